//! Wiring only: load config, open the store, build the services, serve.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use crate::authorizer::Authorizer;
use crate::config::ServeConfig;
use crate::domain::catalog::{Catalog, SENDGRID_CATALOG};
use crate::domain::key::SecretHash;
use crate::domain::load_error::LoadError;
use crate::domain::route::{RouteTable, SENDGRID_ROUTES};
use crate::envoy::CheckService;
use crate::grpc::authorize::AuthorizeService;
use crate::grpc::manage::ManageService;
use crate::keys::Keys;
use crate::pb;
use crate::store::db::{Store, StoreError};

/// Why keyward could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A catalog or route file is invalid.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A file or directory could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The admin token file holds no usable token.
    #[error("{0}: the admin token must be at least 32 characters")]
    WeakAdminToken(PathBuf),
    /// The store could not be opened or loaded.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The gRPC transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection descriptors are invalid (a build problem).
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
    move |source| ServerError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Everything a running keyward holds: loaded, validated, ready to serve.
#[derive(Debug, Clone)]
pub struct App {
    /// The write path.
    pub keys: Arc<Keys>,
    /// The read path.
    pub authorizer: Authorizer,
    /// The catalog in force.
    pub catalog: Arc<Catalog>,
    admin: SecretHash,
}

impl App {
    /// Loads catalog and routes, opens the store, loads the index and the
    /// admin token (creating the data directory and token if missing).
    pub fn open(config: &ServeConfig) -> Result<Self, ServerError> {
        let catalog = Arc::new(match &config.catalog {
            Some(path) => Catalog::parse(&path.display().to_string(), &read(path)?)?,
            None => Catalog::parse("<bundled sendgrid.catalog>", SENDGRID_CATALOG)?,
        });
        let routes = Arc::new(match &config.routes {
            Some(path) => RouteTable::parse(&path.display().to_string(), &read(path)?, &catalog)?,
            None => RouteTable::parse("<bundled sendgrid.routes>", SENDGRID_ROUTES, &catalog)?,
        });
        let data_dir = &config.data.data_dir;
        create_private_dir(data_dir)?;
        let store = Store::open(&data_dir.join("db"))?;
        let (keys, index) = Keys::open(
            store,
            Arc::clone(&catalog),
            config.max_keys_per_account as usize,
        )?;
        let admin = load_or_create_admin_token(&config.data.admin_token_path())?;
        tracing::info!(
            keys = index.len(),
            scopes = catalog.len(),
            routes = routes.len(),
            data_dir = %data_dir.display(),
            "loaded"
        );
        Ok(Self {
            keys: Arc::new(keys),
            authorizer: Authorizer::new(index, routes),
            catalog,
            admin,
        })
    }
}

/// Serves every keyward service on `listener` until `shutdown` resolves,
/// then flushes the store. Tests call this on `127.0.0.1:0`.
pub async fn run(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    use envoy_types::ext_authz::v3::pb::AuthorizationServer;
    use pb::v1::authorizer_server::AuthorizerServer;
    use pb::v1::key_manager_server::KeyManagerServer;

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AuthorizerServer<AuthorizeService>>()
        .await;
    health_reporter
        .set_serving::<KeyManagerServer<ManageService>>()
        .await;
    health_reporter
        .set_serving::<AuthorizationServer<CheckService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let authorize = AuthorizeService::new(app.authorizer.clone(), Arc::clone(&app.catalog));
    let manage = ManageService::new(Arc::clone(&app.keys), app.authorizer.clone(), app.admin);
    let check = CheckService::new(app.authorizer.clone(), Arc::clone(&app.catalog));
    let local = listener
        .local_addr()
        .map_err(io_error(Path::new("listener")))?;
    tracing::info!(%local, "serving");
    Server::builder()
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(AuthorizerServer::new(authorize))
        .add_service(KeyManagerServer::new(manage))
        .add_service(AuthorizationServer::new(check))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    app.keys.flush().await?;
    tracing::info!("stopped; store flushed");
    Ok(())
}

fn read(path: &Path) -> Result<String, ServerError> {
    std::fs::read_to_string(path).map_err(io_error(path))
}

fn create_private_dir(dir: &Path) -> Result<(), ServerError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io_error(dir))
}

/// Reads the admin token, or creates one (mode 0600) on first start. Only
/// its hash is kept in memory; the token itself is never logged.
fn load_or_create_admin_token(path: &Path) -> Result<SecretHash, ServerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim();
            if token.len() < 32 {
                return Err(ServerError::WeakAdminToken(path.to_owned()));
            }
            tracing::info!(path = %path.display(), "using the admin token file");
            Ok(SecretHash::of(token.as_bytes()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                create_private_dir(parent)?;
            }
            let mut raw = [0u8; 32];
            getrandom::fill(&mut raw).map_err(|e| ServerError::Io {
                path: path.to_owned(),
                source: std::io::Error::other(e.to_string()),
            })?;
            let token = format!("kwadmin_{}", URL_SAFE_NO_PAD.encode(raw));
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(path).map_err(io_error(path))?;
            file.write_all(token.as_bytes())
                .and_then(|()| file.write_all(b"\n"))
                .and_then(|()| file.sync_all())
                .map_err(io_error(path))?;
            tracing::info!(path = %path.display(), "created the admin token file (mode 0600)");
            Ok(SecretHash::of(token.as_bytes()))
        }
        Err(e) => Err(io_error(path)(e)),
    }
}
