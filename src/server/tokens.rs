//! The admin and feed reader token files: read (refusing one any local
//! user can read, or one too weak to stand against guessing), or created
//! with a fresh random token; only their hashes are kept.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::{ServerError, create_private_dir, io_error};
use crate::config::ServeConfig;
use crate::domain::key::SecretHash;

/// The hashes of the admin token and, when `--feed-token-file` is set,
/// the feed reader's token (each file created if missing).
pub(super) fn load(config: &ServeConfig) -> Result<(SecretHash, Option<SecretHash>), ServerError> {
    let admin = load_or_create_token(&config.data.admin_token_path(), Token::Admin)?;
    let feed_reader = match &config.feed_token_file {
        Some(path) => Some(load_or_create_token(path, Token::FeedReader)?),
        None => None,
    };
    Ok((admin, feed_reader))
}

/// Least estimated randomness of an admin token, in bits.
const MIN_TOKEN_BITS: f64 = 128.0;

/// Whether a token is long and varied enough to stand against guessing:
/// at least 32 characters, and at least [`MIN_TOKEN_BITS`] by the Shannon
/// entropy of its own character frequencies (32 `a`s score 0 bits; a
/// 32-byte random base64 token scores ~250). A screen for obvious mistakes,
/// not a proof of randomness.
fn strong_enough(token: &str) -> bool {
    let mut counts = [0u32; 256];
    for byte in token.bytes() {
        counts[usize::from(byte)] += 1;
    }
    let len = f64::from(u32::try_from(token.len()).unwrap_or(u32::MAX));
    let bits_per_char: f64 = counts
        .iter()
        .filter(|&&n| n > 0)
        .map(|&n| {
            let p = f64::from(n) / len;
            -p * p.log2()
        })
        .sum();
    token.len() >= 32 && bits_per_char * len >= MIN_TOKEN_BITS
}

/// Which token a file holds.
#[derive(Debug, Clone, Copy)]
enum Token {
    /// The operator's: every management call.
    Admin,
    /// The decision feed's reader: the feed only.
    FeedReader,
}

impl Token {
    /// Its name in the log, and the prefix of a token keyward makes.
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Self::Admin => ("admin", "kwadmin"),
            Self::FeedReader => ("feed reader", "kwfeed"),
        }
    }

    /// The refusal of a token file any local user can read: each file its
    /// own error, so the operator knows which flag's file to fix.
    fn exposed(self, path: &Path, mode: u32) -> ServerError {
        match self {
            Self::Admin => ServerError::ExposedAdminToken(path.to_owned(), mode),
            Self::FeedReader => ServerError::ExposedFeedToken(path.to_owned(), mode),
        }
    }

    /// The refusal of a weak token.
    fn weak(self, path: &Path) -> ServerError {
        match self {
            Self::Admin => ServerError::WeakAdminToken(path.to_owned()),
            Self::FeedReader => ServerError::WeakFeedToken(path.to_owned()),
        }
    }
}

/// Reads a token file (refusing a world-readable or weak one), or creates
/// it with a fresh random token, mode 0600. Only its hash is kept in
/// memory; the token itself is never logged.
fn load_or_create_token(path: &Path, kind: Token) -> Result<SecretHash, ServerError> {
    let (what, prefix) = kind.names();
    match std::fs::read_to_string(path) {
        Ok(text) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                // Follows symlinks: a Kubernetes Secret's file is a link.
                let mode = std::fs::metadata(path)
                    .map_err(io_error(path))?
                    .permissions()
                    .mode();
                if mode & 0o004 != 0 {
                    return Err(kind.exposed(path, mode & 0o777));
                }
            }
            let token = text.trim();
            if !strong_enough(token) {
                return Err(kind.weak(path));
            }
            tracing::info!(path = %path.display(), token = what, "using the token file");
            Ok(SecretHash::of(token.as_bytes()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                create_private_dir(parent)?;
            }
            let mut raw = [0u8; 32];
            getrandom::fill(&mut raw).map_err(|e| ServerError::Io {
                path: path.to_owned(),
                source: std::io::Error::other(e.to_string()),
            })?;
            let token = format!("{prefix}_{}", URL_SAFE_NO_PAD.encode(raw));
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(path).map_err(io_error(path))?;
            file.write_all(token.as_bytes())
                .and_then(|()| file.write_all(b"\n"))
                .and_then(|()| file.sync_all())
                .map_err(io_error(path))?;
            match kind {
                Token::Admin => {
                    tracing::info!(path = %path.display(), "created the admin token file (mode 0600)");
                }
                Token::FeedReader => tracing::info!(
                    path = %path.display(),
                    "created the feed reader token file (mode 0600): give it to the Envoy module's token_file"
                ),
            }
            Ok(SecretHash::of(token.as_bytes()))
        }
        Err(e) => Err(io_error(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::{ServerError, Token, load_or_create_token, strong_enough};

    /// A feed token file is refused as the feed's, never as the admin
    /// token: the operator is told which flag's file to fix.
    #[test]
    fn a_bad_feed_token_file_is_named_as_such() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("feed.token");
        std::fs::write(&path, "short\n").expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let error = load_or_create_token(&path, Token::FeedReader).expect_err("weak");
        assert!(matches!(error, ServerError::WeakFeedToken(_)), "{error:?}");
        assert!(error.to_string().contains("--feed-token-file"), "{error}");
        let error = load_or_create_token(&path, Token::Admin).expect_err("weak");
        assert!(matches!(error, ServerError::WeakAdminToken(_)), "{error:?}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            let error = load_or_create_token(&path, Token::FeedReader).expect_err("exposed");
            assert!(
                matches!(error, ServerError::ExposedFeedToken(_, 0o644)),
                "{error:?}"
            );
        }
    }

    #[test]
    fn obviously_weak_tokens_are_refused() {
        for weak in [
            "short",
            &"a".repeat(32),
            &"ab".repeat(40),
            "passwordpasswordpasswordpassword",
            "0123456789012345678901234567890123",
        ] {
            assert!(!strong_enough(weak), "{weak:?}");
        }
        for strong in [
            "kwadmin_3q2-7wAbYz9XkLmN0pQrStUvWxYz1a2B3c4D5e6F7g8",
            "Zq8vN1xW4mK7pR2tY5uB9cE3hJ6lO0sA",
        ] {
            assert!(strong_enough(strong), "{strong:?}");
        }
    }
}
