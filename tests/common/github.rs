//! GitHub's side of the secret scanning partner protocol, for tests: a
//! P-256 key pair made here, GitHub's key document, report bodies and
//! signed requests in GitHub's shape.

use std::net::SocketAddr;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::EncodePublicKey;
use serde_json::{Value, json};

/// keyward's route for GitHub's reports.
pub const PATH: &str = "/secret-scanning/github";
/// Where the reported tokens were "found".
pub const GITHUB_URL: &str =
    "https://github.com/octocat/Hello-World/blob/12345600b9cbe38a219f39a9941c9319b600c002/.env";

/// A GitHub-like signer: a fresh P-256 key pair and the identifier the
/// key document names it by.
pub struct Signer256 {
    pub identifier: String,
    key: SigningKey,
}

impl Signer256 {
    pub fn new(identifier: &str) -> Self {
        loop {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).expect("randomness");
            if let Ok(key) = SigningKey::from_bytes(&bytes.into()) {
                return Self {
                    identifier: identifier.to_owned(),
                    key,
                };
            }
        }
    }

    /// The key's entry in GitHub's document.
    pub fn listed(&self) -> Value {
        json!({
            "key_identifier": self.identifier,
            "key": self.key
                .verifying_key()
                .to_public_key_pem(p256::pkcs8::LineEnding::LF)
                .expect("PEM"),
            "is_current": true,
        })
    }

    /// Base64 of the DER signature over `body`, as GitHub sends it.
    pub fn sign(&self, body: &[u8]) -> String {
        let signature: Signature = self.key.sign(body);
        STANDARD.encode(signature.to_der().as_bytes())
    }
}

/// GitHub's public key document listing `signers`.
pub fn write_document(path: &Path, signers: &[&Signer256]) {
    let document = json!({ "public_keys": signers.iter().map(|s| s.listed()).collect::<Vec<_>>() });
    std::fs::write(path, serde_json::to_vec_pretty(&document).expect("json")).expect("written");
}

/// A report body in GitHub's shape.
pub fn report(tokens: &[&str]) -> String {
    let matches: Vec<Value> = tokens
        .iter()
        .map(|token| {
            json!({
                "token": token,
                "type": "keyward_api_key",
                "url": GITHUB_URL,
                "source": "content",
            })
        })
        .collect();
    serde_json::to_string(&matches).expect("json")
}

/// POSTs `body` with GitHub's headers (those given).
pub async fn post(
    addr: SocketAddr,
    identifier: Option<&str>,
    signature: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let mut headers = Vec::new();
    if let Some(identifier) = identifier {
        headers.push(("Github-Public-Key-Identifier", identifier));
    }
    if let Some(signature) = signature {
        headers.push(("Github-Public-Key-Signature", signature));
    }
    super::rest_call(addr, "POST", PATH, &headers, body).await
}

/// Posts `body` signed by `signer`.
pub async fn post_signed(addr: SocketAddr, signer: &Signer256, body: &str) -> (u16, Value) {
    let signature = signer.sign(body.as_bytes());
    post(addr, Some(&signer.identifier), Some(&signature), body).await
}
