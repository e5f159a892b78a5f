//! Durability: restarts keep every acknowledged change, and a changed
//! catalog never changes what a stored key may do.

mod common;

use std::collections::HashMap;

use common::{TestServer, bearer};
use keyward::config::ServeConfig;
use keyward::pb::v1 as pb;
use keyward::server::App;

#[tokio::test]
async fn a_restart_keeps_every_key_update_and_revocation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let admin = server.admin.clone();
    let (kept_id, kept) = server.create_key("acme", &["mail.send"]).await;
    let (narrowed_id, narrowed) = server
        .create_key("acme", &["mail.send", "alerts.read"])
        .await;
    let (revoked_id, revoked) = server.create_key("globex", &["mail.send"]).await;
    let mut client = server.manager().await;
    client
        .update_key(bearer(
            &admin,
            pb::UpdateKeyRequest {
                key_id: narrowed_id.clone(),
                name: "narrowed".into(),
                scopes: vec!["alerts.read".into()],
                access: HashMap::new(),
            },
        ))
        .await
        .expect("update");
    client
        .delete_key(bearer(&admin, pb::DeleteKeyRequest { key_id: revoked_id }))
        .await
        .expect("delete");
    let before = client
        .get_key(bearer(
            &admin,
            pb::GetKeyRequest {
                key_id: kept_id.clone(),
            },
        ))
        .await
        .expect("get")
        .into_inner();
    let config = server.stop().await;

    let server = TestServer::start_with(config).await;
    assert_eq!(server.admin, admin, "the admin token survives restarts");
    let after = server
        .manager()
        .await
        .get_key(bearer(&admin, pb::GetKeyRequest { key_id: kept_id }))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(after, before);
    assert!(
        server
            .authorize(&kept, "POST", "/v3/mail/send")
            .await
            .allowed
    );
    let reply = server.authorize(&narrowed, "POST", "/v3/mail/send").await;
    assert_eq!(reply.missing_scopes, vec!["mail.send"]);
    assert!(
        server
            .authorize(&narrowed, "GET", "/v3/alerts")
            .await
            .allowed
    );
    let reply = server.authorize(&revoked, "POST", "/v3/mail/send").await;
    assert_eq!(reply.reason, pb::DenyReason::UnknownKey as i32);
    assert_eq!(server.count("acme").await, 2);
    assert_eq!(server.count("globex").await, 0);
}

const CATALOG_V1: &str = "\
[things] Things
levels none read write full
things.read
things.update
[other] Other
other.read
";

// Reordered, with new scopes in front of the old ones.
const CATALOG_V2: &str = "\
[brand_new] Brand new
brand_new.read
brand_new.update
[other] Other
other.read
[things] Things
levels none read write full
things.admin
things.update
things.read
";

const ROUTES_V1: &str = "\
GET   /things        things.read
PUT   /things        things.update
GET   /other         other.read
";

const ROUTES_V2: &str = "\
GET   /things        things.read
PUT   /things        things.update
GET   /other         other.read
GET   /new           brand_new.read
POST  /things/admin  things.admin
";

fn config_with(dir: &tempfile::TempDir, catalog: &str, routes: &str) -> ServeConfig {
    let catalog_path = dir.path().join("catalog");
    let routes_path = dir.path().join("routes");
    std::fs::write(&catalog_path, catalog).expect("write catalog");
    std::fs::write(&routes_path, routes).expect("write routes");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.catalog = Some(catalog_path);
    config.routes = Some(routes_path);
    config
}

#[tokio::test]
async fn a_changed_catalog_never_changes_what_a_stored_key_may_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start_with(config_with(&dir, CATALOG_V1, ROUTES_V1)).await;
    let (key_id, secret) = server.create_key("acme", &["things.update"]).await;
    assert!(server.authorize(&secret, "PUT", "/things").await.allowed);
    assert!(!server.authorize(&secret, "GET", "/things").await.allowed);
    server.stop().await;

    let server = TestServer::start_with(config_with(&dir, CATALOG_V2, ROUTES_V2)).await;
    assert!(
        server.authorize(&secret, "PUT", "/things").await.allowed,
        "kept its scope"
    );
    for (method, path) in [
        ("GET", "/things"),
        ("GET", "/other"),
        ("GET", "/new"),
        ("POST", "/things/admin"),
    ] {
        let reply = server.authorize(&secret, method, path).await;
        assert!(
            !reply.allowed,
            "{method} {path} must stay denied: {reply:?}"
        );
    }
    let key = server
        .manager()
        .await
        .get_key(bearer(&server.admin, pb::GetKeyRequest { key_id }))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(key.scopes, vec!["things.update"]);
}

#[tokio::test]
async fn bad_catalog_and_route_files_fail_startup_with_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            CATALOG_V1,
            "GET /things things.read\nGET /x things.fly\n",
            "routes:2: unknown scope \"things.fly\"",
        ),
        (
            CATALOG_V1,
            "GET /things things.read\nGET /things other.read\n",
            "routes:2: duplicate route",
        ),
        (
            CATALOG_V1,
            "GET /a//b things.read\n",
            "routes:1: bad template",
        ),
        (
            "[a] A\na.read\na.read\n",
            ROUTES_V1,
            "catalog:3: duplicate scope",
        ),
    ];
    for (catalog, routes, needle) in cases {
        let err = App::open(&config_with(&dir, catalog, routes)).expect_err(needle);
        assert!(
            err.to_string().contains(needle),
            "{err} should contain {needle}"
        );
    }
    let mut missing = ServeConfig::with_data_dir(dir.path().join("data"));
    missing.catalog = Some(dir.path().join("no-such-file"));
    let err = App::open(&missing).expect_err("missing file");
    assert!(err.to_string().contains("no-such-file"), "{err}");
}

#[cfg(unix)]
#[tokio::test]
async fn the_admin_token_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let meta = std::fs::metadata(server.config.data.admin_token_path()).expect("token file");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(server.admin.len() >= 32);
    // A short or obviously weak token an operator supplies is refused.
    let open_with = |name: &str, token: &str, mode: u32| {
        let file = dir.path().join(name);
        std::fs::write(&file, token).expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let mut config = ServeConfig::with_data_dir(dir.path().join(format!("{name}.data")));
        config.data.admin_token_file = Some(file);
        App::open(&config)
    };
    for weak in ["short\n", &"a".repeat(32)] {
        let err = open_with("weak.token", weak, 0o600).expect_err("weak token");
        assert!(err.to_string().contains("too weak"), "{err}");
    }
    // A world-readable token file is refused; a Kubernetes Secret mounted
    // with defaultMode 0440 (group-readable through fsGroup) is fine.
    let strong = "Zq8vN1xW4mK7pR2tY5uB9cE3hJ6lO0sA\n";
    let err = open_with("exposed.token", strong, 0o644).expect_err("world-readable");
    assert!(err.to_string().contains("readable by every user"), "{err}");
    open_with("secret.token", strong, 0o440).expect("0440 is fine");
}
