//! Following changes to the key records ([`Watch`]) and what a watch
//! delivers ([`Watched`]).

use super::record::KeyRecord;
use super::{Etcd, EtcdError, decode_value, prefix_end};
use crate::domain::key::KeyId;
use crate::pb::etcd::{WatchCreateRequest, WatchRequest, WatchResponse, watch_request};
use crate::pb::mvccpb::Event;
use crate::pb::mvccpb::event::EventType;

impl Etcd {
    /// Follows changes to key records from `start_revision` on, in
    /// revision order. A revision etcd has compacted away is reported as
    /// [`Watched::Compacted`]: the caller must take a new snapshot.
    pub async fn watch(&self, start_revision: i64) -> Result<Watch, EtcdError> {
        let start = self.keys_prefix();
        let (requests, receiver) = tokio::sync::mpsc::channel(1);
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    range_end: prefix_end(&start),
                    key: start,
                    start_revision,
                    // Responses over etcd's request limit come in pieces
                    // (see REPLY_LIMIT_BYTES); `next` joins them.
                    fragment: true,
                    ..WatchCreateRequest::default()
                },
            )),
        };
        // The receiver is alive (held by the stream below), so this cannot fail.
        let _ = requests.send(create).await;
        let responses = self
            .watch
            .clone()
            .watch(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await?
            .into_inner();
        Ok(Watch {
            responses,
            requests,
        })
    }
}

/// Changes to key records, from [`Etcd::watch`].
#[derive(Debug)]
pub struct Watch {
    responses: tonic::Streaming<WatchResponse>,
    /// The request stream: keeps the watch open, carries progress requests.
    requests: tokio::sync::mpsc::Sender<WatchRequest>,
}

/// What a watch delivered.
#[derive(Debug, Clone, PartialEq)]
pub enum Watched {
    /// A key record was written (created or replaced) at `revision`.
    Put {
        /// The record (boxed: records are large, the other variants not).
        record: Box<KeyRecord>,
        /// The etcd revision of the write.
        revision: i64,
    },
    /// A key record was removed at `revision`.
    Deleted {
        /// The key.
        id: KeyId,
        /// The etcd revision of the removal.
        revision: i64,
    },
    /// Every change through `revision` has been delivered (the answer to
    /// [`Watch::request_progress`]).
    Progress {
        /// etcd's revision when it answered.
        revision: i64,
    },
    /// The start revision was compacted: take a new snapshot.
    Compacted {
        /// The oldest revision etcd still has.
        compact_revision: i64,
    },
}

impl Watched {
    /// The revision of a put or delete.
    #[must_use]
    pub fn revision(&self) -> Option<i64> {
        match self {
            Self::Put { revision, .. } | Self::Deleted { revision, .. } => Some(*revision),
            Self::Progress { .. } | Self::Compacted { .. } => None,
        }
    }
}

impl Watch {
    /// Asks etcd to confirm how far the watch has delivered; the answer
    /// comes as [`Watched::Progress`]. Proves the watch is alive and the
    /// replica current, even when nothing changes.
    pub async fn request_progress(&self) -> Result<(), EtcdError> {
        let request = WatchRequest {
            request_union: Some(watch_request::RequestUnion::ProgressRequest(
                crate::pb::etcd::WatchProgressRequest {},
            )),
        };
        self.requests
            .send(request)
            .await
            .map_err(|_| EtcdError::WatchClosed)
    }

    /// The next batch of changes (one etcd revision may carry several);
    /// `None` once etcd ended the watch. A response etcd sent in fragments
    /// is joined first: one revision's events are applied together.
    pub async fn next(&mut self) -> Result<Option<Vec<Watched>>, EtcdError> {
        let mut events = Vec::new();
        loop {
            let Some(response) = self.responses.message().await? else {
                return Ok(None);
            };
            if response.compact_revision != 0 {
                return Ok(Some(vec![Watched::Compacted {
                    compact_revision: response.compact_revision,
                }]));
            }
            if response.canceled {
                return Err(EtcdError::WatchCanceled(response.cancel_reason));
            }
            events.extend(response.events);
            if response.fragment {
                continue;
            }
            if events.is_empty() {
                if response.created {
                    continue;
                }
                return Ok(Some(vec![Watched::Progress {
                    revision: response.header.map_or(0, |h| h.revision),
                }]));
            }
            return events
                .into_iter()
                .map(watched)
                .collect::<Result<Vec<_>, _>>()
                .map(Some);
        }
    }
}

/// One etcd event as keyward reads it.
fn watched(event: Event) -> Result<Watched, EtcdError> {
    let kv = event.kv.unwrap_or_default();
    if event.r#type == EventType::Delete as i32 {
        let id = std::str::from_utf8(&kv.key)
            .ok()
            .and_then(|key| key.rsplit('/').next())
            .and_then(|text| text.parse::<KeyId>().ok())
            .ok_or_else(|| EtcdError::Value {
                key: String::from_utf8_lossy(&kv.key).into_owned(),
                problem: "not a key id".into(),
            })?;
        return Ok(Watched::Deleted {
            id,
            revision: kv.mod_revision,
        });
    }
    Ok(Watched::Put {
        record: Box::new(decode_value(&kv.key, &kv.value)?),
        revision: kv.mod_revision,
    })
}
