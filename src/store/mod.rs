//! Durable truth on disk (sled), etcd for replicated mode, and the
//! in-memory index that serves decisions.

pub mod db;
pub mod etcd;
pub mod index;
pub mod record;
