//! The gateway under test: the release binary as a child process, and what `/proc` says about it.
//!
//! Invariant: the child is started with loopback listeners, the key only in its environment, and
//! its output in a log file; it never outlives the soak (dropping the handle kills it if it is
//! still running).

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

/// The soak's HTTP client.
pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// A running gateway child process.
pub struct GatewayProcess {
    child: Child,
    /// The child's pid, for `/proc` and the termination signal.
    pub pid: u32,
    /// The public listener.
    pub public: SocketAddr,
    /// The admin listener (`/metrics`).
    pub admin: SocketAddr,
    /// Holds the config file for the child's lifetime.
    _dir: tempfile::TempDir,
}

/// A loopback port that was free a moment ago (the usual small race is accepted).
fn free_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

impl GatewayProcess {
    /// Writes `config_toml` to a temp dir and starts `bin` against `upstream` with `key` in
    /// `DIFY_API_KEY`; stdout and stderr go to `log`.
    pub fn spawn(
        bin: &Path,
        upstream: &str,
        key: &str,
        config_toml: &str,
        log: &Path,
    ) -> std::io::Result<GatewayProcess> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("soak.toml");
        std::fs::write(&config, config_toml)?;
        let (public, admin) = (free_port()?, free_port()?);
        let out = File::create(log)?;
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(public.to_string())
            .arg("--admin-listen")
            .arg(admin.to_string())
            .arg("--upstream")
            .arg(upstream)
            // Only what the soak sets: no inherited DIFY_GATEWAY_* override sneaks in.
            .env_clear()
            .env("DIFY_API_KEY", key)
            .env("RUST_LOG", "info")
            // The worker count a harness asks of every tokio runtime it starts.
            .envs(std::env::var("TOKIO_WORKER_THREADS").map(|v| ("TOKIO_WORKER_THREADS", v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(GatewayProcess {
            pid: child.id(),
            child,
            public,
            admin,
            _dir: dir,
        })
    }

    /// Waits until the public `/healthz` answers 200, or the child exits, or `within` passes.
    pub async fn wait_healthy(&mut self, client: &HttpClient, within: Duration) -> bool {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if !self.is_alive() {
                return false;
            }
            if healthz(client, self.public).await == Some(200) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// True while the child has not exited.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM (by pid, to this child only).
    pub fn terminate(&self) -> std::io::Result<()> {
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()?
            .success();
        if ok {
            Ok(())
        } else {
            Err(std::io::Error::other("kill -TERM failed"))
        }
    }

    /// Waits up to `within` for the child to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + within;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(5)),
                _ => return None,
            }
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if self.is_alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `GET /healthz` on `addr`: the status, or `None` when there was no answer within 2 s.
pub async fn healthz(client: &HttpClient, addr: SocketAddr) -> Option<u16> {
    let uri: http::Uri = format!("http://{addr}/healthz").parse().ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(2), client.get(uri))
        .await
        .ok()?
        .ok()?;
    Some(resp.status().as_u16())
}

/// `GET` `path` on `addr` and return the body as text (for `/metrics`, `/admin/cache/stats`).
pub async fn get_text(client: &HttpClient, addr: SocketAddr, path: &str) -> Option<String> {
    let uri: http::Uri = format!("http://{addr}{path}").parse().ok()?;
    let fut = async {
        let resp = client.get(uri).await.ok()?;
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
}

/// Memory figures of a process, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// Resident set size now.
    pub rss_kib: u64,
    /// Peak resident set size (VmHWM).
    pub hwm_kib: u64,
}

/// Reads VmRSS and VmHWM from `/proc/<pid>/status`.
pub fn memory(pid: u32) -> Option<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// User plus system CPU seconds from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields are counted after its closing parenthesis.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14, stime 15 (1-based, man 5 proc).
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

/// `sysconf(_SC_CLK_TCK)` via `getconf` (the crate has no libc binding); 100 on Linux in practice.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// The release gateway next to this example's binary (`target/release/examples/soak` →
/// `target/release/dify-gateway`), which follows `CARGO_TARGET_DIR`.
pub fn default_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.join("dify-gateway")))
        .unwrap_or_else(|| PathBuf::from("target/release/dify-gateway"))
}
