//! `[crowdsec]` in the agent's config file (PRODUCT.md, "Cluster-wide bans"), validated before
//! the agent touches the kernel: every error names the key (`crowdsec.api_url`) and the value.
//!
//! Keys beyond PRODUCT.md (documented in deploy/README.md):
//! - `timeout` ("30s"): the most one LAPI request may take, connect to last byte.
//! - `max_response_bytes` (256 MiB): a stream answer larger than this is refused whole
//!   (100k decisions are ~16 MB).
//! - `push_queue` (100000): bans waiting to be published; past it new ones are dropped, counted.
//! - `insecure_skip_verify` (false): accept any server certificate (test setups only).
//!
//! `machine_id` and the file paths may name environment variables as `${NAME}`: one DaemonSet
//! and one ConfigMap serve every node when each node's credentials are picked by
//! `${NODE_NAME}` (the Downward API's `spec.nodeName`).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{config::ConfigError, duration};

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrowdsecFile {
    pub api_url: Option<String>,
    pub api_key: Option<String>,
    pub api_key_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub insecure_skip_verify: Option<bool>,
    pub update_frequency: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub origins: Option<Vec<String>>,
    pub scenarios_containing: Option<Vec<String>>,
    pub scenarios_not_containing: Option<Vec<String>>,
    pub machine_id: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub push: Option<bool>,
    pub timeout: Option<String>,
    pub max_response_bytes: Option<i64>,
    pub push_queue: Option<i64>,
}

/// Where LAPI is: `http[s]://host[:port][/prefix]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiUrl {
    pub tls: bool,
    /// As written, without brackets for IPv6.
    pub host: String,
    pub port: u16,
    /// Path prefix without the trailing `/` (`""` for the root).
    pub prefix: String,
    /// As configured, for status and logs.
    pub shown: String,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Tls {
    /// PEM client certificate chain and key.
    pub client: Option<(PathBuf, PathBuf)>,
    pub ca_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Machine {
    pub id: String,
    /// `None`: the machine authenticates with the client certificate.
    pub password: Option<String>,
}

/// The validated `[crowdsec]` table.
#[derive(Clone, PartialEq, Eq)]
pub struct CrowdsecConfig {
    pub url: ApiUrl,
    /// `None`: the bouncer authenticates with the client certificate.
    pub api_key: Option<String>,
    pub tls: Tls,
    pub update_frequency: Duration,
    /// LAPI's names: `ip`, `range`.
    pub scopes: Vec<String>,
    pub origins: Vec<String>,
    pub scenarios_containing: Vec<String>,
    pub scenarios_not_containing: Vec<String>,
    /// Credentials to publish this node's bans (`None`: bouncer only).
    pub machine: Option<Machine>,
    pub push: bool,
    pub timeout: Duration,
    pub max_response_bytes: usize,
    pub push_queue: usize,
}

impl std::fmt::Debug for CrowdsecConfig {
    // Never print the key or the password (the config is logged on errors).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrowdsecConfig")
            .field("url", &self.url.shown)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("update_frequency", &self.update_frequency)
            .field("machine", &self.machine.as_ref().map(|m| &m.id))
            .field("push", &self.push)
            .finish_non_exhaustive()
    }
}

fn invalid(key: &'static str, value: impl Into<String>, why: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.into(),
        why: why.to_string(),
    }
}

/// A secret from a file (a mounted Kubernetes Secret): trailing white space and newlines go.
fn read_secret(key: &'static str, path: &Path) -> Result<String, ConfigError> {
    let path = &expand_path(key, path)?;
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| invalid(key, &shown, e))?;
    let t = text.trim();
    if t.is_empty() {
        return Err(invalid(key, shown, "the file is empty"));
    }
    if t.contains(['\n', '\r']) {
        return Err(invalid(key, shown, "the file holds more than one line"));
    }
    Ok(t.to_owned())
}

/// `${NAME}` replaced by the environment variable; an unset one is an error naming it.
pub fn expand(key: &'static str, s: &str) -> Result<String, ConfigError> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| invalid(key, s, "unclosed ${"))?;
        let name = &after[..end];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(invalid(key, s, format!("{name:?} is not a variable name")));
        }
        let v = std::env::var(name).map_err(|_| {
            invalid(
                key,
                s,
                format!("the environment variable {name} is not set"),
            )
        })?;
        out.push_str(&v);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn expand_path(key: &'static str, p: &Path) -> Result<PathBuf, ConfigError> {
    Ok(PathBuf::from(expand(key, &p.to_string_lossy())?))
}

fn readable(key: &'static str, path: &Path) -> Result<PathBuf, ConfigError> {
    let path = &expand_path(key, path)?;
    std::fs::File::open(path).map_err(|e| invalid(key, path.display().to_string(), e))?;
    Ok(path.to_owned())
}

pub fn parse_url(s: &str) -> Result<ApiUrl, String> {
    let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = s.strip_prefix("http://") {
        (false, r)
    } else {
        return Err("expected http://HOST[:PORT]/ or https://HOST[:PORT]/".into());
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if path.contains(['?', '#']) {
        return Err("no query or fragment allowed".into());
    }
    if authority.contains('@') {
        return Err("no user info allowed: give credentials as api_key or password".into());
    }
    let (host, port) = if let Some(r) = authority.strip_prefix('[') {
        let (h, after) = r.split_once(']').ok_or("unclosed '[' in the host")?;
        h.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("{h:?} is not an IPv6 address"))?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty()
        || host
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_')))
    {
        return Err(format!("{host:?} is not a host name or address"));
    }
    let port = match port {
        None => {
            if tls {
                443
            } else {
                80
            }
        }
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{p:?} is not a port"))?,
    };
    Ok(ApiUrl {
        tls,
        host: host.to_owned(),
        port,
        prefix: path.trim_end_matches('/').to_owned(),
        shown: s.to_owned(),
    })
}

fn words(key: &'static str, v: &Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
    let v = v.clone().unwrap_or_default();
    for w in &v {
        if w.trim().is_empty() || w.contains([',', '&', '=', '#', '\n']) {
            return Err(invalid(key, w, "one non-empty word per entry, no ','"));
        }
    }
    Ok(v.iter().map(|w| w.trim().to_owned()).collect())
}

impl CrowdsecFile {
    pub fn validate(&self) -> Result<CrowdsecConfig, ConfigError> {
        let raw_url = self.api_url.as_deref().ok_or_else(|| {
            invalid(
                "crowdsec.api_url",
                "",
                "required in [crowdsec], e.g. http://crowdsec-service.crowdsec:8080/",
            )
        })?;
        let url = parse_url(raw_url.trim()).map_err(|e| invalid("crowdsec.api_url", raw_url, e))?;
        let client = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some((
                readable("crowdsec.cert_file", c)?,
                readable("crowdsec.key_file", k)?,
            )),
            (Some(c), None) => {
                return Err(invalid(
                    "crowdsec.cert_file",
                    c.display().to_string(),
                    "give key_file too",
                ));
            }
            (None, Some(k)) => {
                return Err(invalid(
                    "crowdsec.key_file",
                    k.display().to_string(),
                    "give cert_file too",
                ));
            }
            (None, None) => None,
        };
        let ca_file = match &self.ca_file {
            Some(p) => Some(readable("crowdsec.ca_file", p)?),
            None => None,
        };
        let tls = Tls {
            client,
            ca_file,
            insecure_skip_verify: self.insecure_skip_verify.unwrap_or(false),
        };
        if !url.tls && (tls.client.is_some() || tls.ca_file.is_some()) {
            return Err(invalid(
                "crowdsec.api_url",
                raw_url,
                "a client certificate or ca_file needs an https:// URL",
            ));
        }
        let api_key = match (&self.api_key, &self.api_key_file) {
            (Some(_), Some(f)) => {
                return Err(invalid(
                    "crowdsec.api_key_file",
                    f.display().to_string(),
                    "give api_key or api_key_file, not both",
                ));
            }
            (Some(k), None) => {
                let k = k.trim();
                if k.is_empty() || !k.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(invalid(
                        "crowdsec.api_key",
                        "<redacted>",
                        "empty or not printable ASCII",
                    ));
                }
                Some(k.to_owned())
            }
            (None, Some(f)) => {
                let k = read_secret("crowdsec.api_key_file", f)?;
                if !k.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(invalid(
                        "crowdsec.api_key_file",
                        f.display().to_string(),
                        "the key is not printable ASCII",
                    ));
                }
                Some(k)
            }
            (None, None) => None,
        };
        if api_key.is_none() && tls.client.is_none() {
            return Err(invalid(
                "crowdsec.api_key",
                "",
                "bouncer credentials are required: api_key, api_key_file, or cert_file + key_file",
            ));
        }
        let update_frequency = match &self.update_frequency {
            None => Duration::from_secs(10),
            Some(s) => {
                let d =
                    duration::parse(s).map_err(|e| invalid("crowdsec.update_frequency", s, e))?;
                if d < Duration::from_millis(100) {
                    return Err(invalid("crowdsec.update_frequency", s, "at least 100ms"));
                }
                d
            }
        };
        let timeout = match &self.timeout {
            None => Duration::from_secs(30),
            Some(s) => {
                let d = duration::parse(s).map_err(|e| invalid("crowdsec.timeout", s, e))?;
                if d < Duration::from_millis(100) {
                    return Err(invalid("crowdsec.timeout", s, "at least 100ms"));
                }
                d
            }
        };
        let scopes = match &self.scopes {
            None => vec!["ip".to_owned(), "range".to_owned()],
            Some(v) if v.is_empty() => {
                return Err(invalid(
                    "crowdsec.scopes",
                    "[]",
                    "at least one of ip, range",
                ));
            }
            Some(v) => {
                let mut out: Vec<String> = Vec::new();
                for s in v {
                    let l = s.trim().to_ascii_lowercase();
                    if l != "ip" && l != "range" {
                        return Err(invalid(
                            "crowdsec.scopes",
                            s,
                            "wsguard enforces the scopes ip and range only",
                        ));
                    }
                    if !out.contains(&l) {
                        out.push(l);
                    }
                }
                out
            }
        };
        let machine = match (&self.machine_id, &self.password, &self.password_file) {
            (None, None, None) => None,
            (None, Some(_), _) | (None, _, Some(_)) => {
                return Err(invalid(
                    "crowdsec.machine_id",
                    "",
                    "a password needs the machine_id it belongs to",
                ));
            }
            (Some(_), Some(_), Some(f)) => {
                return Err(invalid(
                    "crowdsec.password_file",
                    f.display().to_string(),
                    "give password or password_file, not both",
                ));
            }
            (Some(id), pw, pwf) => {
                let id = expand("crowdsec.machine_id", id.trim())?;
                let id = id.as_str();
                if id.is_empty() || !id.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(invalid(
                        "crowdsec.machine_id",
                        id,
                        "empty or not printable ASCII",
                    ));
                }
                let password = match (pw, pwf) {
                    (Some(p), _) if p.is_empty() => {
                        return Err(invalid("crowdsec.password", "", "empty"));
                    }
                    (Some(p), _) => Some(p.clone()),
                    (None, Some(f)) => Some(read_secret("crowdsec.password_file", f)?),
                    (None, None) if tls.client.is_some() => None,
                    (None, None) => {
                        return Err(invalid(
                            "crowdsec.password",
                            "",
                            "machine_id needs password, password_file, or cert_file + key_file",
                        ));
                    }
                };
                Some(Machine {
                    id: id.to_owned(),
                    password,
                })
            }
        };
        if api_key.is_none() && machine.as_ref().is_some_and(|m| m.password.is_none()) {
            // LAPI checks a certificate's OU against one role: bouncers or agents.
            return Err(invalid(
                "crowdsec.password",
                "",
                "the certificate can serve the bouncer or the machine, not both: give api_key \
                 for the bouncer or a password for the machine",
            ));
        }
        let push = match (self.push, &machine) {
            (Some(true), None) => {
                return Err(invalid(
                    "crowdsec.push",
                    "true",
                    "publishing bans needs machine credentials: machine_id + password or password_file",
                ));
            }
            (Some(p), _) => p,
            (None, m) => m.is_some(),
        };
        let max_response_bytes = match self.max_response_bytes {
            None => 256 << 20,
            Some(n) if n < 1024 => {
                return Err(invalid(
                    "crowdsec.max_response_bytes",
                    n.to_string(),
                    "at least 1024",
                ));
            }
            Some(n) => usize::try_from(n)
                .map_err(|_| invalid("crowdsec.max_response_bytes", n.to_string(), "too large"))?,
        };
        let push_queue = match self.push_queue {
            None => 100_000,
            Some(n) if !(1..=10_000_000).contains(&n) => {
                return Err(invalid(
                    "crowdsec.push_queue",
                    n.to_string(),
                    "1 to 10000000",
                ));
            }
            Some(n) => n as usize,
        };
        Ok(CrowdsecConfig {
            url,
            api_key,
            tls,
            update_frequency,
            scopes,
            origins: words("crowdsec.origins", &self.origins)?,
            scenarios_containing: words(
                "crowdsec.scenarios_containing",
                &self.scenarios_containing,
            )?,
            scenarios_not_containing: words(
                "crowdsec.scenarios_not_containing",
                &self.scenarios_not_containing,
            )?,
            machine,
            push,
            timeout,
            max_response_bytes,
            push_queue,
        })
    }
}

#[cfg(test)]
mod tests;
