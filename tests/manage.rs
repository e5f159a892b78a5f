//! KeyManager over a real loopback server: every rule and bad input.
#![allow(
    clippy::too_many_lines,
    reason = "one end-to-end story reads best in one test"
)]

mod common;

use std::collections::HashMap;

use common::{TestServer, assert_status, bearer};
use keyward::config::ServeConfig;
use keyward::pb::v1 as pb;
use tonic::{Code, Request};

fn create(name: &str, scopes: &[&str], account: &str) -> pb::CreateKeyRequest {
    pb::CreateKeyRequest {
        name: name.to_owned(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        access: HashMap::new(),
        account_id: account.to_owned(),
        expires_at: None,
        allowed_cidrs: Vec::new(),
        rate_limit: None,
        credits: None,
    }
}

#[tokio::test]
async fn credentials_are_required() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let mut client = server.manager().await;
    assert_status(
        client
            .get_scopes(Request::new(pb::GetScopesRequest {}))
            .await,
        Code::Unauthenticated,
        "missing bearer credential",
    );
    for token in [
        "",
        "not-a-key",
        "SG.AAAAAAAAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let result = client
            .get_scopes(bearer(token, pb::GetScopesRequest {}))
            .await;
        assert_eq!(
            result.expect_err(token).code(),
            Code::Unauthenticated,
            "{token:?}"
        );
    }
    // The admin token's near-misses are not the admin token.
    let near = format!("{}x", server.admin);
    assert_status(
        client
            .list_catalog(bearer(&near, pb::ListCatalogRequest {}))
            .await,
        Code::Unauthenticated,
        "invalid",
    );
}

#[tokio::test]
async fn admin_creates_full_access_keys_and_the_secret_is_shown_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let mut client = server.manager().await;
    let response = client
        .create_key(bearer(&server.admin, create("full", &[], "acme")))
        .await
        .expect("created")
        .into_inner();
    let key = response.key.expect("key");
    assert_eq!(key.kind, pb::KeyKind::FullAccess as i32);
    assert_eq!(key.scopes.len(), 198, "every scope but billing's four");
    assert!(!key.scopes.iter().any(|s| s.starts_with("billing.")));
    assert_eq!(response.secret.len(), 69);
    assert!(response.secret.starts_with(&format!("SG.{}.", key.key_id)));

    let fetched = client
        .get_key(bearer(
            &server.admin,
            pb::GetKeyRequest {
                key_id: key.key_id.clone(),
            },
        ))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(fetched, key);
    assert!(!format!("{fetched:?}").contains(&response.secret[26..]));

    // A key reads its own scopes.
    let scopes = client
        .get_scopes(bearer(&response.secret, pb::GetScopesRequest {}))
        .await
        .expect("scopes")
        .into_inner()
        .scopes;
    assert_eq!(scopes, key.scopes);
}

#[tokio::test]
async fn access_levels_and_aliases_grant_canonical_scopes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let mut client = server.manager().await;
    let mut request = create("levels", &[], "acme");
    request.access = HashMap::from([
        ("alerts".to_owned(), pb::AccessLevel::Read as i32),
        ("mail".to_owned(), pb::AccessLevel::Full as i32),
        ("stats".to_owned(), pb::AccessLevel::None as i32),
    ]);
    let key = client
        .create_key(bearer(&server.admin, request))
        .await
        .expect("created")
        .into_inner()
        .key
        .expect("key");
    assert_eq!(key.kind, pb::KeyKind::RestrictedAccess as i32);
    assert_eq!(
        key.scopes,
        vec![
            "alerts.read",
            "mail.batch.create",
            "mail.batch.delete",
            "mail.batch.read",
            "mail.batch.update",
            "mail.send"
        ]
    );

    let legacy = client
        .create_key(bearer(
            &server.admin,
            create("legacy", &["suppressions.read"], "acme"),
        ))
        .await
        .expect("alias accepted")
        .into_inner()
        .key
        .expect("key");
    assert_eq!(legacy.scopes, vec!["suppression.read"]);

    let billing = client
        .create_key(bearer(
            &server.admin,
            create("billing", &["billing.read", "billing.update"], "acme"),
        ))
        .await
        .expect("billing")
        .into_inner()
        .key
        .expect("key");
    assert_eq!(billing.kind, pb::KeyKind::Billing as i32);
}

#[tokio::test]
async fn bad_create_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let mut client = server.manager().await;
    let level = |category: &str, level: i32| {
        let mut request = create("k", &[], "acme");
        request.access = HashMap::from([(category.to_owned(), level)]);
        request
    };
    let mut both = create("k", &["mail.send"], "acme");
    both.access = HashMap::from([("alerts".to_owned(), pb::AccessLevel::Read as i32)]);
    let ten_thousand: Vec<String> = (0..10_000).map(|i| format!("s{i}.read")).collect();
    let cases: Vec<(pb::CreateKeyRequest, &str)> = vec![
        (create("", &["mail.send"], "acme"), "name: required"),
        (create("   ", &["mail.send"], "acme"), "name: required"),
        (
            create(&"n".repeat(101), &["mail.send"], "acme"),
            "name: at most 100",
        ),
        (
            create("bad\u{7}name", &["mail.send"], "acme"),
            "name: must not contain control",
        ),
        (
            create("k", &["mail.fly"], "acme"),
            "scopes: unknown scope \"mail.fly\"",
        ),
        (
            create("k", &["mail.send", "mail.send"], "acme"),
            "scopes: duplicate scope",
        ),
        (
            create("k", &["billing.read", "mail.send"], "acme"),
            "Billing scopes can never be combined",
        ),
        (create("k", &["mail.send"], ""), "account_id: required"),
        (
            create("k", &["mail.send"], "bad account"),
            "account_id: must be",
        ),
        (
            create("k", &["mail.send"], &"a".repeat(65)),
            "account_id: must be",
        ),
        (
            pb::CreateKeyRequest {
                scopes: ten_thousand,
                ..create("k", &[], "acme")
            },
            "scopes: at most 1024",
        ),
        (both, "either scopes or access"),
        (
            level("nope", pb::AccessLevel::Read as i32),
            "access: unknown category",
        ),
        (
            level("marketing_campaigns", pb::AccessLevel::Read as i32),
            "offers none, full, not read",
        ),
        (
            level("alerts", pb::AccessLevel::Unspecified as i32),
            "level must be",
        ),
        (level("alerts", 99), "level must be"),
        (
            level("alerts", pb::AccessLevel::None as i32),
            "access: grants no scope",
        ),
        (level("billing", pb::AccessLevel::Full as i32), "__ok__"),
    ];
    for (request, needle) in cases {
        let label = needle.to_owned();
        let result = client.create_key(bearer(&server.admin, request)).await;
        if needle == "__ok__" {
            result.expect("a billing-only access map is fine");
            continue;
        }
        assert_status(result, Code::InvalidArgument, needle);
        assert_eq!(
            server.count("acme").await,
            0,
            "{label}: nothing was created"
        );
    }
}

#[tokio::test]
async fn keys_manage_keys_only_within_their_scopes_and_account() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let mut client = server.manager().await;
    let (_, manager) = server
        .create_key(
            "acme",
            &[
                "api_keys.create",
                "api_keys.read",
                "mail.send",
                "alerts.read",
            ],
        )
        .await;
    let (_, sender) = server.create_key("acme", &["mail.send"]).await;
    let (other_id, _) = server.create_key("globex", &["mail.send"]).await;

    // A subset of its own scopes: fine, in its own account.
    let created = client
        .create_key(bearer(&manager, create("child", &["mail.send"], "")))
        .await
        .expect("subset grant")
        .into_inner()
        .key
        .expect("key");
    assert_eq!(created.account_id, "acme");

    // More than it holds: PERMISSION_DENIED naming exactly what it lacks.
    assert_status(
        client
            .create_key(bearer(
                &manager,
                create("greedy", &["mail.send", "alerts.create"], ""),
            ))
            .await,
        Code::PermissionDenied,
        "does not hold: alerts.create",
    );
    assert_status(
        client
            .create_key(bearer(&manager, create("full", &[], "")))
            .await,
        Code::PermissionDenied,
        "does not hold",
    );
    // Without api_keys.create at all.
    assert_status(
        client
            .create_key(bearer(&sender, create("x", &["mail.send"], "")))
            .await,
        Code::PermissionDenied,
        "api_keys.create",
    );
    assert_status(
        client
            .list_keys(bearer(&sender, pb::ListKeysRequest::default()))
            .await,
        Code::PermissionDenied,
        "api_keys.read",
    );
    // Another account: refused, and other accounts' keys are invisible.
    assert_status(
        client
            .create_key(bearer(&manager, create("x", &["mail.send"], "globex")))
            .await,
        Code::PermissionDenied,
        "own account",
    );
    assert_status(
        client
            .get_key(bearer(&manager, pb::GetKeyRequest { key_id: other_id }))
            .await,
        Code::NotFound,
        "not found",
    );
    let listed = client
        .list_keys(bearer(&manager, pb::ListKeysRequest::default()))
        .await
        .expect("own list")
        .into_inner();
    assert_eq!(listed.keys.len(), 3);
    assert!(listed.keys.iter().all(|k| k.account_id == "acme"));
    assert_eq!(server.count("acme").await, 3, "refusals created nothing");
}

#[tokio::test]
async fn the_key_limit_is_enforced_per_account() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.max_keys_per_account = 3;
    let server = TestServer::start_with(config).await;
    let mut client = server.manager().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(server.create_key("acme", &["mail.send"]).await.0);
    }
    assert_status(
        client
            .create_key(bearer(
                &server.admin,
                create("fourth", &["mail.send"], "acme"),
            ))
            .await,
        Code::ResourceExhausted,
        "already has 3 keys",
    );
    assert_eq!(server.count("acme").await, 3);
    server.create_key("globex", &["mail.send"]).await; // other accounts are unaffected
    client
        .delete_key(bearer(
            &server.admin,
            pb::DeleteKeyRequest {
                key_id: ids[0].clone(),
            },
        ))
        .await
        .expect("delete");
    server.create_key("acme", &["mail.send"]).await; // room again
}

#[tokio::test]
async fn update_replaces_scopes_and_takes_effect_on_the_next_decision() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let mut client = server.manager().await;
    let (key_id, secret) = server
        .create_key("acme", &["mail.send", "alerts.read"])
        .await;
    assert!(
        server
            .authorize(&secret, "POST", "/v3/mail/send")
            .await
            .allowed
    );

    let updated = client
        .update_key(bearer(
            &server.admin,
            pb::UpdateKeyRequest {
                key_id: key_id.clone(),
                name: "narrowed".into(),
                scopes: vec!["alerts.read".into()],
                access: HashMap::new(),
            },
        ))
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.scopes, vec!["alerts.read"]);
    assert_eq!(updated.name, "narrowed");
    let reply = server.authorize(&secret, "POST", "/v3/mail/send").await;
    assert!(!reply.allowed, "narrowed at once");
    assert_eq!(reply.missing_scopes, vec!["mail.send"]);

    // PUT needs the scopes; PATCH (rename) keeps them.
    assert_status(
        client
            .update_key(bearer(
                &server.admin,
                pb::UpdateKeyRequest {
                    key_id: key_id.clone(),
                    name: "x".into(),
                    ..Default::default()
                },
            ))
            .await,
        Code::InvalidArgument,
        "scopes: required",
    );
    let renamed = client
        .rename_key(bearer(
            &server.admin,
            pb::RenameKeyRequest {
                key_id: key_id.clone(),
                name: "renamed".into(),
            },
        ))
        .await
        .expect("rename")
        .into_inner();
    assert_eq!(renamed.name, "renamed");
    assert_eq!(renamed.scopes, vec!["alerts.read"]);
    assert_status(
        client
            .rename_key(bearer(
                &server.admin,
                pb::RenameKeyRequest {
                    key_id: key_id.clone(),
                    name: String::new(),
                },
            ))
            .await,
        Code::InvalidArgument,
        "name: required",
    );
    assert_status(
        client
            .update_key(bearer(
                &server.admin,
                pb::UpdateKeyRequest {
                    key_id: key_id.clone(),
                    name: "mixed".into(),
                    scopes: vec!["billing.read".into(), "alerts.read".into()],
                    access: HashMap::new(),
                },
            ))
            .await,
        Code::InvalidArgument,
        "never be combined",
    );
    let unchanged = client
        .get_key(bearer(&server.admin, pb::GetKeyRequest { key_id }))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(unchanged.name, "renamed");
    assert_eq!(unchanged.scopes, vec!["alerts.read"]);
}

#[tokio::test]
async fn a_key_cannot_update_beyond_its_own_scopes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let mut client = server.manager().await;
    let (_, updater) = server
        .create_key("acme", &["api_keys.update", "mail.send"])
        .await;
    let (target, _) = server.create_key("acme", &["mail.send"]).await;
    assert_status(
        client
            .update_key(bearer(
                &updater,
                pb::UpdateKeyRequest {
                    key_id: target,
                    name: "up".into(),
                    scopes: vec!["mail.send".into(), "alerts.read".into()],
                    access: HashMap::new(),
                },
            ))
            .await,
        Code::PermissionDenied,
        "alerts.read",
    );
}

#[tokio::test]
async fn delete_revokes_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let mut client = server.manager().await;
    let (key_id, secret) = server.create_key("acme", &["mail.send"]).await;
    assert!(
        server
            .authorize(&secret, "POST", "/v3/mail/send")
            .await
            .allowed
    );
    client
        .delete_key(bearer(
            &server.admin,
            pb::DeleteKeyRequest {
                key_id: key_id.clone(),
            },
        ))
        .await
        .expect("delete");
    let reply = server.authorize(&secret, "POST", "/v3/mail/send").await;
    assert_eq!(reply.reason, pb::DenyReason::UnknownKey as i32);
    assert_eq!(reply.http_status, 401);
    assert_status(
        client
            .get_scopes(bearer(&secret, pb::GetScopesRequest {}))
            .await,
        Code::Unauthenticated,
        "revoked",
    );
    assert_status(
        client
            .delete_key(bearer(
                &server.admin,
                pb::DeleteKeyRequest {
                    key_id: key_id.clone(),
                },
            ))
            .await,
        Code::NotFound,
        &key_id,
    );
    for bad in ["", "short", "!!!!!!!!!!!!!!!!!!!!!!"] {
        let result = client
            .delete_key(bearer(
                &server.admin,
                pb::DeleteKeyRequest { key_id: bad.into() },
            ))
            .await;
        assert_status(result, Code::InvalidArgument, "key_id");
    }
}

#[tokio::test]
async fn list_pages_in_a_stable_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let mut client = server.manager().await;
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(server.create_key("acme", &["mail.send"]).await.0);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_keys(bearer(
                &server.admin,
                pb::ListKeysRequest {
                    account_id: "acme".into(),
                    page_size: 2,
                    page_token: token,
                    unused_for: None,
                },
            ))
            .await
            .expect("page")
            .into_inner();
        pages += 1;
        assert!(page.keys.len() <= 2);
        seen.extend(page.keys.into_iter().map(|k| k.key_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        seen, created,
        "creation order, no duplicates, nothing missed"
    );
    assert_eq!(pages, 3);

    assert_status(
        client
            .list_keys(bearer(
                &server.admin,
                pb::ListKeysRequest {
                    account_id: "acme".into(),
                    page_size: 2,
                    page_token: "garbage".into(),
                    unused_for: None,
                },
            ))
            .await,
        Code::InvalidArgument,
        "page_token",
    );
    assert_status(
        client
            .list_keys(bearer(
                &server.admin,
                pb::ListKeysRequest {
                    account_id: "acme".into(),
                    page_size: -1,
                    page_token: String::new(),
                    unused_for: None,
                },
            ))
            .await,
        Code::InvalidArgument,
        "page_size",
    );
    assert_status(
        client
            .list_keys(bearer(&server.admin, pb::ListKeysRequest::default()))
            .await,
        Code::InvalidArgument,
        "account_id",
    );
}

#[tokio::test]
async fn catalog_lists_categories_levels_and_aliases() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (_, secret) = server.create_key("acme", &["mail.send"]).await;
    let catalog = server
        .manager()
        .await
        .list_catalog(bearer(&secret, pb::ListCatalogRequest {}))
        .await
        .expect("catalog")
        .into_inner();
    let billing = catalog
        .categories
        .iter()
        .find(|c| c.id == "billing")
        .expect("billing");
    assert!(billing.exclusive);
    let campaigns = catalog
        .categories
        .iter()
        .find(|c| c.id == "marketing_campaigns")
        .expect("mc");
    assert_eq!(
        campaigns.levels,
        vec![pb::AccessLevel::None as i32, pb::AccessLevel::Full as i32]
    );
    assert_eq!(
        catalog.aliases.get("suppressions.read").map(String::as_str),
        Some("suppression.read")
    );
    let admin_scopes = server
        .manager()
        .await
        .get_scopes(bearer(&server.admin, pb::GetScopesRequest {}))
        .await
        .expect("admin scopes")
        .into_inner()
        .scopes;
    assert_eq!(admin_scopes.len(), 202);
}
