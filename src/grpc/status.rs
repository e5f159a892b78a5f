//! The one place where errors become gRPC statuses.

use tonic::{Code, Status};

use crate::keys::KeyError;

impl From<KeyError> for Status {
    fn from(error: KeyError) -> Self {
        let code = match &error {
            KeyError::Invalid { .. } => Code::InvalidArgument,
            KeyError::PermissionDenied(_) => Code::PermissionDenied,
            KeyError::NotFound(_) => Code::NotFound,
            KeyError::LimitReached { .. } => Code::ResourceExhausted,
            KeyError::Store(error) => {
                // Details stay in the server log; the caller learns only that
                // nothing was acknowledged.
                tracing::error!(%error, "store failure");
                return Status::unavailable("storage unavailable; the change was not acknowledged");
            }
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
