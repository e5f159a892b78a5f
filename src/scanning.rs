//! GitHub's secret scanning partner protocol: who may report a keyward key
//! found in public. GitHub signs every report with ECDSA P-256 over SHA-256
//! of the raw body and names the signing key; the keys are the document
//! GitHub serves at `/meta/public_keys/secret_scanning`, which the operator
//! saves to a file (keyward makes no outbound call) and refreshes. This
//! module holds that document, verifies signatures against it, and reloads
//! it when the file changes (a bad file keeps the last good one). What a
//! verified report does is `rest::scanning`'s.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use serde::Deserialize;

/// How often the key file is read again for changes: an operator's
/// refresh is in force within this.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// Longest key identifier accepted in a header (GitHub's are 64 hex
/// characters); a longer one is refused without a lookup.
const MAX_IDENTIFIER_LEN: usize = 256;

/// Longest base64 signature accepted (a DER P-256 signature is at most 72
/// bytes, 96 in base64).
const MAX_SIGNATURE_LEN: usize = 256;

/// A public key document that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not GitHub's JSON document.
    #[error(
        "not GitHub's secret scanning key document ({{\"public_keys\": [{{\"key_identifier\", \"key\", \"is_current\"}}]}}): {0}"
    )]
    Json(#[from] serde_json::Error),
    /// A key that is not a P-256 public key in PEM.
    #[error("public_keys[{index}].key: not an ECDSA P-256 public key in PEM ({problem})")]
    Key {
        /// Its position in the document.
        index: usize,
        /// What is wrong.
        problem: String,
    },
    /// A key without an identifier, or an identifier listed twice.
    #[error("public_keys[{index}].key_identifier: {problem}")]
    Identifier {
        /// Its position in the document.
        index: usize,
        /// What is wrong.
        problem: &'static str,
    },
    /// No key at all: every report would be refused.
    #[error("public_keys: empty")]
    Empty,
}

/// Why a report's signature was refused. Nothing in a refused report is
/// looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No `Github-Public-Key-Identifier` header (or not text).
    #[error("Github-Public-Key-Identifier: missing")]
    MissingIdentifier,
    /// No `Github-Public-Key-Signature` header (or not text).
    #[error("Github-Public-Key-Signature: missing")]
    MissingSignature,
    /// An identifier that names no key of the document in force.
    #[error("Github-Public-Key-Identifier: not a key of GitHub's current key document")]
    UnknownIdentifier,
    /// A signature that is not base64 of a DER ECDSA signature.
    #[error("Github-Public-Key-Signature: not base64 of a DER ECDSA signature")]
    MalformedSignature,
    /// A well-formed signature that does not verify over the body.
    #[error("Github-Public-Key-Signature: does not verify over the body")]
    WrongSignature,
}

impl Refusal {
    /// Its name in metrics.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::MissingIdentifier => "missing_identifier",
            Self::MissingSignature => "missing_signature",
            Self::UnknownIdentifier => "unknown_identifier",
            Self::MalformedSignature => "malformed_signature",
            Self::WrongSignature => "wrong_signature",
        }
    }
}

/// GitHub's document, as served.
#[derive(Deserialize)]
struct Document {
    public_keys: Vec<DocumentKey>,
}

/// One listed key. Its `is_current` is not read: a key no longer current
/// may still sign reports in flight, and GitHub removes from the document
/// the keys it no longer signs with.
#[derive(Deserialize)]
struct DocumentKey {
    key_identifier: String,
    key: String,
}

/// The public keys of one document, by identifier.
#[derive(Debug, Clone)]
pub struct PublicKeys {
    keys: HashMap<String, VerifyingKey>,
}

impl PublicKeys {
    /// Parses GitHub's document (every key listed is accepted).
    pub fn parse(text: &[u8]) -> Result<Self, KeysError> {
        let document: Document = serde_json::from_slice(text)?;
        let mut keys = HashMap::with_capacity(document.public_keys.len());
        for (index, listed) in document.public_keys.into_iter().enumerate() {
            if listed.key_identifier.is_empty() || listed.key_identifier.len() > MAX_IDENTIFIER_LEN
            {
                return Err(KeysError::Identifier {
                    index,
                    problem: "must be 1 to 256 characters",
                });
            }
            let key = VerifyingKey::from_public_key_pem(listed.key.trim()).map_err(|e| {
                KeysError::Key {
                    index,
                    problem: e.to_string(),
                }
            })?;
            if keys.insert(listed.key_identifier, key).is_some() {
                return Err(KeysError::Identifier {
                    index,
                    problem: "listed twice",
                });
            }
        }
        if keys.is_empty() {
            return Err(KeysError::Empty);
        }
        Ok(Self { keys })
    }

    /// How many keys it holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether it holds none (never, once parsed).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key `identifier` names, with the decoded `signature`: what can
    /// be refused from the headers alone, before a byte of the body is
    /// read.
    pub fn signer(
        &self,
        identifier: Option<&str>,
        signature: Option<&str>,
    ) -> Result<(VerifyingKey, Signature), Refusal> {
        let identifier = identifier
            .filter(|id| !id.is_empty())
            .ok_or(Refusal::MissingIdentifier)?;
        let signature = signature
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or(Refusal::MissingSignature)?;
        let key = self
            .keys
            .get(identifier.trim())
            .ok_or(Refusal::UnknownIdentifier)?;
        if signature.len() > MAX_SIGNATURE_LEN {
            return Err(Refusal::MalformedSignature);
        }
        let der = STANDARD
            .decode(signature)
            .map_err(|_| Refusal::MalformedSignature)?;
        let signature = Signature::from_der(&der).map_err(|_| Refusal::MalformedSignature)?;
        Ok((*key, signature))
    }

    /// Verifies a report: `signature` (base64 DER) by the key `identifier`
    /// names, over exactly `body`.
    pub fn verify(
        &self,
        identifier: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<(), Refusal> {
        let (key, signature) = self.signer(identifier, signature)?;
        verify(&key, &signature, body)
    }
}

/// ECDSA P-256 with SHA-256 over `body`.
pub fn verify(key: &VerifyingKey, signature: &Signature, body: &[u8]) -> Result<(), Refusal> {
    key.verify(body, signature)
        .map_err(|_| Refusal::WrongSignature)
}

/// The key document in force, from a file the operator refreshes.
#[derive(Debug)]
pub struct KeyFile {
    path: PathBuf,
    current: RwLock<Arc<PublicKeys>>,
    /// The bytes last read (good or bad), so an unchanged file is neither
    /// parsed nor logged again.
    last_read: std::sync::Mutex<Vec<u8>>,
}

impl KeyFile {
    /// Loads `path`: at start-up, a file that cannot be used is an error.
    pub fn load(path: &Path) -> Result<Self, KeysError> {
        let text = std::fs::read(path).map_err(|source| KeysError::Read {
            path: path.to_owned(),
            source,
        })?;
        let keys = PublicKeys::parse(&text)?;
        tracing::info!(path = %path.display(), keys = keys.len(), "secret scanning: GitHub's public keys loaded");
        Ok(Self {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(keys)),
            last_read: std::sync::Mutex::new(text),
        })
    }

    /// The keys in force.
    #[must_use]
    pub fn keys(&self) -> Arc<PublicKeys> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Reads the file again; a changed, usable file takes effect, a
    /// changed, unusable one is logged and the keys in force stay.
    pub async fn reload(&self) {
        let text = match tokio::fs::read(&self.path).await {
            Ok(text) => text,
            Err(error) => {
                let mut last = self
                    .last_read
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if !last.is_empty() {
                    tracing::warn!(path = %self.path.display(), %error, "secret scanning: cannot read GitHub's public key file; keeping the keys in force");
                    last.clear();
                }
                return;
            }
        };
        {
            let mut last = self
                .last_read
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *last == text {
                return;
            }
            last.clone_from(&text);
        }
        match PublicKeys::parse(&text) {
            Ok(keys) => {
                tracing::info!(path = %self.path.display(), keys = keys.len(), "secret scanning: GitHub's public keys reloaded");
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
            }
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "secret scanning: GitHub's public key file changed but cannot be used; keeping the keys in force");
            }
        }
    }

    /// Reloads every `every` for as long as the runtime runs.
    pub async fn follow(self: Arc<Self>, every: Duration) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            self.reload().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GitHub's published example (the partner program's documentation,
    /// "Implement signature verification"): key
    /// `90a421169f0a406205f1563a953312f0be898d3c7b6c06b681aa86a874555f4a`,
    /// its PEM, a payload and the signature GitHub made over it.
    const GITHUB_IDENTIFIER: &str =
        "90a421169f0a406205f1563a953312f0be898d3c7b6c06b681aa86a874555f4a";
    const GITHUB_KEY: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE9MJJHnMfn2+H4xL4YaPDA4RpJqUq\nkCmRCBnYERxZanmcpzQSXs1X/AljlKkbJ8qpVIW4clayyef9gWhFbNHWAA==\n-----END PUBLIC KEY-----";
    const GITHUB_PAYLOAD: &[u8] =
        br#"[{"token":"some_token","type":"some_type","url":"some_url"}]"#;
    const GITHUB_SIGNATURE: &str = "MEUCIQDKZokqnCjrRtw0tni+2Ltvl/uiMJ1EGumEsp1BsNr32AIgQY1YXD2nlj+XNfGK4rBfkMJ1JDOQcYXxa2sY8FNkrKc=";

    fn github_document() -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "public_keys": [{
                "key_identifier": GITHUB_IDENTIFIER,
                "key": GITHUB_KEY,
                "is_current": true,
            }]
        }))
        .expect("serializes")
    }

    #[test]
    fn githubs_published_example_verifies() {
        let keys = PublicKeys::parse(&github_document()).expect("GitHub's document parses");
        assert_eq!(
            keys.verify(
                Some(GITHUB_IDENTIFIER),
                Some(GITHUB_SIGNATURE),
                GITHUB_PAYLOAD
            ),
            Ok(())
        );
    }

    #[test]
    fn anything_else_is_refused() {
        let keys = PublicKeys::parse(&github_document()).expect("parses");
        let verify = |id: Option<&str>, signature: Option<&str>, body: &[u8]| {
            keys.verify(id, signature, body).expect_err("refused")
        };
        let mut tampered = GITHUB_PAYLOAD.to_vec();
        tampered[11] ^= 1;
        assert_eq!(
            verify(Some(GITHUB_IDENTIFIER), Some(GITHUB_SIGNATURE), &tampered),
            Refusal::WrongSignature
        );
        // A trailing newline is a different body.
        let mut newline = GITHUB_PAYLOAD.to_vec();
        newline.push(b'\n');
        assert_eq!(
            verify(Some(GITHUB_IDENTIFIER), Some(GITHUB_SIGNATURE), &newline),
            Refusal::WrongSignature
        );
        assert_eq!(
            verify(None, Some(GITHUB_SIGNATURE), GITHUB_PAYLOAD),
            Refusal::MissingIdentifier
        );
        assert_eq!(
            verify(Some(GITHUB_IDENTIFIER), None, GITHUB_PAYLOAD),
            Refusal::MissingSignature
        );
        assert_eq!(
            verify(Some("f9525bf0"), Some(GITHUB_SIGNATURE), GITHUB_PAYLOAD),
            Refusal::UnknownIdentifier
        );
        for malformed in ["not base64!", "AAAA", &"A".repeat(400)] {
            assert_eq!(
                verify(Some(GITHUB_IDENTIFIER), Some(malformed), GITHUB_PAYLOAD),
                Refusal::MalformedSignature,
                "{malformed}"
            );
        }
    }

    #[test]
    fn unusable_documents_are_refused_by_name() {
        let cases: [(&[u8], &str); 4] = [
            (b"{}", "public_keys"),
            (br#"{"public_keys": []}"#, "public_keys: empty"),
            (
                br#"{"public_keys": [{"key_identifier": "a", "key": "not pem"}]}"#,
                "public_keys[0].key",
            ),
            (
                br#"{"public_keys": [{"key_identifier": "", "key": ""}]}"#,
                "public_keys[0].key_identifier",
            ),
        ];
        for (text, named) in cases {
            let error = PublicKeys::parse(text).expect_err("refused").to_string();
            assert!(error.contains(named), "{error}");
        }
    }

    #[tokio::test]
    async fn a_bad_file_keeps_the_last_good_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys.json");
        std::fs::write(&path, github_document()).expect("written");
        let file = KeyFile::load(&path).expect("loads");
        std::fs::write(&path, b"{\"public_keys\": [").expect("written");
        file.reload().await;
        std::fs::remove_file(&path).expect("removed");
        file.reload().await;
        assert_eq!(
            file.keys().verify(
                Some(GITHUB_IDENTIFIER),
                Some(GITHUB_SIGNATURE),
                GITHUB_PAYLOAD
            ),
            Ok(())
        );
    }
}
