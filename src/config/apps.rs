//! `[[apps]]` and where their keys come from: the Dify apps served, each with its base URL and
//! its key read from an environment variable or a file — never from the config file itself.
//!
//! Invariant: there is at least one app; names are unique and plain; every key is non-empty,
//! sendable as a header value, and no error message quotes it.

use std::path::{Path, PathBuf};

use http::Uri;
use secrecy::SecretString;
use serde::Deserialize;

use super::context::{ConfigError, Context, API_KEY_ENV};
use super::values::{check_name, parse_base_url};

/// Name of the app built from the top-level upstream settings.
pub const DEFAULT_APP: &str = "default";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApp {
    pub name: String,
    pub api_key_env: Option<String>,
    pub api_key_file: Option<PathBuf>,
    pub base_url: Option<String>,
    pub isolate_clients: Option<bool>,
}

/// One Dify app: its name, upstream base and key.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub name: String,
    pub base_url: Uri,
    pub api_key: SecretString,
    /// Where the key was read; a reload reads it again from there (key rotation).
    pub key_source: KeySource,
    /// Runs, tasks and files a client created through the gateway are hidden from the app's
    /// other clients (Dify's 404). Default: on when clients are configured. A reload may change
    /// it.
    pub isolate_clients: bool,
}

/// Where an app key is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// An environment variable, by name.
    Env(String),
    /// A file (a mounted Secret), trimmed.
    File(PathBuf),
}

/// The apps served: the `[[apps]]` entries, or without any one app named `default` with
/// `upstream.base_url` and its key from `upstream.api_key_file` (`default_key_file`) or
/// `DIFY_API_KEY`. `clients_configured` is the default of `isolate_clients`.
pub(super) fn validate(
    raw: Vec<RawApp>,
    default_key_file: Option<PathBuf>,
    base_url: &Uri,
    clients_configured: bool,
    ctx: &Context<'_>,
) -> Result<Vec<AppConfig>, ConfigError> {
    if raw.is_empty() {
        return Ok(vec![default_app(
            default_key_file,
            base_url,
            clients_configured,
            ctx,
        )?]);
    }
    if default_key_file.is_some() {
        return Err(ctx.invalid(
            "upstream.api_key_file",
            "with [[apps]], give each app its own api_key_env or api_key_file".into(),
        ));
    }
    let mut apps: Vec<AppConfig> = Vec::with_capacity(raw.len());
    for (i, a) in raw.into_iter().enumerate() {
        let app = a.validate(i, &apps, base_url, clients_configured, ctx)?;
        apps.push(app);
    }
    Ok(apps)
}

/// The app of a file without `[[apps]]`.
fn default_app(
    key_file: Option<PathBuf>,
    base_url: &Uri,
    isolate_clients: bool,
    ctx: &Context<'_>,
) -> Result<AppConfig, ConfigError> {
    let (key, key_source) = match key_file {
        Some(path) => {
            let key = read_key_file(&path)
                .and_then(|k| check_key(&k).map(|()| k))
                .map_err(|m| ctx.invalid("upstream.api_key_file", m))?;
            (key, KeySource::File(path))
        }
        None => match ctx.env(API_KEY_ENV) {
            Some(k) if !k.trim().is_empty() => {
                let key = k.trim().to_owned();
                check_key(&key).map_err(|m| ConfigError::Invalid {
                    key: API_KEY_ENV,
                    file: None,
                    message: format!("in this environment variable, {m}"),
                })?;
                (key, KeySource::Env(API_KEY_ENV.to_owned()))
            }
            _ => return Err(ConfigError::MissingKey),
        },
    };
    Ok(AppConfig {
        name: DEFAULT_APP.to_owned(),
        base_url: base_url.clone(),
        api_key: SecretString::from(key),
        key_source,
        isolate_clients,
    })
}

impl RawApp {
    /// Checks entry `i` of `[[apps]]` against the entries before it; without its own `base_url`
    /// it uses `upstream.base_url`.
    fn validate(
        self,
        i: usize,
        earlier: &[AppConfig],
        default_base: &Uri,
        clients_configured: bool,
        ctx: &Context<'_>,
    ) -> Result<AppConfig, ConfigError> {
        let at = |key: &'static str, message: String| ctx.invalid_entry(key, i, message);
        check_name(&self.name).map_err(|m| at("apps.name", m))?;
        if earlier.iter().any(|x| x.name == self.name) {
            return Err(at("apps.name", format!("`{}` is defined twice", self.name)));
        }
        let (key, key_source) = match (&self.api_key_env, &self.api_key_file) {
            (Some(var), None) => {
                let key = ctx
                    .env(var)
                    .map(|k| k.trim().to_owned())
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| {
                        format!("app `{}`: environment variable {var} is not set", self.name)
                    })
                    .and_then(|k| {
                        check_key(&k).map(|()| k).map_err(|m| {
                            format!("app `{}`: environment variable {var}: {m}", self.name)
                        })
                    })
                    .map_err(|m| at("apps.api_key_env", m))?;
                (key, KeySource::Env(var.clone()))
            }
            (None, Some(path)) => {
                let key = read_key_file(path)
                    .and_then(|k| check_key(&k).map(|()| k))
                    .map_err(|m| at("apps.api_key_file", format!("app `{}`: {m}", self.name)))?;
                (key, KeySource::File(path.clone()))
            }
            _ => {
                return Err(at(
                    "apps.api_key_env",
                    format!(
                        "app `{}`: set exactly one of api_key_env and api_key_file",
                        self.name
                    ),
                ))
            }
        };
        let base_url = match &self.base_url {
            Some(u) => parse_base_url(u).map_err(|m| at("apps.base_url", m))?,
            None => default_base.clone(),
        };
        Ok(AppConfig {
            name: self.name,
            base_url,
            api_key: SecretString::from(key),
            key_source,
            isolate_clients: self.isolate_clients.unwrap_or(clients_configured),
        })
    }
}

fn read_key_file(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let key = text.trim();
    if key.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(key.to_owned())
}

/// Keys must be sendable as a header value. The message deliberately does not echo the key.
fn check_key(key: &str) -> Result<(), String> {
    if key.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return Err("the key holds whitespace or non-printable characters".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use crate::config::tests::no_env;
    use crate::config::{Overrides, RawConfig};

    #[test]
    fn key_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, "app-fromfile\n").unwrap();
        let raw =
            RawConfig::from_toml(&format!("[upstream]\napi_key_file = \"{}\"\n", p.display()))
                .unwrap();
        let c = raw.validate(&Overrides::default(), None, &no_env).unwrap();
        assert_eq!(c.apps[0].api_key.expose_secret(), "app-fromfile");
    }
}
