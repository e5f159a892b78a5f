//! `POST /secret-scanning/github`: GitHub's secret scanning partner
//! endpoint. Not behind keyward's bearer authentication (GitHub sends
//! none): the report's signature is its authentication, checked
//! ([`crate::scanning`]) before any token in it is looked at. A report
//! refused for its signature, its size or its shape changes nothing.
//!
//! A verified report is a JSON array of matches `{token, type, url,
//! source}`. A token that is a live key's secret (id found, secret
//! verified in constant time) is acted on as `--leaked-key-action` says
//! ([`crate::keys::Keys::leaked`], the one write path); the reply is
//! GitHub's feedback: one `{token_hash, token_type, label}` per match,
//! never a token.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Problem, Rest};
use crate::audit;
use crate::domain::key::{PresentedKey, looks_like_secret};
use crate::domain::record::{KeyRecord, Leak};
use crate::keys::{KeyError, LeakAction};
use crate::metrics::Metrics;
use crate::scanning::{KeyFile, Refusal};

/// The route.
pub const PATH: &str = "/secret-scanning/github";
/// GitHub's header naming the key that signed the report.
pub const IDENTIFIER_HEADER: &str = "github-public-key-identifier";
/// GitHub's header carrying the signature (base64 DER ECDSA).
pub const SIGNATURE_HEADER: &str = "github-public-key-signature";

/// Most matches one report may carry (GitHub sends up to 1,000 at once);
/// past it the report is refused with 413, and nothing is acted on.
pub const MAX_MATCHES: usize = 1000;
/// Largest report body: 1,000 matches of 2 KiB each.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
/// Longest a report body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Matches of one report being acted on at once: each waits for the key
/// writer, which commits them in groups.
const IN_FLIGHT: usize = 16;

/// The longest `url`, `source` and `type` kept on a key (longer ones are
/// cut at a character boundary).
const MAX_URL_CHARS: usize = 2048;
const MAX_LABEL_CHARS: usize = 128;

/// What the endpoint needs besides the keys.
#[derive(Debug)]
pub struct Scanning {
    /// GitHub's public keys, as the operator keeps them.
    pub file: Arc<KeyFile>,
    /// What a verified leak of a live key does.
    pub action: LeakAction,
    /// Where reports, matches and acted-on keys are counted.
    pub metrics: Arc<Metrics>,
}

/// One match of a report, as GitHub sends it. Unknown fields are ignored:
/// GitHub may add some.
#[derive(Deserialize)]
struct Match {
    token: String,
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    url: String,
    #[serde(default)]
    source: String,
}

/// GitHub's feedback for one match.
#[derive(Serialize)]
struct Feedback<'a> {
    token_hash: &'a str,
    token_type: &'a str,
    label: &'static str,
}

/// Refuses a report, counted by why.
fn refused(scanning: &Scanning, result: &'static str, problem: Problem) -> Response {
    scanning.metrics.scanning_report(result);
    problem.into_response()
}

fn refused_signature(scanning: &Scanning, refusal: Refusal) -> Response {
    tracing::warn!(
        reason = refusal.label(),
        "secret scanning: a report was refused for its signature; nothing in it was looked at"
    );
    refused(
        scanning,
        refusal.label(),
        Problem::new(StatusCode::UNAUTHORIZED, None, refusal.to_string()),
    )
}

fn too_large(scanning: &Scanning, message: String) -> Response {
    refused(
        scanning,
        "too_large",
        Problem::new(StatusCode::PAYLOAD_TOO_LARGE, Some("body"), message),
    )
}

/// The report's raw body, within [`MAX_BODY_BYTES`] (refused from its
/// declared length before any of it is read) and [`BODY_TIMEOUT`].
async fn read_body(
    scanning: &Scanning,
    declared: Option<u64>,
    body: axum::body::Body,
) -> Result<axum::body::Bytes, Response> {
    let limit = || format!("body: larger than the {MAX_BODY_BYTES} bytes a report may have");
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large(scanning, limit()));
    }
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(too_large(scanning, limit())),
        Err(_) => Err(refused(
            scanning,
            "timeout",
            Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                Some("body"),
                "body: did not arrive in time",
            ),
        )),
    }
}

/// The handler: verify, then act, then answer with feedback.
pub(super) async fn report(State(rest): State<Rest>, request: axum::extract::Request) -> Response {
    let Some(scanning) = rest.scanning.clone() else {
        return Problem::new(StatusCode::NOT_FOUND, None, "no such endpoint").into_response();
    };
    let (parts, body) = request.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
    };
    // From the headers alone: the signer and the signature's form.
    let (key, signature) = match scanning
        .file
        .keys()
        .signer(header(IDENTIFIER_HEADER), header(SIGNATURE_HEADER))
    {
        Ok(signer) => signer,
        Err(refusal) => return refused_signature(&scanning, refusal),
    };
    let declared = header(axum::http::header::CONTENT_LENGTH.as_str())
        .and_then(|value| value.parse::<u64>().ok());
    let bytes = match read_body(&scanning, declared, body).await {
        Ok(bytes) => bytes,
        Err(refusal) => return refusal,
    };
    if let Err(refusal) = crate::scanning::verify(&key, &signature, &bytes) {
        return refused_signature(&scanning, refusal);
    }
    // Signed by GitHub from here on.
    let matches: Vec<Match> = match serde_json::from_slice(&bytes) {
        Ok(matches) => matches,
        Err(error) => {
            return refused(
                &scanning,
                "malformed",
                Problem::bad_request(
                    "body",
                    format!(
                        "body: not a JSON array of {{token, type, url, source}} (line {}, column {})",
                        error.line(),
                        error.column()
                    ),
                ),
            );
        }
    };
    if matches.len() > MAX_MATCHES {
        return too_large(
            &scanning,
            format!(
                "body: {} matches; a report may have at most {MAX_MATCHES}",
                matches.len()
            ),
        );
    }
    match act(&rest, &scanning, matches).await {
        Ok(feedback) => {
            scanning.metrics.scanning_report("accepted");
            (StatusCode::OK, axum::Json(feedback)).into_response()
        }
        Err(error) => {
            // Whatever was acted on stays so; GitHub sends the report
            // again, and acting again is harmless.
            scanning.metrics.scanning_report("failed");
            Problem::from(error).into_response()
        }
    }
}

/// Acts on every distinct token of a verified report; the feedback, one
/// entry per match in the report's order.
async fn act(
    rest: &Rest,
    scanning: &Scanning,
    matches: Vec<Match>,
) -> Result<Vec<serde_json::Value>, KeyError> {
    let now = crate::clock::now_nanos();
    let turns = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut acting = tokio::task::JoinSet::new();
    let mut labels: HashMap<String, bool> = HashMap::with_capacity(matches.len());
    let mut feedback = Vec::with_capacity(matches.len());
    for found in matches {
        let hash = token_hash(&found.token);
        feedback.push((hash.clone(), found.kind.clone()));
        if labels.insert(hash.clone(), false).is_some()
            || PresentedKey::parse(&found.token).is_err()
        {
            continue;
        }
        let leak = Leak {
            reported_at: now,
            url: kept(&found.url, MAX_URL_CHARS),
            source: kept(&found.source, MAX_LABEL_CHARS),
            kind: kept(&found.kind, MAX_LABEL_CHARS),
            previous_secret: false,
        };
        let (keys, turns, action) = (Arc::clone(&rest.keys), Arc::clone(&turns), scanning.action);
        acting.spawn(async move {
            let _turn = turns.acquire_owned().await;
            let outcome = match PresentedKey::parse(&found.token) {
                Ok(key) => keys.leaked(&key, leak, action).await,
                Err(_) => Ok(None),
            };
            (hash, outcome)
        });
    }
    let mut failure = None;
    while let Some(done) = acting.join_next().await {
        let Ok((hash, outcome)) = done else {
            failure.get_or_insert(KeyError::Unavailable);
            continue;
        };
        match outcome {
            Ok(Some((before, after))) => {
                labels.insert(hash, true);
                let taken = taken(scanning.action, &before, &after);
                audit::leaked(&after, taken);
                scanning.metrics.leaked_key(taken);
            }
            Ok(None) => {}
            Err(error) => {
                failure.get_or_insert(error);
            }
        }
    }
    if let Some(error) = failure {
        return Err(error);
    }
    Ok(feedback
        .iter()
        .map(|(hash, kind)| {
            let label = if labels.get(hash).copied().unwrap_or_default() {
                "true_positive"
            } else {
                "false_positive"
            };
            serde_json::json!(Feedback {
                token_hash: hash,
                token_type: kind,
                label,
            })
        })
        .collect())
}

/// What was done to a key: `disabled`, `revoked`, `reported`, or
/// `overlap_ended` (its previous secret was found).
fn taken(action: LeakAction, before: &KeyRecord, after: &KeyRecord) -> &'static str {
    let previous = after.leak.as_ref().is_some_and(|leak| leak.previous_secret);
    match action {
        LeakAction::Report => "reported",
        _ if previous => {
            if before.access.previous.is_some() {
                "overlap_ended"
            } else {
                "reported"
            }
        }
        LeakAction::Disable => "disabled",
        LeakAction::Revoke => "revoked",
    }
}

/// SHA-256 of a token, in lowercase hex: how GitHub's feedback names it.
fn token_hash(token: &str) -> String {
    use std::fmt::Write as _;
    Sha256::digest(token.as_bytes())
        .iter()
        .fold(String::with_capacity(64), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

/// A report's text field as kept on a key: control characters dropped,
/// at most `max` characters, and withheld entirely if it holds something
/// shaped like a credential (it is shown in the console and logged).
fn kept(text: &str, max: usize) -> String {
    if looks_like_secret(text) {
        return "(withheld: it looked like a credential)".into();
    }
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_named_by_their_sha256() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn kept_fields_are_bounded_and_never_credentials() {
        assert_eq!(kept("a\u{7}b\nc", 10), "abc");
        assert_eq!(kept(&"x".repeat(50), 8).len(), 8);
        let key = format!("https://example.com/?k=SG.{}", "A".repeat(22));
        assert!(!kept(&key, 100).contains("SG."));
    }
}
