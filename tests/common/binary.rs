//! The real binary, as an operator runs it: a command with a clean environment, a running
//! child whose log lines can be awaited, and a plain HTTP/1.1 request.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The gateway binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_dify-gateway");

/// How long a test waits for an expected log line.
pub const LOG_WAIT: Duration = Duration::from_secs(20);

/// The binary with none of the gateway's variables inherited from the test's environment.
pub fn gateway_command() -> Command {
    let mut c = Command::new(BIN);
    for var in [
        "DIFY_API_KEY",
        "DIFY_GATEWAY_CONFIG",
        "DIFY_GATEWAY_LISTEN",
        "DIFY_GATEWAY_UPSTREAM",
        "DIFY_GATEWAY_LOG_FORMAT",
        "DIFY_GATEWAY_ADMIN_LISTEN",
        "DIFY_GATEWAY_REDIS_URL",
        "DIFY_GATEWAY_ADMIN_TOKEN",
        "RUST_LOG",
    ] {
        c.env_remove(var);
    }
    c
}

/// A running binary, killed when dropped; its stdout lines arrive through a channel.
pub struct Running {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    /// Every line read so far.
    pub seen: Vec<String>,
}

impl Running {
    pub fn spawn(cmd: &mut Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the binary starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line containing `needle`, waiting at most [`LOG_WAIT`].
    pub fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + LOG_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {needle:?} within {LOG_WAIT:?}; seen:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Sends `signal` (`HUP`, `TERM`, …) to the process.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{signal} failed");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address logged as `field=ADDR` in `line` (e.g. `listen=127.0.0.1:4321`).
pub fn logged_addr(line: &str, field: &str) -> SocketAddr {
    let start = line
        .find(&format!("{field}="))
        .unwrap_or_else(|| panic!("no {field}= in {line}"))
        + field.len()
        + 1;
    let value: String = line[start..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    value
        .trim_matches('"')
        .parse()
        .unwrap_or_else(|e| panic!("{value}: {e}"))
}

/// A plain HTTP/1.1 answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// The head, lines as received (header names in lower case).
    pub head: String,
    pub body: String,
}

impl Answer {
    /// The value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim())
        })
    }
}

/// `GET path` at `addr` with `headers`, over a fresh connection, within 10 s.
pub fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    let timeout = Duration::from_secs(10);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).expect("connects");
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("reads the answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}
