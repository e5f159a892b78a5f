//! The one place where errors become gRPC statuses.

use tonic::{Code, Status};

use crate::keys::KeyError;
use crate::keys::snapshot::SnapshotError;

/// What a caller learns when storage fails: the change was not
/// acknowledged. It is usually not applied either, but a change whose flush
/// was under way when the caller's wait ran out may still complete, so the
/// message does not promise it. Never a path or an OS message.
const STORAGE_FAILING: &str = "storage is failing or not responding; the change was not acknowledged (read the key to see whether it was applied) and can be retried later";

impl From<KeyError> for Status {
    fn from(error: KeyError) -> Self {
        let code = match &error {
            KeyError::Invalid { .. } => Code::InvalidArgument,
            KeyError::PermissionDenied(_) | KeyError::Beyond { .. } => Code::PermissionDenied,
            KeyError::NotFound(_) => Code::NotFound,
            KeyError::LimitReached { .. } => Code::ResourceExhausted,
            KeyError::Store(error) => {
                // Details (paths, OS messages) stay in the server log.
                tracing::error!(%error, "store failure");
                return Status::unavailable(STORAGE_FAILING);
            }
            KeyError::Unavailable => return Status::unavailable(STORAGE_FAILING),
            KeyError::Rng => Code::Internal,
        };
        Status::new(code, error.to_string())
    }
}

impl From<SnapshotError> for Status {
    fn from(error: SnapshotError) -> Self {
        let code = match &error {
            SnapshotError::Busy => Code::ResourceExhausted,
            SnapshotError::Overrun => Code::Aborted,
            SnapshotError::Inconsistent(_) => Code::Internal,
            SnapshotError::Abandoned => Code::Cancelled,
            SnapshotError::Store(_) | SnapshotError::Etcd(_) => {
                // Details (paths, OS messages) stay in the server log.
                tracing::error!(%error, "backup failed reading the store");
                return Status::unavailable(
                    "storage could not be read; no backup was taken (retry later)",
                );
            }
            SnapshotError::Unavailable => Code::Unavailable,
        };
        Status::new(code, error.to_string())
    }
}

/// INVALID_ARGUMENT naming the field and the problem.
#[must_use]
pub fn invalid(field: &'static str, problem: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {problem}"))
}

/// UNAUTHENTICATED with a reason (never echoing the credential).
#[must_use]
pub fn unauthenticated(problem: &str) -> Status {
    Status::unauthenticated(format!("authorization: {problem}"))
}
