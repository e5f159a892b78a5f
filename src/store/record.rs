//! The versioned on-disk encoding of a key record.
//!
//! One format byte, then a protobuf `keyward.store.v1.KeyRecord`. Protobuf
//! handles additive change (new fields); the format byte is for the rare change
//! it cannot express, so old data is always recognised and never misread.

use prost::Message;

use crate::domain::key::KeyId;
use crate::domain::rate::RateLimit;

pub use crate::pb::store::{KeyRecord, KeyRecordIndexView};

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

/// A record's key id (`None` only for a record too broken to have one;
/// decoding refuses those).
#[must_use]
pub fn key_id(record: &KeyRecord) -> Option<KeyId> {
    <[u8; 16]>::try_from(record.key_id.as_slice())
        .ok()
        .map(KeyId::from_bytes)
}

/// A stored rate limit (`requests` 0: none).
pub fn rate_limit(
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

/// The stored fields of `limit` (zeros: none).
#[must_use]
pub fn rate_fields(limit: Option<RateLimit>) -> (u32, i64, u32) {
    limit.map_or((0, 0, 0), |limit| {
        (
            limit.requests(),
            i64::try_from(limit.period().as_nanos()).unwrap_or(i64::MAX),
            limit.burst(),
        )
    })
}

/// Encodes a record for sled.
#[must_use]
pub fn encode(record: &KeyRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + record.encoded_len());
    out.push(FORMAT_V1);
    record.encode(&mut out).expect("a Vec grows as needed");
    out
}

/// Decodes a record read from sled, checking fixed-size fields.
pub fn decode(bytes: &[u8]) -> Result<KeyRecord, RecordError> {
    decode_checked(bytes)
}

/// Decodes only what the index needs (start-up loads every record).
pub fn decode_index_view(bytes: &[u8]) -> Result<KeyRecordIndexView, RecordError> {
    decode_checked(bytes)
}

/// What every decoded form of a record carries: the fixed-size fields
/// checked at decode, and what the index needs.
pub trait StoredKey: Message + Default {
    /// Raw 16-byte key id.
    fn key_id(&self) -> &[u8];
    /// SHA-256 of the secret.
    fn secret_sha256(&self) -> &[u8];
    /// Rate limit fields: requests, period (nanos), burst.
    fn rate(&self) -> (u32, i64, u32);
    /// Whether the key is disabled.
    fn disabled(&self) -> bool;
    /// Stored expiry (0: never).
    fn expires_at(&self) -> i64;
    /// The previous secret's hash after a rotation (empty: none).
    fn previous_secret_sha256(&self) -> &[u8];
    /// Until when the previous secret works (0: none).
    fn previous_valid_until(&self) -> i64;
    /// Canonical address ranges (empty: any).
    fn allowed_cidrs(&self) -> &[String];
}

macro_rules! stored_key {
    ($record:ty) => {
        impl StoredKey for $record {
            fn key_id(&self) -> &[u8] {
                &self.key_id
            }
            fn secret_sha256(&self) -> &[u8] {
                &self.secret_sha256
            }
            fn rate(&self) -> (u32, i64, u32) {
                (self.rate_requests, self.rate_period_nanos, self.rate_burst)
            }
            fn disabled(&self) -> bool {
                self.disabled
            }
            fn expires_at(&self) -> i64 {
                self.expires_at_unix_nanos
            }
            fn previous_secret_sha256(&self) -> &[u8] {
                &self.previous_secret_sha256
            }
            fn previous_valid_until(&self) -> i64 {
                self.previous_valid_until_unix_nanos
            }
            fn allowed_cidrs(&self) -> &[String] {
                &self.allowed_cidrs
            }
        }
    };
}

stored_key!(KeyRecord);
stored_key!(KeyRecordIndexView);

fn decode_checked<M: StoredKey>(bytes: &[u8]) -> Result<M, RecordError> {
    match bytes.split_first() {
        Some((&FORMAT_V1, body)) => {
            let message = M::decode(body)?;
            if message.key_id().len() != 16 {
                return Err(RecordError::FieldLength("key_id"));
            }
            if message.secret_sha256().len() != 32 {
                return Err(RecordError::FieldLength("secret_sha256"));
            }
            let (requests, period, burst) = message.rate();
            rate_limit(requests, period, burst)?;
            Ok(message)
        }
        other => Err(RecordError::Format(other.map(|(b, _)| *b))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> KeyRecord {
        KeyRecord {
            key_id: vec![7; 16],
            secret_sha256: vec![9; 32],
            account_id: "acme".into(),
            name: "ci".into(),
            kind: 2,
            scopes: vec!["mail.send".into()],
            created_at_unix_nanos: 1,
            updated_at_unix_nanos: 2,
            disabled: true,
            expires_at_unix_nanos: 3,
            previous_secret_sha256: vec![8; 32],
            previous_valid_until_unix_nanos: 4,
            allowed_cidrs: vec!["10.0.0.0/8".into()],
            rate_requests: 100,
            rate_period_nanos: 1_000_000_000,
            rate_burst: 10,
        }
    }

    #[test]
    fn round_trips() {
        let record = sample();
        assert_eq!(decode(&encode(&record)).expect("decodes"), record);
    }

    #[test]
    fn the_index_view_reads_the_same_bytes() {
        let record = sample();
        let view = decode_index_view(&encode(&record)).expect("decodes");
        assert_eq!(view.key_id, record.key_id);
        assert_eq!(view.secret_sha256, record.secret_sha256);
        assert_eq!(view.account_id, record.account_id);
        assert_eq!(view.scopes, record.scopes);
    }

    #[test]
    fn unknown_formats_and_bad_fields_are_refused() {
        assert!(matches!(decode(&[]), Err(RecordError::Format(None))));
        let mut bytes = encode(&sample());
        bytes[0] = 2;
        assert!(matches!(decode(&bytes), Err(RecordError::Format(Some(2)))));
        let short = KeyRecord {
            key_id: vec![1; 3],
            ..sample()
        };
        assert!(matches!(
            decode(&encode(&short)),
            Err(RecordError::FieldLength("key_id"))
        ));
        let absurd = KeyRecord {
            rate_period_nanos: 0,
            ..sample()
        };
        assert!(matches!(
            decode(&encode(&absurd)),
            Err(RecordError::FieldRange("rate_limit"))
        ));
    }
}
