//! Positions in a config file: where a TOML error or a bad value sits, told by line, column and
//! key.
//!
//! Invariant: nothing here holds text of the file's values. A [`TomlError`] keeps the line,
//! column and key path of the fault and what was expected; [`KeyPositions`] keeps key paths and
//! positions only. A value may be an API key, a token or a URL with a password, and on SIGHUP
//! errors go to the log. The toml crate's own `Display` quotes the offending line, so it is never
//! used; its message is kept only in the shapes known to hold no value.

use std::fmt;
use std::ops::Range;

use toml_edit::{ImDocument, Item, TableLike, Value};

/// Why a config file could not be read as TOML into the raw config types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TomlError {
    /// 1-based line of the fault.
    pub line: usize,
    /// 1-based column (in characters) of the fault.
    pub column: usize,
    /// The key at fault, as a path (`apps[0].api_key`), when the fault is inside a key-value.
    pub key: Option<String>,
    /// What is wrong, without any value from the file.
    pub message: String,
}

impl fmt::Display for TomlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)?;
        if let Some(k) = &self.key {
            write!(f, ", key `{k}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for TomlError {}

impl TomlError {
    /// Describes `e`, raised while reading `text`, by position and key.
    pub fn new(text: &str, e: &toml::de::Error) -> TomlError {
        let span = e.span();
        let offset = span.as_ref().map_or(0, |s| s.start).min(text.len());
        let (line, column) = line_column(text, offset);
        let doc = ImDocument::parse(text).ok();
        let message = match &doc {
            // The document is valid TOML: the fault is a serde one, whose messages can quote
            // the value found.
            Some(_) => safe_message(e.message()),
            // A syntax error: toml's parser names grammar (labels, expected tokens), not input.
            None => syntax_message(e.message()),
        };
        let key = match (&doc, span) {
            // Without a span the error belongs to no key (line 1, column 1 stands for the file).
            (_, None) => None,
            (Some(d), Some(_)) => key_at(&walk(d), offset),
            (None, Some(_)) => key_on_line(text, line),
        };
        TomlError {
            line,
            column,
            key,
            message,
        }
    }
}

/// 1-based line and column (counted in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// A serde message reduced to the shapes that name keys and types only.
fn safe_message(m: &str) -> String {
    let m = m.trim();
    // serde's `invalid type: string "…", expected …` and `invalid value: …`: the found part
    // quotes the value; keep its kind only.
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = m.strip_prefix(prefix) {
            let (found, expected) = rest.rsplit_once(", expected ").unwrap_or((rest, "?"));
            let kind = found.split(['`', '"', '\'']).next().unwrap_or("").trim();
            let what = prefix.trim_end_matches(": ");
            return format!("{what}: expected {expected}, found {kind}");
        }
    }
    // Key names and counts: the file's keys and our own field names, never a value.
    for shape in [
        "unknown field `",
        "missing field `",
        "duplicate field `",
        "invalid length ",
        "duplicate key `",
    ] {
        if m.starts_with(shape) {
            let mut out = m.replacen("unknown field", "unknown key", 1);
            if m.starts_with("unknown field `api_key`") {
                out.push_str(
                    "; a key is never written in the file: use api_key_env or api_key_file",
                );
            }
            return out;
        }
    }
    // `unknown variant `x`, expected …`: the variant is the value.
    if m.starts_with("unknown variant `") {
        let expected = m.split_once(", expected ").map_or("", |(_, e)| e);
        return format!("unknown variant, expected {expected}");
    }
    // Messages of this crate's own deserializers, written never to echo.
    if m == super::values::NOT_A_DURATION {
        return m.to_owned();
    }
    "invalid value".to_owned()
}

/// A syntax error's message on one line.
fn syntax_message(m: &str) -> String {
    let parts: Vec<&str> = m.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    format!("not valid TOML: {}", parts.join("; "))
}

/// The path of the innermost entry whose key or value spans `offset`.
fn key_at(entries: &[Entry], offset: usize) -> Option<String> {
    let spans = |r: &Option<Range<usize>>| {
        // A zero-width span (end of file) still names its position.
        r.as_ref()
            .is_some_and(|r| r.contains(&offset) || (r.is_empty() && r.start == offset))
    };
    // Entries come parent first, so the last match is the innermost.
    entries
        .iter()
        .rev()
        .find(|e| spans(&e.key) || spans(&e.value))
        .map(|e| e.path.clone())
}

/// One key (or array element) of a parsed document: its path and where its key and value sit.
struct Entry {
    /// `apps[1].base_url`, `cache.terminal_statuses[0]`.
    path: String,
    /// Byte span of the key as written (none for array elements).
    key: Option<Range<usize>>,
    /// Byte span of the value (a table's runs from its header to its last value).
    value: Option<Range<usize>>,
}

/// Every key and array element of `doc`, each after the one that holds it.
fn walk<S>(doc: &ImDocument<S>) -> Vec<Entry> {
    let mut entries = Vec::new();
    walk_table(doc.as_table(), &mut String::new(), &mut entries);
    entries
}

fn walk_table(t: &dyn TableLike, path: &mut String, entries: &mut Vec<Entry>) {
    for (name, _) in t.iter() {
        let Some((key, item)) = t.get_key_value(name) else {
            continue;
        };
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(name);
        match item {
            Item::None => {}
            Item::Value(v) => walk_value(v, key.span(), path, entries),
            Item::Table(t) => {
                entries.push(Entry {
                    path: path.clone(),
                    key: key.span(),
                    value: t.span(),
                });
                walk_table(t, path, entries);
            }
            Item::ArrayOfTables(a) => {
                for (i, t) in a.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    entries.push(Entry {
                        path: path.clone(),
                        key: None,
                        value: t.span(),
                    });
                    walk_table(t, path, entries);
                    path.truncate(len);
                }
            }
        }
        path.truncate(len);
    }
}

fn walk_value(v: &Value, key: Option<Range<usize>>, path: &mut String, entries: &mut Vec<Entry>) {
    entries.push(Entry {
        path: path.clone(),
        key,
        value: v.span(),
    });
    match v {
        Value::Array(a) => {
            for (i, e) in a.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk_value(e, None, path, entries);
                path.truncate(len);
            }
        }
        Value::InlineTable(t) => walk_table(t, path, entries),
        _ => {}
    }
}

/// For a syntax error: the key written on `line` (1-based), under the last table header above
/// it. A best guess from the text, for when the document cannot be parsed.
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let mut table = String::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.starts_with('[') {
            let name = l.trim_start_matches('[');
            if let Some(end) = name.find(']') {
                table = name[..end].trim().to_owned();
            }
        }
        if i + 1 == line {
            let (k, _) = l.split_once('=')?;
            let k = k.trim();
            let plain = !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
            return plain.then(|| {
                if table.is_empty() {
                    k.to_owned()
                } else {
                    format!("{table}.{k}")
                }
            });
        }
    }
    None
}

/// Where each key of a parsed file sits, by key path (`apps[1].base_url`), so a validation error
/// can point at the line and column of the value it refuses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPositions {
    /// Key path and the 1-based line and column of its value.
    entries: Vec<(String, usize, usize)>,
}

impl KeyPositions {
    /// Every key of `text` (which must be valid TOML; otherwise no positions).
    pub fn of(text: &str) -> KeyPositions {
        let Ok(doc) = ImDocument::parse(text) else {
            return KeyPositions::default();
        };
        let entries = walk(&doc)
            .into_iter()
            .filter_map(|e| {
                let at = e.value.or(e.key)?;
                let (line, column) = line_column(text, at.start);
                Some((e.path, line, column))
            })
            .collect();
        KeyPositions { entries }
    }

    /// `line L, column C` of the value at `path`: with indices (`apps[1].base_url`) that exact
    /// key; without (`upstream.base_url`), the first key that matches once indices are dropped.
    pub fn find(&self, path: &str) -> Option<String> {
        let exact = path.contains('[');
        self.entries
            .iter()
            .find(|(p, _, _)| {
                if exact {
                    p == path
                } else {
                    strip_indices(p) == path
                }
            })
            .map(|(_, line, column)| format!("line {line}, column {column}"))
    }
}

/// `apps[0].base_url` → `apps.base_url`.
fn strip_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut depth = 0;
    for c in path.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigError, Overrides, RawConfig};

    /// Loads `text` as the file `gw.toml` and validates it; the error, whichever layer found it.
    fn load(text: &str) -> ConfigError {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, text).unwrap();
        match RawConfig::from_file(&path) {
            Err(e) => e,
            Ok(raw) => raw
                .validate(&Overrides::default(), Some(&path), &|_| {
                    Some("app-k".to_owned())
                })
                .expect_err("the file is refused"),
        }
    }

    /// The error names file, line, column and key, and neither its Display nor its Debug holds
    /// `secret`.
    fn assert_located_without(e: &ConfigError, secret: &str, at: &str, key: &str) {
        let shown = e.to_string();
        let debug = format!("{e:?}");
        for text in [&shown, &debug] {
            assert!(!text.contains(secret), "secret echoed: {text}");
        }
        assert!(shown.contains("gw.toml"), "{shown}");
        assert!(shown.contains(at), "{shown}");
        assert!(shown.contains(&format!("`{key}`")), "{shown}");
    }

    #[test]
    fn an_inline_api_key_is_refused_without_echoing_it() {
        let e = load("[[apps]]\nname = \"a\"\napi_key = \"app-InlineSecret42\"\n");
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        assert_located_without(&e, "InlineSecret42", "line 3, column 1", "apps[0].api_key");
        assert!(e.to_string().contains("api_key_file"), "{e}");
    }

    #[test]
    fn a_redis_url_given_as_a_string_is_refused_without_echoing_it() {
        let e = load("[shared]\nurls = \"redis://:hunter2pw@cache:6379/0?x=1\"\n");
        assert_located_without(&e, "hunter2pw", "line 2, column 8", "shared.urls");
        assert!(
            e.to_string().contains("expected a sequence, found string"),
            "{e}"
        );
        assert!(!e.to_string().contains("cache:6379"), "{e}");
    }

    #[test]
    fn a_base_url_with_credentials_or_a_query_is_refused_without_echoing_them() {
        let e = load("[upstream]\nbase_url = \"https://bob:S3cretPass@dify.example/v1\"\n");
        assert_located_without(&e, "S3cretPass", "line 2, column 12", "upstream.base_url");
        assert!(e.to_string().contains("credentials"), "{e}");
        assert!(!e.to_string().contains("bob"), "{e}");

        let e = load(
            "[[apps]]\nname = \"a\"\napi_key_env = \"K\"\n\n[[apps]]\nname = \"b\"\n\
             api_key_env = \"K\"\nbase_url = \"https://dify.example/v1?token=QuerySecret\"\n",
        );
        // The second app's line, not the first's.
        assert_located_without(&e, "QuerySecret", "line 8, column 12", "apps.base_url");
    }

    #[test]
    fn type_errors_keep_the_kind_found_but_not_the_value() {
        let e = load("[server]\nlisten = 8080\n");
        assert_located_without(&e, "8080", "line 2, column 10", "server.listen");
        assert!(e.to_string().contains("found integer"), "{e}");
        let e = load("[cache]\nrunning_ttl = \"app-NotADuration\"\n");
        assert_located_without(&e, "NotADuration", "line 2, column 15", "cache.running_ttl");
        let e = load("[cache]\nterminal_statuses = [\"succeeded\", 987654]\n");
        assert_located_without(
            &e,
            "987654",
            "line 2, column 35",
            "cache.terminal_statuses[1]",
        );
    }

    #[test]
    fn syntax_errors_name_the_line_and_the_key_written_there() {
        let e = load("[upstream]\nbase_url = \"https://x:PwInBrokenLine@h/v1\n");
        assert_located_without(&e, "PwInBrokenLine", "line 2", "upstream.base_url");
        assert!(e.to_string().contains("not valid TOML"), "{e}");
    }

    #[test]
    fn positions_point_at_values_by_path() {
        let p = KeyPositions::of("[[apps]]\nname = \"a\"\n[[apps]]\nname = \"b\"\n");
        assert_eq!(p.find("apps[1].name").as_deref(), Some("line 4, column 8"));
        assert_eq!(p.find("apps.name").as_deref(), Some("line 2, column 8"));
        assert_eq!(p.find("apps.base_url"), None);
    }

    #[test]
    fn line_and_column_count_characters() {
        assert_eq!(line_column("a = \"é\"\nb", 9), (2, 1));
        assert_eq!(line_column("é = 1", 2), (1, 2));
    }
}
