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
