//! The backup file (`keyward backup`, `keyward restore`): every key at one
//! point in time, versioned, self-describing and checksummed. The layout is
//! in `proto/keyward/store/v1/backup.proto`: a magic and a format version,
//! a header (key count, source, catalog identity), one entry per key (the
//! record exactly as the store holds it), an end marker and a SHA-256 of
//! everything before it.
//!
//! Why this shape: the format version comes first so a newer file is named
//! as such, not as corrupt; the end marker and the checksum come last so a
//! file cut short or altered anywhere is refused before anything is
//! written from it; the header's count lets a reader (and the writer
//! itself) check that every key is there. Records hold hashes of secrets,
//! never a secret, so neither does the file.

use std::io::{Read, Seek, SeekFrom};

use prost::Message;
use sha2::{Digest, Sha256};

use super::record::{self, KeyRecord};
use crate::pb::store::BackupEntry;
pub use crate::pb::store::BackupHeader as Header;

/// The first bytes of every backup file.
pub const MAGIC: &[u8; 8] = b"KWBACKUP";
/// The format this keyward writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// What follows the last entry, before the checksum.
pub const END: &[u8; 8] = b"KWBKEND\n";
/// The length of the trailing SHA-256.
const CHECKSUM_LEN: usize = 32;
/// The magic and the version.
const PREAMBLE_LEN: usize = MAGIC.len() + 4;
/// The largest header or entry a reader accepts: a record is a few KiB at
/// most (names, scopes and allowlists are capped), so a larger length is a
/// corrupted one, not a reason to allocate.
const MAX_FRAME: u32 = 1024 * 1024;

/// Why a backup file was refused. Every message is one line and names the
/// part of the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The file could not be read.
    #[error("reading the backup: {0}")]
    Io(#[from] std::io::Error),
    /// It does not start with [`MAGIC`].
    #[error("not a keyward backup file (it does not start with {:?})", "KWBACKUP")]
    NotABackup,
    /// A format this keyward does not know (written by a newer one?).
    #[error(
        "backup format version {0} is not supported: this keyward reads version {FORMAT_VERSION}"
    )]
    Version(u32),
    /// It ends before its end marker: an interrupted copy or backup.
    #[error("the backup is truncated: it does not end with keyward's end marker")]
    Truncated,
    /// The checksum does not match: some byte changed.
    #[error("the backup is corrupted: its SHA-256 checksum does not match its contents")]
    Checksum,
    /// A length no keyward writes.
    #[error("{what}: length {len} is larger than any keyward writes")]
    Frame {
        /// The header, or which entry.
        what: String,
        /// The length read.
        len: u32,
    },
    /// The header does not decode.
    #[error("the header does not decode: {0}")]
    Header(prost::DecodeError),
    /// An entry does not decode, or its record is unreadable.
    #[error("entry {index}: {problem}")]
    Entry {
        /// Its position, from 0.
        index: u64,
        /// What is wrong.
        problem: String,
    },
    /// The file's entries do not match its header's count.
    #[error("the header counts {header} keys but {read} were written")]
    Count {
        /// The header's count.
        header: u64,
        /// The entries.
        read: u64,
    },
    /// Something follows the checksum.
    #[error("the backup has bytes after its checksum")]
    Trailing,
}

// ---------------------------------------------------------------------------
// Writing

/// Encodes a backup file into memory a piece at a time, hashing as it
/// goes: the caller takes the bytes in chunks ([`Self::take`]) and sends
/// them on, so a backup never holds more than a chunk and one entry.
#[derive(Debug)]
pub struct Encoder {
    hasher: Sha256,
    buffer: Vec<u8>,
    keys: u64,
    written: u64,
}

impl Encoder {
    /// Starts a file described by `header`.
    #[must_use]
    pub fn new(header: &Header) -> Self {
        let mut encoder = Self {
            hasher: Sha256::new(),
            buffer: Vec::new(),
            keys: header.keys,
            written: 0,
        };
        encoder.push(MAGIC);
        encoder.push(&FORMAT_VERSION.to_be_bytes());
        encoder.frame(&header.encode_to_vec());
        encoder
    }

    /// Adds a key: its record as the store holds it, and when it was last
    /// used (Unix nanos; 0: never).
    pub fn entry(&mut self, record: &[u8], last_used: i64) {
        let entry = BackupEntry {
            record: record.to_vec(),
            last_used_unix_nanos: last_used,
        };
        self.frame(&entry.encode_to_vec());
        self.written += 1;
    }

    /// Bytes encoded and not yet taken.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.buffer.len()
    }

    /// Takes up to `most` of the encoded bytes.
    pub fn take(&mut self, most: usize) -> Vec<u8> {
        let rest = self.buffer.split_off(most.min(self.buffer.len()));
        std::mem::replace(&mut self.buffer, rest)
    }

    /// Ends the file (end marker, checksum) once exactly the header's
    /// count of entries was added; the rest of the bytes.
    pub fn finish(mut self) -> Result<Vec<u8>, BackupError> {
        if self.written != self.keys {
            return Err(BackupError::Count {
                header: self.keys,
                read: self.written,
            });
        }
        self.push(END);
        let checksum = self.hasher.finalize();
        self.buffer.extend_from_slice(&checksum);
        Ok(self.buffer)
    }

    fn frame(&mut self, message: &[u8]) {
        let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
        self.push(&len.to_be_bytes());
        self.push(message);
    }

    fn push(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.buffer.extend_from_slice(bytes);
    }
}

// ---------------------------------------------------------------------------
// Reading

/// One key read back from a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key's record, checked field by field.
    pub record: KeyRecord,
    /// When it was last used (Unix nanos; 0: never or unknown).
    pub last_used: i64,
}

/// Checks a whole backup file without decoding its entries: the format
/// version, the end marker, then the checksum over everything. The cheap
/// checks come first so each refusal names its cause (a newer format is
/// not "corrupted", a cut-short file is "truncated").
pub fn verify_checksum(file: &mut (impl Read + Seek)) -> Result<(), BackupError> {
    let len = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    let mut preamble = [0; PREAMBLE_LEN];
    let read = read_up_to(file, &mut preamble)?;
    check_preamble(&preamble[..read])?;
    let trailer_len = END.len() + CHECKSUM_LEN;
    let Some(body) = len.checked_sub(CHECKSUM_LEN as u64) else {
        return Err(BackupError::Truncated);
    };
    if len < (PREAMBLE_LEN + trailer_len) as u64 {
        return Err(BackupError::Truncated);
    }
    file.seek(SeekFrom::Start(len - trailer_len as u64))?;
    let mut trailer = [0; END.len() + CHECKSUM_LEN];
    file.read_exact(&mut trailer)?;
    if &trailer[..END.len()] != END {
        return Err(BackupError::Truncated);
    }
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    std::io::copy(
        &mut Read::take(&mut *file, body),
        &mut HashWriter(&mut hasher),
    )?;
    if hasher.finalize().as_slice() != &trailer[END.len()..] {
        return Err(BackupError::Checksum);
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(())
}

/// Reads a backup from the start, checking as it goes: the header first,
/// then each entry ([`Self::next_entry`]); after the last, the end marker,
/// the checksum, and that nothing follows.
#[derive(Debug)]
pub struct Reader<R> {
    input: R,
    hasher: Sha256,
    header: Header,
    read: u64,
    done: bool,
}

impl<R: Read> Reader<R> {
    /// Reads the preamble and the header.
    pub fn open(mut input: R) -> Result<Self, BackupError> {
        let mut preamble = [0; PREAMBLE_LEN];
        let read = read_up_to(&mut input, &mut preamble)?;
        check_preamble(&preamble[..read])?;
        let mut hasher = Sha256::new();
        hasher.update(preamble);
        let header = frame(&mut input, &mut hasher, || "the header".to_owned())?;
        let header = Header::decode(header.as_slice()).map_err(BackupError::Header)?;
        Ok(Self {
            input,
            hasher,
            header,
            read: 0,
            done: false,
        })
    }

    /// What the file says of itself.
    #[must_use]
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The next key; `None` after the last, once the end of the file
    /// checked out.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, BackupError> {
        if self.done {
            return Ok(None);
        }
        if self.read == self.header.keys {
            self.finish()?;
            return Ok(None);
        }
        let index = self.read;
        let bytes = frame(&mut self.input, &mut self.hasher, || {
            format!("entry {index}")
        })?;
        let problem = |problem: String| BackupError::Entry { index, problem };
        let entry = BackupEntry::decode(bytes.as_slice()).map_err(|e| problem(e.to_string()))?;
        let record = record::decode(&entry.record).map_err(|e| problem(e.to_string()))?;
        self.read += 1;
        Ok(Some(Entry {
            record,
            last_used: entry.last_used_unix_nanos,
        }))
    }

    fn finish(&mut self) -> Result<(), BackupError> {
        let mut end = [0; END.len()];
        read_exact(&mut self.input, &mut end)?;
        if &end != END {
            // More entries than the header counts, or a damaged marker.
            return Err(BackupError::Count {
                header: self.header.keys,
                read: self.read + 1,
            });
        }
        self.hasher.update(end);
        let mut checksum = [0; CHECKSUM_LEN];
        read_exact(&mut self.input, &mut checksum)?;
        if std::mem::take(&mut self.hasher).finalize().as_slice() != checksum {
            return Err(BackupError::Checksum);
        }
        if self.input.read(&mut [0])? != 0 {
            return Err(BackupError::Trailing);
        }
        self.done = true;
        Ok(())
    }
}

fn check_preamble(preamble: &[u8]) -> Result<(), BackupError> {
    if !preamble.starts_with(MAGIC) {
        return Err(if MAGIC.starts_with(preamble) {
            BackupError::Truncated
        } else {
            BackupError::NotABackup
        });
    }
    let version = preamble
        .get(MAGIC.len()..PREAMBLE_LEN)
        .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
        .ok_or(BackupError::Truncated)?;
    match u32::from_be_bytes(version) {
        FORMAT_VERSION => Ok(()),
        other => Err(BackupError::Version(other)),
    }
}

/// A length-prefixed message, hashed.
fn frame(
    input: &mut impl Read,
    hasher: &mut Sha256,
    what: impl Fn() -> String,
) -> Result<Vec<u8>, BackupError> {
    let mut len = [0; 4];
    read_exact(input, &mut len)?;
    hasher.update(len);
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(BackupError::Frame { what: what(), len });
    }
    let mut bytes = vec![0; len as usize];
    read_exact(input, &mut bytes)?;
    hasher.update(&bytes);
    Ok(bytes)
}

/// `read_exact`, with the end of the file reported as truncation.
fn read_exact(input: &mut impl Read, buffer: &mut [u8]) -> Result<(), BackupError> {
    input.read_exact(buffer).map_err(|error| {
        if error.kind() == std::io::ErrorKind::UnexpectedEof {
            BackupError::Truncated
        } else {
            BackupError::Io(error)
        }
    })
}

/// Fills `buffer` as far as the input goes; how much it filled.
fn read_up_to(input: &mut impl Read, buffer: &mut [u8]) -> Result<usize, BackupError> {
    let mut filled = 0;
    while filled < buffer.len() {
        match input.read(&mut buffer[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Feeds what is written to a hasher.
struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::domain::catalog::KeyKind;
    use crate::domain::key::{KeyId, SecretHash};
    use crate::domain::record::Access;

    fn record(byte: u8) -> KeyRecord {
        KeyRecord {
            id: KeyId::from_bytes([byte; 16]),
            account: "acme".into(),
            name: format!("key {byte}"),
            kind: KeyKind::RestrictedAccess,
            scopes: vec!["mail.send".into()],
            created_at: 1,
            updated_at: 2,
            access: Access::new(SecretHash::from_bytes([byte; 32])),
            leak: None,
        }
    }

    fn file(keys: u8) -> Vec<u8> {
        let header = Header {
            keys: u64::from(keys),
            source: "standalone".into(),
            ..Header::default()
        };
        let mut encoder = Encoder::new(&header);
        let mut out = Vec::new();
        for byte in 0..keys {
            encoder.entry(&record::encode(&record(byte)), i64::from(byte));
            out.extend(encoder.take(7));
        }
        out.extend(encoder.finish().expect("the count matches"));
        out
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Entry>, BackupError> {
        verify_checksum(&mut Cursor::new(bytes))?;
        let mut reader = Reader::open(bytes)?;
        let mut entries = Vec::new();
        while let Some(entry) = reader.next_entry()? {
            entries.push(entry);
        }
        Ok(entries)
    }

    #[test]
    fn round_trips_in_chunks() {
        let entries = read_all(&file(3)).expect("reads");
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[2].record, record(2));
        assert_eq!(entries[2].last_used, 2);
        assert!(read_all(&file(0)).expect("an empty store").is_empty());
    }

    #[test]
    fn the_writer_refuses_a_count_that_does_not_match() {
        let mut encoder = Encoder::new(&Header {
            keys: 2,
            ..Header::default()
        });
        encoder.entry(&record::encode(&record(1)), 0);
        assert!(matches!(
            encoder.finish(),
            Err(BackupError::Count { header: 2, read: 1 })
        ));
    }

    #[test]
    fn damage_is_named() {
        let good = file(3);
        for cut in [0, 5, 11, 20, good.len() - 1] {
            assert!(
                matches!(read_all(&good[..cut]), Err(BackupError::Truncated)),
                "cut at {cut}"
            );
        }
        for at in [12, 40, good.len() - 41, good.len() - 1] {
            let mut flipped = good.clone();
            flipped[at] ^= 0x01;
            assert!(
                matches!(read_all(&flipped), Err(BackupError::Checksum)),
                "flipped at {at}"
            );
        }
        let mut newer = good.clone();
        newer[11] = 2;
        assert!(matches!(read_all(&newer), Err(BackupError::Version(2))));
        assert!(matches!(
            read_all(b"hello, world, this is not a backup at all, no"),
            Err(BackupError::NotABackup)
        ));
        let mut longer = good;
        longer.push(0);
        assert!(read_all(&longer).is_err(), "bytes after the checksum");
    }
}
