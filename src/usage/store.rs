//! The usage store on Redis: where every sidecar's leases on a key's rate
//! limit are traded, and where per-key decision counts are summed.
//!
//! One Redis (a multiplexed connection that reconnects on its own) or a
//! Redis Cluster (slot-aware). Every Redis key of a keyward key carries the
//! key id as its hash tag (`keyward:{<id>}:…`), so a key's state sits on one
//! slot, and every Redis key has a TTL: nothing is left behind by a key that
//! goes quiet or is deleted.

use std::path::PathBuf;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use keyward_core::domain::key::KeyId;
use keyward_core::domain::lease::Trade;
use keyward_core::domain::rate::GcraParts;

/// How long one command may take before the store counts as away.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);

/// Commands one connection may hold queued: a hung Redis makes callers
/// wait here instead of growing a buffer.
const PIPELINE_BUFFER: usize = 1024;

/// Minute counts are kept this long (an hour of minutes, and one more).
pub const MINUTES_TTL_SECONDS: i64 = 2 * 3600;
/// Hour counts are kept this long (30 days of hours, and two more).
pub const HOURS_TTL_SECONDS: i64 = 32 * 24 * 3600;

/// Trades a lease on a key's budget, a GCRA held in Redis (times in
/// microseconds of Redis's own clock, so sidecars' clocks never matter):
/// unused tokens go back (the budget's arrival time moves back, never
/// before now), credit spent is paid (it moves on, past the burst if it
/// must), then up to `want` tokens are granted while the burst allows.
/// Returns the grant, the tokens left, and the wait until the next one.
const TRADE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local give = tonumber(ARGV[3])
local owed = tonumber(ARGV[4])
local want = tonumber(ARGV[5])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
tat = tat - give * interval
if tat < now then tat = now end
tat = tat + owed * interval
local function room()
  if tat - now > tolerance then return 0 end
  return math.floor((tolerance - (tat - now)) / interval) + 1
end
local granted = math.min(want, room())
tat = tat + granted * interval
local wait = tat - now - tolerance
if wait < 0 then wait = 0 end
if tat > now then
  redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
else
  redis.call('DEL', KEYS[1])
end
return {granted, room(), math.ceil(wait)}
";

/// How to reach the usage store: `--usage-store` and its companions.
#[derive(Clone)]
pub struct Connection {
    /// `redis://[user:password@]host:port[/db]` or `rediss://…`.
    pub url: String,
    /// A Redis Cluster, reached through `url` as a seed node.
    pub cluster: bool,
    /// The password, when it comes from a file rather than the URL.
    pub password: Option<String>,
    /// PEM CA bundle for `rediss://`.
    pub ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: only where it points is shown.
        f.debug_struct("Connection")
            .field("at", &self.redacted())
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// The URL without its credentials, for logs.
    #[must_use]
    pub fn redacted(&self) -> String {
        redact(&self.url)
    }
}

/// Why the usage store could not be reached or read.
#[derive(Debug, thiserror::Error)]
pub enum UsageStoreError {
    /// The settings do not describe a usage store.
    #[error("--usage-store: {0}")]
    Settings(String),
    /// A file the settings name could not be read.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Redis refused, failed or did not answer in time.
    #[error("usage store: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer in time.
    #[error("usage store: no answer in time")]
    Timeout,
    /// Not connected to Redis yet.
    #[error("usage store: not connected yet")]
    NotConnected,
    /// The standalone sidecar's own counts could not be read or written.
    #[error("usage counts: {0}")]
    Local(#[from] sled::Error),
    /// The thread reading or writing the sidecar's own counts failed.
    #[error("usage counts: the storage thread failed")]
    Thread,
    /// Redis answered with something the scripts never return.
    #[error("usage store: unexpected reply: {0}")]
    Reply(&'static str),
}

/// A connection to one Redis or a Redis Cluster.
#[derive(Clone)]
pub enum Store {
    /// One Redis: a multiplexed connection that reconnects on its own.
    Single(ConnectionManager),
    /// A Redis Cluster: one connection per primary, slot-aware.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Store {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(cmd, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}

/// The Redis key of one keyward key's state: the id is the hash tag.
fn redis_key(id: &KeyId, what: &str) -> String {
    format!("keyward:{{{id}}}:{what}")
}

/// The counts of one minute, by outcome label (`allowed`, or a deny
/// reason's label).
pub type Outcomes = Vec<(&'static str, u64)>;

impl Store {
    /// Connects. A store that is away now is not an error for a sidecar
    /// (decisions go on without it); the caller retries.
    pub async fn connect(connection: &Connection) -> Result<Self, UsageStoreError> {
        use redis::IntoConnectionInfo;
        let mut info = connection
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| UsageStoreError::Settings(redacted_error(&e)))?;
        if let Some(password) = &connection.password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        if connection.cluster {
            let mut builder = redis::cluster::ClusterClientBuilder::new(vec![info])
                .response_timeout(RESPONSE_TIMEOUT)
                .connection_timeout(RESPONSE_TIMEOUT)
                // No retries: a resent trade or count write may apply twice
                // (the first may have landed before the connection broke);
                // a failed round is retried whole, from fresh leases.
                .retries(0);
            if let Some(ca) = &connection.ca {
                builder = builder.certs(certificates(ca));
            }
            let client = builder.build()?;
            return Ok(Self::Cluster(client.get_async_connection().await?));
        }
        let client = match &connection.ca {
            Some(ca) => redis::Client::build_with_tls(info, certificates(ca))?,
            None => redis::Client::open(info)?,
        };
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_pipeline_buffer_size(PIPELINE_BUFFER);
        Ok(Self::Single(
            ConnectionManager::new_with_config(client, config).await?,
        ))
    }

    /// Whether the store answers.
    pub async fn ping(&mut self) -> Result<(), UsageStoreError> {
        let _: String = redis::cmd("PING").query_async(self).await?;
        Ok(())
    }

    /// Trades one key's lease (see [`TRADE`]): `give` tokens back, `owed`
    /// paid, up to `want` granted.
    pub async fn trade(
        &mut self,
        id: &KeyId,
        limit: GcraParts,
        give: u64,
        owed: u64,
        want: u32,
    ) -> Result<Trade, UsageStoreError> {
        static SCRIPT: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(TRADE));
        // Microseconds with a fraction (Lua numbers are doubles): 400k/s is
        // 2.5 µs, not 2. The budget holds at least two trade ticks, or a
        // burst smaller than a tick's worth would cap every sidecar below
        // the rate (the local limiter widens its own to a clock step
        // likewise).
        #[allow(
            clippy::cast_precision_loss,
            reason = "nanoseconds below 2^60, to a fraction of a µs"
        )]
        let micros = |nanos: i64| nanos as f64 / 1_000.0;
        let tolerance = limit
            .tolerance
            .max(2 * keyward_core::domain::lease::TRADE_TICK_NANOS);
        let (granted, remaining, wait_us): (i64, i64, i64) = SCRIPT
            .key(redis_key(id, "rate"))
            .arg(micros(limit.interval))
            .arg(micros(tolerance))
            .arg(give)
            .arg(owed)
            .arg(want)
            .invoke_async(self)
            .await?;
        let to_u32 = |value: i64| u32::try_from(value.max(0)).unwrap_or(u32::MAX);
        Ok(Trade {
            granted: to_u32(granted),
            remaining: to_u32(remaining),
            retry_after_ms: to_u32((wait_us + 999) / 1_000),
        })
    }

    /// Adds one key's counts for one minute (Unix seconds at its start) to
    /// the minute series and the hour series, in one round trip.
    pub async fn add_counts(
        &mut self,
        id: &KeyId,
        minute: i64,
        outcomes: &Outcomes,
    ) -> Result<(), UsageStoreError> {
        let (hour, day) = (
            minute - minute.rem_euclid(3600),
            minute - minute.rem_euclid(86_400),
        );
        let minutes = redis_key(id, &format!("m:{hour}"));
        let hours = redis_key(id, &format!("h:{day}"));
        let mut pipe = redis::pipe();
        for (label, count) in outcomes {
            pipe.hincr(&minutes, format!("{minute}:{label}"), *count)
                .ignore();
            pipe.hincr(&hours, format!("{hour}:{label}"), *count)
                .ignore();
        }
        pipe.expire(&minutes, MINUTES_TTL_SECONDS).ignore();
        pipe.expire(&hours, HOURS_TTL_SECONDS).ignore();
        pipe.query_async::<()>(self).await?;
        Ok(())
    }

    /// One key's counts from `from` (Unix seconds, inclusive) on: every
    /// bucket (`start`, label, count), minutes or hours.
    pub async fn counts(
        &mut self,
        id: &KeyId,
        from: i64,
        by_hour: bool,
    ) -> Result<Vec<(i64, String, u64)>, UsageStoreError> {
        let (span, prefix) = if by_hour { (86_400, "h") } else { (3600, "m") };
        let now = keyward_core::clock::now_nanos() / 1_000_000_000;
        let mut pipe = redis::pipe();
        let mut at = from - from.rem_euclid(span);
        while at <= now {
            pipe.hgetall(redis_key(id, &format!("{prefix}:{at}")));
            at += span;
        }
        let maps: Vec<Vec<(String, u64)>> = pipe.query_async(self).await?;
        let mut buckets = Vec::new();
        for (field, count) in maps.into_iter().flatten() {
            let (start, label) = field
                .split_once(':')
                .ok_or(UsageStoreError::Reply("a count field without its bucket"))?;
            let start: i64 = start
                .parse()
                .map_err(|_| UsageStoreError::Reply("a bucket that is not a time"))?;
            if start >= from {
                buckets.push((start, label.to_owned(), count));
            }
        }
        Ok(buckets)
    }
}

/// A usage store URL without what may be a password: the scheme and
/// what follows the last `@`; anything else unreadable is not shown.
#[must_use]
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".into();
    };
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{host}")
}

/// Checks a usage store URL and its companions before a sidecar starts:
/// one redis-rs reads, and a CA file only where TLS is asked for (else
/// the password would cross the network in the clear).
pub fn check(connection: &Connection) -> Result<(), UsageStoreError> {
    use redis::IntoConnectionInfo;
    let scheme = connection.url.split_once("://").map(|(scheme, _)| scheme);
    if !matches!(scheme, Some("redis" | "rediss")) {
        return Err(UsageStoreError::Settings(
            "must be a redis:// or rediss:// URL".into(),
        ));
    }
    connection
        .url
        .as_str()
        .into_connection_info()
        .map_err(|e| UsageStoreError::Settings(redacted_error(&e)))?;
    if connection.ca.is_some() && scheme != Some("rediss") {
        return Err(UsageStoreError::Settings(
            "--usage-store-ca-file needs a rediss:// URL (TLS)".into(),
        ));
    }
    Ok(())
}

/// A CA bundle as redis-rs takes it.
fn certificates(ca: &[u8]) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca.to_vec()),
    }
}

/// A URL parse error, which quotes no part of the URL (it may hold a
/// password).
fn redacted_error(error: &redis::RedisError) -> String {
    format!("not a Redis URL ({:?})", error.kind())
}
