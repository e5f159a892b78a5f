//! The versioned on-disk encoding of a key record.
//!
//! One format byte, then a protobuf `keyward.store.v1.KeyRecord`. Protobuf
//! handles additive change (new fields); the format byte is for the rare change
//! it cannot express, so old data is always recognised and never misread.

use prost::Message;

use crate::domain::catalog::KeyKind;
use crate::domain::credits::{Credits, Refill};
use crate::domain::key::{KeyId, SecretHash};
use crate::domain::rate::RateLimit;
pub use crate::domain::record::{Access, KeyRecord, Leak, PreviousSecret};
use crate::domain::rules::Limits;
use crate::pb::store::{
    CreditBalance as StoredCredits, KeyRecord as Stored, KeyRecordIndexView as StoredIndexView,
    LeakMark as StoredLeak,
};

const FORMAT_V1: u8 = 1;

/// A stored value keyward cannot read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Empty value or an unknown format byte (written by a newer keyward?).
    #[error("unknown record format {0:?}")]
    Format(Option<u8>),
    /// Bytes that do not decode.
    #[error("undecodable record: {0}")]
    Decode(#[from] prost::DecodeError),
    /// Decoded, but a fixed-size field has the wrong size.
    #[error("record field {0} has the wrong length")]
    FieldLength(&'static str),
    /// Decoded, but a field holds a value keyward never writes.
    #[error("record field {0} is out of range")]
    FieldRange(&'static str),
}

/// What the index needs of a stored key; start-up decodes every record
/// this way, skipping its name and times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Indexed {
    /// The key's id.
    pub id: KeyId,
    /// The key's account.
    pub account: String,
    /// Scope names as granted.
    pub scopes: Vec<String>,
    /// Secret and lifecycle.
    pub access: Access,
}

/// Encodes a record for storage (sled and etcd hold the same bytes).
#[must_use]
pub fn encode(record: &KeyRecord) -> Vec<u8> {
    let access = &record.access;
    let (rate_requests, rate_period_nanos, rate_burst) =
        access.limits.rate_limit.map_or((0, 0, 0), |limit| {
            (
                limit.requests(),
                i64::try_from(limit.period().as_nanos()).unwrap_or(i64::MAX),
                limit.burst(),
            )
        });
    let stored = Stored {
        key_id: record.id.as_bytes().to_vec(),
        secret_sha256: access.secret.as_bytes().to_vec(),
        account_id: record.account.clone(),
        name: record.name.clone(),
        kind: kind_number(record.kind),
        scopes: record.scopes.clone(),
        created_at_unix_nanos: record.created_at,
        updated_at_unix_nanos: record.updated_at,
        disabled: access.disabled,
        expires_at_unix_nanos: access.limits.expires_at.unwrap_or(0),
        previous_secret_sha256: access
            .previous
            .map(|previous| previous.hash.as_bytes().to_vec())
            .unwrap_or_default(),
        previous_valid_until_unix_nanos: access.previous.map_or(0, |previous| previous.valid_until),
        allowed_cidrs: access.limits.allowed_cidrs.clone(),
        rate_requests,
        rate_period_nanos,
        rate_burst,
        disabled_by_admin: access.disabled_by_admin,
        credits: access.limits.credits.map(|credits| StoredCredits {
            remaining: credits.remaining,
            refill_amount: credits.refill.map_or(0, |refill| refill.amount()),
            refill_period_nanos: credits.refill.map_or(0, |refill| {
                i64::try_from(refill.period().as_nanos()).unwrap_or(i64::MAX)
            }),
            refilled_at_unix_nanos: credits.refilled_at,
            last_move: credits.last_move,
        }),
        leak: record.leak.as_ref().map(|leak| StoredLeak {
            reported_at_unix_nanos: leak.reported_at,
            url: leak.url.clone(),
            source: leak.source.clone(),
            r#type: leak.kind.clone(),
            previous_secret: leak.previous_secret,
        }),
    };
    let mut out = Vec::with_capacity(1 + stored.encoded_len());
    out.push(FORMAT_V1);
    stored.encode(&mut out).expect("a Vec grows as needed");
    out
}

/// Decodes a stored record, checking every field.
pub fn decode(bytes: &[u8]) -> Result<KeyRecord, RecordError> {
    let stored: Stored = body(bytes)?;
    let access = access(&stored)?;
    let leak = stored.leak.map(leak).transpose()?;
    Ok(KeyRecord {
        id: id(&stored.key_id)?,
        leak,
        kind: kind(stored.kind)?,
        account: stored.account_id,
        name: stored.name,
        scopes: stored.scopes,
        created_at: stored.created_at_unix_nanos,
        updated_at: stored.updated_at_unix_nanos,
        access,
    })
}

/// Decodes only what the index needs, checking it as [`decode`] does.
pub fn decode_indexed(bytes: &[u8]) -> Result<Indexed, RecordError> {
    let stored: StoredIndexView = body(bytes)?;
    Ok(Indexed {
        id: id(&stored.key_id)?,
        access: access(&stored)?,
        account: stored.account_id,
        scopes: stored.scopes,
    })
}

/// A stored leak mark; keyward writes one only with the time of its report.
fn leak(stored: StoredLeak) -> Result<Leak, RecordError> {
    if stored.reported_at_unix_nanos <= 0 {
        return Err(RecordError::FieldRange("leak.reported_at_unix_nanos"));
    }
    Ok(Leak {
        reported_at: stored.reported_at_unix_nanos,
        url: stored.url,
        source: stored.source,
        kind: stored.r#type,
        previous_secret: stored.previous_secret,
    })
}

/// The stored number of a kind (the same as `keyward.v1.KeyKind`'s).
const fn kind_number(kind: KeyKind) -> i32 {
    match kind {
        KeyKind::FullAccess => 1,
        KeyKind::RestrictedAccess => 2,
        KeyKind::Billing => 3,
    }
}

fn kind(number: i32) -> Result<KeyKind, RecordError> {
    match number {
        1 => Ok(KeyKind::FullAccess),
        2 => Ok(KeyKind::RestrictedAccess),
        3 => Ok(KeyKind::Billing),
        _ => Err(RecordError::FieldRange("kind")),
    }
}

fn body<M: Message + Default>(bytes: &[u8]) -> Result<M, RecordError> {
    match bytes.split_first() {
        Some((&FORMAT_V1, body)) => Ok(M::decode(body)?),
        other => Err(RecordError::Format(other.map(|(b, _)| *b))),
    }
}

fn id(bytes: &[u8]) -> Result<KeyId, RecordError> {
    <[u8; 16]>::try_from(bytes)
        .map(KeyId::from_bytes)
        .map_err(|_| RecordError::FieldLength("key_id"))
}

fn hash(bytes: &[u8], field: &'static str) -> Result<SecretHash, RecordError> {
    <[u8; 32]>::try_from(bytes)
        .map(SecretHash::from_bytes)
        .map_err(|_| RecordError::FieldLength(field))
}

/// The access fields both decoded forms of a record carry.
trait StoredAccess {
    fn secret_sha256(&self) -> &[u8];
    fn previous(&self) -> (&[u8], i64);
    fn disabled(&self) -> bool;
    fn disabled_by_admin(&self) -> bool;
    fn expires_at(&self) -> i64;
    fn allowed_cidrs(&self) -> &[String];
    fn rate(&self) -> (u32, i64, u32);
    fn credits(&self) -> Option<&StoredCredits>;
}

macro_rules! stored_access {
    ($stored:ty) => {
        impl StoredAccess for $stored {
            fn secret_sha256(&self) -> &[u8] {
                &self.secret_sha256
            }
            fn previous(&self) -> (&[u8], i64) {
                (
                    &self.previous_secret_sha256,
                    self.previous_valid_until_unix_nanos,
                )
            }
            fn disabled(&self) -> bool {
                self.disabled
            }
            fn disabled_by_admin(&self) -> bool {
                self.disabled && self.disabled_by_admin
            }
            fn expires_at(&self) -> i64 {
                self.expires_at_unix_nanos
            }
            fn allowed_cidrs(&self) -> &[String] {
                &self.allowed_cidrs
            }
            fn rate(&self) -> (u32, i64, u32) {
                (self.rate_requests, self.rate_period_nanos, self.rate_burst)
            }
            fn credits(&self) -> Option<&StoredCredits> {
                self.credits.as_ref()
            }
        }
    };
}

stored_access!(Stored);
stored_access!(StoredIndexView);

fn access(stored: &impl StoredAccess) -> Result<Access, RecordError> {
    let previous = match stored.previous() {
        ([], 0) => None,
        ([], _) => return Err(RecordError::FieldRange("previous_valid_until_unix_nanos")),
        (bytes, valid_until) => Some(PreviousSecret {
            hash: hash(bytes, "previous_secret_sha256")?,
            valid_until,
        }),
    };
    let (requests, period, burst) = stored.rate();
    Ok(Access {
        secret: hash(stored.secret_sha256(), "secret_sha256")?,
        previous,
        disabled: stored.disabled(),
        disabled_by_admin: stored.disabled_by_admin(),
        limits: Limits {
            expires_at: match stored.expires_at() {
                0 => None,
                at => Some(at),
            },
            allowed_cidrs: stored.allowed_cidrs().to_vec(),
            rate_limit: rate_limit(requests, period, burst)?,
            credits: stored.credits().map(credits).transpose()?,
        },
    })
}

/// A stored credit balance, checked as `Credits::new` checks a new one.
fn credits(stored: &StoredCredits) -> Result<Credits, RecordError> {
    let refill = match (stored.refill_amount, stored.refill_period_nanos) {
        (0, 0) => None,
        (amount, period) => Some(
            Refill::new(
                amount,
                std::time::Duration::from_nanos(
                    u64::try_from(period).map_err(|_| RecordError::FieldRange("credits.refill"))?,
                ),
            )
            .map_err(|_| RecordError::FieldRange("credits.refill"))?,
        ),
    };
    let mut credits = Credits::new(stored.remaining, refill, stored.refilled_at_unix_nanos)
        .map_err(|_| RecordError::FieldRange("credits.remaining"))?;
    credits.last_move = stored.last_move;
    Ok(credits)
}

/// A stored rate limit (`requests` 0: none).
fn rate_limit(
    requests: u32,
    period_nanos: i64,
    burst: u32,
) -> Result<Option<RateLimit>, RecordError> {
    if requests == 0 {
        return Ok(None);
    }
    let period = std::time::Duration::from_nanos(
        u64::try_from(period_nanos).map_err(|_| RecordError::FieldRange("rate_period_nanos"))?,
    );
    RateLimit::new(requests, period, burst)
        .map(Some)
        .map_err(|_| RecordError::FieldRange("rate_limit"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn sample() -> KeyRecord {
        KeyRecord {
            id: KeyId::from_bytes([7; 16]),
            account: "acme".into(),
            name: "ci".into(),
            kind: KeyKind::RestrictedAccess,
            scopes: vec!["mail.send".into()],
            created_at: 1,
            updated_at: 2,
            access: Access {
                secret: SecretHash::from_bytes([9; 32]),
                previous: Some(PreviousSecret {
                    hash: SecretHash::from_bytes([8; 32]),
                    valid_until: 4,
                }),
                disabled: true,
                disabled_by_admin: true,
                limits: Limits {
                    expires_at: Some(3),
                    allowed_cidrs: vec!["10.0.0.0/8".into()],
                    rate_limit: Some(
                        RateLimit::new(100, Duration::from_secs(1), 10).expect("valid"),
                    ),
                    credits: Some(
                        Credits::new(
                            500,
                            Some(Refill::new(1000, Duration::from_secs(86_400)).expect("valid")),
                            6,
                        )
                        .map(|credits| Credits {
                            last_move: 42,
                            ..credits
                        })
                        .expect("valid"),
                    ),
                },
            },
            leak: Some(Leak {
                reported_at: 5,
                url: "https://github.com/octocat/Hello-World/blob/main/.env".into(),
                source: "content".into(),
                kind: "keyward_api_key".into(),
                previous_secret: false,
            }),
        }
    }

    /// Bytes of a stored message as keyward would write them.
    fn raw(stored: &Stored) -> Vec<u8> {
        let mut out = vec![FORMAT_V1];
        stored.encode(&mut out).expect("a Vec grows");
        out
    }

    fn stored_sample() -> Stored {
        let bytes = encode(&sample());
        Stored::decode(&bytes[1..]).expect("decodes")
    }

    #[test]
    fn round_trips() {
        let record = sample();
        assert_eq!(decode(&encode(&record)).expect("decodes"), record);
        let fresh = KeyRecord {
            access: Access::new(SecretHash::from_bytes([1; 32])),
            leak: None,
            ..sample()
        };
        assert_eq!(decode(&encode(&fresh)).expect("decodes"), fresh);
    }

    /// A record written before leak marks existed (no field 18) still
    /// decodes, unmarked; and the index view skips the mark.
    #[test]
    fn records_without_a_leak_mark_still_decode() {
        let older = Stored {
            leak: None,
            ..stored_sample()
        };
        let decoded = decode(&raw(&older)).expect("decodes");
        assert_eq!(decoded.leak, None);
        assert_eq!(decoded.access, sample().access);
        let view = decode_indexed(&encode(&sample())).expect("decodes");
        assert_eq!(view.access, sample().access);
    }

    #[test]
    fn the_index_view_reads_the_same_bytes() {
        let record = sample();
        let view = decode_indexed(&encode(&record)).expect("decodes");
        assert_eq!(view.id, record.id);
        assert_eq!(view.account, record.account);
        assert_eq!(view.scopes, record.scopes);
        assert_eq!(view.access, record.access);
    }

    #[test]
    #[allow(clippy::too_many_lines, reason = "a table of cases")]
    fn unknown_formats_and_bad_fields_are_refused() {
        assert!(matches!(decode(&[]), Err(RecordError::Format(None))));
        let mut bytes = encode(&sample());
        bytes[0] = 2;
        assert!(matches!(decode(&bytes), Err(RecordError::Format(Some(2)))));
        let cases: [(Stored, &str); 9] = [
            (
                Stored {
                    credits: Some(StoredCredits {
                        remaining: crate::domain::credits::MAX_CREDITS + 1,
                        ..StoredCredits::default()
                    }),
                    ..stored_sample()
                },
                "credits.remaining",
            ),
            (
                Stored {
                    credits: Some(StoredCredits {
                        refill_amount: 5,
                        ..StoredCredits::default()
                    }),
                    ..stored_sample()
                },
                "credits.refill",
            ),
            (
                Stored {
                    leak: Some(StoredLeak::default()),
                    ..stored_sample()
                },
                "leak.reported_at_unix_nanos",
            ),
            (
                Stored {
                    key_id: vec![1; 3],
                    ..stored_sample()
                },
                "key_id",
            ),
            (
                Stored {
                    secret_sha256: Vec::new(),
                    ..stored_sample()
                },
                "secret_sha256",
            ),
            (
                Stored {
                    previous_secret_sha256: vec![1; 31],
                    ..stored_sample()
                },
                "previous_secret_sha256",
            ),
            (
                Stored {
                    previous_secret_sha256: Vec::new(),
                    ..stored_sample()
                },
                "previous_valid_until_unix_nanos",
            ),
            (
                Stored {
                    rate_period_nanos: 0,
                    ..stored_sample()
                },
                "rate_limit",
            ),
            (
                Stored {
                    kind: 0,
                    ..stored_sample()
                },
                "kind",
            ),
        ];
        for (stored, field) in cases {
            let refused = decode(&raw(&stored)).expect_err(field);
            assert!(
                matches!(refused, RecordError::FieldLength(f) | RecordError::FieldRange(f) if f == field),
                "{field}: {refused}"
            );
        }
        // The index view checks what it reads the same way.
        let short = Stored {
            secret_sha256: vec![1; 3],
            ..stored_sample()
        };
        assert!(matches!(
            decode_indexed(&raw(&short)),
            Err(RecordError::FieldLength("secret_sha256"))
        ));
    }
}
