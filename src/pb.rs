//! Generated protobuf code, fenced off from hand-written code.
#![allow(missing_docs, clippy::pedantic, clippy::all)]

/// `keyward.v1`: the public API.
pub mod v1 {
    tonic::include_proto!("keyward.v1");
}

/// `keyward.store.v1`: the on-disk record schema.
pub mod store {
    tonic::include_proto!("keyward.store.v1");
}

/// `etcdserverpb`: the etcd v3 RPCs keyward calls (client only).
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// `mvccpb`: etcd's key-value and event types.
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

/// Descriptors of every keyward proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keyward_descriptor");
