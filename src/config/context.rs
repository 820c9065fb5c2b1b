//! What validation knows besides the file's tables — the flags and variables given, the
//! environment, the file's name and where each key sits — and the errors it words from them.
//!
//! Invariant: an error names what the operator wrote: a value from a flag or variable is blamed
//! on that flag or variable, a value from the file on its key, file, line and column; and no error
//! quotes a key, a token or a URL's credentials.

use std::path::{Path, PathBuf};

use super::position::{KeyPositions, TomlError};

/// Name of the environment variable that holds the upstream app key.
pub const API_KEY_ENV: &str = "DIFY_API_KEY";

/// Why a configuration could not be used. Every variant names the key (and file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML or holds unknown keys or wrongly typed values.
    #[error("invalid config file {path}: {error}")]
    Parse { path: PathBuf, error: TomlError },
    /// A value parsed but is not acceptable.
    #[error("invalid value for `{key}`{}: {message}", file_suffix(.file))]
    Invalid {
        key: &'static str,
        file: Option<PathBuf>,
        message: String,
    },
    /// No upstream key anywhere.
    #[error(
        "no upstream API key: set the {API_KEY_ENV} environment variable or `upstream.api_key_file` in the config file"
    )]
    MissingKey,
}

fn file_suffix(file: &Option<PathBuf>) -> String {
    match file {
        Some(p) => format!(" in {}", p.display()),
        None => String::new(),
    }
}

/// Values given on the command line or in `DIFY_GATEWAY_*` variables; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub log_format: Option<String>,
    pub admin_listen: Option<String>,
    /// A single Redis/Valkey URL for the shared tier (`--redis-url`).
    pub redis_url: Option<String>,
    /// Which flag or variable gave each value, named in its errors.
    pub origins: Origins,
}

/// No value given on the command line or in the environment.
static NO_OVERRIDES: Overrides = Overrides {
    listen: None,
    upstream: None,
    log_format: None,
    admin_listen: None,
    redis_url: None,
    origins: Origins::FLAGS,
};

/// The flag (`--listen`) or environment variable (`DIFY_GATEWAY_LISTEN`) each override came
/// from, so an error about it names what the operator wrote rather than a config key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origins {
    pub listen: &'static str,
    pub upstream: &'static str,
    pub log_format: &'static str,
    pub admin_listen: &'static str,
    pub redis_url: &'static str,
}

impl Origins {
    /// Every value given as a flag.
    const FLAGS: Origins = Origins {
        listen: "--listen",
        upstream: "--upstream",
        log_format: "--log-format",
        admin_listen: "--admin-listen",
        redis_url: "--redis-url",
    };
}

impl Default for Origins {
    /// Every value given as a flag.
    fn default() -> Self {
        Origins::FLAGS
    }
}

/// What a section's `validate` needs besides its own table: the values given on the command line
/// or in the environment, the environment itself, and the file and key positions its errors
/// point at.
pub struct Context<'a> {
    overrides: &'a Overrides,
    env: &'a dyn Fn(&str) -> Option<String>,
    file: Option<PathBuf>,
    /// Where each key sits in the file; set by [`RawConfig::validate`](super::RawConfig::validate).
    pub(super) positions: KeyPositions,
}

impl<'a> Context<'a> {
    /// Validation of values from `file` (named in errors), with `overrides` winning over it and
    /// `env` looking up environment variables.
    pub(super) fn new(
        overrides: &'a Overrides,
        file: Option<&Path>,
        env: &'a dyn Fn(&str) -> Option<String>,
    ) -> Context<'a> {
        Context {
            overrides,
            env,
            file: file.map(Path::to_path_buf),
            positions: KeyPositions::default(),
        }
    }

    /// No file, no overrides and an empty environment: for checking one section on its own
    /// (tests, tools).
    pub fn standalone() -> Context<'static> {
        fn no_env(_: &str) -> Option<String> {
            None
        }
        Context::new(&NO_OVERRIDES, None, &no_env)
    }

    /// The values given on the command line or in the environment.
    pub(super) fn overrides(&self) -> &'a Overrides {
        self.overrides
    }

    /// The environment variable `name`, if set.
    pub(super) fn env(&self, name: &str) -> Option<String> {
        (self.env)(name)
    }

    /// The file's `key` is not acceptable; the error points at its value when the file has it.
    pub(super) fn invalid(&self, key: &'static str, message: String) -> ConfigError {
        self.invalid_at(key, key, message)
    }

    /// Like [`Context::invalid`], with `path` the key with array indices
    /// (`cache.terminal_statuses[1]`): the error then points at that value's line and column.
    pub(super) fn invalid_at(&self, key: &'static str, path: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            key,
            file: self.file.clone(),
            message: match self.positions.find(path) {
                Some(at) => format!("{at}: {message}"),
                None => message,
            },
        }
    }

    /// `key` (`apps.base_url`) of entry `i` of an array of tables (`apps[1].base_url`).
    pub(super) fn invalid_entry(
        &self,
        key: &'static str,
        i: usize,
        message: String,
    ) -> ConfigError {
        let (table, field) = key.split_once('.').unwrap_or((key, ""));
        self.invalid_at(key, &format!("{table}[{i}].{field}"), message)
    }

    /// A value from a flag or variable is that flag's or variable's problem, not the file's.
    pub(super) fn blame(&self, from: Given, message: String) -> ConfigError {
        match from {
            Given::Override(origin) => ConfigError::Invalid {
                key: origin,
                file: None,
                message,
            },
            Given::File(key) => self.invalid(key, message),
        }
    }

    /// A setting a flag or variable may override: the override if given (`over` picks it and its
    /// origin), else the file's value, else `default`; read by `parse`, whose refusal is blamed on
    /// where the value came from.
    pub(super) fn overridable<T>(
        &self,
        over: impl FnOnce(&Overrides) -> (&Option<String>, &'static str),
        file: Option<String>,
        key: &'static str,
        default: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let (value, from) = match over(self.overrides) {
            (Some(v), origin) => (v.clone(), Given::Override(origin)),
            (None, _) => (file.unwrap_or_else(|| default.to_owned()), Given::File(key)),
        };
        parse(&value).map_err(|m| self.blame(from, m))
    }
}

/// Where a setting's value came from, for its errors.
#[derive(Debug, Clone, Copy)]
pub(super) enum Given {
    /// A flag or environment variable, by the name the operator wrote.
    Override(&'static str),
    /// The file (or the default), by config key.
    File(&'static str),
}
