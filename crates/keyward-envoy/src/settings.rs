//! The module's settings: the `filter_config` string, JSON.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Settings, each with a documented default except `sidecar`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The sidecar's gRPC address on loopback, `http://127.0.0.1:50051`
    /// (the sidecar runs beside Envoy: the feed carries key hashes and a
    /// token in plain HTTP/2, so it never leaves the host).
    pub sidecar: String,
    /// The file holding the token the feed is read with: the sidecar's
    /// `--feed-token-file` (reads the feed and nothing else), or its admin
    /// token.
    pub token_file: PathBuf,
    /// Refuse every request (503) once the copy has heard nothing from the
    /// sidecar for this long; 0 (the default): decide from the last copy
    /// for as long as the sidecar is away.
    #[serde(default)]
    pub max_staleness_ms: u64,
    /// How often uses are reported to the sidecar (`last_used_at`).
    #[serde(default = "default_report_every_ms")]
    pub report_use_every_ms: u64,
}

fn default_report_every_ms() -> u64 {
    1000
}

impl Settings {
    /// Parses and checks the `filter_config` text.
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        let settings: Self =
            serde_json::from_slice(text).map_err(|e| format!("filter_config: {e}"))?;
        let url = settings.sidecar.as_str();
        let host = url
            .strip_prefix("http://")
            .map(|rest| rest.split('/').next().unwrap_or_default())
            .and_then(|authority| authority.rsplit_once(':').map(|(host, _)| host));
        if !matches!(host, Some("127.0.0.1" | "[::1]" | "localhost")) {
            return Err(format!(
                "filter_config.sidecar: {url:?} must be http://<loopback>:<port> (127.0.0.1, [::1] or localhost): the sidecar runs beside Envoy"
            ));
        }
        if settings.report_use_every_ms == 0 {
            return Err("filter_config.report_use_every_ms: must be at least 1".into());
        }
        Ok(settings)
    }

    /// [`Self::max_staleness_ms`], `None` for no limit.
    #[must_use]
    pub fn max_staleness(&self) -> Option<Duration> {
        (self.max_staleness_ms > 0).then(|| Duration::from_millis(self.max_staleness_ms))
    }
}
