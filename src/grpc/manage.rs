//! `keyward.v1.KeyManager`: SendGrid's /v3/api_keys and /v3/scopes as gRPC.
//! Every change is written to the audit log (target `keyward::audit`).

use std::sync::Arc;

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::convert;
use crate::access::Access;
use crate::audit;
use crate::domain::record::KeyRecord;
use crate::keys::snapshot::Origin;
use crate::keys::{Expiry, KeyError, Keys, Lifecycle, Operation, Principal, StateChange};
use crate::pb::v1 as pb;

/// Serves the management RPCs.
#[derive(Debug, Clone)]
pub struct ManageService {
    keys: Arc<Keys>,
    access: Access,
    /// What backups say of this sidecar.
    origin: Arc<Origin>,
}

impl ManageService {
    /// The service over the shared key store, authenticating callers with
    /// `access`; backups describe the sidecar as `origin`.
    #[must_use]
    pub fn new(keys: Arc<Keys>, access: Access, origin: Origin) -> Self {
        Self {
            keys,
            access,
            origin: Arc::new(origin),
        }
    }

    /// Authenticates `authorization: Bearer <admin token | API key>`.
    async fn principal<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        principal_of(&self.access, request).await
    }
}

/// The caller, from `authorization` and (for a key's allowlist) the
/// peer's address.
pub(crate) async fn principal_of<T>(
    access: &Access,
    request: &Request<T>,
) -> Result<Principal, Status> {
    let header = request
        .metadata()
        .get("authorization")
        .map(|value| value.to_str().map(str::to_owned).map_err(|_| ()));
    let client = request.remote_addr().map(|peer| peer.ip());
    access
        .principal(
            header.as_ref().map(|h| h.as_deref().map_err(|&()| ())),
            client,
        )
        .await
        .map_err(Status::from)
}

/// Logs a refused change to the audit log, then converts it.
fn refused(principal: &Principal, operation: &str) -> impl FnOnce(KeyError) -> Status {
    move |error| {
        audit::refused(principal, operation, &error);
        error.into()
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
        let principal = self.principal(&request).await?;
        if !matches!(principal, Principal::Admin) {
            let error = KeyError::PermissionDenied("backups are for the admin token only".into());
            return Err(refused(&principal, "backup")(error));
        }
        let chunks = self.keys.backup((*self.origin).clone()).await?;
        audit::backup(&principal);
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
        let principal = self.principal(&request).await?;
        let request = request.into_inner();
        let fail = |e| refused(&principal, "create")(e);
        let named = self
            .access
            .screen_account(&request.account_id)
            .map_err(fail)?;
        let account = self
            .keys
            .authorize(&principal, Operation::Create, named)
            .map_err(fail)?;
        let name = self.access.name(&request.name).map_err(fail)?;
        let grant = convert::grant(self.keys.catalog(), &request.scopes, &request.access)
            .map_err(fail)?
            .unwrap_or_else(|| self.keys.catalog().full_access());
        let lifecycle = Lifecycle {
            expires_at: convert::expires_at(request.expires_at.as_ref()).map_err(fail)?,
            allowed_cidrs: self
                .access
                .allowed_cidrs(&request.allowed_cidrs)
                .map_err(fail)?,
            rate_limit: convert::rate_limit(request.rate_limit.as_ref()).map_err(fail)?,
        };
        let (record, secret) = self
            .keys
            .create(&principal, account, name, grant, lifecycle)
            .await
            .map_err(fail)?;
        audit::changed(&principal, "create", None, &record);
        Ok(Response::new(pb::CreateKeyResponse {
            key: Some(self.show(&record)),
            secret,
        }))
    }

    async fn get_key(
        &self,
        request: Request<pb::GetKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let principal = self.principal(&request).await?;
        self.keys.permit(&principal, Operation::Read)?;
        let id = convert::key_id(&request.get_ref().key_id)?;
        let record = self.keys.get(&principal, &id).await?;
        Ok(Response::new(self.show(&record)))
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let principal = self.principal(&request).await?;
        let request = request.get_ref();
        let account = self.keys.authorize(
            &principal,
            Operation::Read,
            self.access.screen_account(&request.account_id)?,
        )?;
        let limit = convert::page_size(request.page_size)?;
        let unused_for = convert::unused_for(request.unused_for.as_ref())?;
        let (records, next_page_token) = self
            .keys
            .list(account, &request.page_token, limit, unused_for)
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
        let principal = self.principal(&request).await?;
        let request = request.into_inner();
        let fail = |e| refused(&principal, "update")(e);
        self.keys
            .permit(&principal, Operation::Update)
            .map_err(fail)?;
        let id = convert::key_id(&request.key_id).map_err(fail)?;
        let name = self.access.name(&request.name).map_err(fail)?;
        let grant = convert::grant(self.keys.catalog(), &request.scopes, &request.access)
            .map_err(fail)?
            .ok_or_else(|| KeyError::Invalid {
                field: "scopes",
                problem: "required: UpdateKey replaces the scopes (set scopes or access); use RenameKey to change only the name".into(),
            })
            .map_err(fail)?;
        let (before, record) = self
            .keys
            .update(&principal, &id, name, Some(grant))
            .await
            .map_err(fail)?;
        audit::changed(&principal, "update", Some(&before), &record);
        Ok(Response::new(self.show(&record)))
    }

    async fn rename_key(
        &self,
        request: Request<pb::RenameKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let principal = self.principal(&request).await?;
        let request = request.into_inner();
        let fail = |e| refused(&principal, "rename")(e);
        self.keys
            .permit(&principal, Operation::Update)
            .map_err(fail)?;
        let id = convert::key_id(&request.key_id).map_err(fail)?;
        let name = self.access.name(&request.name).map_err(fail)?;
        let (before, record) = self
            .keys
            .update(&principal, &id, name, None)
            .await
            .map_err(fail)?;
        audit::changed(&principal, "rename", Some(&before), &record);
        Ok(Response::new(self.show_to(&principal, &record)))
    }

    async fn delete_key(
        &self,
        request: Request<pb::DeleteKeyRequest>,
    ) -> Result<Response<pb::DeleteKeyResponse>, Status> {
        let principal = self.principal(&request).await?;
        let fail = |e| refused(&principal, "delete")(e);
        self.keys
            .permit(&principal, Operation::Delete)
            .map_err(fail)?;
        let id = convert::key_id(&request.get_ref().key_id).map_err(fail)?;
        let record = self.keys.delete(&principal, &id).await.map_err(fail)?;
        audit::changed(&principal, "delete", Some(&record), &record);
        Ok(Response::new(pb::DeleteKeyResponse {}))
    }

    async fn get_scopes(
        &self,
        request: Request<pb::GetScopesRequest>,
    ) -> Result<Response<pb::GetScopesResponse>, Status> {
        let principal = self.principal(&request).await?;
        let scopes = self.keys.held_scopes(&principal);
        Ok(Response::new(pb::GetScopesResponse {
            scopes: self.keys.catalog().names(&scopes),
        }))
    }

    async fn list_catalog(
        &self,
        request: Request<pb::ListCatalogRequest>,
    ) -> Result<Response<pb::ListCatalogResponse>, Status> {
        self.principal(&request).await?;
        let catalog = self.keys.catalog();
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
        let key_id = &request.get_ref().key_id;
        self.set_state(&request, "disable", key_id, || {
            Ok(StateChange {
                disabled: Some(true),
                ..StateChange::default()
            })
        })
        .await
    }

    async fn enable_key(
        &self,
        request: Request<pb::EnableKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let key_id = &request.get_ref().key_id;
        self.set_state(&request, "enable", key_id, || {
            Ok(StateChange {
                disabled: Some(false),
                ..StateChange::default()
            })
        })
        .await
    }

    async fn set_key_allowlist(
        &self,
        request: Request<pb::SetKeyAllowlistRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let key_id = &request.get_ref().key_id;
        let cidrs = &request.get_ref().allowed_cidrs;
        self.set_state(&request, "set_allowlist", key_id, || {
            Ok(StateChange {
                allowed_cidrs: Some(self.access.allowed_cidrs(cidrs)?),
                ..StateChange::default()
            })
        })
        .await
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        let principal = self.principal(&request).await?;
        let request = request.into_inner();
        let fail = |e| refused(&principal, "rotate")(e);
        self.keys
            .permit(&principal, Operation::Rotate)
            .map_err(fail)?;
        let id = convert::key_id(&request.key_id).map_err(fail)?;
        let overlap = convert::overlap(request.overlap.as_ref()).map_err(fail)?;
        let (before, record, secret) = self
            .keys
            .rotate(&principal, &id, overlap)
            .await
            .map_err(fail)?;
        audit::changed(&principal, "rotate", Some(&before), &record);
        Ok(Response::new(pb::RotateKeyResponse {
            key: Some(self.show_to(&principal, &record)),
            secret,
        }))
    }

    async fn set_key_rate_limit(
        &self,
        request: Request<pb::SetKeyRateLimitRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let key_id = &request.get_ref().key_id;
        let limit = request.get_ref().rate_limit.as_ref();
        self.set_state(&request, "set_rate_limit", key_id, || {
            Ok(StateChange {
                rate_limit: Some(convert::rate_limit(limit)?),
                ..StateChange::default()
            })
        })
        .await
    }

    async fn set_key_expiry(
        &self,
        request: Request<pb::SetKeyExpiryRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let key_id = &request.get_ref().key_id;
        let expires_at = request.get_ref().expires_at.as_ref();
        self.set_state(&request, "set_expiry", key_id, || {
            Ok(StateChange {
                expires_at: Some(
                    convert::expires_at(expires_at)?.map_or(Expiry::Never, Expiry::At),
                ),
                ..StateChange::default()
            })
        })
        .await
    }
}

impl ManageService {
    /// A record as the API shows it, with this sidecar's last-used time.
    fn show(&self, record: &KeyRecord) -> pb::ApiKey {
        convert::api_key(record, self.keys.last_used(record))
    }

    /// The lifecycle RPCs (disable, enable, expiry, allowlist, rate limit):
    /// the same rules as UpdateKey. The caller is authenticated once, then
    /// `state` reads the request's values (refused values are audited too).
    async fn set_state<T>(
        &self,
        request: &Request<T>,
        operation: &str,
        key_id: &str,
        state: impl FnOnce() -> Result<StateChange, KeyError>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let principal = self.principal(request).await?;
        let fail = |e| refused(&principal, operation)(e);
        self.keys
            .permit(&principal, Operation::Update)
            .map_err(fail)?;
        let id = convert::key_id(key_id).map_err(fail)?;
        let state = state().map_err(fail)?;
        let (before, record) = self
            .keys
            .set_state(&principal, &id, state)
            .await
            .map_err(fail)?;
        audit::changed(&principal, operation, Some(&before), &record);
        Ok(Response::new(self.show_to(&principal, &record)))
    }

    /// A changed key as its changer may see it: all of it to a caller that
    /// could read the key anyway, else its id and name (SendGrid's PATCH
    /// answer), never its scopes, account or limits.
    fn show_to(&self, principal: &Principal, record: &KeyRecord) -> pb::ApiKey {
        let key = self.show(record);
        if self.keys.permit(principal, Operation::Read).is_ok() {
            key
        } else {
            pb::ApiKey {
                key_id: key.key_id,
                name: key.name,
                ..pb::ApiKey::default()
            }
        }
    }
}
