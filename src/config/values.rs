//! Single values as people write them: listen addresses, run statuses, URLs shown in errors.
//!
//! Invariant: each parser either returns the typed value or a message that names what was
//! expected; a URL reaches a message only through [`redact_url`], without userinfo or query.

use std::net::{SocketAddr, ToSocketAddrs};

use super::{DEFAULT_TERMINAL_STATUSES, NON_TERMINAL_STATUSES};

/// A listen address: `IP:PORT`, `[IPv6]:PORT`, `HOST:PORT` with a host name resolved now (its
/// first IPv4 address, else its first address), or `:PORT` for every IPv4 interface (0.0.0.0).
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let hint = "write IP:PORT, HOST:PORT or :PORT, e.g. 127.0.0.1:8080, localhost:8080 or :8080";
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("`{s}`: no port; {hint}"));
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("`{s}`: `{port}` is not a port number (0-65535); {hint}"))?;
    if host.is_empty() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if host.contains(':') && !host.starts_with('[') {
        return Err(format!(
            "`{s}`: an IPv6 address goes in brackets, e.g. [::1]:{port}"
        ));
    }
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("`{s}`: cannot resolve `{host}` ({e}); {hint}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("`{s}`: `{host}` has no address"))
}

/// A status may be listed as terminal only when Dify never moves a run out of it.
pub(crate) fn check_terminal_status(s: &str) -> Result<(), String> {
    if DEFAULT_TERMINAL_STATUSES.contains(&s) {
        return Ok(());
    }
    let terminal = DEFAULT_TERMINAL_STATUSES.join(", ");
    if NON_TERMINAL_STATUSES.contains(&s) {
        return Err(format!(
            "`{s}` is not terminal: a {s} run changes again, so caching it for good would serve \
             it stale forever; the terminal statuses are {terminal}"
        ));
    }
    Err(format!(
        "`{s}` is not a Dify run status; the terminal statuses are {terminal} (the others, {}, \
         are not terminal)",
        NON_TERMINAL_STATUSES.join(", ")
    ))
}

/// `url` fit for an error or a log line: userinfo replaced by `***`, no query, no fragment. A
/// value that does not parse as a URL is not shown at all (it may be a secret pasted by mistake).
pub fn redact_url(url: &str) -> String {
    let Ok(mut u) = url::Url::parse(url.trim()) else {
        return "<not a URL>".to_owned();
    };
    if !u.username().is_empty() || u.password().is_some() {
        let _ = u.set_password(None);
        let _ = u.set_username("***");
    }
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}
