//! Durable truth on disk (sled), etcd for replicated mode, and the
//! in-memory index that serves decisions. `record` is the one encoding
//! both stores hold; `db` is sled; `etcd` is the etcd layout, client,
//! paginated read and watch; `copy` moves a sled store into etcd (it uses
//! both, neither uses it); `backup` is the backup file (records at one
//! point in time, checksummed); `index` serves decisions.

pub mod backup;
pub mod copy;
pub mod db;
pub mod etcd;
pub use keyward_core::index;
pub mod record;
