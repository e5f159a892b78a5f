//! Least privilege over lifecycle limits: a key's expiry, allowlist and
//! rate limit bind it wherever it authenticates, and nothing it creates or
//! changes ends up less restricted than itself; the admin's disable holds.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use common::{TestServer, assert_status, bearer, rest_call};
use keyward::config::ServeConfig;
use keyward::pb::v1 as pb;
use tonic::Code;

fn in_future(from_now: Duration) -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now() + from_now)
}

fn rate(requests: u32, seconds: i64) -> pb::RateLimit {
    pb::RateLimit {
        requests,
        period: Some(prost_types::Duration { seconds, nanos: 0 }),
        burst: 0,
    }
}

const MANAGER: [&str; 5] = [
    "api_keys.create",
    "api_keys.read",
    "api_keys.update",
    "api_keys.delete",
    "mail.send",
];

/// A manager key with a 1 h expiry, a loopback allowlist and 100 req/s.
async fn restricted_manager(server: &TestServer) -> (String, String) {
    server
        .create(pb::CreateKeyRequest {
            name: "restricted".into(),
            scopes: MANAGER.map(String::from).to_vec(),
            account_id: "acme".into(),
            expires_at: Some(in_future(Duration::from_secs(3600))),
            allowed_cidrs: vec!["127.0.0.0/8".into()],
            rate_limit: Some(rate(100, 1)),
            ..Default::default()
        })
        .await
}

async fn set_expiry(
    server: &TestServer,
    credential: &str,
    key_id: &str,
    expires_at: Option<prost_types::Timestamp>,
) -> Result<(), tonic::Status> {
    let request = pb::SetKeyExpiryRequest {
        key_id: key_id.into(),
        expires_at,
    };
    let mut manager = server.manager().await;
    manager.set_key_expiry(bearer(credential, request)).await?;
    Ok(())
}

async fn set_allowlist(
    server: &TestServer,
    credential: &str,
    key_id: &str,
    cidrs: &[&str],
) -> Result<(), tonic::Status> {
    let request = pb::SetKeyAllowlistRequest {
        key_id: key_id.into(),
        allowed_cidrs: cidrs.iter().map(|c| (*c).to_owned()).collect(),
    };
    let mut manager = server.manager().await;
    manager
        .set_key_allowlist(bearer(credential, request))
        .await?;
    Ok(())
}

async fn set_rate_limit(
    server: &TestServer,
    credential: &str,
    key_id: &str,
    rate_limit: Option<pb::RateLimit>,
) -> Result<(), tonic::Status> {
    let request = pb::SetKeyRateLimitRequest {
        key_id: key_id.into(),
        rate_limit,
    };
    let mut manager = server.manager().await;
    manager
        .set_key_rate_limit(bearer(credential, request))
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_key_may_tighten_its_limits_never_loosen_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (id, secret) = restricted_manager(&server).await;
    let later = in_future(Duration::from_secs(7200));
    for (result, field) in [
        (set_expiry(&server, &secret, &id, None).await, "expires_at"),
        (
            set_expiry(&server, &secret, &id, Some(later)).await,
            "expires_at",
        ),
        (
            set_allowlist(&server, &secret, &id, &[]).await,
            "allowed_cidrs",
        ),
        (
            set_allowlist(&server, &secret, &id, &["0.0.0.0/0"]).await,
            "allowed_cidrs",
        ),
        (
            set_rate_limit(&server, &secret, &id, None).await,
            "rate_limit",
        ),
        (
            set_rate_limit(&server, &secret, &id, Some(rate(1000, 1))).await,
            "rate_limit",
        ),
    ] {
        assert_status(result, Code::PermissionDenied, field);
    }
    // Tightening is fine.
    let sooner = in_future(Duration::from_secs(1800));
    set_expiry(&server, &secret, &id, Some(sooner))
        .await
        .expect("an earlier expiry");
    set_rate_limit(&server, &secret, &id, Some(rate(10, 1)))
        .await
        .expect("a lower rate");
    // The admin may loosen.
    set_allowlist(&server, &server.admin, &id, &[])
        .await
        .expect("the admin lifts the allowlist");
}

#[tokio::test]
async fn a_child_inherits_its_creators_limits_and_cannot_exceed_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (parent_id, secret) = restricted_manager(&server).await;
    let mut manager = server.manager().await;
    let child = |request: pb::CreateKeyRequest| {
        bearer(
            &secret,
            pb::CreateKeyRequest {
                name: "child".into(),
                scopes: vec!["mail.send".into()],
                ..request
            },
        )
    };
    let created = manager
        .create_key(child(pb::CreateKeyRequest::default()))
        .await
        .expect("a child with nothing set")
        .into_inner()
        .key
        .expect("key");
    let parent = manager
        .get_key(bearer(&secret, pb::GetKeyRequest { key_id: parent_id }))
        .await
        .expect("own key")
        .into_inner();
    assert_eq!(
        created.expires_at, parent.expires_at,
        "the creator's expiry"
    );
    assert_eq!(created.allowed_cidrs, vec!["127.0.0.0/8".to_owned()]);
    assert_eq!(created.rate_limit, parent.rate_limit);
    for (request, field) in [
        (
            pb::CreateKeyRequest {
                expires_at: Some(in_future(Duration::from_secs(7200))),
                ..Default::default()
            },
            "expires_at",
        ),
        (
            pb::CreateKeyRequest {
                allowed_cidrs: vec!["10.0.0.0/8".into()],
                ..Default::default()
            },
            "allowed_cidrs",
        ),
        (
            pb::CreateKeyRequest {
                rate_limit: Some(rate(1000, 1)),
                ..Default::default()
            },
            "rate_limit",
        ),
    ] {
        assert_status(
            manager.create_key(child(request)).await,
            Code::PermissionDenied,
            field,
        );
    }
    // Within bounds: accepted as asked.
    let narrower = manager
        .create_key(child(pb::CreateKeyRequest {
            allowed_cidrs: vec!["127.0.0.1".into()],
            rate_limit: Some(rate(5, 1)),
            ..Default::default()
        }))
        .await
        .expect("narrower")
        .into_inner()
        .key
        .expect("key");
    assert_eq!(narrower.allowed_cidrs, vec!["127.0.0.1/32".to_owned()]);
    assert_eq!(server.count("acme").await, 3);
}

#[tokio::test]
async fn the_admins_disable_holds_and_rotation_cannot_escape_limits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (target, _) = server.create_key("acme", &["mail.send"]).await;
    let (_, sibling) = server.create_key("acme", &MANAGER).await;
    let mut manager = server.manager().await;
    let disable = |credential: &str| {
        bearer(
            credential,
            pb::DisableKeyRequest {
                key_id: target.clone(),
            },
        )
    };
    let enable = |credential: &str| {
        bearer(
            credential,
            pb::EnableKeyRequest {
                key_id: target.clone(),
            },
        )
    };
    manager
        .disable_key(disable(&server.admin))
        .await
        .expect("admin");
    assert_status(
        manager.enable_key(enable(&sibling)).await,
        Code::PermissionDenied,
        "only the admin",
    );
    manager
        .enable_key(enable(&server.admin))
        .await
        .expect("admin");
    // A disable by a key may be lifted by a key.
    manager.disable_key(disable(&sibling)).await.expect("key");
    manager.enable_key(enable(&sibling)).await.expect("key");

    // A restricted key rotating an unrestricted sibling would hold a
    // working secret with none of its own limits.
    let (_, restricted) = restricted_manager(&server).await;
    assert_status(
        manager
            .rotate_key(bearer(
                &restricted,
                pb::RotateKeyRequest {
                    key_id: target.clone(),
                    overlap: None,
                },
            ))
            .await,
        Code::PermissionDenied,
        "less restricted",
    );
}

#[tokio::test]
async fn a_keys_allowlist_binds_its_management_calls_through_both_front_doors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let server = TestServer::start_with(config).await;
    let (_, elsewhere) = server
        .create(pb::CreateKeyRequest {
            name: "office only".into(),
            scopes: MANAGER.map(String::from).to_vec(),
            account_id: "acme".into(),
            allowed_cidrs: vec!["10.0.0.0/8".into()],
            ..Default::default()
        })
        .await;
    let (_, here) = restricted_manager(&server).await;
    let mut manager = server.manager().await;
    let scopes = |credential: &str| bearer(credential, pb::GetScopesRequest {});
    assert_status(
        manager.get_scopes(scopes(&elsewhere)).await,
        Code::Unauthenticated,
        "allowlist",
    );
    manager
        .get_scopes(scopes(&here))
        .await
        .expect("from an allowed address");
    let rest = server.http_addr.expect("rest");
    for (credential, status) in [(&elsewhere, 401), (&here, 200)] {
        let auth = format!("Bearer {credential}");
        let (got, json) =
            rest_call(rest, "GET", "/v3/scopes", &[("authorization", &auth)], "").await;
        assert_eq!(got, status, "{json}");
    }
}

/// What a change answers to a caller without `api_keys.read`: the key's id
/// and name, as RenameKey always did, never its scopes, account or limits.
#[tokio::test]
async fn changes_show_a_key_only_to_a_caller_that_may_read_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (peer, _) = server.create_key("acme", &["mail.send"]).await;
    let (_, writer) = server
        .create_key("acme", &["api_keys.create", "api_keys.update", "mail.send"])
        .await;
    let mut manager = server.manager().await;
    let rotated = manager
        .rotate_key(bearer(
            &writer,
            pb::RotateKeyRequest {
                key_id: peer.clone(),
                overlap: None,
            },
        ))
        .await
        .expect("rotated")
        .into_inner();
    let disabled = manager
        .disable_key(bearer(
            &writer,
            pb::DisableKeyRequest {
                key_id: peer.clone(),
            },
        ))
        .await
        .expect("disabled")
        .into_inner();
    for key in [rotated.key.expect("key"), disabled] {
        assert_eq!(key.key_id, peer);
        assert!(
            key.scopes.is_empty() && key.account_id.is_empty(),
            "{key:?}"
        );
    }
    assert!(
        rotated.secret.starts_with("SG."),
        "the new secret is the point"
    );
}
