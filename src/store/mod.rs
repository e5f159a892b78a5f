//! Durable truth on disk (sled) and the in-memory index that serves decisions.

pub mod db;
pub mod index;
pub mod record;
