//! gRPC adapters: protobuf in, domain calls, protobuf out. Thin by design.

pub mod authorize;
pub mod caller;
pub mod codec;
pub mod convert;
pub mod echo;
pub mod feed;
mod feed_input;
pub mod manage;
pub mod rpc_counts;
