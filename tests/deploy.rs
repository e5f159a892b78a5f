//! The shipped deployment examples are valid keyward configuration.

mod common;

use keyward::domain::catalog::Catalog;
use keyward::domain::route::RouteTable;

#[test]
fn the_custom_policy_overlay_example_loads() {
    let catalog = Catalog::parse(
        "k8s/overlays/custom-policy/catalog",
        include_str!("../k8s/overlays/custom-policy/catalog"),
    )
    .expect("example catalog");
    let routes = RouteTable::parse(
        "k8s/overlays/custom-policy/routes",
        include_str!("../k8s/overlays/custom-policy/routes"),
        &catalog,
    )
    .expect("example routes");
    assert_eq!(routes.len(), 7);
}

/// The shipped Deployment exposes only decisions on the pod IP: KeyManager
/// (key management, the admin token's reach) listens on loopback only.
#[test]
fn the_shipped_deployment_serves_key_management_on_loopback_only() {
    let deployment = include_str!("../k8s/base/deployment.yaml");
    let value_of = |name: &str| {
        let at = deployment
            .find(&format!("name: {name}\n"))
            .unwrap_or_else(|| panic!("{name} is set"));
        deployment[at..]
            .lines()
            .nth(1)
            .and_then(|line| line.trim().strip_prefix("value: "))
            .unwrap_or_else(|| panic!("{name} has a value"))
            .to_owned()
    };
    let manage: std::net::SocketAddr = value_of("KEYWARD_MANAGE_LISTEN")
        .parse()
        .expect("an address");
    assert!(manage.ip().is_loopback(), "KeyManager on {manage}");
    assert!(
        deployment.contains("defaultMode: 0440"),
        "the admin token Secret is not world-readable"
    );
}

/// The replicated overlay's keyward settings are ones `keyward serve`
/// accepts (names, values, the store timeout below the request timeout),
/// and with etcd unreachable and an empty replica the sidecar is not ready.
#[tokio::test]
async fn the_replicated_overlay_settings_start_keyward() {
    let overlay = include_str!("../k8s/overlays/replicated/deployment-patch.yaml");
    let lines: Vec<&str> = overlay.lines().map(str::trim).collect();
    let mut env: Vec<(String, String)> = lines
        .windows(2)
        .filter_map(|pair| {
            let name = pair[0].strip_prefix("- name: ")?;
            let value = pair[1].strip_prefix("value: ")?;
            name.starts_with("KEYWARD_")
                .then(|| (name.to_owned(), value.trim_matches('"').to_owned()))
        })
        .collect();
    let names: Vec<&str> = env.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "KEYWARD_ETCD_ENDPOINTS",
        "KEYWARD_ETCD_CA_FILE",
        "KEYWARD_ETCD_CERT_FILE",
        "KEYWARD_ETCD_KEY_FILE",
        "KEYWARD_STORE_TIMEOUT_MS",
        "KEYWARD_REQUEST_TIMEOUT_MS",
        "KEYWARD_MAX_STALENESS",
        "KEYWARD_REPLICA_MODE",
        "KEYWARD_REPLICA_CACHE_KEYS",
    ] {
        assert!(names.contains(&expected), "{expected} is set");
    }
    // Same settings, local stand-ins for the cluster's addresses and files.
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::pki::pki();
    let unreachable = format!("https://127.0.0.1:{}", common::free_port());
    for (name, value) in &mut env {
        let local = |file: &str, pem: &str| {
            let path = dir.path().join(file);
            std::fs::write(&path, pem).expect("write");
            path.display().to_string()
        };
        match name.as_str() {
            "KEYWARD_ETCD_ENDPOINTS" => value.clone_from(&unreachable),
            "KEYWARD_ETCD_CA_FILE" => *value = local("ca.pem", &pki.ca),
            "KEYWARD_ETCD_CERT_FILE" => *value = local("client.pem", &pki.client.0),
            "KEYWARD_ETCD_KEY_FILE" => *value = local("client.key", &pki.client.1),
            _ => {}
        }
    }
    let (mut child, port) = common::spawn_serve_env(
        env!("CARGO_BIN_EXE_keyward"),
        dir.path(),
        &["--data-dir", "data"],
        &env,
    );
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        common::connect(&format!("http://127.0.0.1:{port}")).await,
    );
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "keyward.v1.Authorizer".into(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32,
        "not ready before etcd answers"
    );
}

/// The Envoy-module overlay agrees with itself: the module reads the feed
/// token keyward is told to accept, from the sidecar's loopback management
/// listener (where the feed is served), and Envoy
/// looks for the module where the Containerfile puts it.
#[test]
fn the_envoy_module_overlay_is_consistent() {
    let patch = include_str!("../k8s/overlays/envoy-module/deployment-patch.yaml");
    let envoy = include_str!("../k8s/overlays/envoy-module/envoy.yaml");
    let containerfile = include_str!("../k8s/overlays/envoy-module/Containerfile");
    let base = include_str!("../k8s/base/deployment.yaml");
    let value_after = |text: &str, name: &str| -> String {
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        lines
            .windows(2)
            .find_map(|pair| {
                (pair[0] == format!("- name: {name}"))
                    .then(|| pair[1].strip_prefix("value: ").map(str::to_owned))
                    .flatten()
            })
            .unwrap_or_else(|| panic!("{name} is set"))
    };
    let token = value_after(patch, "KEYWARD_FEED_TOKEN_FILE");
    assert!(
        envoy.contains(&format!(r#""token_file": "{token}""#)),
        "the module reads {token}"
    );
    // The feed is served with key management, on its loopback listener.
    let manage = value_after(base, "KEYWARD_MANAGE_LISTEN");
    assert!(manage.starts_with("127.0.0.1:"), "{manage}");
    assert!(
        envoy.contains(&format!(r#""sidecar": "http://{manage}""#)),
        "the module dials the sidecar's management listener {manage}"
    );
    let search = value_after(patch, "ENVOY_DYNAMIC_MODULES_SEARCH_PATH");
    assert!(
        containerfile.contains(&format!("{search}/libkeyward_envoy.so")),
        "the image holds the module in {search}"
    );
    assert!(envoy.contains("dynamic_module_config: { name: keyward_envoy"));
}

/// The backup CronJob reaches what it needs: the keyward container of the
/// shipped Deployment, its binary where the image puts it, and KeyManager
/// on the loopback address the Deployment gives it.
#[test]
fn the_backup_cronjob_reaches_key_management() {
    let cronjob = include_str!("../k8s/backup/cronjob.yaml");
    let deployment = include_str!("../k8s/base/deployment.yaml");
    let dockerfile = include_str!("../Dockerfile");
    let manage = deployment
        .lines()
        .skip_while(|line| !line.contains("name: KEYWARD_MANAGE_LISTEN"))
        .nth(1)
        .and_then(|line| line.trim().strip_prefix("value: "))
        .expect("KEYWARD_MANAGE_LISTEN is set");
    assert!(
        cronjob.contains(&format!("backup --server http://{manage} --out -")),
        "the job dials KeyManager at {manage}"
    );
    assert!(deployment.contains("  name: app\n") && deployment.contains("- name: keyward\n"));
    assert!(cronjob.contains("kubectl exec deploy/app -c keyward --"));
    assert!(dockerfile.contains("/out/usr/local/bin/keyward"));
    assert!(cronjob.contains("/usr/local/bin/keyward backup"));
    assert!(
        deployment.contains("name: KEYWARD_ADMIN_TOKEN_FILE"),
        "the sidecar's environment names the admin token for the CLI"
    );
}
