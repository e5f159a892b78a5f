//! Generated protobuf code (the decision feed's client), fenced off.
#![allow(missing_docs, clippy::pedantic, clippy::all)]
#![forbid(unsafe_code)]

tonic::include_proto!("keyward.v1");
