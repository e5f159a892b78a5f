//! Least privilege among keys of one account (the outside review's items):
//! a key changes only keys whose scopes it holds, a revoked caller gets no
//! later write acknowledged, and RenameKey discloses no more than PATCH.
#![allow(
    clippy::too_many_lines,
    reason = "one end-to-end story reads best in one test"
)]

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{TestServer, assert_status, bearer};
use keyward::pb::v1 as pb;
use tonic::Code;

const MANAGER: &[&str] = &[
    "api_keys.create",
    "api_keys.read",
    "api_keys.update",
    "api_keys.delete",
    "alerts.read",
];

#[tokio::test]
async fn a_key_changes_only_keys_whose_scopes_it_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (_, manager) = server.create_key("acme", MANAGER).await;
    let (mailer_id, mailer) = server.create_key("acme", &["mail.send"]).await;
    let (billing_id, _) = server.create_key("acme", &["billing.read"]).await;
    let (peer_id, _) = server.create_key("acme", &["alerts.read"]).await;
    let mut client = server.manager().await;

    for (id, lacks) in [(&mailer_id, "mail.send"), (&billing_id, "billing.read")] {
        assert_status(
            client
                .rename_key(bearer(
                    &manager,
                    pb::RenameKeyRequest {
                        key_id: id.clone(),
                        name: "renamed".into(),
                    },
                ))
                .await,
            Code::PermissionDenied,
            lacks,
        );
        assert_status(
            client
                .update_key(bearer(
                    &manager,
                    pb::UpdateKeyRequest {
                        key_id: id.clone(),
                        name: "narrowed".into(),
                        scopes: vec!["alerts.read".into()],
                        ..Default::default()
                    },
                ))
                .await,
            Code::PermissionDenied,
            lacks,
        );
        assert_status(
            client
                .delete_key(bearer(
                    &manager,
                    pb::DeleteKeyRequest { key_id: id.clone() },
                ))
                .await,
            Code::PermissionDenied,
            lacks,
        );
    }
    // Nothing changed: the sibling keeps its name, scopes and access.
    let mailer_key = client
        .get_key(bearer(
            &server.admin,
            pb::GetKeyRequest {
                key_id: mailer_id.clone(),
            },
        ))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(mailer_key.scopes, vec!["mail.send"]);
    assert_eq!(mailer_key.name, "test key in acme");
    assert!(
        server
            .authorize(&mailer, "POST", "/v3/mail/send")
            .await
            .allowed
    );

    // A sibling within the caller's scopes can be changed and revoked.
    client
        .rename_key(bearer(
            &manager,
            pb::RenameKeyRequest {
                key_id: peer_id.clone(),
                name: "peer".into(),
            },
        ))
        .await
        .expect("rename a peer");
    client
        .delete_key(bearer(&manager, pb::DeleteKeyRequest { key_id: peer_id }))
        .await
        .expect("delete a peer");
    // The admin token is not limited.
    client
        .delete_key(bearer(
            &server.admin,
            pb::DeleteKeyRequest { key_id: mailer_id },
        ))
        .await
        .expect("admin deletes");
}

#[tokio::test]
async fn rename_returns_only_id_and_name_to_a_caller_that_cannot_read_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (_, updater) = server
        .create_key("acme", &["api_keys.update", "alerts.read"])
        .await;
    let (_, reader) = server
        .create_key("acme", &["api_keys.update", "api_keys.read", "alerts.read"])
        .await;
    let (target, _) = server.create_key("acme", &["alerts.read"]).await;
    let mut client = server.manager().await;
    let rename = |token: &str, name: &str| {
        bearer(
            token,
            pb::RenameKeyRequest {
                key_id: target.clone(),
                name: name.into(),
            },
        )
    };
    let reply = client
        .rename_key(rename(&updater, "by updater"))
        .await
        .expect("rename")
        .into_inner();
    assert_eq!(reply.key_id, target);
    assert_eq!(reply.name, "by updater");
    assert!(reply.scopes.is_empty(), "no scopes disclosed: {reply:?}");
    assert!(reply.account_id.is_empty() && reply.created_at.is_none());
    let reply = client
        .rename_key(rename(&reader, "by reader"))
        .await
        .expect("rename")
        .into_inner();
    assert_eq!(
        reply.scopes,
        vec!["alerts.read"],
        "a reader sees the record"
    );
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// A key creating keys as fast as it can while the admin revokes it: no key
/// it creates may be committed after its revocation was acknowledged.
#[tokio::test]
async fn a_revoked_caller_gets_no_later_write_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = keyward::config::ServeConfig::with_data_dir(dir.path().join("data"));
    config.max_keys_per_account = 100_000;
    let server = Arc::new(TestServer::start_with(config).await);
    for round in 0..10 {
        let account = format!("acct{round}");
        let (caller_id, caller) = server.create_key(&account, MANAGER).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let (server, caller, stop) =
                    (Arc::clone(&server), caller.clone(), Arc::clone(&stop));
                tokio::spawn(async move {
                    let mut client = server.manager().await;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let _ = client
                            .create_key(bearer(
                                &caller,
                                pb::CreateKeyRequest {
                                    name: "child".into(),
                                    scopes: vec!["alerts.read".into()],
                                    ..Default::default()
                                },
                            ))
                            .await;
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(30)).await;
        server
            .manager()
            .await
            .delete_key(bearer(
                &server.admin,
                pb::DeleteKeyRequest {
                    key_id: caller_id.clone(),
                },
            ))
            .await
            .expect("revoke");
        let acknowledged_at = now_nanos();
        tokio::time::sleep(Duration::from_millis(30)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for worker in workers {
            worker.await.expect("worker");
        }
        let children = server.list(&account).await;
        assert!(
            !children.is_empty(),
            "round {round}: the caller created keys before"
        );
        for child in children {
            let created = child.created_at.expect("created_at");
            let nanos = created.seconds * 1_000_000_000 + i64::from(created.nanos);
            assert!(
                nanos < acknowledged_at,
                "round {round}: {} committed {} µs after its creator's revocation was acknowledged",
                child.key_id,
                (nanos - acknowledged_at) / 1000
            );
        }
    }
}
