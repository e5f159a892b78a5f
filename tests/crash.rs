//! Crash safety: the real binary, SIGKILLed at random moments under
//! concurrent writes and decisions, restarted 20 times. Every acknowledged
//! create, update and delete must survive exactly as acknowledged; nothing
//! half-written may show; no acknowledged revocation may ever authorize again.

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

/// What the harness knows of one key.
#[derive(Clone, Debug)]
struct Model {
    account: String,
    secret: String,
    /// Last acknowledged state: its scopes, or `None` once a delete was acknowledged.
    acked: Option<Vec<String>>,
    /// The would-be state of an operation in flight when the server died.
    #[allow(
        clippy::option_option,
        reason = "in flight or not, of a key that exists or not"
    )]
    in_flight: Option<Option<Vec<String>>>,
}

#[derive(Default)]
struct Ledger {
    keys: HashMap<String, Model>,
    /// Creates whose reply was lost, per account: they may or may not exist.
    unacked_creates: HashMap<String, usize>,
    acknowledged: usize,
}

type Shared = Arc<Mutex<Ledger>>;

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
        let mine: Vec<String> = {
            let ledger = ledger.lock().expect("lock");
            let mut ids: Vec<String> = ledger
                .keys
                .iter()
                .filter(|(_, m)| m.account == account && m.acked.is_some())
                .map(|(id, _)| id.clone())
                .collect();
            ids.sort();
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
                    secret: reply.secret,
                    acked: Some(scopes),
                    in_flight: None,
                },
            );
            ledger.acknowledged += 1;
        } else {
            let id = mine[rng.below(mine.len())].clone();
            let next = if roll >= 7 { None } else { Some(rng.scopes()) };
            ledger
                .lock()
                .expect("lock")
                .keys
                .get_mut(&id)
                .expect("model")
                .in_flight = Some(next.clone());
            let result = match &next {
                None => client
                    .delete_key(bearer(&admin, pb::DeleteKeyRequest { key_id: id.clone() }))
                    .await
                    .map(drop),
                Some(scopes) => client
                    .update_key(bearer(
                        &admin,
                        pb::UpdateKeyRequest {
                            key_id: id.clone(),
                            name: "crash".into(),
                            scopes: scopes.clone(),
                            access: HashMap::new(),
                        },
                    ))
                    .await
                    .map(drop),
            };
            if result.is_err() {
                return; // in flight at the kill: either outcome is allowed
            }
            let mut ledger = ledger.lock().expect("lock");
            let model = ledger.keys.get_mut(&id).expect("model");
            model.acked = next;
            model.in_flight = None;
            ledger.acknowledged += 1;
        }
    }
}

/// Decides with known keys while writes happen; a key whose revocation was
/// acknowledged before the request was sent must never be allowed.
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
            (!all.is_empty()).then(|| all[rng.below(all.len())].1.clone())
        };
        let Some(model) = picked else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        let revoked_before_sending = model.acked.is_none() && model.in_flight.is_none();
        let request = pb::AuthorizeRequest {
            key: model.secret,
            method: "GET".into(),
            path: "/v3/scopes".into(),
            client_ip: String::new(),
        };
        match client.authorize(request).await {
            Ok(reply) => {
                if revoked_before_sending && reply.into_inner().allowed {
                    violations.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => return,
        }
    }
}

#[allow(clippy::too_many_lines, reason = "one verification story")]
/// After a restart: the store must match the ledger exactly (resolving
/// operations that were in flight to whichever outcome happened).
async fn verify(url: &str, admin: &str, ledger: &Shared) -> usize {
    let mut manager = KeyManagerClient::new(connect(url).await);
    let mut authorizer = AuthorizerClient::new(connect(url).await);
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
    for (id, model) in &snapshot {
        let stored = match manager
            .get_key(bearer(admin, pb::GetKeyRequest { key_id: id.clone() }))
            .await
        {
            Ok(key) => Some(key.into_inner().scopes),
            Err(status) if status.code() == Code::NotFound => None,
            Err(status) => panic!("GetKey {id}: {status:?}"),
        };
        let allowed = match &model.in_flight {
            None => vec![model.acked.clone()],
            Some(next) => vec![model.acked.clone(), next.clone()],
        };
        assert!(
            allowed.contains(&stored),
            "key {id}: stored {stored:?}, acknowledged {:?}",
            model.acked
        );
        // The secret works exactly when the key exists, with exactly its scopes.
        let reply = authorizer
            .authorize(pb::AuthorizeRequest {
                key: model.secret.clone(),
                method: "GET".into(),
                path: "/v3/scopes".into(),
                client_ip: String::new(),
            })
            .await
            .expect("authorize")
            .into_inner();
        assert_eq!(reply.allowed, stored.is_some(), "key {id}: {reply:?}");
        if let Some(scopes) = &stored {
            let own = manager
                .get_scopes(bearer(&model.secret, pb::GetScopesRequest {}))
                .await
                .expect("scopes")
                .into_inner()
                .scopes;
            assert_eq!(&own, scopes, "key {id}");
        }
        let mut ledger = ledger.lock().expect("lock");
        let entry = ledger.keys.get_mut(id).expect("model");
        entry.acked = stored;
        entry.in_flight = None;
        checked += 1;
    }
    // Listings agree with the records: no dangling entry, nothing missing;
    // extra keys only from creates whose reply was lost (then removed).
    let accounts: HashSet<String> = snapshot.iter().map(|(_, m)| m.account.clone()).collect();
    for account in accounts {
        let listed: Vec<String> = manager
            .list_keys(bearer(
                admin,
                pb::ListKeysRequest {
                    account_id: account.clone(),
                    page_size: 1000,
                    page_token: String::new(),
                    unused_for: None,
                },
            ))
            .await
            .expect("list")
            .into_inner()
            .keys
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
        let (mut child, port) = spawn_serve(
            BIN,
            dir.path(),
            &["--data-dir", "data", "--shutdown-grace-ms", "0"],
        );
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
    let (mut child, port) = spawn_serve(BIN, dir.path(), &["--data-dir", "data"]);
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
