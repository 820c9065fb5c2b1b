//! Single values as people write them: durations, listen addresses, base URLs, names, and URLs
//! shown in errors.
//!
//! Invariant: each parser either returns the typed value or a message that names what was
//! expected; a URL reaches a message only through [`redact_url`], without userinfo or query.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use http::Uri;
use serde::Deserialize;

/// The message of a duration that does not parse; it does not echo the value.
pub(crate) const NOT_A_DURATION: &str = "not a duration; write e.g. \"1s\" or \"500ms\"";

/// A duration written as humans write it (`1s`, `500ms`, `2m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        // humantime's error quotes the value, which could be anything pasted by mistake.
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|_| serde::de::Error::custom(NOT_A_DURATION))
    }
}

/// The duration written, else `default`.
pub(super) fn dur(v: Option<HumanDuration>, default: Duration) -> Duration {
    v.map(|d| d.0).unwrap_or(default)
}

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

/// A base URL; its errors show it through [`redact_url`] only.
pub(super) fn parse_base_url(s: &str) -> Result<Uri, String> {
    let shown = redact_url(s);
    let trimmed = s.trim_end_matches('/');
    let uri: Uri = trimmed
        .parse()
        .map_err(|e| format!("`{shown}`: not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("https") | Some("http") => {}
        _ => return Err(format!("`{shown}`: the scheme must be https:// or http://")),
    }
    if uri.authority().is_none() {
        return Err(format!("`{shown}`: no host"));
    }
    if uri.query().is_some() {
        return Err(format!("`{shown}`: a query string is not allowed"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!(
            "`{shown}`: credentials in the URL are not allowed (the app key is the credential)"
        ));
    }
    Ok(uri)
}

/// Names become metric labels and admin API parameters: keep them short and plain.
pub(super) fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!("`{name}`: use 1-64 characters of [A-Za-z0-9._-]"))
    }
}
