//! The `user` field of a `multipart/form-data` body, prefixed as the body streams.
//!
//! Invariant: the output is the input with the prefix inserted at the start of the content of
//! every part the upstream reads as a form field named `user` (a `Content-Disposition` with
//! `name` `user` and no `filename`); nothing else is added, dropped or reordered, and memory
//! stays bounded by one chunk plus one part's header block (`header_cap`) or a boundary's length.
//!
//! The upstream's parser (Werkzeug) is lenient: it also takes a boundary after a bare LF or CR,
//! and skips what it cannot read in a `Content-Disposition`. Wherever its reading of the body
//! could differ from this one (a boundary not after CRLF, folded or stray-line-ended headers, a
//! duplicate or extended (`name*=`) name, an escaped name), this parser refuses the body, so a
//! `user` field can never reach the upstream unprefixed. Bytes already passed on before a
//! refusal are harmless: the caller aborts the upstream request, which then never completes.

use bytes::{Bytes, BytesMut};
use memchr::memmem;

use super::UserPrefix;

/// Default cap on one part's header block, in bytes.
pub const DEFAULT_HEADER_CAP: usize = 16 * 1024;

/// Longest boundary RFC 2046 allows.
const MAX_BOUNDARY_LEN: usize = 70;

/// Why a multipart body is refused (the caller answers 400, or aborts the upstream request if
/// bytes were already sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    /// The Content-Type is not `multipart/form-data` with one valid boundary.
    #[error("Content-Type must be multipart/form-data with a boundary of 1 to 70 characters")]
    ContentType,
    /// The boundary appears where it is not a well-formed delimiter line.
    #[error("the multipart boundary appears where it is not a delimiter")]
    StrayBoundary,
    /// A part's header block is longer than the cap.
    #[error("a multipart part's headers exceed {0} bytes")]
    HeadersTooLarge(usize),
    /// A part's headers are malformed or ambiguous.
    #[error("a multipart part has malformed or ambiguous headers")]
    PartHeaders,
    /// The body ended before its closing delimiter.
    #[error("the multipart body ends before its closing boundary")]
    Truncated,
}

/// A streaming rewriter for one multipart body: [`push`](Rewriter::push) each chunk as it
/// arrives and forward what it returns, then call [`finish`](Rewriter::finish). After an error
/// the body is refused and the rewriter is done.
pub struct Rewriter {
    /// `--boundary`, the start of every delimiter line.
    finder: memmem::Finder<'static>,
    /// Inserted at the start of each `user` field's content.
    prefix: Bytes,
    /// Longest accepted part header block, in bytes.
    header_cap: usize,
    /// Where in the body the parser is.
    state: State,
    /// Bytes received but not yet returned: a part's incomplete header block, or a tail that
    /// may begin a delimiter. Always the start of the current state's bytes.
    held: BytesMut,
    /// How many bytes of `held` were already searched for a header block's end.
    scanned: usize,
}

/// Shows where the parser is, never the body's bytes.
impl std::fmt::Debug for Rewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewriter")
            .field("state", &self.state)
            .field("held", &self.held.len())
            .finish_non_exhaustive()
    }
}

/// Where in the body the parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first delimiter.
    Preamble,
    /// Just after `--boundary`; `open` while a closing `--` may still follow.
    Delimiter { open: bool },
    /// A part's header block, up to its blank line.
    Headers,
    /// A part's content, up to the next delimiter.
    Content,
    /// After the closing delimiter: passed on unread, as the upstream ignores it.
    Epilogue,
}

impl Rewriter {
    /// A rewriter for a body sent with `content_type`, inserting `prefix`.
    pub fn new(
        content_type: &str,
        prefix: &UserPrefix,
        header_cap: usize,
    ) -> Result<Rewriter, MultipartError> {
        let mut dash_boundary = b"--".to_vec();
        dash_boundary.extend_from_slice(boundary(content_type)?.as_bytes());
        Ok(Rewriter {
            finder: memmem::Finder::new(&dash_boundary).into_owned(),
            prefix: prefix.raw.clone(),
            header_cap,
            state: State::Preamble,
            held: BytesMut::new(),
            scanned: 0,
        })
    }

    /// Takes the next chunk and returns the bytes to forward now, in order: slices of the
    /// chunk (and of held bytes), with the prefix where a `user` field's content starts.
    pub fn push(&mut self, chunk: Bytes) -> Result<Vec<Bytes>, MultipartError> {
        let buf = if self.held.is_empty() {
            chunk
        } else {
            self.held.extend_from_slice(&chunk);
            self.held.split().freeze()
        };
        let mut out = Vec::new();
        let mut emitted = 0;
        let mut pos = 0;
        let hold_from = loop {
            match self.state {
                State::Preamble | State::Content => match self.scan(&buf, pos)? {
                    Scan::Delimiter(after) => {
                        pos = after;
                        self.state = State::Delimiter { open: true };
                    }
                    Scan::Partial(hold_from) => break hold_from,
                },
                State::Delimiter { open } => {
                    if open {
                        match &buf[pos..] {
                            [] | [b'-'] => break pos,
                            [b'-', b'-', ..] => {
                                pos += 2;
                                self.state = State::Epilogue;
                                continue;
                            }
                            _ => self.state = State::Delimiter { open: false },
                        }
                    }
                    pos += buf[pos..]
                        .iter()
                        .take_while(|b| matches!(b, b' ' | b'\t'))
                        .count();
                    match &buf[pos..] {
                        [] | [b'\r'] => break pos,
                        [b'\r', b'\n', ..] => {
                            pos += 2;
                            self.state = State::Headers;
                            self.scanned = 0;
                        }
                        _ => return Err(MultipartError::StrayBoundary),
                    }
                }
                State::Headers => {
                    let rest = &buf[pos..];
                    if rest.starts_with(b"\r\n") {
                        // An empty header block: no Content-Disposition.
                        return Err(MultipartError::PartHeaders);
                    }
                    let from = self.scanned.saturating_sub(3).min(rest.len());
                    let Some(end) = memmem::find(&rest[from..], b"\r\n\r\n").map(|e| from + e)
                    else {
                        if rest.len() > self.header_cap {
                            return Err(MultipartError::HeadersTooLarge(self.header_cap));
                        }
                        self.scanned = rest.len();
                        break pos;
                    };
                    if end + 4 > self.header_cap {
                        return Err(MultipartError::HeadersTooLarge(self.header_cap));
                    }
                    let user = is_user_field(&rest[..end])?;
                    pos += end + 4;
                    if user {
                        out.push(buf.slice(emitted..pos));
                        out.push(self.prefix.clone());
                        emitted = pos;
                    }
                    self.state = State::Content;
                }
                State::Epilogue => break buf.len(),
            }
        };
        if emitted < hold_from {
            out.push(buf.slice(emitted..hold_from));
        }
        self.held.extend_from_slice(&buf[hold_from..]);
        Ok(out)
    }

    /// Ends the body: an error if it stopped before its closing delimiter, in which case the
    /// caller must abort the upstream request rather than end it.
    pub fn finish(self) -> Result<(), MultipartError> {
        match self.state {
            State::Epilogue => Ok(()),
            _ => Err(MultipartError::Truncated),
        }
    }

    /// Finds the delimiter ending the preamble or the content that starts at `start` in `buf`.
    fn scan(&self, buf: &[u8], start: usize) -> Result<Scan, MultipartError> {
        let preamble = self.state == State::Preamble;
        let len = self.finder.needle().len();
        let mut from = start;
        while let Some(found) = self.finder.find(&buf[from..]) {
            let at = from + found;
            let before = &buf[start..at];
            // The body may open with the boundary itself (only the preamble can start there,
            // as held bytes always keep what precedes a match).
            if before.ends_with(b"\r\n") || (preamble && at == start) {
                return Ok(Scan::Delimiter(at + len));
            }
            if preamble || before.ends_with(b"\r") || before.ends_with(b"\n") {
                return Err(MultipartError::StrayBoundary);
            }
            // After anything but a line end, the upstream reads the boundary as content too.
            from = at + 1;
        }
        // A delimiter not yet complete starts at or after `window`, with its line end.
        let window = start.max(buf.len().saturating_sub(len + 1));
        if preamble {
            return Ok(Scan::Partial(window));
        }
        let needle = self.finder.needle();
        let hold_from = memchr::memchr2_iter(b'\r', b'\n', &buf[window..])
            .map(|i| window + i)
            .find(|&i| {
                let rest = &buf[i + 1..];
                let rest = match (buf[i], rest) {
                    (b'\r', [b'\n', after @ ..]) => after,
                    _ => rest,
                };
                needle.starts_with(rest)
            });
        Ok(Scan::Partial(hold_from.unwrap_or(buf.len())))
    }

    /// Bytes currently held back (for tests of the memory bound).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.held.len()
    }
}

/// What a scan of the preamble or a part's content found.
enum Scan {
    /// A delimiter, ending just before this offset.
    Delimiter(usize),
    /// No delimiter yet: return bytes before this offset, hold the rest.
    Partial(usize),
}

/// The boundary of a `multipart/form-data` Content-Type.
fn boundary(content_type: &str) -> Result<&str, MultipartError> {
    let (mime, params) =
        parse_header_value(content_type.as_bytes()).map_err(|_| MultipartError::ContentType)?;
    if !mime
        .trim_ascii()
        .eq_ignore_ascii_case(b"multipart/form-data")
    {
        return Err(MultipartError::ContentType);
    }
    let mut found = params
        .iter()
        .filter(|p| p.key.eq_ignore_ascii_case(b"boundary"));
    let (Some(param), None) = (found.next(), found.next()) else {
        return Err(MultipartError::ContentType);
    };
    let ok = (1..=MAX_BOUNDARY_LEN).contains(&param.value.len())
        && param
            .value
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"'()+_,-./:=?".contains(&b));
    if !ok {
        return Err(MultipartError::ContentType);
    }
    std::str::from_utf8(param.value).map_err(|_| MultipartError::ContentType)
}

/// Whether a part's header block (its lines, without the blank line) makes it a `user` field.
fn is_user_field(block: &[u8]) -> Result<bool, MultipartError> {
    let bad = MultipartError::PartHeaders;
    // Only CRLF ends a line here: a bare CR or LF would split lines differently upstream.
    for i in memchr::memchr2_iter(b'\r', b'\n', block) {
        let crlf = match block[i] {
            b'\r' => block.get(i + 1) == Some(&b'\n'),
            _ => i > 0 && block[i - 1] == b'\r',
        };
        if !crlf {
            return Err(bad);
        }
    }
    let mut disposition = None;
    for line in block.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            return Err(bad); // obsolete line folding
        }
        let colon = line.iter().position(|&b| b == b':').ok_or(bad)?;
        let name = line[..colon].trim_ascii();
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(bad);
        }
        if name.eq_ignore_ascii_case(b"content-disposition")
            && disposition.replace(&line[colon + 1..]).is_some()
        {
            return Err(bad);
        }
    }
    let (_, params) = parse_header_value(disposition.ok_or(bad)?).map_err(|_| bad)?;
    let (mut name, mut filename) = (None, false);
    for p in &params {
        let key = p.key.to_ascii_lowercase();
        if key == b"name" {
            if name.replace(p.value).is_some() || (p.quoted && p.value.contains(&b'\\')) {
                return Err(bad);
            }
        } else if key.starts_with(b"name*") {
            return Err(bad); // an RFC 2231 name the upstream decodes
        } else if key == b"filename" || key.starts_with(b"filename*") {
            filename = true;
        }
    }
    Ok(name == Some(&b"user"[..]) && !filename)
}

/// One `key=value` parameter of a header value; a quoted value is given without its quotes,
/// escapes left as sent.
struct Param<'a> {
    key: &'a [u8],
    value: &'a [u8],
    quoted: bool,
}

/// Splits `type; key=value; key="quoted"` strictly: no spaces around `=`, tokens or
/// quoted strings only, nothing but whitespace after a value.
fn parse_header_value(value: &[u8]) -> Result<(&[u8], Vec<Param<'_>>), ()> {
    let split = value.iter().position(|&b| b == b';').unwrap_or(value.len());
    let (kind, mut rest) = value.split_at(split);
    let mut params = Vec::new();
    loop {
        rest = rest.trim_ascii_start();
        match rest {
            [] => return Ok((kind, params)),
            [b';', tail @ ..] => rest = tail.trim_ascii_start(),
            _ => return Err(()),
        }
        if rest.is_empty() || rest[0] == b';' {
            continue;
        }
        let key_len = rest.iter().take_while(|&&b| is_tchar(b)).count();
        let (key, tail) = rest.split_at(key_len);
        let [b'=', tail @ ..] = tail else {
            return Err(());
        };
        if key.is_empty() {
            return Err(());
        }
        let (param, tail) = match tail {
            [b'"', quoted @ ..] => {
                let mut i = 0;
                loop {
                    match quoted.get(i) {
                        None => return Err(()),
                        Some(b'"') => break,
                        Some(b'\\') => i += 2,
                        Some(_) => i += 1,
                    }
                }
                let value = quoted.get(..i).ok_or(())?;
                (
                    Param {
                        key,
                        value,
                        quoted: true,
                    },
                    &quoted[i + 1..],
                )
            }
            _ => {
                let n = tail.iter().take_while(|&&b| is_tchar(b)).count();
                if n == 0 {
                    return Err(());
                }
                (
                    Param {
                        key,
                        value: &tail[..n],
                        quoted: false,
                    },
                    &tail[n..],
                )
            }
        };
        params.push(param);
        rest = tail;
    }
}

/// RFC 9110 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
#[path = "multipart_tests.rs"]
mod tests;
