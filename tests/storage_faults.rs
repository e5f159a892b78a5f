//! Storage faults cost writes, never decisions: the real binary with its
//! data directory on a real volume that fills up, turns read-only or
//! stalls. Needs root (mount, losetup, fsfreeze), as CI has; elsewhere a
//! test that cannot mount says so and skips, but never in CI.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{admin_token, bearer, spawn_serve};
use keyward::pb::v1 as pb;
use keyward::pb::v1::authorizer_client::AuthorizerClient;
use keyward::pb::v1::key_manager_client::KeyManagerClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const BIN: &str = env!("CARGO_BIN_EXE_keyward");
/// `--store-timeout-ms` for these runs.
const STORE_TIMEOUT: Duration = Duration::from_millis(500);
/// A decision that has not answered by then is waiting on the broken disk
/// (the outage this guards against hung until the 2 s request deadline).
/// A liveness bound, far above any loaded machine's latency: no test here
/// asserts how fast anything is.
const ANSWERED_WITHIN: Duration = Duration::from_secs(30);

fn sh(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

fn sh_out(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// A mounted test volume, unmounted (and thawed, detached) on drop.
struct Volume {
    mount: PathBuf,
    loop_device: Option<String>,
    _dir: tempfile::TempDir,
}

impl Volume {
    /// A tmpfs of `size` (e.g. "16m"), or `None` where mounting is impossible.
    fn tmpfs(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).expect("mount point");
        let options = format!("size={size}");
        let target = mount.to_str().expect("utf-8 path");
        mountable(sh(
            "mount",
            &["-t", "tmpfs", "-o", &options, "tmpfs", target],
        ))?;
        Some(Self {
            mount,
            loop_device: None,
            _dir: dir,
        })
    }

    /// An ext4 filesystem on a fresh loop device (fsfreeze and
    /// errors=remount-ro need a block device).
    fn ext4() -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("volume.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).expect("mount point");
        let image_path = image.to_str().expect("utf-8 path");
        assert!(sh("truncate", &["-s", "64M", image_path]));
        assert!(sh("mkfs.ext4", &["-q", "-F", image_path]), "mkfs.ext4");
        let device = sh_out("losetup", &["-f", "--show", image_path]);
        mountable(!device.is_empty())?;
        // A recycled loop device may still carry an old read-only flag.
        sh("blockdev", &["--setrw", &device]);
        let volume = Self {
            mount,
            loop_device: Some(device),
            _dir: dir,
        };
        assert!(volume.mount_ext4(), "mount ext4");
        Some(volume)
    }

    fn mount_ext4(&self) -> bool {
        let device = self.loop_device.as_deref().expect("loop device");
        let target = self.mount.to_str().expect("utf-8 path");
        sh("mount", &["-o", "errors=remount-ro", device, target])
    }

    fn path(&self) -> &Path {
        &self.mount
    }

    fn target(&self) -> &str {
        self.mount.to_str().expect("utf-8 path")
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let target = self.target().to_owned();
        sh("fsfreeze", &["-u", &target]);
        sh("umount", &["-l", &target]);
        if let Some(device) = &self.loop_device {
            sh("losetup", &["-d", device]);
        }
    }
}

/// `Some(())` if mounting worked; `None` (skip) where it cannot, never in CI.
fn mountable(ok: bool) -> Option<()> {
    if ok {
        return Some(());
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must be able to mount test volumes (run as root)"
    );
    eprintln!("SKIPPED: cannot mount a test volume here (needs root)");
    None
}

/// A running `keyward serve` over a data directory on a test volume.
struct Sidecar {
    child: Child,
    channel: Channel,
    admin: String,
    log: PathBuf,
    _cwd: tempfile::TempDir,
}

impl Sidecar {
    async fn start(data_dir: &Path) -> Self {
        // The log lives off the test volume: it must not fill or freeze.
        let cwd = tempfile::tempdir().expect("tempdir");
        let timeout = STORE_TIMEOUT.as_millis().to_string();
        let data = data_dir.to_str().expect("utf-8 path");
        let (child, port) = spawn_serve(
            BIN,
            cwd.path(),
            &[
                "--data-dir",
                data,
                "--store-timeout-ms",
                &timeout,
                "--shutdown-grace-ms",
                "0",
                "--drain-timeout-ms",
                "1000",
            ],
        );
        let channel = common::connect(&format!("http://127.0.0.1:{port}")).await;
        Self {
            child,
            channel,
            admin: admin_token(data_dir),
            log: cwd.path().join("serve.log"),
            _cwd: cwd,
        }
    }

    /// Starts and creates 20 keys while the volume is healthy; returns their
    /// secrets.
    async fn start_with_keys(data_dir: &Path) -> (Self, Vec<String>) {
        let sidecar = Self::start(data_dir).await;
        let mut secrets = Vec::new();
        for n in 0..20 {
            secrets.push(sidecar.create(n).await.expect("created").1);
        }
        (sidecar, secrets)
    }

    /// CreateKey as admin.
    async fn create(&self, n: usize) -> Result<(String, String), tonic::Status> {
        KeyManagerClient::new(self.channel.clone())
            .create_key(bearer(
                &self.admin,
                pb::CreateKeyRequest {
                    name: format!("key {n}"),
                    scopes: vec!["mail.send".into()],
                    account_id: format!("acct{}", n % 3),
                    ..Default::default()
                },
            ))
            .await
            .map(|r| {
                let r = r.into_inner();
                (r.key.expect("key").key_id, r.secret)
            })
    }

    /// Authorizes POST /v3/mail/send with each secret; all must be
    /// answered, and allowed.
    async fn authorize_all(&self, secrets: &[String]) {
        let mut client = AuthorizerClient::new(self.channel.clone());
        for _ in 0..5 {
            for secret in secrets {
                let mut request = tonic::Request::new(pb::AuthorizeRequest {
                    key: secret.clone(),
                    method: "POST".into(),
                    path: "/v3/mail/send".into(),
                    client_ip: String::new(),
                });
                request.set_timeout(ANSWERED_WITHIN);
                let reply = client
                    .authorize(request)
                    .await
                    .expect("authorize answers, never waiting on the disk")
                    .into_inner();
                assert!(
                    reply.allowed,
                    "an acknowledged key must authorize: {reply:?}"
                );
            }
        }
    }

    async fn health(&self, service: &str) -> ServingStatus {
        let status = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health answers")
            .into_inner()
            .status;
        ServingStatus::try_from(status).expect("known status")
    }

    async fn wait_for_manager(&self, want: ServingStatus, within: Duration) {
        let deadline = Instant::now() + within;
        while self.health("keyward.v1.KeyManager").await != want {
            assert!(
                Instant::now() < deadline,
                "KeyManager did not become {want:?} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; waits until keyward decides to exit (its last log line),
    /// then returns the exit status once the process is gone, and the log.
    fn terminate(mut self, until_gone: impl FnOnce()) -> (std::process::ExitStatus, String) {
        assert!(sh("kill", &["-TERM", &self.child.id().to_string()]));
        let deadline = Instant::now() + ANSWERED_WITHIN;
        loop {
            let log = self.log();
            if log.contains("stopped; store flushed")
                || log.contains("keyward stopped with an error")
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no exit decision after SIGTERM:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        until_gone();
        let status = self.child.wait().expect("reaped");
        (status, self.log())
    }
}

/// Creates keys until the store refuses one; every refusal must be the
/// store's clear UNAVAILABLE. Returns the secrets acknowledged meanwhile.
async fn write_until_refused(sidecar: &Sidecar, from: usize) -> Vec<String> {
    let mut acknowledged = Vec::new();
    for n in from..from + 200 {
        // A write stuck on the disk would end at the request deadline
        // (CANCELLED / DEADLINE_EXCEEDED), not the store's UNAVAILABLE.
        match sidecar.create(n).await {
            Ok((_, secret)) => acknowledged.push(secret),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(
                    status.message().contains("storage is failing"),
                    "{status:?}"
                );
                assert!(!status.message().contains('/'), "no paths: {status:?}");
                return acknowledged;
            }
        }
    }
    panic!("the broken volume never refused a write");
}

/// What every fault must look like from outside, while it lasts.
async fn assert_contained(sidecar: &Sidecar, secrets: &[String], reason: &str) {
    sidecar.authorize_all(secrets).await;
    sidecar
        .wait_for_manager(ServingStatus::NotServing, ANSWERED_WITHIN)
        .await;
    assert_eq!(
        sidecar.health("keyward.v1.Authorizer").await,
        ServingStatus::Serving
    );
    assert_eq!(
        sidecar.health("envoy.service.auth.v3.Authorization").await,
        ServingStatus::Serving
    );
    // Still refused, still fast, while the fault lasts.
    let result = sidecar.create(10_000).await;
    assert_eq!(result.expect_err("refused").code(), Code::Unavailable);
    // The log names the failure and its reason.
    common::await_log(|| sidecar.log(), &["storage failing", reason]).await;
}

/// After the fault is gone: writes succeed again without a restart, and
/// everything acknowledged still authorizes.
async fn assert_recovered(sidecar: &Sidecar, secrets: &mut Vec<String>) {
    sidecar
        .wait_for_manager(ServingStatus::Serving, ANSWERED_WITHIN)
        .await;
    let result = sidecar.create(20_000).await;
    secrets.push(result.expect("writes work again").1);
    sidecar.authorize_all(secrets).await;
}

fn fill(dir: &Path) {
    use std::io::Write;
    let mut filler = std::fs::File::create(dir.join("filler")).expect("filler");
    let chunk = vec![0u8; 1 << 20];
    while filler.write_all(&chunk).is_ok() {}
    let _ = filler.sync_all();
}

#[tokio::test]
async fn a_full_disk_costs_writes_never_decisions_and_recovers_without_restart() {
    let Some(volume) = Volume::tmpfs("16m") else {
        return;
    };
    let data = volume.path().join("data");
    let (sidecar, mut secrets) = Sidecar::start_with_keys(&data).await;
    sidecar.authorize_all(&secrets).await;

    fill(volume.path());
    secrets.extend(write_until_refused(&sidecar, 100).await);
    assert_contained(&sidecar, &secrets, "no space left on the data volume").await;

    std::fs::remove_file(volume.path().join("filler")).expect("space returns");
    assert_recovered(&sidecar, &mut secrets).await;

    let (status, log) = sidecar.terminate(|| {});
    assert!(status.success(), "clean exit once healthy:\n{log}");

    let sidecar = Sidecar::start(&data).await;
    sidecar.authorize_all(&secrets).await;
    sidecar.terminate(|| {});
}

#[tokio::test]
async fn a_volume_turned_read_only_costs_writes_never_decisions() {
    let Some(volume) = Volume::ext4() else {
        return;
    };
    let data = volume.path().join("data");
    let (sidecar, mut secrets) = Sidecar::start_with_keys(&data).await;

    // What the kernel does on a filesystem error with errors=remount-ro
    // (a plain `mount -o remount,ro` is refused while files are open for
    // writing, so this is how a data volume turns read-only under a process).
    let device = volume.loop_device.clone().expect("loop device");
    let name = device.trim_start_matches("/dev/");
    std::fs::write(format!("/sys/fs/ext4/{name}/trigger_fs_error"), "test\n")
        .expect("trigger an ext4 error");
    secrets.extend(write_until_refused(&sidecar, 100).await);
    assert_contained(&sidecar, &secrets, "the data volume is read-only").await;

    // The kernel allows no way back but unmount, fsck and mount: possible
    // only because keyward let go of every file on the failed volume.
    let deadline = Instant::now() + ANSWERED_WITHIN;
    while !sh("umount", &[volume.target()]) {
        assert!(Instant::now() < deadline, "keyward still holds the volume");
        std::thread::sleep(Duration::from_millis(100));
    }
    sh("e2fsck", &["-fy", &device]);
    sh("blockdev", &["--setrw", &device]);
    assert!(volume.mount_ext4(), "mount again");
    assert_recovered(&sidecar, &mut secrets).await;

    let (status, log) = sidecar.terminate(|| {});
    assert!(status.success(), "{log}");
    let sidecar = Sidecar::start(&data).await;
    sidecar.authorize_all(&secrets).await;
    sidecar.terminate(|| {});
}

#[tokio::test]
async fn a_stuck_disk_costs_writes_never_decisions_and_shutdown_is_bounded() {
    let Some(volume) = Volume::ext4() else {
        return;
    };
    let data = volume.path().join("data");
    let (sidecar, secrets) = Sidecar::start_with_keys(&data).await;

    // A frozen filesystem blocks every writer in the kernel: a stalled disk.
    assert!(sh("fsfreeze", &["-f", volume.target()]), "fsfreeze");
    let result = sidecar.create(100).await;
    assert_eq!(result.expect_err("refused").code(), Code::Unavailable);
    assert_contained(&sidecar, &secrets, "the data volume is not responding").await;

    // SIGTERM while stuck: keyward decides to exit within its bounds and
    // says the final flush could not complete. (A thread blocked inside the
    // kernel on a frozen filesystem keeps the process until the thaw.)
    let target = volume.target().to_owned();
    let (status, log) = sidecar.terminate(|| {
        sh("fsfreeze", &["-u", &target]);
    });
    assert!(!status.success(), "a failed final flush exits non-zero");
    assert!(
        log.contains("final store flush could not complete"),
        "{log}"
    );

    // Nothing acknowledged was lost.
    let sidecar = Sidecar::start(&data).await;
    sidecar.authorize_all(&secrets).await;
    sidecar.terminate(|| {});
}

/// The log destination failing (stderr on a full tmpfs, or `/dev/full`
/// from the start) costs log lines, counted, never a request and never
/// start-up: every write is answered and applied, decisions continue, the
/// process exits cleanly.
#[tokio::test]
async fn a_failing_log_destination_drops_lines_never_requests() {
    let Some(volume) = Volume::tmpfs("1m") else {
        return;
    };
    let on_full_tmpfs = volume.path().join("serve.log");
    std::fs::File::create(&on_full_tmpfs).expect("log file");
    fill(volume.path());
    for destination in [Path::new("/dev/full"), on_full_tmpfs.as_path()] {
        let stderr = std::fs::OpenOptions::new()
            .append(true)
            .open(destination)
            .expect("destination opens");
        let dir = tempfile::tempdir().expect("tempdir");
        let (port, metrics_port) = (common::free_port(), common::free_port());
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(["--shutdown-grace-ms", "0"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "debug")
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("keyward starts");
        let url = format!("http://127.0.0.1:{port}");
        common::await_ready(&url).await;
        let sidecar = Sidecar {
            child,
            channel: common::connect(&url).await,
            admin: admin_token(&dir.path().join("data")),
            log: destination.to_owned(),
            _cwd: dir,
        };
        let mut secrets = Vec::new();
        for n in 0..30 {
            let created = sidecar.create(n).await;
            secrets.push(created.expect("every write answered").1);
        }
        sidecar.authorize_all(&secrets).await;
        // Counted by the log's own thread as it works through its queue.
        let deadline = Instant::now() + ANSWERED_WITHIN;
        loop {
            let metrics = common::scrape(&format!("127.0.0.1:{metrics_port}")).await;
            let dropped: f64 = metrics
                .lines()
                .find_map(|l| l.strip_prefix("keyward_log_lines_dropped_total "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("dropped lines counted:\n{metrics}"));
            if dropped >= 30.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {dropped}",
                destination.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child = sidecar.child;
        assert!(sh("kill", &["-TERM", &child.id().to_string()]));
        let status = child.wait().expect("exits");
        assert!(status.success(), "{}: {status}", destination.display());
    }
}
