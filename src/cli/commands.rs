//! One function per `keyward keys` subcommand: the request it sends, and
//! its result as [`Shown`].

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};
use tonic::Request;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use super::show::{key_json, kind_name, level_name, show_key, show_new_secret, to_the_minute};
use super::{CreateArgs, Rate, Shown};
use crate::pb::v1 as pb;
use crate::pb::v1::key_manager_client::KeyManagerClient;

/// A connected KeyManager client and the credential its calls carry.
pub(super) struct Session {
    /// The client.
    pub(super) client: KeyManagerClient<Channel>,
    /// `Bearer …`, the admin token or a key.
    pub(super) bearer: MetadataValue<Ascii>,
}

impl Session {
    /// `message` with the credential.
    fn authed<T>(&self, message: T) -> Request<T> {
        super::authed(&self.bearer, message)
    }

    /// `keys create`: the new key and its secret, shown this once.
    pub(super) async fn create(&mut self, args: CreateArgs) -> anyhow::Result<Shown> {
        let CreateArgs {
            name,
            scopes,
            access,
            account,
            expires_in,
            allowed_cidrs,
            rate,
            burst,
            credits,
            refill,
        } = args;
        let request = self.authed(pb::CreateKeyRequest {
            name,
            scopes,
            access: parse_access(&access)?,
            account_id: account,
            expires_at: expires_in.map(from_now),
            allowed_cidrs,
            rate_limit: rate.map(|rate| rate.with_burst(burst)),
            credits: super::credits(credits, refill),
        });
        let response = self.client.create_key(request).await?.into_inner();
        Ok(show_new_secret(response.key.as_ref(), &response.secret))
    }

    /// `keys list`: every page of an account's keys, one line each.
    pub(super) async fn list(
        &mut self,
        account: String,
        page_size: i32,
        unused_for: Option<Duration>,
    ) -> anyhow::Result<Shown> {
        let unused_for = unused_for
            .map(prost_types::Duration::try_from)
            .transpose()
            .context("--unused-for is too long")?;
        let mut out = String::new();
        let mut keys = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = self.authed(pb::ListKeysRequest {
                account_id: account.clone(),
                page_size,
                page_token,
                unused_for,
            });
            let page = self.client.list_keys(request).await?.into_inner();
            for key in &page.keys {
                keys.push(key_json(key));
                // A leaked current secret is the state that matters most
                // (a previous one found ended its overlap and is harmless).
                let leaked = key.leak.as_ref().is_some_and(|leak| !leak.previous_secret);
                let state = match (key.enabled, key.expired, leaked) {
                    (false, _, true) => "disabled:leaked",
                    (true, _, true) => "leaked",
                    (_, true, false) => "expired",
                    (false, false, false) => "disabled",
                    (true, false, false) => "enabled",
                };
                let _ = writeln!(
                    out,
                    "{}  {:<18}  {:<15}  {:<17}  {}",
                    key.key_id,
                    kind_name(key.kind),
                    state,
                    key.last_used_at
                        .as_ref()
                        .map_or_else(|| "never used".to_owned(), to_the_minute),
                    key.name
                );
            }
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        Ok(Shown {
            text: out,
            json: serde_json::json!({ "keys": keys }),
        })
    }

    /// `keys get`.
    pub(super) async fn get(&mut self, key_id: String) -> anyhow::Result<Shown> {
        let request = self.authed(pb::GetKeyRequest { key_id });
        Ok(show_key(&self.client.get_key(request).await?.into_inner()))
    }

    /// `keys usage`.
    pub(super) async fn usage(&mut self, key_id: String, range: String) -> anyhow::Result<Shown> {
        let request = self.authed(pb::GetKeyUsageRequest { key_id, range });
        Ok(super::show::show_usage(
            &self.client.get_key_usage(request).await?.into_inner(),
        ))
    }

    /// `keys update`: a new name and a complete new scope list.
    pub(super) async fn update(
        &mut self,
        key_id: String,
        name: String,
        scopes: Vec<String>,
        access: &[String],
    ) -> anyhow::Result<Shown> {
        let request = self.authed(pb::UpdateKeyRequest {
            key_id,
            name,
            scopes,
            access: parse_access(access)?,
        });
        Ok(show_key(
            &self.client.update_key(request).await?.into_inner(),
        ))
    }

    /// `keys rename`.
    pub(super) async fn rename(&mut self, key_id: String, name: String) -> anyhow::Result<Shown> {
        let request = self.authed(pb::RenameKeyRequest { key_id, name });
        Ok(show_key(
            &self.client.rename_key(request).await?.into_inner(),
        ))
    }

    /// `keys delete`.
    pub(super) async fn delete(&mut self, key_id: String) -> anyhow::Result<Shown> {
        let request = self.authed(pb::DeleteKeyRequest {
            key_id: key_id.clone(),
        });
        self.client.delete_key(request).await?;
        Ok(Shown {
            text: format!("revoked {key_id}\n"),
            json: serde_json::json!({ "revoked": key_id }),
        })
    }

    /// `keys rotate`: the key and its new secret, shown this once.
    pub(super) async fn rotate(
        &mut self,
        key_id: String,
        overlap: Duration,
    ) -> anyhow::Result<Shown> {
        let request = self.authed(pb::RotateKeyRequest {
            key_id,
            overlap: Some(
                prost_types::Duration::try_from(overlap).context("--overlap is too long")?,
            ),
        });
        let response = self.client.rotate_key(request).await?.into_inner();
        Ok(show_new_secret(response.key.as_ref(), &response.secret))
    }

    /// `keys allow`: the address ranges (none: any address).
    pub(super) async fn allow(
        &mut self,
        key_id: String,
        cidrs: Vec<String>,
    ) -> anyhow::Result<Shown> {
        let request = self.authed(pb::SetKeyAllowlistRequest {
            key_id,
            allowed_cidrs: cidrs,
        });
        let key = self.client.set_key_allowlist(request).await?.into_inner();
        Ok(show_key(&key))
    }

    /// `keys limit`: a rate limit, or none.
    pub(super) async fn limit(
        &mut self,
        key_id: String,
        rate: Option<Rate>,
        burst: Option<u32>,
    ) -> anyhow::Result<Shown> {
        let request = self.authed(pb::SetKeyRateLimitRequest {
            key_id,
            rate_limit: rate.map(|rate| rate.with_burst(burst)),
        });
        let key = self.client.set_key_rate_limit(request).await?.into_inner();
        Ok(show_key(&key))
    }

    /// `keys credits`.
    pub(super) async fn credits(
        &mut self,
        key_id: String,
        credits: Option<pb::Credits>,
    ) -> anyhow::Result<Shown> {
        let request = self.authed(pb::SetKeyCreditsRequest { key_id, credits });
        let key = self.client.set_key_credits(request).await?.into_inner();
        Ok(show_key(&key))
    }

    /// `keys disable`.
    pub(super) async fn disable(&mut self, key_id: String) -> anyhow::Result<Shown> {
        let request = self.authed(pb::DisableKeyRequest { key_id });
        Ok(show_key(
            &self.client.disable_key(request).await?.into_inner(),
        ))
    }

    /// `keys enable`.
    pub(super) async fn enable(&mut self, key_id: String) -> anyhow::Result<Shown> {
        let request = self.authed(pb::EnableKeyRequest { key_id });
        Ok(show_key(
            &self.client.enable_key(request).await?.into_inner(),
        ))
    }

    /// `keys expire`: an expiry this long from now, or never.
    pub(super) async fn expire(
        &mut self,
        key_id: String,
        after: Option<Duration>,
    ) -> anyhow::Result<Shown> {
        let request = self.authed(pb::SetKeyExpiryRequest {
            key_id,
            expires_at: after.map(from_now),
        });
        let key = self.client.set_key_expiry(request).await?.into_inner();
        Ok(show_key(&key))
    }

    /// `keys scopes`: the calling credential's scopes.
    pub(super) async fn scopes(&mut self) -> anyhow::Result<Shown> {
        let request = self.authed(pb::GetScopesRequest {});
        let scopes = self.client.get_scopes(request).await?.into_inner().scopes;
        Ok(Shown {
            text: scopes.iter().fold(String::new(), |mut out, s| {
                let _ = writeln!(out, "{s}");
                out
            }),
            json: serde_json::json!({ "scopes": scopes }),
        })
    }

    /// `keys catalog`: each category, its levels and its scopes.
    pub(super) async fn catalog(&mut self) -> anyhow::Result<Shown> {
        let request = self.authed(pb::ListCatalogRequest {});
        let catalog = self.client.list_catalog(request).await?.into_inner();
        let mut out = String::new();
        let mut categories = Vec::new();
        for category in catalog.categories {
            let levels: Vec<&str> = category.levels.iter().map(|l| level_name(*l)).collect();
            categories.push(serde_json::json!({
                "id": category.id,
                "title": category.title,
                "levels": levels,
                "exclusive": category.exclusive,
                "scopes": category.scopes,
            }));
            let _ = writeln!(
                out,
                "[{}] {} (levels: {}{})",
                category.id,
                category.title,
                levels.join(", "),
                if category.exclusive {
                    "; exclusive"
                } else {
                    ""
                }
            );
            for scope in category.scopes {
                let _ = writeln!(out, "  {scope}");
            }
        }
        Ok(Shown {
            text: out,
            json: serde_json::json!({ "categories": categories }),
        })
    }
}

/// `--access category=level` pairs as the request's map.
fn parse_access(pairs: &[String]) -> anyhow::Result<HashMap<String, i32>> {
    pairs
        .iter()
        .map(|pair| {
            let Some((category, level)) = pair.split_once('=') else {
                bail!("--access {pair:?}: expected category=level");
            };
            let level = match level.to_ascii_lowercase().as_str() {
                "none" => pb::AccessLevel::None,
                "read" => pb::AccessLevel::Read,
                "write" => pb::AccessLevel::Write,
                "full" => pb::AccessLevel::Full,
                other => {
                    bail!("--access {pair:?}: unknown level {other:?} (none, read, write, full)")
                }
            };
            Ok((category.to_owned(), level as i32))
        })
        .collect()
}

/// `now + after` as a protobuf timestamp.
fn from_now(after: std::time::Duration) -> prost_types::Timestamp {
    let at = std::time::SystemTime::now() + after;
    prost_types::Timestamp::from(at)
}
