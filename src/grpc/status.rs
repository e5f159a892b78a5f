//! The one place where errors become gRPC statuses.

use tonic::{Code, Status};

use crate::keys::KeyError;

/// What a caller learns when storage fails: nothing was acknowledged, and
/// trying again later is right. Never a path or an OS message.
const STORAGE_FAILING: &str =
    "storage is failing or not responding; nothing was changed or acknowledged, try again later";

impl From<KeyError> for Status {
    fn from(error: KeyError) -> Self {
        let code = match &error {
            KeyError::Invalid { .. } => Code::InvalidArgument,
            KeyError::PermissionDenied(_) => Code::PermissionDenied,
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
