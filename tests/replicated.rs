//! Replicated mode, end to end: real `keyward serve` processes sharing one
//! key set through a real etcd cluster (3 members where quorum matters),
//! all on loopback ports. Skipped locally without etcd; required in CI.
#![allow(
    clippy::too_many_lines,
    reason = "one end-to-end story reads best in one test"
)]

mod common;

use std::time::{Duration, Instant};

use common::etcd::{Cluster, Sidecar};
use common::{bearer, connect};
use keyward::pb::v1 as pb;
use keyward::pb::v1::authorizer_client::AuthorizerClient;
use keyward::pb::v1::key_manager_client::KeyManagerClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const BIN: &str = env!("CARGO_BIN_EXE_keyward");
/// Longest a change may take to reach another sidecar in these tests
/// (the measured figures are far below; this only bounds a hang).
const CONVERGE: Duration = Duration::from_secs(20);

/// Flags of an on-demand replica.
const ON_DEMAND: &[&str] = &["--replica-mode", "on-demand"];

/// One test at a time: each runs an etcd cluster and several sidecars, and
/// two at once on two cores measure the machine, not keyward.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A sidecar's clients.
struct Client {
    authorizer: AuthorizerClient<Channel>,
    manager: KeyManagerClient<Channel>,
    health: HealthClient<Channel>,
    admin: String,
}

impl Client {
    async fn of(sidecar: &Sidecar) -> Self {
        Self {
            admin: sidecar.admin.clone(),
            ..Self::of_url(&sidecar.url()).await
        }
    }

    async fn of_url(url: &str) -> Self {
        let channel = connect(url).await;
        Self {
            authorizer: AuthorizerClient::new(channel.clone()),
            manager: KeyManagerClient::new(channel.clone()),
            health: HealthClient::new(channel),
            admin: String::new(),
        }
    }

    /// Whether `key` may send mail here.
    async fn allowed(&mut self, key: &str, method: &str, path: &str) -> bool {
        self.authorizer
            .authorize(pb::AuthorizeRequest {
                key: key.to_owned(),
                method: method.to_owned(),
                path: path.to_owned(),
                client_ip: String::new(),
            })
            .await
            .expect("authorize replies")
            .into_inner()
            .allowed
    }

    async fn create(
        &mut self,
        account: &str,
        scopes: &[&str],
    ) -> Result<(String, String), tonic::Status> {
        let reply = self
            .manager
            .create_key(bearer(
                &self.admin,
                pb::CreateKeyRequest {
                    name: "replicated".into(),
                    account_id: account.into(),
                    scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                    ..Default::default()
                },
            ))
            .await?
            .into_inner();
        Ok((reply.key.expect("key").key_id, reply.secret))
    }

    /// Replaces a key's scopes (and names it "narrowed").
    async fn narrow(&mut self, id: &str, scopes: &[&str]) -> Result<(), tonic::Status> {
        self.manager
            .update_key(bearer(
                &self.admin,
                pb::UpdateKeyRequest {
                    key_id: id.into(),
                    name: "narrowed".into(),
                    scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ())
    }

    async fn delete(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.manager
            .delete_key(bearer(
                &self.admin,
                pb::DeleteKeyRequest { key_id: id.into() },
            ))
            .await
            .map(|_| ())
    }

    async fn rename(&mut self, id: &str, name: &str) -> Result<(), tonic::Status> {
        self.manager
            .rename_key(bearer(
                &self.admin,
                pb::RenameKeyRequest {
                    key_id: id.into(),
                    name: name.into(),
                },
            ))
            .await
            .map(|_| ())
    }

    async fn name_of(&mut self, id: &str) -> String {
        self.manager
            .get_key(bearer(&self.admin, pb::GetKeyRequest { key_id: id.into() }))
            .await
            .expect("get")
            .into_inner()
            .name
    }

    async fn count(&mut self, account: &str) -> usize {
        common::list_keys(&mut self.manager, &self.admin, account)
            .await
            .len()
    }

    async fn status(&mut self, service: &str) -> ServingStatus {
        let reply = self
            .health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health answers")
            .into_inner();
        ServingStatus::try_from(reply.status).expect("a status")
    }
}

const SEND: (&str, &str) = ("POST", "/v3/mail/send");
const ALERTS: (&str, &str) = ("GET", "/v3/alerts");

/// Polls `client` until `key`'s answer for `request` is `allowed`.
async fn converge(client: &mut Client, key: &str, request: (&str, &str), allowed: bool) {
    let deadline = Instant::now() + CONVERGE;
    while client.allowed(key, request.0, request.1).await != allowed {
        assert!(
            Instant::now() < deadline,
            "{} {} never became allowed={allowed}",
            request.0,
            request.1
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Polls until `status(service)` is `want`.
async fn converge_status(client: &mut Client, service: &str, want: ServingStatus) {
    let deadline = Instant::now() + CONVERGE;
    while client.status(service).await != want {
        assert!(Instant::now() < deadline, "{service} never became {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn three_sidecars(cluster: &Cluster, extra: &[&str]) -> (Vec<Sidecar>, Vec<Client>) {
    let sidecars: Vec<Sidecar> = (0..3)
        .map(|_| Sidecar::start(BIN, &cluster.endpoints(), extra))
        .collect();
    let mut clients = Vec::new();
    for sidecar in &sidecars {
        let mut client = Client::of(sidecar).await;
        converge_status(&mut client, "keyward.v1.Authorizer", ServingStatus::Serving).await;
        clients.push(client);
    }
    (sidecars, clients)
}

/// Quantile of sorted durations.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let at = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_sidecars_share_one_key_set_and_revocations_propagate_fast() {
    propagation(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_sidecars_share_one_key_set_and_revocations_propagate_fast_on_demand() {
    propagation(ON_DEMAND).await;
}

async fn propagation(mode: &[&str]) {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::start(3).await else {
        return;
    };
    let (_sidecars, mut c) = three_sidecars(&cluster, mode).await;

    // Created on A: authorizes on B and C.
    let (id, key) = c[0]
        .create("acme", &["mail.send", "alerts.read"])
        .await
        .expect("create on A");
    assert!(
        c[0].allowed(&key, SEND.0, SEND.1).await,
        "A reads its own write at once"
    );
    for i in [1, 2] {
        converge(&mut c[i], &key, SEND, true).await;
        converge(&mut c[i], &key, ALERTS, true).await;
    }

    // Narrowed on B: loses the scope on A and C.
    c[1].narrow(&id, &["mail.send"]).await.expect("narrow on B");
    assert!(!c[1].allowed(&key, ALERTS.0, ALERTS.1).await);
    for i in [0, 2] {
        converge(&mut c[i], &key, ALERTS, false).await;
        assert!(
            c[i].allowed(&key, SEND.0, SEND.1).await,
            "the kept scope stays"
        );
    }

    // Revoked on C: denied on A and B.
    c[2].delete(&id).await.expect("revoke on C");
    assert!(!c[2].allowed(&key, SEND.0, SEND.1).await);
    for i in [0, 1] {
        converge(&mut c[i], &key, SEND, false).await;
    }

    // The distribution: from DeleteKey's acknowledgement on one sidecar
    // until both others deny, over 200 revocations (writer rotates).
    let mut delays = Vec::with_capacity(400);
    for round in 0..200 {
        let writer = round % 3;
        let (id, key) = c[writer]
            .create("acme", &["mail.send"])
            .await
            .expect("create");
        let others: Vec<usize> = (0..3).filter(|i| *i != writer).collect();
        for &i in &others {
            converge(&mut c[i], &key, SEND, true).await;
        }
        c[writer].delete(&id).await.expect("revoke");
        let acked = Instant::now();
        let mut waits = Vec::new();
        for &i in &others {
            let mut authorizer = c[i].authorizer.clone();
            let key = key.clone();
            waits.push(tokio::spawn(async move {
                loop {
                    let allowed = ask(&mut authorizer, &key, SEND).await.allowed;
                    if !allowed {
                        return acked.elapsed();
                    }
                    assert!(acked.elapsed() < CONVERGE, "revocation never arrived");
                }
            }));
        }
        for wait in waits {
            delays.push(wait.await.expect("poller"));
        }
    }
    delays.sort();
    let (p50, p99, max) = (
        quantile(&delays, 0.50),
        quantile(&delays, 0.99),
        delays[delays.len() - 1],
    );
    println!(
        "revocation propagation over {} observations (200 revocations x 2 other sidecars): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        delays.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
    // Reported, never asserted (CI shares a loaded machine): the README
    // sets the goal (p99 <= 50 ms) beside the bench's measured figures.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_account_limit_holds_across_sidecars() {
    account_limit(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_account_limit_holds_across_sidecars_on_demand() {
    account_limit(ON_DEMAND).await;
}

async fn account_limit(mode: &[&str]) {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::start(3).await else {
        return;
    };
    let (_sidecars, c) = three_sidecars(
        &cluster,
        &[mode, &["--max-keys-per-account", "20"]].concat(),
    )
    .await;
    let mut creates = Vec::new();
    for client in &c {
        for _ in 0..15 {
            let mut manager = client.manager.clone();
            let admin = client.admin.clone();
            creates.push(tokio::spawn(async move {
                manager
                    .create_key(bearer(
                        &admin,
                        pb::CreateKeyRequest {
                            name: "race".into(),
                            account_id: "acme".into(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .map(|reply| reply.into_inner().key.expect("key").key_id)
            }));
        }
    }
    let mut ids = std::collections::HashSet::new();
    for create in creates {
        match create.await.expect("task") {
            Ok(id) => assert!(ids.insert(id), "ids are unique"),
            Err(status) => assert!(
                matches!(status.code(), Code::ResourceExhausted),
                "{status:?}"
            ),
        }
    }
    assert_eq!(ids.len(), 20, "exactly the limit, across 45 racing creates");
    let in_etcd = cluster.client().snapshot().await.expect("read etcd").0;
    assert_eq!(in_etcd.len(), 20);
    for mut client in c {
        let deadline = Instant::now() + CONVERGE;
        while client.count("acme").await != 20 {
            assert!(Instant::now() < deadline, "a replica never listed all 20");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn member_and_quorum_loss() {
    member_and_quorum(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn member_and_quorum_loss_on_demand() {
    member_and_quorum(ON_DEMAND).await;
}

async fn member_and_quorum(mode: &[&str]) {
    let _serial = SERIAL.lock().await;
    let Some(mut cluster) = Cluster::start(3).await else {
        return;
    };
    // Writes may wait out a leader election (about a second here).
    let (sidecars, mut c) = three_sidecars(
        &cluster,
        &[
            mode,
            &["--store-timeout-ms", "5000", "--request-timeout-ms", "8000"],
        ]
        .concat(),
    )
    .await;
    let (_, before) = c[0].create("acme", &["mail.send"]).await.expect("create");
    // Seen everywhere (an on-demand replica holds it from then on).
    for client in &mut c {
        converge(client, &before, SEND, true).await;
    }

    // One member down: writes and decisions continue.
    cluster.kill(0);
    let (_, during) = c[1]
        .create("acme", &["mail.send"])
        .await
        .expect("a write with two of three members");
    for client in &mut c {
        converge(client, &during, SEND, true).await;
    }

    // Quorum lost: writes refused (nothing acknowledged), decisions go on
    // from each replica.
    cluster.kill(1);
    let refused = c[2].create("acme", &["mail.send"]).await;
    assert_eq!(refused.expect_err("no quorum").code(), Code::Unavailable);
    for client in &mut c {
        assert!(client.allowed(&before, SEND.0, SEND.1).await);
        assert!(client.allowed(&during, SEND.0, SEND.1).await);
        converge_status(client, "keyward.v1.KeyManager", ServingStatus::NotServing).await;
        assert_eq!(
            client.status("keyward.v1.Authorizer").await,
            ServingStatus::Serving,
            "no --max-staleness: decisions keep serving"
        );
    }

    // Quorum back: everyone converges, on changes made anywhere.
    cluster.restart(0);
    cluster.restart(1);
    cluster.wait_writable().await;
    for (client, sidecar) in c.iter_mut().zip(&sidecars) {
        let deadline = Instant::now() + CONVERGE;
        while client.status("keyward.v1.KeyManager").await != ServingStatus::Serving {
            assert!(
                Instant::now() < deadline,
                "KeyManager never SERVING again:\n{}",
                sidecar.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (_, after) = c[0]
        .create("acme", &["mail.send"])
        .await
        .expect("write again");
    let during_id = c[1].create("acme", &[]).await.expect("create on B").0;
    c[1].delete(&during_id).await.expect("delete on B");
    for client in &mut c {
        converge(client, &after, SEND, true).await;
        assert!(
            client.allowed(&before, SEND.0, SEND.1).await,
            "nothing acknowledged was lost"
        );
    }
    let etcd = cluster.client().snapshot().await.expect("read etcd").0;
    assert_eq!(
        etcd.len(),
        3,
        "before, during, after: the refused write never landed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sidecar_restarted_while_etcd_is_down_serves_its_replica_then_catches_up() {
    let _serial = SERIAL.lock().await;
    let Some(mut cluster) = Cluster::start(1).await else {
        return;
    };
    let mut a = Sidecar::start(BIN, &cluster.endpoints(), &[]);
    let b = Sidecar::start(BIN, &cluster.endpoints(), &[]);
    let mut ca = Client::of(&a).await;
    let mut keys = Vec::new();
    for _ in 0..5 {
        keys.push(ca.create("acme", &["mail.send"]).await.expect("create"));
    }

    // SIGKILL, etcd down, restart: every key it had still authorizes.
    a.kill();
    cluster.kill(0);
    a.restart(BIN);
    let mut ca = Client::of(&a).await;
    converge_status(&mut ca, "keyward.v1.Authorizer", ServingStatus::Serving).await;
    for (_, key) in &keys {
        assert!(
            ca.allowed(key, SEND.0, SEND.1).await,
            "served from the replica"
        );
    }
    assert_eq!(
        ca.create("acme", &[]).await.expect_err("etcd down").code(),
        Code::Unavailable
    );
    // Logged just after the sidecar turns to its replica: waited for.
    common::await_log(|| a.log(), &["etcd unreachable"]).await;

    // etcd back: a change made elsewhere reaches it.
    cluster.restart(0);
    cluster.wait_writable().await;
    let mut cb = Client::of(&b).await;
    let deadline = Instant::now() + CONVERGE;
    while cb.delete(&keys[0].0).await.is_err() {
        assert!(Instant::now() < deadline, "B never wrote again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, fresh) = cb
        .create("acme", &["mail.send"])
        .await
        .expect("create on B");
    converge(&mut ca, &keys[0].1, SEND, false).await;
    converge(&mut ca, &fresh, SEND, true).await;
    assert!(ca.allowed(&keys[1].1, SEND.0, SEND.1).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sidecar_restarted_during_an_outage_resumes_its_watch_or_reads_everything_after_a_compaction()
 {
    let _serial = SERIAL.lock().await;
    let Some(mut cluster) = Cluster::start(1).await else {
        return;
    };
    let a = Sidecar::start(BIN, &cluster.endpoints(), &[]);
    let mut b = Sidecar::start(BIN, &cluster.endpoints(), &[]);
    let (mut ca, mut cb) = (Client::of(&a).await, Client::of(&b).await);
    let (doomed_id, doomed) = ca.create("acme", &["mail.send"]).await.expect("create");
    // B writes too, so its replica holds a key at a revision of its own.
    let (own_id, own) = cb.create("acme", &["mail.send"]).await.expect("create");
    converge(&mut cb, &doomed, SEND, true).await;
    converge(&mut ca, &own, SEND, true).await;

    // B is down while A revokes one key, renames B's and creates another;
    // then etcd goes down too, and B restarts on its replica. When etcd is
    // back, B replays only the history it missed.
    b.kill();
    ca.delete(&doomed_id).await.expect("revoke");
    ca.rename(&own_id, "renamed by A").await.expect("rename");
    let (_, fresh) = ca.create("acme", &["mail.send"]).await.expect("create");
    cluster.kill(0);
    b.restart(BIN);
    let mut cb = Client::of(&b).await;
    converge_status(&mut cb, "keyward.v1.Authorizer", ServingStatus::Serving).await;
    assert!(
        cb.allowed(&doomed, SEND.0, SEND.1).await,
        "B cannot know yet"
    );
    cluster.restart(0);
    converge(&mut cb, &doomed, SEND, false).await;
    converge(&mut cb, &fresh, SEND, true).await;
    assert!(cb.allowed(&own, SEND.0, SEND.1).await);
    assert_eq!(cb.name_of(&own_id).await, "renamed by A");
    common::await_log(|| b.log(), &["the watch will resume"]).await;
    let log = b.log();
    assert!(
        !log.contains("replica synced with etcd"),
        "no full read: {log}"
    );

    // Again, but etcd compacts the history B would need (two changes,
    // compacted at the second): a full read.
    b.kill();
    let (_, later) = ca.create("acme", &["mail.send"]).await.expect("create");
    ca.delete(&own_id).await.expect("revoke");
    cluster.compact(0).await;
    cluster.kill(0);
    b.restart(BIN);
    let mut cb = Client::of(&b).await;
    converge_status(&mut cb, "keyward.v1.Authorizer", ServingStatus::Serving).await;
    cluster.restart(0);
    converge(&mut cb, &later, SEND, true).await;
    converge(&mut cb, &own, SEND, false).await;
    common::await_log(|| b.log(), &["replica synced with etcd"]).await;
    assert!(b.log().contains("compacted"));
    assert!(!cb.allowed(&doomed, SEND.0, SEND.1).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compaction_past_a_disconnected_sidecar_makes_it_read_everything_again() {
    compaction_past_a_disconnected_sidecar(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compaction_past_a_disconnected_sidecar_makes_it_read_everything_again_on_demand() {
    compaction_past_a_disconnected_sidecar(ON_DEMAND).await;
}

async fn compaction_past_a_disconnected_sidecar(mode: &[&str]) {
    let _serial = SERIAL.lock().await;
    let Some(mut cluster) = Cluster::start(3).await else {
        return;
    };
    // A talks to the whole cluster; C only to member 2.
    let a = Sidecar::start(
        BIN,
        &cluster.endpoints(),
        &["--store-timeout-ms", "5000", "--request-timeout-ms", "8000"],
    );
    let c_sidecar = Sidecar::start(BIN, &cluster.endpoint(2), mode);
    let (mut ca, mut cc) = (Client::of(&a).await, Client::of(&c_sidecar).await);
    let (doomed_id, doomed) = ca.create("acme", &["mail.send"]).await.expect("create");
    let (_, kept) = ca.create("acme", &["mail.send"]).await.expect("create");
    converge(&mut cc, &doomed, SEND, true).await;
    converge(&mut cc, &kept, SEND, true).await;

    // C loses its only member; meanwhile the key is revoked and the
    // history compacted past C's revision.
    cluster.kill(2);
    ca.delete(&doomed_id).await.expect("revoke");
    let (_, newer) = ca.create("acme", &["mail.send"]).await.expect("create");
    cluster.compact(0).await;
    assert!(
        cc.allowed(&doomed, SEND.0, SEND.1).await,
        "C cannot know yet"
    );

    // Member back: C's watch finds its revision compacted, re-reads, and
    // converges.
    cluster.restart(2);
    converge(&mut cc, &doomed, SEND, false).await;
    converge(&mut cc, &newer, SEND, true).await;
    assert!(cc.allowed(&kept, SEND.0, SEND.1).await);
    common::await_log(|| c_sidecar.log(), &["compacted"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_sidecar_is_ready_after_its_first_full_read_and_modes_do_not_mix() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::start(1).await else {
        return;
    };
    let a = Sidecar::start(BIN, &cluster.endpoints(), &[]);
    let mut ca = Client::of(&a).await;
    let (_, key) = ca.create("acme", &["mail.send"]).await.expect("create");
    let late = Sidecar::start(BIN, &cluster.endpoints(), &[]);
    let mut cl = Client::of(&late).await;
    converge_status(&mut cl, "keyward.v1.Authorizer", ServingStatus::Serving).await;
    assert!(cl.allowed(&key, SEND.0, SEND.1).await, "ready means synced");
    // Logged just after readiness is set, by the log's own thread.
    common::await_log(|| late.log(), &["replica synced with etcd"]).await;

    // A standalone store is never silently replaced by etcd's key set...
    let standalone = tempfile::tempdir().expect("tempdir");
    let (mut child, port) = common::spawn_serve(BIN, standalone.path(), &["--data-dir", "data"]);
    let mut own = Client {
        admin: common::admin_token(&standalone.path().join("data")),
        ..Client::of_url(&format!("http://127.0.0.1:{port}")).await
    };
    own.create("acme", &[]).await.expect("a standalone key");
    let _ = child.kill();
    let _ = child.wait();
    let refused = serve_once(&standalone.path().join("data"), Some(&cluster.endpoints()));
    assert!(
        refused.contains("standalone key store") && refused.contains("keyward migrate"),
        "{refused}"
    );
    // ...and a replica is never silently used as a standalone store.
    let mut late = late;
    late.kill();
    let refused = serve_once(&late.dir.path().join("data"), None);
    assert!(refused.contains("replica of etcd"), "{refused}");
}

/// `n` keys written straight into etcd in migration-sized transactions,
/// over 50 accounts; the secrets of every 500th, for asking.
async fn seed(cluster: &Cluster, n: usize) -> Vec<String> {
    use keyward::domain::catalog::KeyKind;
    use keyward::domain::record::{Access, KeyRecord};
    let mut secrets = Vec::new();
    let mut records: Vec<KeyRecord> = (0..n)
        .map(|i| {
            let key = keyward::domain::key::generate().expect("rng");
            if i % 500 == 0 {
                secrets.push(key.text.clone());
            }
            KeyRecord {
                id: key.id,
                account: format!("account-{}", i % 50),
                name: format!("seeded {i}"),
                kind: KeyKind::RestrictedAccess,
                scopes: vec!["mail.send".into()],
                created_at: 1,
                updated_at: 1,
                access: Access::new(key.hash),
                leak: None,
            }
        })
        .collect();
    records.sort_by(|a, b| a.account.cmp(&b.account));
    let etcd = cluster.client();
    // Two puts a key (its record, its listing entry) and one an account:
    // within etcd's 128 operations a transaction.
    for chunk in records.chunks(40) {
        etcd.put_batch(chunk).await.expect("seed");
    }
    secrets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_read_of_many_pages_is_complete_and_restarts_when_compacted_under_it() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::start(1).await else {
        return;
    };
    // 12,000 keys in pages of 5: 2,400 pages, one revision.
    let secrets = seed(&cluster, 12_000).await;
    let sidecar = Sidecar::start(BIN, &cluster.endpoints(), &["--etcd-page-keys", "5"]);
    let mut client = Client::of(&sidecar).await;
    // While it reads, etcd compacts the revision it reads at.
    common::await_log(
        || sidecar.log(),
        &["reading the key set from etcd, page by page"],
    )
    .await;
    cluster.etcdctl(&["put", "/elsewhere", "bump"]);
    cluster.compact(0).await;
    // During the second read, this sidecar changes keys itself: a create
    // and a revocation, both after that read's revision. The pages (older)
    // must not undo either.
    let deadline = Instant::now() + CONVERGE;
    while sidecar.log().matches("page by page").count() < 2 {
        assert!(Instant::now() < deadline, "the read never started again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, created) = client
        .create("another-account", &["mail.send"])
        .await
        .expect("create during the read");
    let revoked = secrets.last().expect("a seeded key").clone();
    let revoked_id = revoked.split('.').nth(1).expect("id").to_owned();
    client
        .delete(&revoked_id)
        .await
        .expect("revoke during the read");
    converge_status(&mut client, "keyward.v1.Authorizer", ServingStatus::Serving).await;
    common::await_log(|| sidecar.log(), &["replica synced with etcd"]).await;
    let log = sidecar.log();
    assert!(
        log.contains("compacted the revision of the full read in progress"),
        "the compaction landed during the read, which started again:\n{log}"
    );
    assert_eq!(
        log.matches("replica synced with etcd").count(),
        1,
        "ready once, after a complete read:\n{log}"
    );
    assert!(
        scrape(&sidecar)
            .await
            .lines()
            .any(|l| l == "keyward_keys 12000"),
        "exactly the key set: 12,000 seeded, one created, one revoked"
    );
    assert!(
        client.allowed(&created, SEND.0, SEND.1).await,
        "the create stands"
    );
    assert!(
        !client.allowed(&revoked, SEND.0, SEND.1).await,
        "the revocation stands"
    );
    for secret in &secrets[..secrets.len() - 1] {
        assert!(client.allowed(secret, SEND.0, SEND.1).await);
    }
    assert!(!client.allowed(&secrets[0], ALERTS.0, ALERTS.1).await);
}

/// Runs `keyward serve` expecting it to refuse to start; its stderr.
fn serve_once(data_dir: &std::path::Path, endpoints: Option<&str>) -> String {
    let mut command = std::process::Command::new(BIN);
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("KEYWARD_DATA_DIR")
        .env_remove("KEYWARD_ETCD_ENDPOINTS");
    if let Some(endpoints) = endpoints {
        command.args(["--etcd-endpoints", endpoints]);
    }
    let output = command.output().expect("runs");
    assert!(!output.status.success(), "it must refuse to start");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_max_staleness_a_cut_off_sidecar_leaves_rotation_and_says_how_stale_it_is() {
    let _serial = SERIAL.lock().await;
    let Some(mut cluster) = Cluster::start(1).await else {
        return;
    };
    let a = Sidecar::start(BIN, &cluster.endpoints(), &["--max-staleness", "2s"]);
    let mut ca = Client::of(&a).await;
    let (_, key) = ca.create("acme", &["mail.send"]).await.expect("create");
    converge_status(&mut ca, "keyward.v1.KeyManager", ServingStatus::Serving).await;
    converge_metric(&a, "keyward_replica_connected 1").await;

    cluster.kill(0);
    converge_status(&mut ca, "keyward.v1.KeyManager", ServingStatus::NotServing).await;
    converge_status(&mut ca, "keyward.v1.Authorizer", ServingStatus::NotServing).await;
    assert_eq!(
        ca.status("envoy.service.auth.v3.Authorization").await,
        ServingStatus::NotServing
    );
    assert_eq!(
        ca.status("").await,
        ServingStatus::Serving,
        "liveness stays up: no restart loop"
    );
    assert!(
        ca.allowed(&key, SEND.0, SEND.1).await,
        "decisions are still answered"
    );
    let metrics = converge_metric(&a, "keyward_replica_connected 0").await;
    let staleness: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keyward_replica_staleness_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .expect("staleness metric");
    assert!(staleness >= 2.0, "{staleness}");

    // Back: current again, serving again.
    cluster.restart(0);
    converge_status(&mut ca, "keyward.v1.Authorizer", ServingStatus::Serving).await;
    converge_status(&mut ca, "keyward.v1.KeyManager", ServingStatus::Serving).await;
}

/// Polls the sidecar's metrics until they contain `line`; returns them.
async fn converge_metric(sidecar: &Sidecar, line: &str) -> String {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let metrics = scrape(sidecar).await;
        if metrics.lines().any(|l| l == line) {
            return metrics;
        }
        assert!(Instant::now() < deadline, "never saw {line}:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sidecar's Prometheus metrics.
async fn scrape(sidecar: &Sidecar) -> String {
    common::scrape_logged(&sidecar.log_path()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_over_mutual_tls() {
    let _serial = SERIAL.lock().await;
    let pki = common::pki::pki();
    let files = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, pem: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, pem).expect("write pem");
        path
    };
    let (ca, server, server_key) = (
        write("ca.pem", &pki.ca),
        write("server.pem", &pki.server.0),
        write("server.key", &pki.server.1),
    );
    let (client, client_key) = (
        write("client.pem", &pki.client.0),
        write("client.key", &pki.client.1),
    );
    let Some(cluster) = Cluster::start_tls([server, server_key, ca.clone()]).await else {
        return;
    };
    let arg = |path: &std::path::Path| path.display().to_string();
    let a = Sidecar::start(
        BIN,
        &cluster.endpoints(),
        &[
            "--etcd-ca-file",
            &arg(&ca),
            "--etcd-cert-file",
            &arg(&client),
            "--etcd-key-file",
            &arg(&client_key),
        ],
    );
    let mut ca_client = Client::of(&a).await;
    converge_status(
        &mut ca_client,
        "keyward.v1.KeyManager",
        ServingStatus::Serving,
    )
    .await;
    let (_, key) = ca_client
        .create("acme", &["mail.send"])
        .await
        .expect("create over mTLS");
    assert!(ca_client.allowed(&key, SEND.0, SEND.1).await);

    // Without a client certificate etcd refuses the connection: never
    // ready, writes refused.
    let b = Sidecar::start(BIN, &cluster.endpoints(), &["--etcd-ca-file", &arg(&ca)]);
    let mut cb = Client::of(&b).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        cb.status("keyward.v1.Authorizer").await,
        ServingStatus::NotServing
    );
    assert_eq!(
        cb.create("acme", &[])
            .await
            .expect_err("no client cert")
            .code(),
        Code::Unavailable
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_with_a_user_and_password() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::start(1).await else {
        return;
    };
    cluster.etcdctl(&["user", "add", "root:root-secret-pw"]);
    cluster.etcdctl(&["user", "add", "keyward:keyward-secret-pw"]);
    cluster.etcdctl(&["role", "add", "keyward"]);
    cluster.etcdctl(&[
        "role",
        "grant-permission",
        "keyward",
        "--prefix=true",
        "readwrite",
        "/keyward/",
    ]);
    cluster.etcdctl(&["user", "grant-role", "keyward", "keyward"]);
    cluster.etcdctl(&["auth", "enable"]);
    let files = tempfile::tempdir().expect("tempdir");
    let password = files.path().join("password");
    std::fs::write(&password, "keyward-secret-pw\n").expect("write");
    let password = password.display().to_string();
    let as_user = ["--etcd-user", "keyward", "--etcd-password-file", &password];
    let a = Sidecar::start(BIN, &cluster.endpoints(), &as_user);
    let mut ca = Client::of(&a).await;
    converge_status(&mut ca, "keyward.v1.KeyManager", ServingStatus::Serving).await;
    let (_, key) = ca
        .create("acme", &["mail.send"])
        .await
        .expect("create as the etcd user");
    let b = Sidecar::start(BIN, &cluster.endpoints(), &as_user);
    let mut cb = Client::of(&b).await;
    converge_status(&mut cb, "keyward.v1.Authorizer", ServingStatus::Serving).await;
    assert!(
        cb.allowed(&key, SEND.0, SEND.1).await,
        "the watch reads as the user too"
    );
    assert!(
        !a.log().contains("keyward-secret-pw"),
        "the password is never logged"
    );

    // Without credentials: refused by etcd, never ready.
    let c = Sidecar::start(BIN, &cluster.endpoints(), &[]);
    let mut cc = Client::of(&c).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        cc.status("keyward.v1.Authorizer").await,
        ServingStatus::NotServing
    );
}

/// The value of the (integer) metric line starting with `name` (0 when
/// absent).
fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// etcd reads an on-demand replica made for first sights.
fn first_sight_reads(metrics: &str) -> u64 {
    ["held", "absent", "etcd_unreachable", "kept_changing"]
        .iter()
        .map(|outcome| {
            metric(
                metrics,
                &format!("keyward_replica_first_sights_total{{outcome=\"{outcome}\"}}"),
            )
        })
        .sum()
}

/// Asks `authorizer` about `key` for `request`.
async fn ask(
    authorizer: &mut AuthorizerClient<Channel>,
    key: &str,
    request: (&str, &str),
) -> pb::AuthorizeResponse {
    authorizer
        .authorize(pb::AuthorizeRequest {
            key: key.to_owned(),
            method: request.0.into(),
            path: request.1.into(),
            client_ip: String::new(),
        })
        .await
        .expect("authorize replies")
        .into_inner()
}

/// Why `key` was refused here (`Unspecified` when allowed).
async fn reason(client: &mut Client, key: &str) -> pb::DenyReason {
    let reply = ask(&mut client.authorizer, key, SEND).await;
    pb::DenyReason::try_from(reply.reason).expect("a reason")
}

/// An on-demand sidecar with `--replica-fetch-rate rate`, serving, once
/// its membership filter lists at least `members` ids.
async fn on_demand_with_members(cluster: &Cluster, rate: &str, members: u64) -> (Sidecar, Client) {
    let sidecar = Sidecar::start(
        BIN,
        &cluster.endpoints(),
        &[ON_DEMAND, &["--replica-fetch-rate", rate]].concat(),
    );
    let mut client = Client::of(&sidecar).await;
    converge_status(&mut client, "keyward.v1.Authorizer", ServingStatus::Serving).await;
    let started = Instant::now();
    while metric(&scrape(&sidecar).await, "keyward_replica_member_ids ") < members {
        assert!(
            started.elapsed() < CONVERGE,
            "the membership filter was never built"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (sidecar, client)
}

/// A well-formed key that was never issued.
fn made_up_key() -> String {
    keyward::domain::key::generate().expect("rng").text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_on_demand_replica_fetches_at_first_sight_and_holds_only_its_working_set() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::start(1).await else {
        return;
    };
    let seeded = seed(&cluster, 2_000).await;
    let a = Sidecar::start(BIN, &cluster.endpoints(), &[]);
    let b = Sidecar::start(
        BIN,
        &cluster.endpoints(),
        &[ON_DEMAND, &["--replica-cache-keys", "3"]].concat(),
    );
    let (mut ca, mut cb) = (Client::of(&a).await, Client::of(&b).await);
    // Ready without reading the key set.
    converge_status(&mut cb, "keyward.v1.Authorizer", ServingStatus::Serving).await;
    common::await_log(|| b.log(), &["on-demand replica following etcd"]).await;
    assert!(!b.log().contains("reading the key set"), "no full read");
    assert_eq!(metric(&scrape(&b).await, "keyward_keys "), 0);

    // First sight: fetched once; then decided from memory.
    assert!(cb.allowed(&seeded[0], SEND.0, SEND.1).await, "first sight");
    for _ in 0..10 {
        assert!(cb.allowed(&seeded[0], SEND.0, SEND.1).await, "a hit");
    }
    let wrong = {
        let mut wrong = seeded[0].clone().into_bytes();
        let at = wrong.len() - 10;
        wrong[at] = if wrong[at] == b'A' { b'B' } else { b'A' };
        String::from_utf8(wrong).expect("ascii")
    };
    assert_eq!(reason(&mut cb, &wrong).await, pb::DenyReason::UnknownKey);
    let metrics = scrape(&b).await;
    assert_eq!(first_sight_reads(&metrics), 1, "one etcd read:\n{metrics}");
    assert_eq!(metric(&metrics, "keyward_keys "), 1);

    // Over --replica-cache-keys, keys are evicted; an evicted key is
    // fetched again when presented.
    for key in &seeded {
        assert!(cb.allowed(key, SEND.0, SEND.1).await);
    }
    converge_metric(&b, "keyward_keys 3").await;
    assert!(
        cb.allowed(&seeded[0], SEND.0, SEND.1).await,
        "fetched again"
    );

    // Revoked on A while B holds it: denied here.
    let (id, key) = ca.create("acme", &["mail.send"]).await.expect("create");
    assert!(cb.allowed(&key, SEND.0, SEND.1).await, "B holds it now");
    ca.delete(&id).await.expect("revoke on A");
    converge(&mut cb, &key, SEND, false).await;
    assert_eq!(reason(&mut cb, &key).await, pb::DenyReason::UnknownKey);

    // Narrowed on A while B holds it: the narrower scopes apply here.
    let (id, key) = ca
        .create("acme", &["mail.send", "alerts.read"])
        .await
        .expect("create");
    assert!(cb.allowed(&key, ALERTS.0, ALERTS.1).await);
    ca.narrow(&id, &["mail.send"]).await.expect("narrow on A");
    converge(&mut cb, &key, ALERTS, false).await;
    assert!(cb.allowed(&key, SEND.0, SEND.1).await);

    // Deleted before its first sight here: never allowed, and remembered
    // as absent (no second read).
    let (gone_id, gone) = ca.create("acme", &["mail.send"]).await.expect("create");
    ca.delete(&gone_id).await.expect("delete");
    let before = first_sight_reads(&scrape(&b).await);
    assert_eq!(reason(&mut cb, &gone).await, pb::DenyReason::UnknownKey);
    assert_eq!(reason(&mut cb, &gone).await, pb::DenyReason::UnknownKey);
    let metrics = scrape(&b).await;
    assert_eq!(first_sight_reads(&metrics), before + 1, "{metrics}");
    assert!(
        metric(
            &metrics,
            "keyward_replica_first_sights_total{outcome=\"absent_remembered\"}"
        ) >= 1
    );

    management_reads_the_truth(&mut ca, &mut cb).await;
}

/// Key management on an on-demand replica (`cb`) reads etcd: what `ca`
/// (full) wrote, listed in pages, read and renamed.
async fn management_reads_the_truth(ca: &mut Client, cb: &mut Client) {
    // Key management reads the truth: B lists and reads what A wrote.
    let (listed_id, _) = ca.create("listed", &["mail.send"]).await.expect("create");
    ca.create("listed", &["alerts.read"]).await.expect("create");
    assert_eq!(cb.count("listed").await, 2);
    assert_eq!(cb.count("account-7").await, 40, "seeded keys are listed");
    // In pages, through the tokens: every key once.
    let (mut token, mut ids) = (String::new(), std::collections::HashSet::new());
    loop {
        let page = cb
            .manager
            .list_keys(bearer(
                &cb.admin,
                pb::ListKeysRequest {
                    account_id: "account-7".into(),
                    page_size: 7,
                    page_token: token.clone(),
                    ..Default::default()
                },
            ))
            .await
            .expect("a page")
            .into_inner();
        for key in page.keys {
            assert!(ids.insert(key.key_id), "listed twice");
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(ids.len(), 40);
    // Last use is known here only for held keys: not a question for it.
    let unused = cb
        .manager
        .list_keys(bearer(
            &cb.admin,
            pb::ListKeysRequest {
                account_id: "account-7".into(),
                unused_for: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                ..Default::default()
            },
        ))
        .await
        .expect_err("refused");
    assert_eq!(unused.code(), Code::InvalidArgument);
    assert!(
        unused.message().contains("unused_for"),
        "{}",
        unused.message()
    );
    cb.rename(&listed_id, "renamed on B").await.expect("rename");
    assert_eq!(ca.name_of(&listed_id).await, "renamed on B");
    assert_eq!(cb.name_of(&listed_id).await, "renamed on B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_on_demand_replica_shares_first_sights_and_with_etcd_away_refuses_what_it_cannot_verify()
{
    let _serial = SERIAL.lock().await;
    let Some(mut cluster) = Cluster::start(1).await else {
        return;
    };
    let a = Sidecar::start(BIN, &cluster.endpoints(), &[]);
    let mut b = Sidecar::start(BIN, &cluster.endpoints(), ON_DEMAND);
    let (mut ca, mut cb) = (Client::of(&a).await, Client::of(&b).await);
    converge_status(&mut cb, "keyward.v1.Authorizer", ServingStatus::Serving).await;

    // Concurrent first sights of one key share one etcd read.
    let (_, shared) = ca.create("acme", &["mail.send"]).await.expect("create");
    let before = first_sight_reads(&scrape(&b).await);
    let mut asks = Vec::new();
    for _ in 0..32 {
        let mut authorizer = cb.authorizer.clone();
        let shared = shared.clone();
        asks.push(tokio::spawn(async move {
            ask(&mut authorizer, &shared, SEND).await.allowed
        }));
    }
    for ask in asks {
        assert!(ask.await.expect("asker"), "every concurrent first sight");
    }
    assert_eq!(first_sight_reads(&scrape(&b).await), before + 1);

    // etcd away: held keys decide; a key never seen is unverifiable
    // (distinct from unknown), counted.
    let (_, unseen) = ca.create("acme", &["mail.send"]).await.expect("create");
    cluster.kill(0);
    assert!(cb.allowed(&shared, SEND.0, SEND.1).await, "held: decided");
    assert_eq!(
        reason(&mut cb, &unseen).await,
        pb::DenyReason::KeyUnverifiable
    );
    let metrics = scrape(&b).await;
    assert!(
        metric(
            &metrics,
            "keyward_decisions_total{source=\"authorize\",result=\"deny\",reason=\"key_unverifiable\"}"
        ) >= 1,
        "{metrics}"
    );

    // Restarted while etcd is away: nothing can be verified, so it is not
    // ready; once etcd is back it is, and fetches again.
    b.restart(BIN);
    let mut cb = Client::of(&b).await;
    assert_eq!(
        reason(&mut cb, &shared).await,
        pb::DenyReason::KeyUnverifiable
    );
    assert_eq!(
        cb.status("keyward.v1.Authorizer").await,
        ServingStatus::NotServing
    );
    cluster.restart(0);
    cluster.wait_writable().await;
    converge_status(&mut cb, "keyward.v1.Authorizer", ServingStatus::Serving).await;
    converge(&mut cb, &unseen, SEND, true).await;
    assert!(cb.allowed(&shared, SEND.0, SEND.1).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_made_up_key_ids_costs_etcd_at_most_the_fetch_rate() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::start(1).await else {
        return;
    };
    let b = Sidecar::start(
        BIN,
        &cluster.endpoints(),
        &[ON_DEMAND, &["--replica-fetch-rate", "20"]].concat(),
    );
    let mut cb = Client::of(&b).await;
    converge_status(&mut cb, "keyward.v1.Authorizer", ServingStatus::Serving).await;
    let started = Instant::now();
    let mut floods = Vec::new();
    for _ in 0..8 {
        let mut authorizer = cb.authorizer.clone();
        floods.push(tokio::spawn(async move {
            let mut refused = 0;
            for _ in 0..100 {
                let reply = ask(&mut authorizer, &made_up_key(), SEND).await;
                assert!(!reply.allowed, "a made-up key is never allowed");
                if reply.reason == pb::DenyReason::KeyUnverifiable as i32 {
                    refused += 1;
                }
            }
            refused
        }));
    }
    let mut unverifiable = 0;
    for flood in floods {
        unverifiable += flood.await.expect("flood");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let metrics = scrape(&b).await;
    let reads = first_sight_reads(&metrics);
    // The bound: a burst of RATE, then RATE a second (the elapsed time is
    // measured after the flood, so a slow machine only loosens it).
    // Listed ids' budget, plus a tenth of it for ids etcd did not list.
    let rate = 20.0 * 1.1;
    let bound = rate + rate * elapsed;
    #[allow(clippy::cast_precision_loss)]
    let reads = reads as f64;
    println!(
        "800 made-up ids in {elapsed:.2} s: {reads} etcd reads (bound {bound:.0}), {unverifiable} refused as unverifiable"
    );
    assert!(reads <= bound, "{reads} reads over {bound}:\n{metrics}");
    let over = |outcome: &str| {
        metric(
            &metrics,
            &format!("keyward_replica_first_sights_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert!(
        over("over_rate") + over("over_rate_unlisted") > 0,
        "over the rate, refused"
    );
    // Listed ids over their budget are unverifiable; unlisted ones are
    // answered as unknown, as made-up ids are.
    assert_eq!(over("over_rate"), unverifiable);
    // Memory stays bounded too: absent ids are capped, nothing is held.
    assert_eq!(metric(&metrics, "keyward_keys "), 0);
}

/// Issue 29 (4): a flood of made-up key ids, as fast as 8 clients can send
/// them, never takes the first sights of keys that exist: a fresh
/// on-demand sidecar (it holds none of them, as after a restart or an
/// eviction) allows every real key presented during the flood, while the
/// flood's own ids are refused over their small budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_made_up_ids_never_starves_the_first_sights_of_real_keys() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::start(1).await else {
        return;
    };
    let a = Sidecar::start(BIN, &cluster.endpoints(), &[]);
    let mut ca = Client::of(&a).await;
    let mut real = Vec::new();
    for _ in 0..40 {
        real.push(ca.create("acme", &["mail.send"]).await.expect("create").1);
    }
    let (_, unseen) = ca.create("acme", &["mail.send"]).await.expect("create");
    let (b, mut cb) = on_demand_with_members(&cluster, "50", 40).await;
    let started = Instant::now();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut floods = Vec::new();
    for _ in 0..8 {
        let mut authorizer = cb.authorizer.clone();
        let stop = std::sync::Arc::clone(&stop);
        floods.push(tokio::spawn(async move {
            let mut sent = 0_u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let reply = ask(&mut authorizer, &made_up_key(), SEND).await;
                assert!(!reply.allowed, "a made-up key is never allowed");
                sent += 1;
            }
            sent
        }));
    }
    // Let the flood spend every budget it can reach first.
    let refusals = |metrics: &str| {
        metric(
            metrics,
            "keyward_replica_first_sights_total{outcome=\"over_rate_unlisted\"}",
        ) + metric(
            metrics,
            "keyward_replica_first_sights_total{outcome=\"over_rate\"}",
        )
    };
    while refusals(&scrape(&b).await) < 50 {
        assert!(
            started.elapsed() < CONVERGE * 3,
            "the flood never reached its budget"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut refused = Vec::new();
    for (n, key) in real.iter().enumerate() {
        let reply = ask(&mut cb.authorizer, key, SEND).await;
        if !reply.allowed {
            refused.push((n, pb::DenyReason::try_from(reply.reason)));
        }
    }
    // During the flood a live id (with a wrong secret) and a made-up one
    // get the same answer: the budgets tell no one which ids are live.
    let wrong_secret = format!("{}AAAA", &unseen[..unseen.len() - 4]);
    for key in [wrong_secret, made_up_key()] {
        assert_eq!(
            reason(&mut cb, &key).await,
            pb::DenyReason::UnknownKey,
            "a live id and a made-up one are answered alike"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    for flood in floods {
        sent += flood.await.expect("flood");
    }
    let metrics = scrape(&b).await;
    println!(
        "{sent} made-up ids during the flood; {} of {} real keys refused",
        refused.len(),
        real.len()
    );
    assert!(
        refused.is_empty(),
        "real keys refused during the flood: {refused:?}\n{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "keyward_replica_first_sights_total{outcome=\"over_rate_unlisted\"}"
        ) > 0,
        "the flood was refused over its own budget"
    );
}

/// A leak GitHub reports to one sidecar is denied on every other: the leak
/// mark and the disable are one record in etcd, written through the same
/// path as DisableKey. The reporting sidecar is an on-demand replica that
/// has never seen the key (the report reads etcd); the creating one is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leak_reported_on_one_sidecar_is_denied_on_every_other() {
    use common::github::{GITHUB_URL, Signer256, post_signed, report, write_document};
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::start(1).await else {
        return;
    };
    let keys_dir = tempfile::tempdir().expect("tempdir");
    let github = Signer256::new("github-key-1");
    let keys_file = keys_dir.path().join("github-keys.json");
    write_document(&keys_file, &[&github]);
    let keys_arg = keys_file.display().to_string();
    let reporting = Sidecar::start(
        BIN,
        &cluster.endpoints(),
        &[
            "--replica-mode",
            "on-demand",
            "--http-listen",
            "127.0.0.1:0",
            "--secret-scanning-keys",
            &keys_arg,
        ],
    );
    let full = Sidecar::start(BIN, &cluster.endpoints(), &[]);
    let mut r = Client::of(&reporting).await;
    let mut f = Client::of(&full).await;
    converge_status(&mut r, "keyward.v1.Authorizer", ServingStatus::Serving).await;
    converge_status(&mut f, "keyward.v1.Authorizer", ServingStatus::Serving).await;
    let (id, key) = f.create("acme", &["mail.send"]).await.expect("create");
    let (_, bystander) = f.create("acme", &["mail.send"]).await.expect("create");
    assert!(f.allowed(&key, SEND.0, SEND.1).await);

    let rest: std::net::SocketAddr =
        common::await_logged_address(&reporting.log_path(), "serving SendGrid's REST key API")
            .parse()
            .expect("address");
    let (status, feedback) = post_signed(rest, &github, &report(&[&key, &bystander[..60]])).await;
    assert_eq!(status, 200, "{feedback}");
    assert_eq!(feedback[0]["label"], "true_positive");
    assert_eq!(feedback[1]["label"], "false_positive");

    for client in [&mut f, &mut r] {
        converge(client, &key, SEND, false).await;
        let reply = ask(&mut client.authorizer, &key, SEND).await;
        assert_eq!(reply.reason, pb::DenyReason::KeyDisabled as i32);
        assert!(client.allowed(&bystander, SEND.0, SEND.1).await);
    }
    let stored = f
        .manager
        .get_key(bearer(&f.admin, pb::GetKeyRequest { key_id: id }))
        .await
        .expect("get")
        .into_inner();
    assert!(!stored.enabled);
    assert_eq!(stored.leak.expect("the mark is in etcd").url, GITHUB_URL);
}

/// Issue 29 (5): every etcd read key management can cause on an on-demand
/// replica is bounded. Reading made-up ids costs no read at all (the
/// membership filter does not list them); listing an account spends a
/// budget of its own, `--replica-fetch-rate` a second, past which the
/// caller is told to retry (UNAVAILABLE).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_management_reads_of_etcd_are_bounded_on_demand() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::start(1).await else {
        return;
    };
    let a = Sidecar::start(BIN, &cluster.endpoints(), &[]);
    let mut ca = Client::of(&a).await;
    let (_, reader) = ca
        .create("acme", &["api_keys.read", "mail.send"])
        .await
        .expect("create");
    let (b, mut cb) = on_demand_with_members(&cluster, "20", 1).await;
    let outcome = |metrics: &str, outcome: &str| {
        metric(
            metrics,
            &format!("keyward_replica_manage_reads_total{{outcome=\"{outcome}\"}}"),
        )
    };

    for _ in 0..200 {
        let made_up = keyward::domain::key::generate()
            .expect("rng")
            .id
            .to_string();
        let refused = cb
            .manager
            .get_key(bearer(&reader, pb::GetKeyRequest { key_id: made_up }))
            .await;
        assert_eq!(refused.expect_err("no such key").code(), Code::NotFound);
    }
    let metrics = scrape(&b).await;
    assert_eq!(outcome(&metrics, "unlisted"), 200, "{metrics}");
    assert_eq!(outcome(&metrics, "read"), 0, "no etcd read for made-up ids");

    let started = Instant::now();
    let mut unavailable = 0;
    for _ in 0..200 {
        let listed = cb
            .manager
            .list_keys(bearer(
                &reader,
                pb::ListKeysRequest {
                    account_id: "acme".into(),
                    ..Default::default()
                },
            ))
            .await;
        match listed {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                unavailable += 1;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let metrics = scrape(&b).await;
    #[allow(clippy::cast_precision_loss)]
    let reads = outcome(&metrics, "read") as f64;
    // A burst of 20 (plus the one that starts it), then 20 a second.
    let bound = 21.0 + 20.0 * elapsed;
    println!(
        "200 listings in {elapsed:.2} s: {reads} etcd reads (bound {bound:.0}), {unavailable} refused"
    );
    assert!(reads <= bound, "{reads} reads over {bound}");
    // Refusals need the calls to outrun the budget; a machine too slow
    // for that proves only the bound above.
    if 200.0 > bound {
        assert!(unavailable > 0, "over the budget, refused");
    }
    assert_eq!(outcome(&metrics, "over_rate"), unavailable);
}
