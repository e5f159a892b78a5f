//! The shipped deployment examples are valid keyward configuration.

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
