//! `keyward.v1.Diagnostics/Echo`: a no-op RPC served by the same server
//! stack, so load tests can measure Authorize against the cost of gRPC itself.

use tonic::{Request, Response, Status};

use crate::pb::v1 as pb;

/// Echoes the payload; nothing else.
#[derive(Debug, Clone, Copy, Default)]
pub struct EchoService;

#[tonic::async_trait]
impl pb::diagnostics_server::Diagnostics for EchoService {
    async fn echo(
        &self,
        request: Request<pb::EchoRequest>,
    ) -> Result<Response<pb::EchoResponse>, Status> {
        Ok(Response::new(pb::EchoResponse {
            payload: request.into_inner().payload,
        }))
    }
}
