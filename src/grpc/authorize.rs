//! `keyward.v1.Authorizer`: the decision as a gRPC call.

use tonic::{Request, Response, Status};

use crate::decisions::FrontDoor;
use crate::domain::catalog::Catalog;
use crate::domain::decision::Decision;
use crate::pb::v1 as pb;
use crate::refusal::invalid;

/// Serves `Authorize` through the shared front door.
#[derive(Debug, Clone)]
pub struct AuthorizeService {
    front: FrontDoor,
}

impl AuthorizeService {
    /// The service over the shared decision path.
    #[must_use]
    pub fn new(front: FrontDoor) -> Self {
        Self { front }
    }

    async fn authorize(
        &self,
        request: &pb::AuthorizeRequest,
    ) -> Result<pb::AuthorizeResponse, Status> {
        let (method, path) = FrontDoor::validate(&request.method, &request.path)
            .map_err(|e| invalid(e.field, e.problem))?;
        let client = crate::domain::allowlist::client(&request.client_ip)
            .map_err(|problem| invalid("client_ip", problem))?;
        let decision = self.front.decide(&request.key, client, method, path).await;
        Ok(response(&decision, self.front.catalog()))
    }
}

#[tonic::async_trait]
impl pb::authorizer_server::Authorizer for AuthorizeService {
    async fn authorize(
        &self,
        request: Request<pb::AuthorizeRequest>,
    ) -> Result<Response<pb::AuthorizeResponse>, Status> {
        self.authorize(request.get_ref()).await.map(Response::new)
    }
}

/// The protobuf form of a decision.
#[must_use]
pub fn response(decision: &Decision, catalog: &Catalog) -> pb::AuthorizeResponse {
    let missing = catalog.names(&decision.missing);
    let message = keyward_core::reply::message(decision, &missing);
    pb::AuthorizeResponse {
        allowed: decision.allowed(),
        reason: crate::refusal::wire(decision.deny) as i32,
        key_id: decision.key_id.map(|id| id.to_string()).unwrap_or_default(),
        account_id: decision.account.as_deref().unwrap_or_default().to_owned(),
        required_scopes: catalog.names(&decision.required),
        missing_scopes: missing,
        http_status: u32::from(decision.http_status()),
        message,
        retry_after: decision.retry_after_ms().map(duration),
        rate_limit: decision.quota.map(|quota| pb::RateLimitStatus {
            limit: quota.limit,
            remaining: quota.remaining,
            reset: Some(duration(quota.reset_ms)),
        }),
    }
}

fn duration(millis: u32) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::from(millis / 1000),
        nanos: i32::try_from(millis % 1000).unwrap_or_default() * 1_000_000,
    }
}
