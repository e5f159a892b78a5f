//! The paged full read of the key records ([`Listing`]), every page at
//! one revision.

use super::connection::Authed;
use super::record::KeyRecord;
use super::{DEFAULT_PAGE_KEYS, Etcd, EtcdError, decode_value, prefix_end};
use crate::pb::etcd::RangeRequest;
use crate::pb::etcd::kv_client::KvClient;

impl Etcd {
    /// Reads every key record under the prefix, `page_keys` at a time, as
    /// of one revision ([`Listing`]).
    #[must_use]
    pub fn list(&self, page_keys: u32) -> Listing {
        let start = self.keys_prefix();
        Listing {
            kv: self.kv.clone(),
            end: prefix_end(&start),
            next: start.clone(),
            start,
            bounds: Vec::new(),
            window: 0,
            total: 0,
            done: false,
            pages: 0,
            window_keys: WINDOW_KEYS,
            revision: 0,
            page_keys: if page_keys == 0 {
                DEFAULT_PAGE_KEYS
            } else {
                page_keys
            } as usize,
        }
    }

    /// Every key record and the revision they are the state at, read in
    /// pages ([`Self::list`]) and held together: for tools and tests (a
    /// sidecar applies a listing page by page instead).
    pub async fn snapshot(&self) -> Result<(Vec<KeyRecord>, i64), EtcdError> {
        let mut listing = self.list(0);
        let mut records = Vec::new();
        let mut revision = 0;
        while let Some(page) = listing.next_page().await? {
            records.extend(page.records);
            revision = page.revision;
        }
        Ok((records, revision))
    }
}

/// A full read of the key records in pages, every page at the first
/// read's revision, so the pages together are exactly the key set at that
/// revision (Kubernetes' paginated LIST). Reading on after etcd compacted
/// that revision fails with [`EtcdError::Compacted`]: the caller starts a
/// new listing, and must not take what it read as complete.
///
/// etcd counts every key from a range's start to its end to answer even a
/// limited range, so paging through one range is quadratic (measured here:
/// 19 ms for each of the first pages of 100,000 keys, and etcd-io/etcd#11057
/// saw minutes at 2M). The listing first counts the keys once, then pages
/// through contiguous windows that cover the prefix exactly, split on the
/// leading characters of the key ids (random, so windows are even): each
/// window holds at most about [`WINDOW_KEYS`] keys, and every key is in
/// exactly one window whatever its name.
#[derive(Debug)]
pub struct Listing {
    kv: KvClient<Authed>,
    /// Where the keys prefix starts and ends.
    start: Vec<u8>,
    end: Vec<u8>,
    /// Window boundaries after `start`, sorted; empty until counted.
    bounds: Vec<Vec<u8>>,
    /// The window being read (an index into the windows), and where in it.
    window: usize,
    next: Vec<u8>,
    /// The revision every page is read at (0 until the count answers).
    revision: i64,
    /// Keys at that revision.
    total: u64,
    page_keys: usize,
    window_keys: u64,
    done: bool,
    pages: usize,
}

/// The most keys a window of a [`Listing`] is meant to hold, on average.
const WINDOW_KEYS: u64 = 20_000;

/// The characters a key id is written with, in byte order.
const ID_ALPHABET: &[u8; 64] = b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz";

/// One page of a [`Listing`].
#[derive(Debug)]
pub struct Page {
    /// Its records, in etcd key order.
    pub records: Vec<KeyRecord>,
    /// The revision the listing is at.
    pub revision: i64,
    /// How many keys the whole listing holds.
    pub total: u64,
    /// Whether it is the first page (a new listing).
    pub first: bool,
    /// Whether it is the last: the listing is complete.
    pub last: bool,
}

impl Listing {
    /// The next page, `None` after the last. A page too large for
    /// [`REPLY_LIMIT_BYTES`](super::REPLY_LIMIT_BYTES) is asked for again
    /// at half the size (down to one key). Every page holds at least one
    /// record, except a last one.
    pub async fn next_page(&mut self) -> Result<Option<Page>, EtcdError> {
        if self.done {
            return Ok(None);
        }
        if self.revision == 0 {
            self.count().await?;
        }
        loop {
            let window_end = self.bounds.get(self.window).unwrap_or(&self.end).clone();
            let reply = self.range(&window_end).await?;
            let more = reply.more;
            let records = reply
                .kvs
                .iter()
                .map(|kv| decode_value(&kv.key, &kv.value))
                .collect::<Result<Vec<_>, _>>()?;
            match reply.kvs.last() {
                Some(last) if more => {
                    // Strictly after the last key read, same window.
                    self.next.clone_from(&last.key);
                    self.next.push(0);
                }
                _ => {
                    self.next.clone_from(&window_end);
                    self.window += 1;
                }
            }
            self.done = self.window > self.bounds.len();
            if records.is_empty() && !self.done {
                continue;
            }
            self.pages += 1;
            return Ok(Some(Page {
                records,
                revision: self.revision,
                total: self.total,
                first: self.pages == 1,
                last: self.done,
            }));
        }
    }

    /// Counts the keys (a linearizable read, whose revision every page is
    /// then read at) and splits the prefix into windows for that many.
    async fn count(&mut self) -> Result<(), EtcdError> {
        (self.total, self.revision) =
            super::count_range(&mut self.kv, self.start.clone(), self.end.clone()).await?;
        let mut depth = 0;
        while self.total / 64_u64.pow(depth) > self.window_keys && depth < 3 {
            depth += 1;
        }
        let mut bounds = vec![self.start.clone()];
        for _ in 0..depth {
            bounds = bounds
                .iter()
                .flat_map(|prefix| {
                    ID_ALPHABET.iter().map(move |c| {
                        let mut bound = prefix.clone();
                        bound.push(*c);
                        bound
                    })
                })
                .collect();
        }
        // Windows: [start, b0), [b0, b1), …, [b_last, end).
        self.bounds = if depth == 0 { Vec::new() } else { bounds };
        self.next.clone_from(&self.start);
        self.window = 0;
        Ok(())
    }

    /// One limited range from `next` to `window_end` at the revision.
    async fn range(
        &mut self,
        window_end: &[u8],
    ) -> Result<crate::pb::etcd::RangeResponse, EtcdError> {
        loop {
            let request = RangeRequest {
                key: self.next.clone(),
                range_end: window_end.to_vec(),
                limit: i64::try_from(self.page_keys).unwrap_or(i64::MAX),
                revision: self.revision,
                ..RangeRequest::default()
            };
            match self.kv.range(request).await {
                Ok(reply) => return Ok(reply.into_inner()),
                Err(status) => match EtcdError::from(status) {
                    EtcdError::TooLarge(status) if self.page_keys > 1 => {
                        self.page_keys /= 2;
                        tracing::warn!(
                            page_keys = self.page_keys,
                            error = status.message(),
                            "an etcd page exceeded the reply limit; reading smaller pages"
                        );
                    }
                    error => return Err(error),
                },
            }
        }
    }

    /// Windows of at most about `keys` keys instead of [`WINDOW_KEYS`]
    /// (small ones let a test of a few thousand keys use many windows).
    #[must_use]
    pub fn with_window_keys(mut self, keys: u64) -> Self {
        self.window_keys = keys.max(1);
        self
    }

    /// The keys per page now asked for.
    #[must_use]
    pub fn page_keys(&self) -> usize {
        self.page_keys
    }
}
