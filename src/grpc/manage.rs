//! `keyward.v1.KeyManager`: SendGrid's /v3/api_keys and /v3/scopes as gRPC,
//! a thin adapter over the management service ([`crate::manage`]):
//! protobuf in and out, nothing else. Its callers are authenticated by
//! a layer around it ([`super::caller`]).

use std::sync::Arc;

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::caller::caller;
use super::convert;
use crate::domain::record::KeyRecord;
use crate::keys::Principal;
use crate::keys::snapshot::Origin;
use crate::manage::{BackupError, Manager, NewKey, PageRequest, Replacement};
use crate::pb::v1 as pb;

/// Serves the management RPCs.
#[derive(Debug, Clone)]
pub struct ManageService {
    manager: Manager,
    /// What backups say of this sidecar.
    origin: Arc<Origin>,
}

impl ManageService {
    /// The RPCs over the management service; backups describe the sidecar
    /// as `origin`. Callers are authenticated by
    /// [`super::caller::AuthenticateLayer`] around it.
    #[must_use]
    pub fn new(manager: Manager, origin: Origin) -> Self {
        Self {
            manager,
            origin: Arc::new(origin),
        }
    }

    /// A record as the API shows it, with this sidecar's last-used time.
    fn show(&self, record: &KeyRecord) -> pb::ApiKey {
        convert::api_key(record, self.manager.last_used(record))
    }

    /// A changed key as its changer may see it: all of it to a caller that
    /// could read the key anyway, else its id and name (SendGrid's PATCH
    /// answer), never its scopes, account or limits.
    fn show_to(&self, principal: &Principal, record: &KeyRecord) -> pb::ApiKey {
        if self.manager.may_read(principal) {
            self.show(record)
        } else {
            pb::ApiKey {
                key_id: record.id.to_string(),
                name: record.name.clone(),
                ..pb::ApiKey::default()
            }
        }
    }
}

#[tonic::async_trait]
impl pb::key_manager_server::KeyManager for ManageService {
    type BackupStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

    async fn backup(
        &self,
        request: Request<pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let principal = caller(&request)?;
        let chunks = self
            .manager
            .backup(&principal, (*self.origin).clone())
            .await
            .map_err(|error| match error {
                BackupError::Refused(error) => Status::from(error),
                BackupError::Failed(error) => Status::from(error),
            })?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(chunks).map(|chunk| {
            chunk
                .map(|data| pb::BackupChunk { data })
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        let principal = caller(&request)?;
        let request = request.into_inner();
        let key = NewKey {
            name: request.name,
            grant: convert::grant(&request.scopes, &request.access),
            expires_at: convert::time(request.expires_at.as_ref()),
            allowed_cidrs: request.allowed_cidrs,
            rate_limit: convert::rate_limit(request.rate_limit.as_ref()),
            credits: convert::credits(request.credits.as_ref()),
        };
        let (record, secret) = self
            .manager
            .create(&principal, Ok(&request.account_id), Ok(key))
            .await?;
        Ok(Response::new(pb::CreateKeyResponse {
            key: Some(self.show(&record)),
            secret,
        }))
    }

    async fn get_key(
        &self,
        request: Request<pb::GetKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let principal = caller(&request)?;
        let id = &request.get_ref().key_id;
        let record = self.manager.get(&principal, id, Ok("")).await?;
        Ok(Response::new(self.show(&record)))
    }

    async fn get_key_usage(
        &self,
        request: Request<pb::GetKeyUsageRequest>,
    ) -> Result<Response<pb::KeyUsage>, Status> {
        let principal = caller(&request)?;
        let request = request.get_ref();
        let usage = self
            .manager
            .usage(&principal, &request.key_id, Ok(""), Ok(&request.range))
            .await?;
        Ok(Response::new(convert::key_usage(&usage)))
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let principal = caller(&request)?;
        let request = request.into_inner();
        let page = PageRequest {
            token: request.page_token,
            size: i64::from(request.page_size),
            unused_for: convert::duration(request.unused_for.as_ref()),
        };
        let (records, next_page_token) = self
            .manager
            .list(&principal, Ok(&request.account_id), Ok(page))
            .await?;
        Ok(Response::new(pb::ListKeysResponse {
            keys: records.iter().map(|record| self.show(record)).collect(),
            next_page_token,
        }))
    }

    async fn update_key(
        &self,
        request: Request<pb::UpdateKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let principal = caller(&request)?;
        let request = request.into_inner();
        let replacement = Replacement {
            name: request.name,
            grant: convert::grant(&request.scopes, &request.access),
            grant_required: "required: UpdateKey replaces the scopes (set scopes or access); use RenameKey to change only the name",
        };
        let record = self
            .manager
            .update(&principal, (&request.key_id, Ok("")), Ok(replacement))
            .await?;
        Ok(Response::new(self.show(&record)))
    }

    async fn rename_key(
        &self,
        request: Request<pb::RenameKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let principal = caller(&request)?;
        let request = request.into_inner();
        let record = self
            .manager
            .rename(&principal, (&request.key_id, Ok("")), Ok(request.name))
            .await?;
        Ok(Response::new(self.show_to(&principal, &record)))
    }

    async fn delete_key(
        &self,
        request: Request<pb::DeleteKeyRequest>,
    ) -> Result<Response<pb::DeleteKeyResponse>, Status> {
        let principal = caller(&request)?;
        let id = &request.get_ref().key_id;
        self.manager.delete(&principal, (id, Ok(""))).await?;
        Ok(Response::new(pb::DeleteKeyResponse {}))
    }

    async fn get_scopes(
        &self,
        request: Request<pb::GetScopesRequest>,
    ) -> Result<Response<pb::GetScopesResponse>, Status> {
        let principal = caller(&request)?;
        let scopes = self.manager.held_scopes(&principal);
        Ok(Response::new(pb::GetScopesResponse {
            scopes: self.manager.catalog().names(&scopes),
        }))
    }

    async fn list_catalog(
        &self,
        request: Request<pb::ListCatalogRequest>,
    ) -> Result<Response<pb::ListCatalogResponse>, Status> {
        caller(&request)?;
        let catalog = self.manager.catalog();
        let categories = catalog
            .categories()
            .iter()
            .map(|c| pb::Category {
                id: c.id.clone(),
                title: c.title.clone(),
                levels: c
                    .levels
                    .iter()
                    .map(|l| convert::access_level_pb(*l) as i32)
                    .collect(),
                scopes: c
                    .scopes
                    .iter()
                    .map(|id| catalog.name(*id).to_owned())
                    .collect(),
                exclusive: c.exclusive,
                description: c.description.clone(),
            })
            .collect();
        Ok(Response::new(pb::ListCatalogResponse {
            categories,
            aliases: catalog.aliases().clone().into_iter().collect(),
        }))
    }

    async fn disable_key(
        &self,
        request: Request<pb::DisableKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let principal = caller(&request)?;
        let id = &request.get_ref().key_id;
        let record = self
            .manager
            .set_disabled(&principal, (id, Ok("")), true)
            .await?;
        Ok(Response::new(self.show_to(&principal, &record)))
    }

    async fn enable_key(
        &self,
        request: Request<pb::EnableKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let principal = caller(&request)?;
        let id = &request.get_ref().key_id;
        let record = self
            .manager
            .set_disabled(&principal, (id, Ok("")), false)
            .await?;
        Ok(Response::new(self.show_to(&principal, &record)))
    }

    async fn set_key_allowlist(
        &self,
        request: Request<pb::SetKeyAllowlistRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let principal = caller(&request)?;
        let request = request.into_inner();
        let record = self
            .manager
            .set_allowlist(
                &principal,
                (&request.key_id, Ok("")),
                Ok(request.allowed_cidrs),
            )
            .await?;
        Ok(Response::new(self.show_to(&principal, &record)))
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        let principal = caller(&request)?;
        let request = request.into_inner();
        let overlap = convert::duration(request.overlap.as_ref());
        let (record, secret) = self
            .manager
            .rotate(&principal, (&request.key_id, Ok("")), Ok(overlap))
            .await?;
        Ok(Response::new(pb::RotateKeyResponse {
            key: Some(self.show_to(&principal, &record)),
            secret,
        }))
    }

    async fn set_key_rate_limit(
        &self,
        request: Request<pb::SetKeyRateLimitRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let principal = caller(&request)?;
        let request = request.into_inner();
        let limit = convert::rate_limit(request.rate_limit.as_ref());
        let record = self
            .manager
            .set_rate_limit(&principal, (&request.key_id, Ok("")), Ok(limit))
            .await?;
        Ok(Response::new(self.show_to(&principal, &record)))
    }

    async fn set_key_credits(
        &self,
        request: Request<pb::SetKeyCreditsRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let principal = caller(&request)?;
        let request = request.into_inner();
        let credits = convert::credits(request.credits.as_ref());
        let record = self
            .manager
            .set_credits(&principal, (&request.key_id, Ok("")), Ok(credits))
            .await?;
        Ok(Response::new(self.show_to(&principal, &record)))
    }

    async fn set_key_expiry(
        &self,
        request: Request<pb::SetKeyExpiryRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let principal = caller(&request)?;
        let request = request.into_inner();
        let at = convert::time(request.expires_at.as_ref());
        let record = self
            .manager
            .set_expiry(&principal, (&request.key_id, Ok("")), Ok(at))
            .await?;
        Ok(Response::new(self.show_to(&principal, &record)))
    }
}
