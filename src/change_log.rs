//! The change feed of the index: every change the writer makes, numbered
//! in order and broadcast to the decision feed's readers
//! ([`crate::grpc::feed`]), with the numbering that lets a reader stitch a
//! snapshot and the changes after it together without a gap.
//!
//! A reader subscribes (learning the last number sent), then reads the
//! index: every change numbered at or below that was in the index before
//! the read (the index tells its observer after a change is made), every
//! later one is in the subscription. Once the reader has passed the number
//! current when its read ended, its copy is the index at that point.

use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::domain::key::KeyId;
use crate::store::index::{Entry, Observer};

/// Changes a reader may fall behind by before it must read again. A change
/// is an entry (~200 bytes), so the buffer holds at most ~1 MiB.
pub const CHANGE_LOG_BUFFER: usize = 4096;

/// One change: `id` became `entry` (`None`: no longer live).
#[derive(Debug)]
pub struct Change {
    /// Its place in the order of changes (from 1).
    pub seq: u64,
    /// The key.
    pub id: KeyId,
    /// Its new state.
    pub entry: Option<Entry>,
}

/// Numbers and broadcasts the index's changes.
#[derive(Debug)]
pub struct ChangeLog {
    /// The last number given; held while sending, so that numbers and
    /// subscriptions are ordered.
    last: Mutex<u64>,
    sender: broadcast::Sender<Arc<Change>>,
}

impl Default for ChangeLog {
    fn default() -> Self {
        Self {
            last: Mutex::new(0),
            sender: broadcast::Sender::new(CHANGE_LOG_BUFFER),
        }
    }
}

impl ChangeLog {
    /// The last change's number, and every change after it.
    pub fn subscribe(&self) -> (u64, broadcast::Receiver<Arc<Change>>) {
        let last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (*last, self.sender.subscribe())
    }

    /// The last change's number.
    pub fn last(&self) -> u64 {
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Observer for ChangeLog {
    fn changed(&self, id: &KeyId, entry: Option<&Entry>) {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *last += 1;
        // No receiver is not an error: nobody is reading the feed.
        let _ = self.sender.send(Arc::new(Change {
            seq: *last,
            id: *id,
            entry: entry.cloned(),
        }));
    }
}
