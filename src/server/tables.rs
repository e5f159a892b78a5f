//! The catalog and the route table: the configured files, or the bundled
//! SendGrid ones, compiled (a bad file is a start-up error naming its line),
//! and their text, which the decision feed serves.

use std::path::Path;
use std::sync::Arc;

use super::{ServerError, io_error};
use crate::config::ServeConfig;
use crate::domain::catalog::{Catalog, SENDGRID_CATALOG};
use crate::domain::route::{RouteTable, SENDGRID_ROUTES};
use crate::grpc::feed::Tables;

/// A compiled catalog, routes against it, and both texts.
type Loaded = (Arc<Catalog>, Arc<RouteTable>, Arc<Tables>);

/// The catalog and routes (configured files, or the bundled SendGrid
/// ones), compiled, and their text for the decision feed.
pub(super) fn load_tables(config: &ServeConfig) -> Result<Loaded, ServerError> {
    let (catalog_source, catalog_text) = match &config.catalog {
        Some(path) => (path.display().to_string(), read(path)?),
        None => (
            "<bundled sendgrid.catalog>".to_owned(),
            SENDGRID_CATALOG.to_owned(),
        ),
    };
    let (routes_source, routes_text) = match &config.routes {
        Some(path) => (path.display().to_string(), read(path)?),
        None => (
            "<bundled sendgrid.routes>".to_owned(),
            SENDGRID_ROUTES.to_owned(),
        ),
    };
    let catalog = Arc::new(Catalog::parse(&catalog_source, &catalog_text)?);
    let routes = Arc::new(RouteTable::parse(&routes_source, &routes_text, &catalog)?);
    let tables = Arc::new(Tables {
        catalog_source,
        catalog: catalog_text,
        routes_source,
        routes: routes_text,
    });
    Ok((catalog, routes, tables))
}

fn read(path: &Path) -> Result<String, ServerError> {
    std::fs::read_to_string(path).map_err(io_error(path))
}
