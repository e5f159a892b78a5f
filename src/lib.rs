//! keyward: an authorization sidecar for SendGrid-model scoped API keys.
//!
//! Services (and Envoy, through ext_authz) ask keyward whether a request may
//! pass: `Authorize(key, method, path)`. A decision is one hash lookup, one
//! constant-time hash compare and one AND of precomputed scope bitsets.
//!
//! # Layout
//! Each layer imports only the ones below it.
//! - [`server`]: wiring: what a running keyward is (`App`, opened from the
//!   configuration) and `run`, which serves it until shutdown (`server.rs`);
//!   each job of the wiring in its own file: `server/tokens.rs` (the admin
//!   and feed reader token files), `server/tables.rs` (catalog and route
//!   loading), `server/listeners.rs` (the sockets, bound before serving),
//!   `server/servers.rs` (what each listener serves, behind which layers,
//!   with which TLS), `server/health.rs` (health and `keyward_serving`,
//!   kept current), `server/shutdown.rs` (grace, stop, drain).
//! - [`backup`]: `keyward backup` and `keyward restore`: an online,
//!   consistent backup of a running sidecar (taken by `keys::snapshot`,
//!   in the file format of `store::backup`), and a data directory from one.
//! - [`cli`]: `keyward keys …`, the operator's client for KeyManager: the
//!   command line and its dispatch (`cli.rs`), one function per
//!   subcommand (`cli/commands.rs`), how results are shown (`cli/show.rs`).
//! - [`migrate`]: `keyward migrate`, a standalone store's keys into etcd.
//! - [`grpc`]: thin protobuf adapters (`Authorizer`, `KeyManager`, the
//!   decision feed), every RPC counted at the edge (`grpc::rpc_counts`).
//! - [`rest`]: SendGrid's key-management REST API, through the same key
//!   service as KeyManager.
//! - [`envoy`]: Envoy's ext_authz `Check`, through the same authorizer.
//! - [`refusal`]: the one place refusals take their outward forms: a
//!   `KeyError` as a gRPC status and SendGrid's HTTP status and body, a
//!   deny reason as ext_authz's status, the wire enum and its counter.
//! - [`manage`]: key management, one service for both front doors (gRPC
//!   KeyManager, SendGrid's REST): field checks on plain values, then each
//!   operation's flow (permit, check, change, audit) written once.
//! - [`decisions`]: the front door `Authorize` and `Check` share: validate,
//!   decide, count.
//! - [`access`] (its `Authenticator`), [`audit`]: who is calling (both front doors authenticate
//!   through it, as a layer), and the audit log.
//! - [`config`]: settings, each a flag and an environment variable.
//! - [`authorizer`]: the read path: the core's decision function, and on
//!   an on-demand replica the fetch of a key seen for the first time.
//! - [`usage`]: the usage plane, over the write path: a key's rate limit
//!   held across every sidecar through leases on a budget in the usage
//!   store (Redis), per-key decision counts summed there
//!   (`usage::counts`, the core's, shared with the Envoy module;
//!   `usage::local` a standalone's own counts; `usage::sync` the background
//!   task that trades and flushes, `usage::store` Redis itself,
//!   `usage::series` what management shows), and usage credits, whose
//!   leases `usage::credits` keeps by moving credits through `keys::Keys`
//!   (the balance lives in the key's record). Decisions never wait on it.
//! - [`keys`]: the write path. One writer thread (`keys::writer`: queue,
//!   batching, group commit, replies, recovery) commits through a storage
//!   seam (`keys::backend`): sled as the standalone truth
//!   (`keys::standalone`), or etcd as the replicated truth with a local
//!   replica (`keys::replicated`; its transactions in `keys::remote`). The
//!   rules (`keys::stage`) run at the commit point over the backend's view
//!   of the truth; decisions see a change (`keys::mirror`) only once its
//!   batch stands. The replica follows etcd as kube-rs's runtime does:
//!   `keys::watcher` turns etcd into a stream of events (a paged read at
//!   one revision, then the watch; backoff a wrapper), `keys::follow`
//!   drives it into the writer's queue, and `keys::reflector` applies each
//!   event on the writer thread, once by revision. `keys::demand` is the
//!   on-demand replica (keys fetched at their first sight, held under an
//!   eviction policy, asked by the authorizer on a miss) and
//!   `keys::cache` its side on the writer thread. `keys::change` is the
//!   vocabulary they share, `keys::shared` what passes between the writer
//!   thread and the rest. `keys::snapshot` takes online backups: the
//!   writer fixes their point in time and saves what they have yet to read
//!   before changing it. No storage or etcd call runs on an async worker:
//!   a failing disk or an unreachable etcd costs writes, never decisions.
//! - [`change_log`]: the index's changes, numbered and broadcast to the decision
//!   feed (`grpc::feed`, `keyward.v1.DecisionFeed`) that the Envoy module
//!   reads.
//! - [`metrics`]: Prometheus metrics and their loopback endpoint.
//! - [`guessing`]: guessing detection: repeated wrong secrets per key id.
//! - [`store`]: sled (standalone truth, or etcd's local replica), versioned
//!   records, and etcd's layout and client; `store::index` is the core's.
//! - [`tls`]: TLS for the REST listener (HTTP/1.1 and h2 by ALPN).
//! - [`log`]: log lines through a bounded non-blocking writer; a failing
//!   destination drops and counts lines, never fails a request. Human
//!   lines quote and escape every text value, so none forges a field or
//!   a line.
//! - [`console`]: the web console's files (HTML, script, style), embedded
//!   in the binary and served by `rest` beside the API.
//! - [`listen`]: accepted connections within bounds: a cap per listener,
//!   an idle timeout, accept errors that pause instead of spinning.
//! - [`scanning`]: GitHub's secret scanning partner protocol: its public
//!   keys (a file the operator refreshes, reloaded when it changes) and
//!   report signatures; `rest::scanning` is the endpoint, which acts on
//!   leaked keys through the same key writer.
//! - [`trace`]: W3C `traceparent` on a request, carried into its log lines
//!   and audit line as `trace_id` (no tracing backend).
//! - [`domain`], [`clock`], `store::index` and the decision itself
//!   (`keyward_core::decide`, `keyward_core::reply`) live in the workspace
//!   crate `keyward-core` (`crates/keyward-core`): pure, no I/O, shared
//!   with the Envoy module so both decide from the same code.
//! - [`pb`]: generated protobuf code, fenced off.
//!
//! The read path and the write path meet only at the index: decisions never
//! wait on disk, and a write is visible the moment it is acknowledged.

pub mod access;
pub mod audit;
pub mod authorizer;
pub mod backup;
pub mod cli;
pub use keyward_core::clock;
pub mod config;
pub mod console;
pub use keyward_core::domain;
pub mod change_log;
pub mod decisions;
pub mod envoy;
pub mod grpc;
pub mod guessing;
pub mod keys;
pub mod listen;
pub mod log;
pub mod manage;
pub mod metrics;
pub mod migrate;
pub mod pb;
pub mod refusal;
pub mod rest;
pub mod scanning;
pub mod server;
pub mod store;
pub mod tls;
pub mod trace;
pub mod usage;
