//! The one place refusals take their outward forms. A management error
//! ([`KeyError`], an unauthenticated caller) becomes a gRPC status and
//! SendGrid's HTTP status and error body; a backup's error a gRPC status;
//! a decision's [`DenyReason`] its ext_authz gRPC status and its wire enum
//! (its HTTP status, message and label are the core's, which the Envoy
//! module shares). Every mapping is an exhaustive `match`: a new variant
//! does not compile until it has each of its forms.

use axum::http::StatusCode;
use tonic::Code;

use crate::access::Unauthenticated;
use crate::domain::decision::DenyReason;
use crate::keys::KeyError;
use crate::keys::snapshot::SnapshotError;
use crate::pb::v1 as pb;

/// What a caller learns when storage fails: the change was not
/// acknowledged. It is usually not applied either, but a change whose flush
/// was under way when the caller's wait ran out may still complete, so the
/// message does not promise it. Never a path or an OS message.
pub const STORAGE_FAILING: &str = "storage is failing or not responding; the change was not acknowledged (read the key to see whether it was applied) and can be retried later";

/// SendGrid's header naming the account (subuser) the parent acts for:
/// the REST name of `account_id`.
pub const ON_BEHALF_OF: &str = "on-behalf-of";

/// A refused management call, in both front doors' forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// gRPC's code.
    pub code: Code,
    /// gRPC's message.
    pub message: String,
    /// SendGrid's HTTP status.
    pub http: StatusCode,
    /// SendGrid's body: the field (by its REST name), if the refusal is
    /// one field's.
    pub field: Option<&'static str>,
    /// SendGrid's body: what is wrong.
    pub body: String,
}

impl Refusal {
    /// A refusal whose gRPC message and SendGrid body say the same.
    fn same(code: Code, http: StatusCode, field: Option<&'static str>, message: String) -> Self {
        Self {
            code,
            body: message.clone(),
            message,
            http,
            field,
        }
    }

    fn storage_failing() -> Self {
        Self::same(
            Code::Unavailable,
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            STORAGE_FAILING.into(),
        )
    }
}

/// A field's name in the REST API (the management service names fields as
/// gRPC does).
#[must_use]
pub fn rest_field(field: &'static str) -> &'static str {
    match field {
        "key_id" => "api_key_id",
        "account_id" => ON_BEHALF_OF,
        "page_size" => "limit",
        "overlap" => "overlap_seconds",
        "rate_limit.period" => "rate_limit.period_ms",
        "credits.refill.period" => "credits.refill.period_seconds",
        other => other,
    }
}

impl From<KeyError> for Refusal {
    fn from(error: KeyError) -> Self {
        let message = error.to_string();
        match error {
            KeyError::Invalid { field, problem } => {
                let named = rest_field(field);
                Self {
                    code: Code::InvalidArgument,
                    message,
                    http: StatusCode::BAD_REQUEST,
                    field: Some(named),
                    body: format!("{named}: {problem}"),
                }
            }
            KeyError::PermissionDenied(_) => {
                Self::same(Code::PermissionDenied, StatusCode::FORBIDDEN, None, message)
            }
            KeyError::Beyond { field, problem } => {
                let named = rest_field(field);
                let body = match problem
                    .strip_prefix(field)
                    .and_then(|p| p.strip_prefix(": "))
                {
                    Some(rest) => format!("{named}: {rest}"),
                    None => problem,
                };
                Self {
                    code: Code::PermissionDenied,
                    message,
                    http: StatusCode::FORBIDDEN,
                    field: Some(named),
                    body,
                }
            }
            KeyError::NotFound(_) => Self {
                code: Code::NotFound,
                message,
                http: StatusCode::NOT_FOUND,
                field: None,
                body: "resource not found".into(),
            },
            // SendGrid answers a full account with 403.
            KeyError::LimitReached { .. } => Self::same(
                Code::ResourceExhausted,
                StatusCode::FORBIDDEN,
                None,
                message,
            ),
            KeyError::Store(error) => {
                // Details (paths, OS messages) stay in the server log.
                tracing::error!(%error, "store failure");
                Self::storage_failing()
            }
            KeyError::Unavailable | KeyError::Busy => Self::storage_failing(),
            // A state of this deployment, not a fault: gRPC's mapping of
            // FAILED_PRECONDITION, 400.
            KeyError::NoUsageStore | KeyError::NoCreditsLeft => Self::same(
                Code::FailedPrecondition,
                StatusCode::BAD_REQUEST,
                None,
                message,
            ),
            KeyError::UsageStoreAway => Self::same(
                Code::Unavailable,
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                message,
            ),
            KeyError::Rng => Self {
                code: Code::Internal,
                message,
                http: StatusCode::INTERNAL_SERVER_ERROR,
                field: None,
                body: "internal error; nothing was changed".into(),
            },
        }
    }
}

impl From<Unauthenticated> for Refusal {
    fn from(Unauthenticated(problem): Unauthenticated) -> Self {
        Self::same(
            Code::Unauthenticated,
            StatusCode::UNAUTHORIZED,
            None,
            format!("authorization: {problem}"),
        )
    }
}

impl From<Refusal> for tonic::Status {
    fn from(refusal: Refusal) -> Self {
        Self::new(refusal.code, refusal.message)
    }
}

impl From<KeyError> for tonic::Status {
    fn from(error: KeyError) -> Self {
        Refusal::from(error).into()
    }
}

impl From<Unauthenticated> for tonic::Status {
    fn from(error: Unauthenticated) -> Self {
        Refusal::from(error).into()
    }
}

impl From<SnapshotError> for tonic::Status {
    fn from(error: SnapshotError) -> Self {
        let code = match &error {
            SnapshotError::Busy => Code::ResourceExhausted,
            SnapshotError::Overrun => Code::Aborted,
            SnapshotError::Inconsistent(_) => Code::Internal,
            SnapshotError::Abandoned => Code::Cancelled,
            SnapshotError::Store(_) | SnapshotError::Etcd(_) => {
                // Details (paths, OS messages) stay in the server log.
                tracing::error!(%error, "backup failed reading the store");
                return Self::unavailable(
                    "storage could not be read; no backup was taken (retry later)",
                );
            }
            SnapshotError::Unavailable => Code::Unavailable,
        };
        Self::new(code, error.to_string())
    }
}

/// INVALID_ARGUMENT naming the field and the problem (a decision request's
/// field: decisions have no [`KeyError`]).
#[must_use]
pub fn invalid(field: &'static str, problem: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::invalid_argument(format!("{field}: {problem}"))
}

// --- deny reasons ---------------------------------------------------------------

/// The gRPC status code of an ext_authz `Check` that denies for `reason`
/// (for Envoy's logs and stats; the HTTP reply is [`DenyReason::http_status`]).
#[must_use]
pub fn ext_authz_code(reason: DenyReason) -> Code {
    match reason {
        DenyReason::MissingKey
        | DenyReason::MalformedKey
        | DenyReason::UnknownKey
        | DenyReason::KeyExpired
        | DenyReason::KeyDisabled => Code::Unauthenticated,
        DenyReason::RateLimited | DenyReason::CreditsExhausted => Code::ResourceExhausted,
        DenyReason::KeyUnverifiable => Code::Unavailable,
        DenyReason::InsufficientScope
        | DenyReason::UnknownRoute
        | DenyReason::AmbiguousPath
        | DenyReason::IpNotAllowed => Code::PermissionDenied,
    }
}

/// `keyward.v1.DenyReason` of a decision's reason (`None`: allowed).
#[must_use]
pub fn wire(reason: Option<DenyReason>) -> pb::DenyReason {
    let Some(reason) = reason else {
        return pb::DenyReason::Unspecified;
    };
    match reason {
        DenyReason::MissingKey => pb::DenyReason::MissingKey,
        DenyReason::MalformedKey => pb::DenyReason::MalformedKey,
        DenyReason::UnknownKey => pb::DenyReason::UnknownKey,
        DenyReason::InsufficientScope => pb::DenyReason::InsufficientScope,
        DenyReason::UnknownRoute => pb::DenyReason::UnknownRoute,
        DenyReason::AmbiguousPath => pb::DenyReason::AmbiguousPath,
        DenyReason::KeyExpired => pb::DenyReason::KeyExpired,
        DenyReason::KeyDisabled => pb::DenyReason::KeyDisabled,
        DenyReason::IpNotAllowed => pb::DenyReason::IpNotAllowed,
        DenyReason::RateLimited => pb::DenyReason::RateLimited,
        DenyReason::KeyUnverifiable => pb::DenyReason::KeyUnverifiable,
        DenyReason::CreditsExhausted => pb::DenyReason::CreditsExhausted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_wire_value() {
        for reason in DenyReason::ALL {
            assert_ne!(wire(Some(reason)), pb::DenyReason::Unspecified);
        }
    }

    #[test]
    fn both_front_doors_say_the_same_of_an_error() {
        let refusal = Refusal::from(KeyError::Invalid {
            field: "key_id",
            problem: "required".into(),
        });
        assert_eq!(refusal.code, Code::InvalidArgument);
        assert_eq!(refusal.message, "key_id: required");
        assert_eq!(refusal.http, StatusCode::BAD_REQUEST);
        assert_eq!(refusal.field, Some("api_key_id"));
        assert_eq!(refusal.body, "api_key_id: required");
        let full = Refusal::from(KeyError::LimitReached {
            account: "acme".into(),
            limit: 1,
        });
        assert_eq!(
            (full.code, full.http),
            (Code::ResourceExhausted, StatusCode::FORBIDDEN)
        );
        let failing = Refusal::from(KeyError::Unavailable);
        assert_eq!(failing.message, STORAGE_FAILING);
        assert_eq!(failing.body, STORAGE_FAILING);
    }
}
