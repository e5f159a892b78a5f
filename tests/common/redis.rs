//! A real `redis-server` on a loopback port, for the usage store's tests:
//! with an ACL user and password (never the default user), killed on drop.
//! From `KEYWARD_REDIS` or PATH (`apt-get install redis-server`); without
//! it a test skips locally and fails under CI.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, tool};

/// The ACL user keyward connects as.
pub const USER: &str = "keyward";
/// Its password (in a file, as an operator would give it).
pub const PASSWORD: &str = "usage-store-test-password";

/// One Redis server.
pub struct Redis {
    binary: String,
    pub port: u16,
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    /// Serves TLS only, with the certificate in `dir` (`tls.crt`,
    /// `tls.key`, `ca.crt`).
    tls: bool,
    /// A Redis Cluster node.
    cluster: bool,
}

impl Redis {
    /// Starts one Redis with no persistence, the default user off and
    /// [`USER`] allowed every key and command; `None` (skip) without a
    /// binary outside CI.
    pub fn start() -> Option<Self> {
        Self::start_as(None, false)
    }

    /// [`Self::start`], serving TLS only with a certificate for 127.0.0.1
    /// issued by `ca` (`(certificate, key)` PEM and the CA's PEM).
    pub fn start_tls(server: &(String, String), ca: &str) -> Option<Self> {
        Self::start_as(Some((server, ca)), false)
    }

    fn start_as(tls: Option<(&(String, String), &str)>, cluster: bool) -> Option<Self> {
        let binary = tool(
            "KEYWARD_REDIS",
            "redis-server",
            "apt-get install redis-server",
        )?;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("password"), format!("{PASSWORD}\n"))
            .expect("password file");
        if let Some(((cert, key), ca)) = tls {
            std::fs::write(dir.path().join("tls.crt"), cert).expect("cert");
            std::fs::write(dir.path().join("tls.key"), key).expect("key");
            std::fs::write(dir.path().join("ca.crt"), ca).expect("ca");
        }
        let mut redis = Self {
            binary,
            port: free_port(),
            child: None,
            dir,
            tls: tls.is_some(),
            cluster,
        };
        redis.launch();
        Some(redis)
    }

    fn launch(&mut self) {
        let port = self.port.to_string();
        let file = |name: &str| self.dir.path().join(name).display().to_string();
        let mut command = Command::new(&self.binary);
        command.args(["--bind", "127.0.0.1"]);
        if self.tls {
            command.args(["--port", "0", "--tls-port", &port]);
            command.args([
                "--tls-cert-file",
                &file("tls.crt"),
                "--tls-key-file",
                &file("tls.key"),
            ]);
            command.args([
                "--tls-ca-cert-file",
                &file("ca.crt"),
                "--tls-auth-clients",
                "no",
            ]);
        } else {
            command.args(["--port", &port]);
        }
        if self.cluster {
            command.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]);
            command.args(["--cluster-config-file", &file("nodes.conf")]);
        }
        let child = command
            .args(["--save", "", "--appendonly", "no"])
            .args(["--user", "default", "off"])
            .args([
                "--user",
                USER,
                "on",
                &format!(">{PASSWORD}"),
                "~*",
                "&*",
                "+@all",
            ])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        self.await_ready();
    }

    fn await_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.cli(&["PING"]).trim() != "PONG" {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `--usage-store` and `--usage-store-password-file` for a sidecar
    /// (and `--usage-store-ca-file` over TLS), in that order.
    #[must_use]
    pub fn flags(&self) -> Vec<String> {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let mut flags = vec![
            "--usage-store".into(),
            format!("{scheme}://{USER}@127.0.0.1:{}", self.port),
            "--usage-store-password-file".into(),
            self.dir.path().join("password").display().to_string(),
        ];
        if self.tls {
            flags.push("--usage-store-ca-file".into());
            flags.push(self.dir.path().join("ca.crt").display().to_string());
        }
        flags
    }

    /// Runs `redis-cli` as [`USER`]; its output.
    #[must_use]
    pub fn cli(&self, args: &[&str]) -> String {
        let mut command = Command::new("redis-cli");
        if self.tls {
            let ca = self.dir.path().join("ca.crt");
            command.arg("--tls").arg("--cacert").arg(ca);
        }
        let output = command
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["--user", USER, "--pass", PASSWORD, "--no-auth-warning"])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Sends a signal (`STOP`, `CONT`) to the server.
    pub fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args([&format!("-{signal}"), &child.id().to_string()])
                .status()
                .expect("kill runs");
            assert!(status.success());
        }
    }

    /// SIGKILLs the server; its data is gone (no persistence).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again, empty, on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of three primaries (no replicas) on loopback ports.
pub struct Cluster {
    pub nodes: Vec<Redis>,
}

impl Cluster {
    /// Starts three nodes, assigns the slots, and waits until the cluster
    /// is ok; `None` (skip) without a binary outside CI.
    pub fn start() -> Option<Self> {
        let nodes = (0..3)
            .map(|_| Redis::start_as(None, true))
            .collect::<Option<Vec<_>>>()?;
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--user", USER, "--pass", PASSWORD, "--no-auth-warning"])
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create runs");
        assert!(
            created.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !nodes
            .iter()
            .all(|node| node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(Instant::now() < deadline, "the cluster never became ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(Self { nodes })
    }

    /// Every key held, over all nodes.
    #[must_use]
    pub fn keys(&self) -> Vec<String> {
        self.nodes
            .iter()
            .flat_map(|node| {
                node.cli(&["KEYS", "*"])
                    .lines()
                    .filter(|line| !line.is_empty())
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}
