//! The sockets keyward serves on: bound before serving (so tests and the
//! log learn the real ports), TCP or, for the main gRPC listener, a Unix
//! domain socket.

use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, UnixListener};

use super::{ServerError, io_error};
use crate::config::{ListenAddr, ServeConfig};
use crate::listen::Incoming;

/// The sockets keyward serves on, bound before serving so that tests (and
/// the log) learn the real ports. Their connections are served within the
/// bounds of [`crate::listen`] (cap, idle timeout, TCP_NODELAY and
/// keepalive).
#[derive(Debug)]
pub struct Listeners {
    /// Authorize, Check, health, reflection (and KeyManager unless separate or disabled).
    pub grpc: GrpcListener,
    /// KeyManager alone, when `--manage-listen` is set.
    pub manage: Option<TcpListener>,
    /// Prometheus metrics, unless disabled.
    pub metrics: Option<TcpListener>,
    /// SendGrid's REST key API, when `--http-listen` is set.
    pub http: Option<TcpListener>,
    pub(super) manage_enabled: bool,
    pub(super) echo_enabled: bool,
}

impl Listeners {
    /// Binds every listener the configuration asks for.
    pub async fn bind(config: &ServeConfig) -> Result<Self, ServerError> {
        let bind = |addr: std::net::SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(io_error(Path::new(&addr.to_string())))
        };
        Ok(Self {
            grpc: match &config.listen {
                ListenAddr::Tcp(addr) => GrpcListener::Tcp(bind(*addr).await?),
                ListenAddr::Unix(path) => bind_unix(path)?,
            },
            manage: match config.manage_listen {
                Some(addr) => Some(bind(addr).await?),
                None => None,
            },
            metrics: if config.disable_metrics {
                None
            } else {
                Some(bind(config.metrics_listen).await?)
            },
            http: match config.http_listen {
                Some(addr) => Some(bind(addr).await?),
                None => None,
            },
            manage_enabled: !config.disable_manage,
            echo_enabled: config.enable_echo,
        })
    }
}

/// The main gRPC listener: TCP, or a Unix domain socket.
#[derive(Debug)]
pub enum GrpcListener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix domain socket (and its path, removed at shutdown).
    Unix(UnixListener, PathBuf),
}

impl GrpcListener {
    /// The TCP address, for TCP listeners.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        match self {
            Self::Tcp(listener) => listener.local_addr(),
            Self::Unix(_, path) => Err(std::io::Error::other(format!(
                "{} is a Unix socket",
                path.display()
            ))),
        }
    }

    /// Where it listens, for the log.
    pub(super) fn describe(&self) -> String {
        match self {
            Self::Tcp(listener) => listener
                .local_addr()
                .map_or_else(|e| e.to_string(), |a| a.to_string()),
            Self::Unix(_, path) => format!("unix://{}", path.display()),
        }
    }
}

/// Binds a Unix domain socket at `path`, replacing a stale socket left by
/// an earlier run (never any other kind of file). Mode 0660: Envoy in
/// another container of the pod reaches it through the shared volume and
/// the pod's fsGroup.
fn bind_unix(path: &Path) -> Result<GrpcListener, ServerError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        std::fs::remove_file(path).map_err(io_error(path))?;
    }
    let listener = UnixListener::bind(path).map_err(io_error(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io_error(path))?;
    Ok(GrpcListener::Unix(listener, path.to_owned()))
}

pub(super) fn local_addr(
    listener: &Incoming<TcpListener>,
) -> Result<std::net::SocketAddr, ServerError> {
    listener
        .get_ref()
        .local_addr()
        .map_err(io_error(Path::new("listener")))
}
