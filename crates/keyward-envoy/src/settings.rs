//! The module's settings: the `filter_config` string, JSON.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Settings, each with a documented default except `sidecar`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The sidecar's gRPC address, `http://127.0.0.1:50051`.
    pub sidecar: String,
    /// The sidecar's admin token file (the feed is admin only); default
    /// `keyward-data/admin.token`, the sidecar's own default, relative to
    /// Envoy's working directory.
    #[serde(default = "default_token_file")]
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

fn default_token_file() -> PathBuf {
    PathBuf::from("keyward-data/admin.token")
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
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "filter_config.sidecar: {url:?} must be an http:// or https:// URL"
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
