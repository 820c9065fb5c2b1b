//! nginx as the reference streaming proxy for the examples: `proxy_pass` to one upstream with
//! `proxy_buffering off`, keep-alive to the upstream, the app key set by the proxy.
//!
//! Invariant: nginx runs as one process (`master_process off`) in the foreground, listening on
//! loopback only, with its prefix in a temporary directory; it never outlives its handle
//! (dropping it kills the process).

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nginx.
pub struct Nginx {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Holds the prefix (config, logs, temp files) for nginx's lifetime.
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx in front of `upstream`, adding `Authorization: Bearer <key>`; `None` when
    /// nginx is not installed or does not come up within 5 s.
    pub fn start(upstream: SocketAddr, key: &str) -> Option<Nginx> {
        let dir = tempfile::tempdir().ok()?;
        let addr = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?;
        let prefix = dir.path().display().to_string();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\nworker_rlimit_nofile 20000;\n\
             pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n\
             events {{ worker_connections 8192; use epoll; multi_accept on; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {prefix}/body;\n\
               proxy_temp_path {prefix}/proxy;\n  fastcgi_temp_path {prefix}/fastcgi;\n\
               uwsgi_temp_path {prefix}/uwsgi;\n  scgi_temp_path {prefix}/scgi;\n\
               tcp_nodelay on;\n  keepalive_requests 10000000;\n\
               upstream dify {{ server {upstream}; keepalive 2000; }}\n\
               server {{\n    listen {addr} backlog=4096;\n\
                 location /v1/ {{\n      proxy_pass http://dify;\n\
                   proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
                   proxy_set_header Authorization \"Bearer {key}\";\n\
                   proxy_buffering off;\n      proxy_request_buffering off;\n\
                   proxy_read_timeout 120s;\n    }}\n  }}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).ok()?;
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut nginx = Nginx {
            child,
            addr,
            _dir: dir,
        };
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Some(nginx);
            }
            if !matches!(nginx.child.try_wait(), Ok(None)) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// nginx's process id (with `master_process off`, its one worker).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// nginx's resident set size now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
