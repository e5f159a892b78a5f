//! Crash safety: the real binary, SIGKILLed at random moments under
//! concurrent writes and decisions, restarted 20 times. Every acknowledged
//! create, update, disable, enable, rotation and delete must survive exactly
//! as acknowledged; nothing half-written may show; no acknowledged
//! revocation, disabling or rotation may ever let the old credential in again.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{bearer, connect, spawn_serve};
use keyward::pb::v1 as pb;
use keyward::pb::v1::authorizer_client::AuthorizerClient;
use keyward::pb::v1::key_manager_client::KeyManagerClient;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_keyward");
const CYCLES: usize = 20;
const WRITERS: usize = 3;
const SCOPES: [&str; 5] = [
    "alerts.create",
    "alerts.read",
    "mail.send",
    "stats.read",
    "templates.read",
];

/// A small deterministic PRNG (xorshift64*), seeded per run and printed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % (n as u64)).unwrap_or(0)
    }

    /// A non-empty sorted subset of SCOPES.
    fn scopes(&mut self) -> Vec<String> {
        let mut chosen: Vec<String> = SCOPES
            .iter()
            .filter(|_| self.below(2) == 0)
            .map(|s| (*s).to_owned())
            .collect();
        if chosen.is_empty() {
            chosen.push(SCOPES[self.below(SCOPES.len())].to_owned());
        }
        chosen
    }
}

/// A key's acknowledged state.
#[derive(Clone, Debug, PartialEq, Eq)]
struct State {
    scopes: Vec<String>,
    enabled: bool,
}

/// A change in flight when the server died: either outcome may show.
#[derive(Clone, Debug)]
enum Pending {
    /// An update, disable, enable (`Some`) or delete (`None`).
    To(Option<State>),
    /// A rotation with no overlap: the secret may have changed.
    Rotate,
}

/// What the harness knows of one key.
#[derive(Clone, Debug)]
struct Model {
    account: String,
    /// The current secret; `None` once a rotation's reply was lost.
    secret: Option<String>,
    /// Secrets an acknowledged rotation (overlap 0) replaced: never valid again.
    retired: Vec<String>,
    /// Last acknowledged state; `None` once a delete was acknowledged.
    acked: Option<State>,
    in_flight: Option<Pending>,
    /// Changes started on this key: a decision overlapping one is not judged.
    changes: u64,
}

#[derive(Default)]
struct Ledger {
    keys: HashMap<String, Model>,
    /// Creates whose reply was lost, per account: they may or may not exist.
    unacked_creates: HashMap<String, usize>,
    acknowledged: usize,
}

type Shared = Arc<Mutex<Ledger>>;

/// Creates, updates, disables or enables, rotates and deletes keys of one
/// account, recording each acknowledgement; stops at the first lost reply.
#[allow(
    clippy::too_many_lines,
    reason = "one writer story: create, revoke, record what was acknowledged"
)]
async fn writer(
    url: String,
    admin: String,
    account: String,
    ledger: Shared,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = Rng(seed | 1);
    let mut client = KeyManagerClient::new(connect(&url).await);
    while !stop.load(Ordering::Relaxed) {
        let mine: Vec<(String, State)> = {
            let ledger = ledger.lock().expect("lock");
            let mut ids: Vec<(String, State)> = ledger
                .keys
                .iter()
                .filter(|(_, m)| m.account == account)
                .filter_map(|(id, m)| Some((id.clone(), m.acked.clone()?)))
                .collect();
            ids.sort_by(|a, b| a.0.cmp(&b.0));
            ids
        };
        let roll = if mine.is_empty() { 0 } else { rng.below(10) };
        if roll < 4 {
            let scopes = rng.scopes();
            let request = pb::CreateKeyRequest {
                name: "crash".into(),
                scopes: scopes.clone(),
                account_id: account.clone(),
                ..Default::default()
            };
            let result = client.create_key(bearer(&admin, request)).await;
            let mut ledger = ledger.lock().expect("lock");
            let Ok(reply) = result else {
                *ledger.unacked_creates.entry(account.clone()).or_default() += 1;
                return;
            };
            let reply = reply.into_inner();
            let key = reply.key.expect("key");
            assert_eq!(key.scopes, scopes);
            ledger.keys.insert(
                key.key_id,
                Model {
                    account: account.clone(),
                    secret: Some(reply.secret),
                    retired: Vec::new(),
                    acked: Some(State {
                        scopes,
                        enabled: true,
                    }),
                    in_flight: None,
                    changes: 0,
                },
            );
            ledger.acknowledged += 1;
            continue;
        }
        let (id, current) = mine[rng.below(mine.len())].clone();
        let pending = match roll {
            4 | 5 => Pending::To(Some(State {
                scopes: rng.scopes(),
                ..current.clone()
            })),
            6 => Pending::To(Some(State {
                enabled: !current.enabled,
                ..current.clone()
            })),
            7 => Pending::Rotate,
            _ => Pending::To(None),
        };
        {
            let mut ledger = ledger.lock().expect("lock");
            let model = ledger.keys.get_mut(&id).expect("model");
            model.in_flight = Some(pending.clone());
            model.changes += 1;
        }
        let result = send(&mut client, &admin, id.clone(), &pending, &current).await;
        let Ok(new_secret) = result else {
            return; // in flight at the kill: either outcome is allowed
        };
        let mut ledger = ledger.lock().expect("lock");
        let model = ledger.keys.get_mut(&id).expect("model");
        match pending {
            Pending::To(next) => model.acked = next,
            Pending::Rotate => {
                model.retired.extend(model.secret.take());
                model.secret = new_secret;
            }
        }
        model.in_flight = None;
        ledger.acknowledged += 1;
    }
}

/// Sends one change; a rotation's reply carries the new secret.
async fn send(
    client: &mut KeyManagerClient<tonic::transport::Channel>,
    admin: &str,
    key_id: String,
    pending: &Pending,
    current: &State,
) -> Result<Option<String>, tonic::Status> {
    match pending {
        Pending::To(None) => client
            .delete_key(bearer(admin, pb::DeleteKeyRequest { key_id }))
            .await
            .map(|_| None),
        Pending::To(Some(next)) if next.enabled != current.enabled => if next.enabled {
            client
                .enable_key(bearer(admin, pb::EnableKeyRequest { key_id }))
                .await
        } else {
            client
                .disable_key(bearer(admin, pb::DisableKeyRequest { key_id }))
                .await
        }
        .map(|_| None),
        Pending::To(Some(next)) => client
            .update_key(bearer(
                admin,
                pb::UpdateKeyRequest {
                    key_id,
                    name: "crash".into(),
                    scopes: next.scopes.clone(),
                    access: HashMap::new(),
                },
            ))
            .await
            .map(|_| None),
        Pending::Rotate => client
            .rotate_key(bearer(
                admin,
                pb::RotateKeyRequest {
                    key_id,
                    overlap: None,
                },
            ))
            .await
            .map(|reply| Some(reply.into_inner().secret)),
    }
}

/// Decides with known keys while writes happen. Never allowed: a key whose
/// revocation or disabling was acknowledged before the request was sent, or
/// a secret an acknowledged rotation replaced.
async fn decider(
    url: String,
    ledger: Shared,
    stop: Arc<AtomicBool>,
    violations: Arc<AtomicUsize>,
    seed: u64,
) {
    let mut rng = Rng(seed | 1);
    let Ok(channel) = tonic::transport::Channel::from_shared(url)
        .expect("url")
        .connect()
        .await
    else {
        return;
    };
    let mut client = AuthorizerClient::new(channel);
    while !stop.load(Ordering::Relaxed) {
        let picked = {
            let ledger = ledger.lock().expect("lock");
            let mut all: Vec<(String, Model)> = ledger
                .keys
                .iter()
                .map(|(k, m)| (k.clone(), m.clone()))
                .collect();
            all.sort_by(|a, b| a.0.cmp(&b.0));
            (!all.is_empty()).then(|| all[rng.below(all.len())].clone())
        };
        let Some((id, model)) = picked else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        let settled = model.in_flight.is_none();
        let (secret, must_deny) = match (&model.secret, model.retired.last()) {
            (_, Some(retired)) if rng.below(2) == 0 => (retired.clone(), true),
            (Some(secret), _) => (
                secret.clone(),
                settled && model.acked.as_ref().is_none_or(|s| !s.enabled),
            ),
            (None, _) => continue,
        };
        let request = pb::AuthorizeRequest {
            key: secret,
            method: "GET".into(),
            path: "/v3/scopes".into(),
            client_ip: String::new(),
        };
        match client.authorize(request).await {
            Ok(reply) => {
                // A disabled key may be enabled while the request travels:
                // judge only decisions no change overlapped.
                let unchanged = || ledger.lock().expect("lock").keys[&id].changes == model.changes;
                if must_deny && reply.into_inner().allowed && unchanged() {
                    violations.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => return,
        }
    }
}

#[allow(clippy::too_many_lines, reason = "one verification story")]
/// After a restart, once ready: the store must match the ledger exactly (resolving
/// operations that were in flight to whichever outcome happened).
async fn verify(url: &str, admin: &str, ledger: &Shared) -> usize {
    // What a restarted pod serves once its readiness probe passes.
    common::await_ready(url).await;
    let mut manager = KeyManagerClient::new(connect(url).await);
    let authorizer = AuthorizerClient::new(connect(url).await);
    let mut snapshot: Vec<(String, Model)> = {
        let ledger = ledger.lock().expect("lock");
        ledger
            .keys
            .iter()
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect()
    };
    snapshot.sort_by(|a, b| a.0.cmp(&b.0));
    let mut checked = 0;
    let decide = |secret: String| {
        let mut authorizer = authorizer.clone();
        async move {
            authorizer
                .authorize(pb::AuthorizeRequest {
                    key: secret,
                    method: "GET".into(),
                    path: "/v3/scopes".into(),
                    client_ip: String::new(),
                })
                .await
                .expect("authorize")
                .into_inner()
        }
    };
    for (id, model) in &snapshot {
        let stored = match manager
            .get_key(bearer(admin, pb::GetKeyRequest { key_id: id.clone() }))
            .await
        {
            Ok(key) => {
                let key = key.into_inner();
                Some(State {
                    scopes: key.scopes,
                    enabled: key.enabled,
                })
            }
            Err(status) if status.code() == Code::NotFound => None,
            Err(status) => panic!("GetKey {id}: {status:?}"),
        };
        let mut outcomes = vec![model.acked.clone()];
        if let Some(Pending::To(next)) = &model.in_flight {
            outcomes.push(next.clone());
        }
        assert!(
            outcomes.contains(&stored),
            "key {id}: stored {stored:?}, acknowledged {:?}",
            model.acked
        );
        for retired in &model.retired {
            assert!(
                !decide(retired.clone()).await.allowed,
                "key {id}: a retired secret"
            );
        }
        // The secret works exactly when the key exists (and is enabled),
        // with exactly its scopes; it changed only if a rotation was in flight.
        let mut secret = model.secret.clone();
        if let Some(known) = model.secret.clone() {
            let reply = decide(known.clone()).await;
            let matched = reply.allowed || reply.reason == pb::DenyReason::KeyDisabled as i32;
            match &stored {
                None => assert!(!reply.allowed, "key {id}: revoked, yet {reply:?}"),
                Some(_) if !matched => {
                    assert!(
                        matches!(model.in_flight, Some(Pending::Rotate)),
                        "key {id}: the secret stopped working with no rotation in flight: {reply:?}"
                    );
                    secret = None;
                }
                Some(state) => {
                    assert_eq!(reply.allowed, state.enabled, "key {id}: {reply:?}");
                    if state.enabled {
                        let own = manager
                            .get_scopes(bearer(&known, pb::GetScopesRequest {}))
                            .await
                            .expect("scopes")
                            .into_inner()
                            .scopes;
                        assert_eq!(own, state.scopes, "key {id}");
                    }
                }
            }
        }
        let mut ledger = ledger.lock().expect("lock");
        let entry = ledger.keys.get_mut(id).expect("model");
        if secret.is_none() {
            entry.retired.extend(entry.secret.take());
        }
        entry.acked = stored;
        entry.in_flight = None;
        checked += 1;
    }
    // Listings agree with the records: no dangling entry, nothing missing;
    // extra keys only from creates whose reply was lost (then removed).
    let accounts: HashSet<String> = snapshot.iter().map(|(_, m)| m.account.clone()).collect();
    for account in accounts {
        let listed: Vec<String> = common::list_keys(&mut manager, admin, &account)
            .await
            .into_iter()
            .map(|k| k.key_id)
            .collect();
        let extra = {
            let mut ledger = ledger.lock().expect("lock");
            let live: HashSet<&String> = ledger
                .keys
                .iter()
                .filter(|(_, m)| m.account == account && m.acked.is_some())
                .map(|(k, _)| k)
                .collect();
            let listed_set: HashSet<&String> = listed.iter().collect();
            assert!(
                live.is_subset(&listed_set),
                "{account}: live keys missing from the listing"
            );
            let extra: Vec<String> = listed
                .iter()
                .filter(|k| !live.contains(k))
                .cloned()
                .collect();
            let lost = ledger.unacked_creates.remove(&account).unwrap_or(0);
            assert!(
                extra.len() <= lost,
                "{account}: {} unexplained keys, {lost} lost replies",
                extra.len()
            );
            extra
        };
        for id in extra {
            manager
                .delete_key(bearer(admin, pb::DeleteKeyRequest { key_id: id }))
                .await
                .expect("clean up orphan");
        }
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    harness(&["--data-dir", "data"]).await;
}

/// The same harness with etcd as the truth and the data directory as the
/// sidecar's replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_moments_loses_nothing_acknowledged_with_etcd() {
    let Some(cluster) = common::etcd::Cluster::start(1).await else {
        return;
    };
    harness(&[
        "--data-dir",
        "data",
        "--etcd-endpoints",
        &cluster.endpoints(),
    ])
    .await;
}

/// The same with an on-demand replica: nothing on disk, every key fetched
/// from etcd again after each restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_moments_loses_nothing_acknowledged_on_demand() {
    let Some(cluster) = common::etcd::Cluster::start(1).await else {
        return;
    };
    harness(&[
        "--data-dir",
        "data",
        "--etcd-endpoints",
        &cluster.endpoints(),
        "--replica-mode",
        "on-demand",
    ])
    .await;
}

/// Runs the writers and deciders against `keyward serve <args>`, SIGKILLs
/// it at random moments, restarts it, and checks the ledger each time.
async fn harness(args: &[&str]) {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_secs() ^ u64::from(d.subsec_nanos()) << 20);
    eprintln!("crash harness seed {seed}");
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger: Shared = Arc::default();
    let violations = Arc::new(AtomicUsize::new(0));
    let mut verified = 0;
    for cycle in 0..CYCLES {
        let mut cycle_args = args.to_vec();
        cycle_args.extend(["--shutdown-grace-ms", "0"]);
        let (mut child, port) = spawn_serve(BIN, dir.path(), &cycle_args);
        let url = format!("http://127.0.0.1:{port}");
        let admin = common::admin_token(&dir.path().join("data"));
        if cycle > 0 {
            verified += verify(&url, &admin, &ledger).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            tasks.push(tokio::spawn(writer(
                url.clone(),
                admin.clone(),
                format!("acct{w}"),
                Arc::clone(&ledger),
                Arc::clone(&stop),
                rng.next(),
            )));
        }
        for _ in 0..2 {
            tasks.push(tokio::spawn(decider(
                url.clone(),
                Arc::clone(&ledger),
                Arc::clone(&stop),
                Arc::clone(&violations),
                rng.next(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(100 + rng.next() % 300)).await;
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await.expect("task");
        }
    }
    let (mut child, port) = spawn_serve(BIN, dir.path(), args);
    let admin = common::admin_token(&dir.path().join("data"));
    verified += verify(&format!("http://127.0.0.1:{port}"), &admin, &ledger).await;
    let _ = child.kill();
    let _ = child.wait();
    let acknowledged = ledger.lock().expect("lock").acknowledged;
    eprintln!(
        "crash harness: {CYCLES} SIGKILL cycles, {acknowledged} acknowledged writes, {verified} key states verified after restarts"
    );
    assert!(acknowledged > 50, "the harness did real work");
    assert_eq!(
        violations.load(Ordering::Relaxed),
        0,
        "a revoked key was allowed"
    );
}

#[tokio::test]
async fn last_used_times_survive_a_sigkill_once_their_batch_was_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = ["--data-dir", "data", "--last-used-flush-ms", "200"];
    let (mut child, port) = spawn_serve(BIN, dir.path(), &args);
    let url = format!("http://127.0.0.1:{port}");
    let admin = common::admin_token(&dir.path().join("data"));
    let mut manager = KeyManagerClient::new(connect(&url).await);
    let created = manager
        .create_key(bearer(
            &admin,
            pb::CreateKeyRequest {
                name: "used".into(),
                scopes: vec!["mail.send".into()],
                account_id: "acme".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("create")
        .into_inner();
    let id = created.key.expect("key").key_id;
    let mut authorizer = AuthorizerClient::new(connect(&url).await);
    for _ in 0..1000 {
        let reply = authorizer
            .authorize(pb::AuthorizeRequest {
                key: created.secret.clone(),
                method: "POST".into(),
                path: "/v3/mail/send".into(),
                client_ip: String::new(),
            })
            .await
            .expect("authorize")
            .into_inner();
        assert!(reply.allowed);
    }
    // Two batch periods, then no chance to flush at shutdown.
    tokio::time::sleep(Duration::from_millis(600)).await;
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");

    let (mut child, port) = spawn_serve(BIN, dir.path(), &args);
    let mut manager = KeyManagerClient::new(connect(&format!("http://127.0.0.1:{port}")).await);
    let key = manager
        .get_key(bearer(&admin, pb::GetKeyRequest { key_id: id }))
        .await
        .expect("get")
        .into_inner();
    let _ = child.kill();
    let _ = child.wait();
    let last_used = key.last_used_at.expect("persisted before the kill");
    let age = SystemTime::now()
        .duration_since(SystemTime::try_from(last_used).expect("a time"))
        .expect("in the past");
    assert!(age < Duration::from_secs(120), "{age:?}");
}
