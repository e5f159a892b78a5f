//! `keyward backup` and `keyward restore` against a real server on a
//! loopback port with a real sled directory: a backup taken while keys are
//! created and revoked is one point in time, a sidecar started on its
//! restore decides every key in it with the key's original secret, and
//! every refusal is one line, a non-zero exit, and nothing left behind.
#![allow(
    clippy::too_many_lines,
    reason = "one end-to-end story reads best in one test"
)]

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};

use common::{TestServer, assert_status, bearer};
use keyward::config::ServeConfig;
use keyward::pb::v1 as pb;
use keyward::store::backup::{Header, Reader, verify_checksum};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_keyward");
/// Accounts keys are spread over (each holds at most 100).
const ACCOUNTS: usize = 20;
/// Keys before the backup starts.
const KEYS: usize = 600;
/// Changes the churn makes at least, started before the backup.
const MIN_CHURN: usize = 60;

/// Runs the keyward binary with `args` (off the async workers, so the
/// in-process server keeps serving).
async fn keyward(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .args(&args)
            .env_remove("KEYWARD_TOKEN")
            .env_remove("KEYWARD_DATA_DIR")
            .env_remove("KEYWARD_SERVER")
            .output()
            .expect("keyward runs")
    })
    .await
    .expect("joined")
}

fn backup_args(server: &TestServer, token: &str, out: &Path) -> Vec<String> {
    vec![
        "backup".into(),
        "--server".into(),
        server.url(),
        "--token".into(),
        token.into(),
        "--out".into(),
        out.display().to_string(),
    ]
}

fn restore_args(dir: &Path, file: &Path) -> Vec<String> {
    vec![
        "restore".into(),
        "--data-dir".into(),
        dir.display().to_string(),
        file.display().to_string(),
    ]
}

/// A refusal: non-zero exit, one line on stderr mentioning `needle`.
fn assert_refused(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "succeeded: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(needle), "{needle:?} in {stderr}");
}

fn assert_succeeded(output: &Output) {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Keys by id: their secret, and whether the churn revoked them.
type Secrets = Arc<Mutex<HashMap<String, String>>>;

async fn create(server: &TestServer, secrets: &Secrets, n: usize) -> String {
    let (id, secret) = server.create_key(&account(n), &["mail.send"]).await;
    secrets.lock().expect("lock").insert(id.clone(), secret);
    id
}

/// The account of the `n`th key.
fn account(n: usize) -> String {
    format!("account-{}", n % ACCOUNTS)
}

/// Every key the server holds, by account.
async fn stored_ids(server: &TestServer) -> HashSet<String> {
    let mut ids = HashSet::new();
    let mut manager = server.manager().await;
    for n in 0..ACCOUNTS {
        let mut page_token = String::new();
        loop {
            let page = manager
                .list_keys(bearer(
                    &server.admin,
                    pb::ListKeysRequest {
                        account_id: account(n),
                        page_size: 500,
                        page_token,
                        ..Default::default()
                    },
                ))
                .await
                .expect("lists")
                .into_inner();
            ids.extend(page.keys.into_iter().map(|key| key.key_id));
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
    }
    ids
}

/// The header and the key ids of a backup file, read as restore does.
fn backup_contents(file: &Path) -> (Header, HashSet<String>) {
    let mut opened = std::fs::File::open(file).expect("open");
    verify_checksum(&mut opened).expect("checksum");
    let mut reader = Reader::open(std::io::BufReader::new(opened)).expect("header");
    let mut ids = HashSet::new();
    while let Some(entry) = reader.next_entry().expect("entry") {
        ids.insert(entry.record.id.to_string());
    }
    (reader.header().clone(), ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_under_writes_is_one_point_in_time_and_restores_every_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Arc::new(TestServer::start(&dir).await);
    let secrets: Secrets = Arc::default();
    let mut initial = Vec::with_capacity(KEYS);
    for n in 0..KEYS {
        initial.push(create(&server, &secrets, n).await);
    }
    // Revoked before the backup: never in it.
    let mut manager = server.manager().await;
    let revoked_before: Vec<String> = initial.drain(..10).collect();
    for id in &revoked_before {
        manager
            .delete_key(bearer(
                &server.admin,
                pb::DeleteKeyRequest { key_id: id.clone() },
            ))
            .await
            .expect("deletes");
    }

    // The churn: creates and revokes keys until told to stop, and at
    // least MIN_CHURN times (so it runs while the backup does).
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let churn = {
        let server = Arc::clone(&server);
        let secrets = Arc::clone(&secrets);
        let doomed: Vec<String> = initial.iter().step_by(3).cloned().collect();
        tokio::spawn(async move {
            let mut manager = server.manager().await;
            let mut revoked = HashSet::new();
            let mut n = KEYS;
            let mut doomed = doomed.into_iter();
            // Once the doomed keys are gone, the churn revokes its own
            // (the store stays under the per-account limit however long
            // the backup takes).
            let mut created = std::collections::VecDeque::new();
            while n < KEYS + MIN_CHURN || !*stopped.borrow_and_update() {
                created.push_back(create(&server, &secrets, n).await);
                if let Some(id) = doomed.next().or_else(|| created.pop_front()) {
                    manager
                        .delete_key(bearer(
                            &server.admin,
                            pb::DeleteKeyRequest { key_id: id.clone() },
                        ))
                        .await
                        .expect("deletes");
                    revoked.insert(id);
                }
                n += 1;
            }
            revoked
        })
    };
    let file = dir.path().join("keys.kwbackup");
    let output = keyward(backup_args(&server, &server.admin, &file)).await;
    stop.send(true).expect("churn running");
    let revoked_during = churn.await.expect("churn ran");
    assert_succeeded(&output);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("backed up"), "{stdout}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    let (header, in_backup) = backup_contents(&file);
    assert_eq!(header.source, "standalone");
    assert_eq!(
        usize::try_from(header.keys).expect("fits"),
        in_backup.len(),
        "the header counts it"
    );
    // One point in time: every key that lived through the whole backup is
    // in it; no key revoked before it is.
    for id in &initial {
        if !revoked_during.contains(id) {
            assert!(in_backup.contains(id), "key {id} lived throughout");
        }
    }
    for id in &revoked_before {
        assert!(!in_backup.contains(id), "key {id} was revoked before");
    }

    // Restore into a fresh directory, start a sidecar on it.
    let restored = dir.path().join("restored");
    let output = keyward(restore_args(&restored, &file)).await;
    assert_succeeded(&output);
    let second = TestServer::start_with(ServeConfig::with_data_dir(restored.clone())).await;
    assert_eq!(stored_ids(&second).await, in_backup, "the same keys");
    let secrets = secrets.lock().expect("lock").clone();
    for id in &in_backup {
        let secret = &secrets[id];
        let reply = second.authorize(secret, "POST", "/v3/mail/send").await;
        assert!(reply.allowed, "key {id} decides with its original secret");
        let denied = second.authorize(secret, "GET", "/v3/user/profile").await;
        assert!(!denied.allowed, "and with its original scopes");
    }
    // A key not in the backup is unknown there.
    for id in &revoked_before {
        let reply = second
            .authorize(&secrets[id], "POST", "/v3/mail/send")
            .await;
        assert!(!reply.allowed);
    }

    // A store is never restored over.
    let before = std::fs::read_dir(&restored).expect("list").count();
    let output = keyward(restore_args(&restored, &file)).await;
    assert_refused(&output, "not empty");
    assert_eq!(std::fs::read_dir(&restored).expect("list").count(), before);
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_admin_takes_a_backup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    // A key that may do everything else with keys.
    let (_, secret) = server
        .create(pb::CreateKeyRequest {
            name: "ops".into(),
            account_id: "acme".into(),
            ..Default::default()
        })
        .await;
    let mut manager = server.manager().await;
    let refused = manager
        .backup(bearer(&secret, pb::BackupRequest {}))
        .await
        .map(|_| ());
    assert_status(refused, Code::PermissionDenied, "admin token only");
    let anonymous = manager
        .backup(tonic::Request::new(pb::BackupRequest {}))
        .await
        .map(|_| ());
    assert_status(anonymous, Code::Unauthenticated, "bearer");

    let out = dir.path().join("out").join("keys.kwbackup");
    std::fs::create_dir(dir.path().join("out")).expect("mkdir");
    let output = keyward(backup_args(&server, &secret, &out)).await;
    assert_refused(&output, "admin token only");
    assert_eq!(
        std::fs::read_dir(dir.path().join("out"))
            .expect("list")
            .count(),
        0,
        "nothing written"
    );
}

/// A good backup of a few keys, its bytes.
async fn small_backup(dir: &tempfile::TempDir) -> Vec<u8> {
    let server = TestServer::start(dir).await;
    for n in 0..5 {
        server.create_key(&account(n), &["mail.send"]).await;
    }
    let file = dir.path().join("good.kwbackup");
    assert_succeeded(&keyward(backup_args(&server, &server.admin, &file)).await);
    server.stop().await;
    std::fs::read(file).expect("read")
}

/// Restores `bytes` into an absent directory and an empty one: refused,
/// mentioning `needle`, with both left as they were.
async fn assert_restore_refused(dir: &tempfile::TempDir, name: &str, bytes: &[u8], needle: &str) {
    let file = dir.path().join(name);
    std::fs::write(&file, bytes).expect("write");
    let absent: PathBuf = dir.path().join(format!("{name}.absent"));
    assert_refused(&keyward(restore_args(&absent, &file)).await, needle);
    assert!(!absent.exists(), "{name}: nothing created");
    let empty = dir.path().join(format!("{name}.empty"));
    std::fs::create_dir(&empty).expect("mkdir");
    assert_refused(&keyward(restore_args(&empty, &file)).await, needle);
    assert_eq!(
        std::fs::read_dir(&empty).expect("list").count(),
        0,
        "{name}: nothing left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_files_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = small_backup(&dir).await;

    let truncated = &good[..good.len() / 2];
    assert_restore_refused(&dir, "truncated", truncated, "truncated").await;

    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x20;
    assert_restore_refused(&dir, "flipped", &flipped, "checksum").await;

    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&2u32.to_be_bytes());
    assert_restore_refused(&dir, "newer", &newer, "format version 2").await;

    assert_restore_refused(
        &dir,
        "garbage",
        b"not a backup at all",
        "not a keyward backup",
    )
    .await;

    // The good one restores.
    let file = dir.path().join("good.kwbackup");
    let target = dir.path().join("target");
    assert_succeeded(&keyward(restore_args(&target, &file)).await);
    assert!(target.join("db").is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_sidecar_backs_up_etcd_at_one_revision() {
    let Some(cluster) = common::etcd::Cluster::start(1).await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.etcd.etcd_endpoints = cluster.endpoints().split(',').map(str::to_owned).collect();
    let server = TestServer::start_with(config).await;
    let secrets: Secrets = Arc::default();
    let mut ids = Vec::new();
    for n in 0..8 {
        ids.push(create(&server, &secrets, n).await);
    }
    let revoked = ids.pop().expect("a key");
    server
        .manager()
        .await
        .delete_key(bearer(
            &server.admin,
            pb::DeleteKeyRequest {
                key_id: revoked.clone(),
            },
        ))
        .await
        .expect("deletes");
    let file = dir.path().join("etcd.kwbackup");
    assert_succeeded(&keyward(backup_args(&server, &server.admin, &file)).await);
    let (header, in_backup) = backup_contents(&file);
    assert_eq!(header.source, "etcd");
    assert!(header.etcd_revision > 0, "the revision read");
    assert_eq!(in_backup, ids.iter().cloned().collect::<HashSet<_>>());
    assert_eq!(header.keys, 7);

    // Restored as a standalone directory: every key decides as before.
    let restored = dir.path().join("restored");
    assert_succeeded(&keyward(restore_args(&restored, &file)).await);
    let standalone = TestServer::start_with(ServeConfig::with_data_dir(restored)).await;
    let secrets = secrets.lock().expect("lock").clone();
    for id in &ids {
        let reply = standalone
            .authorize(&secrets[id], "POST", "/v3/mail/send")
            .await;
        assert!(reply.allowed, "key {id}");
    }
    let reply = standalone
        .authorize(&secrets[&revoked], "POST", "/v3/mail/send")
        .await;
    assert!(!reply.allowed, "the revoked key stays revoked");
    standalone.stop().await;
}
