//! The API key format, key generation, and secret hashing and verification.
//!
//! A key is `SG.` + 22-character id + `.` + 43-character secret: 69
//! characters, URL-safe base64 of 16 random bytes and 32 random bytes. Only
//! SHA-256 of the secret is stored: the secret has 256 bits of entropy, so a
//! slow password hash would add latency without adding strength.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Length of a full key.
pub const KEY_LEN: usize = 69;
/// Length of the encoded key id.
pub const ID_LEN: usize = 22;
/// Length of the encoded secret.
pub const SECRET_LEN: usize = 43;
const PREFIX: &str = "SG.";

/// A key's public id: 16 random bytes, shown as 22 URL-safe base64 characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; 16]);

impl KeyId {
    /// The raw bytes, as stored.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// From raw stored bytes.
    #[must_use]
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; ID_LEN];
        let written = URL_SAFE_NO_PAD
            .encode_slice(self.0, &mut buf)
            .map_err(|_| fmt::Error)?;
        f.write_str(std::str::from_utf8(&buf[..written]).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A key id that is not 22 canonical URL-safe base64 characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("must be a 22-character key id")]
pub struct BadKeyId;

/// Why a value shaped like a credential ([`looks_like_secret`], or the
/// operator's admin token) was refused (it is never echoed).
pub const CREDENTIAL_REFUSED: &str = "looks like a credential (an API key or the admin token); refused, not recorded or logged: revoke it if it was exposed";

/// Whether `text` holds something shaped like a keyward credential: an API
/// key (`SG.` followed by a key id) or a token keyward generated (`kwadmin_`
/// or `kwfeed_` followed by at least 20 token characters). Such a value
/// pasted into a name, scope, account or address field is refused without
/// being echoed, logged or stored.
#[must_use]
pub fn looks_like_secret(text: &str) -> bool {
    let token_byte = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_';
    let bytes = text.as_bytes();
    let api_key = bytes
        .windows(3 + ID_LEN)
        .any(|window| window.starts_with(b"SG.") && window[3..].iter().all(token_byte));
    api_key
        || [&b"kwadmin_"[..], b"kwfeed_"].iter().any(|prefix| {
            bytes.windows(prefix.len() + 20).any(|window| {
                window.starts_with(prefix) && window[prefix.len()..].iter().all(token_byte)
            })
        })
}

impl FromStr for KeyId {
    type Err = BadKeyId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_exact::<16, 18>(s.as_bytes(), ID_LEN)
            .map(Self)
            .ok_or(BadKeyId)
    }
}

/// Why a presented key was refused before any lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MalformedKey {
    /// Not 69 characters.
    #[error("an API key is 69 characters")]
    Length,
    /// Not `SG.<id>.<secret>`.
    #[error("an API key has the form SG.<id>.<secret>")]
    Shape,
    /// The id or secret is not canonical URL-safe base64.
    #[error("an API key uses only URL-safe base64 characters")]
    Alphabet,
}

/// A syntactically valid key, borrowed from the request.
#[derive(Debug, Clone, Copy)]
pub struct PresentedKey<'a> {
    /// The key's id.
    pub id: KeyId,
    secret: &'a [u8],
}

impl PresentedKey<'_> {
    /// Parses `SG.<id>.<secret>`, checking length, shape and alphabet.
    /// Allocates nothing.
    pub fn parse(key: &str) -> Result<PresentedKey<'_>, MalformedKey> {
        let bytes = key.as_bytes();
        if bytes.len() != KEY_LEN {
            return Err(MalformedKey::Length);
        }
        if !key.starts_with(PREFIX) || bytes[PREFIX.len() + ID_LEN] != b'.' {
            return Err(MalformedKey::Shape);
        }
        let id_start = PREFIX.len();
        let secret_start = id_start + ID_LEN + 1;
        let id = decode_exact::<16, 18>(&bytes[id_start..id_start + ID_LEN], ID_LEN)
            .ok_or(MalformedKey::Alphabet)?;
        let secret = &bytes[secret_start..];
        if !is_canonical_secret(secret) {
            return Err(MalformedKey::Alphabet);
        }
        Ok(PresentedKey {
            id: KeyId(id),
            secret,
        })
    }

    /// The hash this key's secret must match.
    #[must_use]
    pub fn secret_hash(&self) -> SecretHash {
        SecretHash::of(self.secret)
    }
}

/// SHA-256 of a secret: all keyward ever stores of it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SecretHash([u8; 32]);

impl SecretHash {
    /// Hashes a secret.
    #[must_use]
    pub fn of(secret: &[u8]) -> Self {
        Self(Sha256::digest(secret).into())
    }

    /// From stored bytes.
    #[must_use]
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The stored bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Constant-time comparison: the time taken does not reveal how many
    /// leading bytes matched.
    #[must_use]
    pub fn matches(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }

    /// The comparison as a `subtle::Choice`, to combine with others without
    /// branching.
    #[must_use]
    pub fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.0.ct_eq(&other.0)
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretHash(..)")
    }
}

/// A freshly generated key: the full text (shown once) and what is stored.
#[derive(Clone)]
pub struct NewKey {
    /// The key's id.
    pub id: KeyId,
    /// The 69-character key to hand to the caller, once.
    pub text: String,
    /// The hash to store.
    pub hash: SecretHash,
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Generates a key from the operating system's CSPRNG.
pub fn generate() -> Result<NewKey, getrandom::Error> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id)?;
    generate_secret(KeyId(id))
}

/// A new secret for an existing key id (rotation), from the CSPRNG.
pub fn generate_secret(id: KeyId) -> Result<NewKey, getrandom::Error> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)?;
    let secret_text = URL_SAFE_NO_PAD.encode(secret);
    Ok(NewKey {
        id,
        text: format!("{PREFIX}{id}.{secret_text}"),
        hash: SecretHash::of(secret_text.as_bytes()),
    })
}

/// Values of the URL-safe base64 alphabet; 0xFF marks bytes outside it.
const SEXTET: [u8; 256] = {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut table = [0xFF; 256];
    let mut value = 0u8;
    while (value as usize) < alphabet.len() {
        table[alphabet[value as usize] as usize] = value;
        value += 1;
    }
    table
};

/// Whether 43 characters are the canonical URL-safe base64 of 32 bytes.
/// The secret is only ever hashed, never decoded, so checking its spelling
/// is all that is needed: one table lookup per byte.
fn is_canonical_secret(secret: &[u8]) -> bool {
    let mut invalid = 0u8;
    for &byte in secret {
        invalid |= SEXTET[usize::from(byte)] & 0xC0;
    }
    // 43 characters carry 258 bits for 256: the last one's low 2 bits are 0.
    invalid == 0
        && secret.len() == SECRET_LEN
        && SEXTET[usize::from(secret[SECRET_LEN - 1])].trailing_zeros() >= 2
}

/// Decodes exactly `len` base64 characters into exactly `N` bytes, refusing
/// non-canonical trailing bits so that each value has one spelling.
/// `B` is a scratch size the decoder's length estimate accepts.
fn decode_exact<const N: usize, const B: usize>(text: &[u8], len: usize) -> Option<[u8; N]> {
    if text.len() != len {
        return None;
    }
    let mut buf = [0u8; B];
    let written = URL_SAFE_NO_PAD.decode_slice(text, &mut buf).ok()?;
    (written == N).then(|| {
        let mut out = [0u8; N];
        out.copy_from_slice(&buf[..N]);
        out
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn credentials_keyward_makes_look_like_secrets() {
        let key = "SG.aaaaaaaaaaaaaaaaaaaaaa.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
        for text in [
            key,
            &format!("prod {key}"),
            "kwadmin_3q2-7wAbYz9XkLmN0pQrStUvWx",
            "token: kwfeed_Zq8vN1xW4mK7pR2tY5uB9cE3",
        ] {
            assert!(looks_like_secret(text), "{text}");
        }
        for text in [
            "mailer",
            "kwadmin_short",
            "SG.short",
            "alerts.read",
            "kwfeed_",
        ] {
            assert!(!looks_like_secret(text), "{text}");
        }
    }
    use super::*;

    #[test]
    fn generated_keys_have_the_sendgrid_shape() {
        let key = generate().expect("rng");
        assert_eq!(key.text.len(), KEY_LEN);
        assert!(key.text.starts_with("SG."));
        assert_eq!(key.text.as_bytes()[25], b'.');
        let parsed = PresentedKey::parse(&key.text).expect("parses");
        assert_eq!(parsed.id, key.id);
        assert!(parsed.secret_hash().matches(&key.hash));
        assert_eq!(key.id.to_string().parse::<KeyId>(), Ok(key.id));
        assert!(!format!("{key:?}").contains(&key.text[26..]));
    }

    #[test]
    fn keys_are_unique() {
        let a = generate().expect("rng");
        let b = generate().expect("rng");
        assert_ne!(a.id, b.id);
        assert_ne!(a.text, b.text);
    }

    #[test]
    fn malformed_keys_are_refused() {
        let good = generate().expect("rng").text;
        let mut wrong_prefix = good.clone();
        wrong_prefix.replace_range(0..3, "XX.");
        let mut no_dot = good.clone();
        no_dot.replace_range(25..26, "x");
        let mut bad_char = good.clone();
        bad_char.replace_range(10..11, "+");
        let mut bad_secret_char = good.clone();
        bad_secret_char.replace_range(50..51, "=");
        let cases = [
            (String::new(), MalformedKey::Length),
            (good[..68].to_owned(), MalformedKey::Length),
            (format!("{good}A"), MalformedKey::Length),
            (wrong_prefix, MalformedKey::Shape),
            (no_dot, MalformedKey::Shape),
            (bad_char, MalformedKey::Alphabet),
            (bad_secret_char, MalformedKey::Alphabet),
            ("é".repeat(34) + "x", MalformedKey::Shape),
        ];
        for (key, want) in cases {
            assert_eq!(
                PresentedKey::parse(&key).map(|k| k.id),
                Err(want),
                "{key:?}"
            );
        }
    }

    #[test]
    fn non_canonical_base64_is_refused() {
        // 22 chars encode 132 bits for 128: the last char's low bits must be 0.
        let id = "AAAAAAAAAAAAAAAAAAAAAB";
        assert_eq!(id.parse::<KeyId>(), Err(BadKeyId));
        assert!("AAAAAAAAAAAAAAAAAAAAAA".parse::<KeyId>().is_ok());
        // 43 chars encode 258 bits for 256: the last char's low 2 bits must be 0.
        let id = "A".repeat(ID_LEN);
        let canonical = format!("SG.{id}.{}E", "A".repeat(42));
        let sloppy = format!("SG.{id}.{}F", "A".repeat(42));
        assert!(PresentedKey::parse(&canonical).is_ok());
        assert_eq!(
            PresentedKey::parse(&sloppy).map(|k| k.id),
            Err(MalformedKey::Alphabet)
        );
    }

    #[test]
    fn wrong_secret_does_not_match() {
        let a = generate().expect("rng");
        let b = generate().expect("rng");
        let forged = format!("{}{}", &a.text[..26], &b.text[26..]);
        let parsed = PresentedKey::parse(&forged).expect("well-formed");
        assert_eq!(parsed.id, a.id);
        assert!(!parsed.secret_hash().matches(&a.hash));
    }
}
