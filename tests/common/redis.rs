//! Real `redis-server` processes for the shared-tier tests, on free loopback ports.
//!
//! A server can be stopped and started again on the same port (to test Redis going away and
//! coming back); it is killed when dropped. Without `redis-server` on PATH the tests fail with a
//! message saying so — CI installs it (`.ci/run`), so a silent skip would hide a broken suite.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a fresh server may take to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A port nobody listens on right now (the OS picks it; the listener is closed again).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0 to pick a port")
}

fn require_redis_server() {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "redis-server is not on PATH: the shared-tier tests need a real Redis \
         (Debian/Ubuntu: `apt-get install -y redis-server`; .ci/run installs it)"
    );
}

/// Sends `PING` and expects `+PONG`.
fn pings(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// One `redis-server` child process.
pub struct RedisServer {
    /// The client port.
    pub port: u16,
    /// Extra arguments (cluster mode), repeated on restart.
    extra: Vec<String>,
    /// Working directory (cluster node files); removed on drop.
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// A standalone server on a free port, answering PING.
    pub fn start() -> RedisServer {
        Self::start_with(Vec::new)
    }

    /// A server with extra arguments made by `extra` (given the chosen port).
    pub fn start_with(extra: impl Fn() -> Vec<String>) -> RedisServer {
        require_redis_server();
        // A port picked by the OS can be taken by someone else before redis-server binds it;
        // try a few.
        for _ in 0..5 {
            let mut s = RedisServer {
                port: free_port(),
                extra: extra(),
                dir: tempfile::tempdir().expect("temp dir"),
                child: None,
            };
            if s.spawn() {
                return s;
            }
        }
        panic!("redis-server did not start on a free loopback port after 5 tries");
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .args(["--loglevel", "warning"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if pings(self.port) {
                return true;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    // Exited: most likely the port was taken.
                    self.child = None;
                    return false;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    /// Kills the server (SIGKILL: no goodbye to clients) and waits until its port is closed.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty: nothing is persisted).
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn(),
            "redis-server did not restart on port {}",
            self.port
        );
    }

    /// The cluster bus port given with `--cluster-port`, if any.
    fn cluster_port(&self) -> Option<u16> {
        let i = self.extra.iter().position(|a| a == "--cluster-port")?;
        self.extra.get(i + 1)?.parse().ok()
    }

    /// A plain synchronous connection, to plant and inspect raw values.
    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the server: connections stay open, nothing is
    /// answered while frozen.
    pub fn freeze(&self, frozen: bool) {
        let pid = self.child.as_ref().expect("server running").id();
        let sig = if frozen { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    }

    pub fn raw(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("raw connection to the test redis-server")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster of `n` primaries on loopback, slots split evenly, ready (`cluster_state:ok`).
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(n: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| {
                RedisServer::start_with(|| {
                    vec![
                        "--cluster-enabled".into(),
                        "yes".into(),
                        "--cluster-config-file".into(),
                        "nodes.conf".into(),
                        "--cluster-node-timeout".into(),
                        "2000".into(),
                        // The bus port defaults to port + 10000, which may not exist.
                        "--cluster-port".into(),
                        free_port().to_string(),
                    ]
                })
            })
            .collect();
        let per = 16384 / n;
        for (i, node) in nodes.iter().enumerate() {
            let first = i * per;
            let last = if i + 1 == n { 16383 } else { first + per - 1 };
            let mut c = node.raw();
            let _: () = redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .query(&mut c)
                .expect("CLUSTER ADDSLOTSRANGE");
        }
        let mut c0 = nodes[0].raw();
        for node in &nodes[1..] {
            let _: () = redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(node.port)
                .arg(node.cluster_port().expect("cluster nodes have a bus port"))
                .query(&mut c0)
                .expect("CLUSTER MEET");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = nodes.iter().all(|node| {
                let mut c = node.raw();
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut c)
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{n}"))
            });
            if ready {
                return RedisCluster { nodes };
            }
            assert!(
                Instant::now() < deadline,
                "the test cluster did not become ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}
