//! The versioned on-disk encoding of a key record.
//!
//! One format byte, then a protobuf `keyward.store.v1.KeyRecord`. Protobuf
//! handles additive change (new fields); the format byte is for the rare change
//! it cannot express, so old data is always recognised and never misread.

use prost::Message;

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

/// The fixed-size fields every decoded form carries.
trait FixedFields: Message + Default {
    fn key_id(&self) -> &[u8];
    fn secret_sha256(&self) -> &[u8];
}

impl FixedFields for KeyRecord {
    fn key_id(&self) -> &[u8] {
        &self.key_id
    }
    fn secret_sha256(&self) -> &[u8] {
        &self.secret_sha256
    }
}

impl FixedFields for KeyRecordIndexView {
    fn key_id(&self) -> &[u8] {
        &self.key_id
    }
    fn secret_sha256(&self) -> &[u8] {
        &self.secret_sha256
    }
}

fn decode_checked<M: FixedFields>(bytes: &[u8]) -> Result<M, RecordError> {
    match bytes.split_first() {
        Some((&FORMAT_V1, body)) => {
            let message = M::decode(body)?;
            if message.key_id().len() != 16 {
                return Err(RecordError::FieldLength("key_id"));
            }
            if message.secret_sha256().len() != 32 {
                return Err(RecordError::FieldLength("secret_sha256"));
            }
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
    }
}
