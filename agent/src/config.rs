//! `wsguard agent` flags and the TOML config file (same keys in snake_case; flags override).
//!
//! Merge order: built-in defaults < config file < flags. Every value is validated here, before
//! the agent touches the kernel, and every error names the key and the offending value.
//!
//! Keys beyond PRODUCT.md's flags (config file, and hidden flags of the same name):
//! - `api_group`: group name or numeric gid whose members may mutate through the API (besides
//!   uid 0). Default: none.
//! - `ban_rate_limit` (100), `ban_rate_window` ("10s"), `ban_rate_hard_limit` (1000): the
//!   circuit breaker on automatic bans (see `policy::breaker`).
//! - `offense_memory` ("7d"): how long an address's offence history is kept after its last ban.
//! - `[logs]` (config file only): log sources and rules for TLS-terminated traffic, see
//!   `crate::logs::config`; its rules default to `threshold`, `window` and `ws_path`, its
//!   offsets live in `<state_dir>/logs`, and its `trusted_proxies` to `proxy_protocol_from`
//!   (`crate::proxy`).
//! - `[crowdsec]` (config file only): CrowdSec LAPI, see `crate::crowdsec::config`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use wsguard_common::maps::{MAX_PATHS, PATH_LEN};

use crate::{addr::Cidr, datapath::XdpMode, duration, model::Mode, paths, policy::BreakerConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags of `wsguard agent` (PRODUCT.md, "Agent"). Options stay `None` when not given so the
/// config file's value can show through.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct AgentArgs {
    /// TOML config file; flags override its values.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Interface to protect (repeatable); default: the interface of the default route.
    #[arg(long, value_name = "IF")]
    pub iface: Vec<String>,
    /// auto (native, else generic) | native | generic.
    #[arg(long, value_enum, value_name = "MODE")]
    pub xdp_mode: Option<XdpMode>,
    /// Watched TCP ports, comma separated; default 80.
    #[arg(long, value_name = "LIST")]
    pub ports: Option<String>,
    /// WebSocket path prefix (repeatable); default: every path is in scope.
    #[arg(long, value_name = "PREFIX")]
    pub ws_path: Vec<String>,
    /// Bad handshakes per source per window that make a burst; default 20.
    #[arg(long, value_name = "N")]
    pub threshold: Option<String>,
    /// Rate window; default 10s.
    #[arg(long, value_name = "DUR")]
    pub window: Option<String>,
    /// TTL of a first ban; default 10m.
    #[arg(long, value_name = "DUR")]
    pub ban_ttl: Option<String>,
    /// Longest escalated TTL; default 24h.
    #[arg(long, value_name = "DUR")]
    pub ban_max_ttl: Option<String>,
    /// enforce | observe; default enforce.
    #[arg(long, value_enum, value_name = "MODE")]
    pub mode: Option<Mode>,
    /// Ban map capacity; default 1000000.
    #[arg(long, value_name = "N")]
    pub max_bans: Option<String>,
    /// CIDR added to the built-in allowlist (repeatable).
    #[arg(long, value_name = "CIDR")]
    pub allow: Vec<String>,
    /// Trusted sender of PROXY protocol v1/v2 headers, e.g. an L4 load balancer (repeatable):
    /// its flows are judged by the client the header names, and it is never banned nor
    /// charged (allowlisted, source `proxy`). Default: none, and a flow that starts with a
    /// PROXY header is then never judged (`wsguard status` names its sender).
    #[arg(long, value_name = "CIDR")]
    pub proxy_protocol_from: Vec<String>,
    /// API socket; default /run/wsguard/wsguard.sock.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// State directory; default /var/lib/wsguard.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// bpffs pin directory; default /sys/fs/bpf/wsguard.
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Metrics listen address, or `off`; default 0.0.0.0:9477.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// text | json.
    #[arg(long, value_enum, value_name = "FMT")]
    pub log_format: Option<LogFormat>,
    /// Remove programs and pins when the agent exits (default: leave them enforcing).
    #[arg(long)]
    pub detach_on_exit: bool,
    #[arg(long, hide = true)]
    pub api_group: Option<String>,
    #[arg(long, hide = true)]
    pub ban_rate_limit: Option<String>,
    #[arg(long, hide = true)]
    pub ban_rate_window: Option<String>,
    #[arg(long, hide = true)]
    pub ban_rate_hard_limit: Option<String>,
    #[arg(long, hide = true)]
    pub offense_memory: Option<String>,
}

/// The config file. Scalars the operator may quote either way are taken as strings or numbers
/// and validated by the same code as the flags.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub iface: Option<Vec<String>>,
    pub xdp_mode: Option<XdpMode>,
    pub ports: Option<Vec<u32>>,
    pub ws_path: Option<Vec<String>>,
    pub threshold: Option<i64>,
    pub window: Option<String>,
    pub ban_ttl: Option<String>,
    pub ban_max_ttl: Option<String>,
    pub mode: Option<Mode>,
    pub max_bans: Option<i64>,
    pub allow: Option<Vec<String>>,
    pub proxy_protocol_from: Option<Vec<String>>,
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub pin_dir: Option<PathBuf>,
    pub metrics_addr: Option<String>,
    pub log_format: Option<LogFormat>,
    pub detach_on_exit: Option<bool>,
    pub api_group: Option<String>,
    pub ban_rate_limit: Option<i64>,
    pub ban_rate_window: Option<String>,
    pub ban_rate_hard_limit: Option<i64>,
    pub offense_memory: Option<String>,
    /// `[logs]`: log sources and rules (issue 7, `crate::logs::config`).
    pub logs: Option<crate::logs::LogsFile>,
    /// `[crowdsec]`: CrowdSec LAPI (issue 13, `crate::crowdsec::config`).
    pub crowdsec: Option<crate::crowdsec::CrowdsecFile>,
}

/// The validated configuration the daemon runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    pub ports: Vec<u16>,
    pub ws_paths: Vec<String>,
    pub threshold: u32,
    pub window: Duration,
    pub ban_ttl: Duration,
    pub ban_max_ttl: Duration,
    pub mode: Mode,
    pub max_bans: u32,
    pub allow: Vec<Cidr>,
    /// Trusted PROXY protocol senders (`crate::proxy`).
    pub proxy_protocol_from: Vec<Cidr>,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub pin_dir: PathBuf,
    /// `None`: `off`.
    pub metrics_addr: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub detach_on_exit: bool,
    pub api_gid: Option<u32>,
    pub breaker: BreakerConfig,
    pub offense_memory: Duration,
    /// `None`: no `[logs]` table, no log detection.
    pub logs: Option<crate::logs::LogsConfig>,
    /// `None`: no `[crowdsec]` table.
    pub crowdsec: Option<crate::crowdsec::CrowdsecConfig>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {err}")]
    Read { path: String, err: String },
    #[error("config file {path}: {err}")]
    Parse { path: String, err: String },
    #[error("invalid value for {key}: {value:?}: {why}")]
    Invalid {
        key: &'static str,
        value: String,
        why: String,
    },
    #[error("{key} must be >= {min}, got {value}")]
    TooSmall {
        key: &'static str,
        min: String,
        value: String,
    },
    #[error(
        "no interface given and no default route found in /proc/net/route or /proc/net/ipv6_route: pass --iface"
    )]
    NoInterface,
    /// A `[logs]` value; the message names the key (`logs.rules[0].window`) and the value.
    #[error(transparent)]
    Logs(#[from] crate::logs::LogsConfigError),
}

fn invalid(key: &'static str, value: impl Into<String>, why: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.into(),
        why: why.to_string(),
    }
}

impl AgentConfig {
    /// Read the config file (if any), merge the flags, resolve the default interface.
    pub fn load(args: &AgentArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(p) => FileConfig::read(p)?,
            None => FileConfig::default(),
        };
        Self::merge(&file, args, default_route_iface)
    }

    /// Defaults < file < flags. `default_iface` is only asked when neither names an interface.
    pub fn merge(
        file: &FileConfig,
        args: &AgentArgs,
        default_iface: impl FnOnce() -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let interfaces = pick_vec(&args.iface, &file.iface);
        for i in &interfaces {
            // IFNAMSIZ is 16 including the terminating NUL.
            if i.is_empty() || i.len() > 15 || i.contains(['/', ' ', '\0']) {
                return Err(invalid("iface", i, "not a valid interface name"));
            }
        }
        let interfaces = match interfaces.is_empty() {
            false => interfaces,
            true => vec![default_iface().ok_or(ConfigError::NoInterface)?],
        };
        let ports = match (&args.ports, &file.ports) {
            (Some(s), _) => parse_ports_str(s)?,
            (None, Some(v)) => check_ports(v.iter().map(|p| (p.to_string(), i64::from(*p))))?,
            (None, None) => vec![80],
        };
        let ws_paths = pick_vec(&args.ws_path, &file.ws_path);
        check_paths(&ws_paths)?;

        let threshold = int(
            "threshold",
            args.threshold.as_deref(),
            file.threshold,
            20,
            1,
        )?;
        let window = dur(
            "window",
            args.window.as_deref(),
            file.window.as_deref(),
            "10s",
        )?;
        positive("window", window)?;
        let ban_ttl = dur(
            "ban_ttl",
            args.ban_ttl.as_deref(),
            file.ban_ttl.as_deref(),
            "10m",
        )?;
        positive("ban_ttl", ban_ttl)?;
        let max_ttl = dur(
            "ban_max_ttl",
            args.ban_max_ttl.as_deref(),
            file.ban_max_ttl.as_deref(),
            "24h",
        )?;
        if max_ttl < ban_ttl {
            return Err(ConfigError::TooSmall {
                key: "ban_max_ttl",
                min: format!("ban_ttl ({})", duration::human(ban_ttl)),
                value: duration::human(max_ttl),
            });
        }
        let max_bans = int(
            "max_bans",
            args.max_bans.as_deref(),
            file.max_bans,
            1_000_000,
            1,
        )?;

        let allow_raw = pick_vec(&args.allow, &file.allow);
        let mut allow = Vec::with_capacity(allow_raw.len());
        for a in &allow_raw {
            let c: Cidr = a.parse().map_err(|e| invalid("allow", a, e))?;
            allow.push(c);
        }
        let proxy_protocol_from = crate::proxy::trusted_from(&pick_vec(
            &args.proxy_protocol_from,
            &file.proxy_protocol_from,
        ))?;

        let metrics_addr = match args
            .metrics_addr
            .as_deref()
            .or(file.metrics_addr.as_deref())
        {
            None => Some(paths::METRICS_ADDR.parse().expect("valid default")),
            Some(s) if s.trim() == "off" => None,
            Some(s) => Some(
                s.trim()
                    .parse()
                    .map_err(|e| invalid("metrics_addr", s, e))?,
            ),
        };
        let api_gid = match args.api_group.as_deref().or(file.api_group.as_deref()) {
            None => None,
            Some(g) => {
                Some(resolve_group(g).ok_or_else(|| invalid("api_group", g, "no such group"))?)
            }
        };

        let breaker = BreakerConfig {
            limit: int(
                "ban_rate_limit",
                args.ban_rate_limit.as_deref(),
                file.ban_rate_limit,
                100,
                1,
            )?,
            window: dur(
                "ban_rate_window",
                args.ban_rate_window.as_deref(),
                file.ban_rate_window.as_deref(),
                "10s",
            )?,
            hard_limit: int(
                "ban_rate_hard_limit",
                args.ban_rate_hard_limit.as_deref(),
                file.ban_rate_hard_limit,
                1000,
                1,
            )?,
        };
        positive("ban_rate_window", breaker.window)?;
        if breaker.hard_limit < breaker.limit {
            return Err(ConfigError::TooSmall {
                key: "ban_rate_hard_limit",
                min: format!("ban_rate_limit ({})", breaker.limit),
                value: breaker.hard_limit.to_string(),
            });
        }
        let offense_memory = dur(
            "offense_memory",
            args.offense_memory.as_deref(),
            file.offense_memory.as_deref(),
            "7d",
        )?;
        let state_dir = pick_path(&args.state_dir, &file.state_dir, paths::STATE_DIR);
        let logs = match &file.logs {
            None => None,
            Some(l) => Some(l.validate(&crate::logs::LogDefaults {
                threshold,
                window,
                ws_paths: ws_paths.clone(),
                state_dir: state_dir.clone(),
                proxy_protocol_from: proxy_protocol_from.clone(),
            })?),
        };

        let crowdsec = file.crowdsec.as_ref().map(|c| c.validate()).transpose()?;

        Ok(Self {
            interfaces,
            xdp_mode: args.xdp_mode.or(file.xdp_mode).unwrap_or(XdpMode::Auto),
            ports,
            ws_paths,
            threshold,
            window,
            ban_ttl,
            ban_max_ttl: max_ttl,
            mode: args.mode.or(file.mode).unwrap_or(Mode::Enforce),
            max_bans,
            allow,
            proxy_protocol_from,
            socket: pick_path(&args.socket, &file.socket, paths::SOCKET),
            state_dir,
            pin_dir: pick_path(&args.pin_dir, &file.pin_dir, paths::PIN_DIR),
            metrics_addr,
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            detach_on_exit: args.detach_on_exit || file.detach_on_exit.unwrap_or(false),
            api_gid,
            breaker,
            offense_memory,
            logs,
            crowdsec,
        })
    }
}

impl FileConfig {
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: shown.clone(),
            err: e.to_string(),
        })?;
        Self::parse(&text).map_err(|err| ConfigError::Parse { path: shown, err })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }
}

fn pick_vec(flag: &[String], file: &Option<Vec<String>>) -> Vec<String> {
    if flag.is_empty() {
        file.clone().unwrap_or_default()
    } else {
        flag.to_vec()
    }
}

fn pick_path(flag: &Option<PathBuf>, file: &Option<PathBuf>, default: &str) -> PathBuf {
    flag.clone()
        .or_else(|| file.clone())
        .unwrap_or_else(|| default.into())
}

fn int<T: TryFrom<i64>>(
    key: &'static str,
    flag: Option<&str>,
    file: Option<i64>,
    default: T,
    min: i64,
) -> Result<T, ConfigError> {
    let (shown, v) = match (flag, file) {
        (Some(s), _) => {
            let v: i64 = s
                .trim()
                .parse()
                .map_err(|_| invalid(key, s, "not a whole number"))?;
            (s.to_owned(), v)
        }
        (None, Some(v)) => (v.to_string(), v),
        (None, None) => return Ok(default),
    };
    if v < min {
        return Err(ConfigError::TooSmall {
            key,
            min: min.to_string(),
            value: shown,
        });
    }
    T::try_from(v).map_err(|_| invalid(key, shown, "too large"))
}

fn dur(
    key: &'static str,
    flag: Option<&str>,
    file: Option<&str>,
    default: &str,
) -> Result<Duration, ConfigError> {
    let s = flag.or(file).unwrap_or(default);
    duration::parse(s).map_err(|e| invalid(key, s, e))
}

fn positive(key: &'static str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::TooSmall {
            key,
            min: "1ms".into(),
            value: "0".into(),
        });
    }
    // The kernel holds the window in u64 nanoseconds; 584 years is plenty but check anyway.
    if u64::try_from(d.as_nanos()).is_err() {
        return Err(invalid(key, duration::human(d), "too large"));
    }
    Ok(())
}

fn parse_ports_str(s: &str) -> Result<Vec<u16>, ConfigError> {
    let mut items = Vec::new();
    for part in s.split(',') {
        let t = part.trim();
        let v: i64 = t
            .parse()
            .map_err(|_| invalid("ports", s, format!("{t:?} is not a port number")))?;
        items.push((t.to_owned(), v));
    }
    check_ports(items.into_iter())
}

fn check_ports(items: impl Iterator<Item = (String, i64)>) -> Result<Vec<u16>, ConfigError> {
    let mut out: Vec<u16> = Vec::new();
    for (shown, v) in items {
        let p = u16::try_from(v)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid("ports", shown, "ports are 1..=65535"))?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        return Err(invalid("ports", "", "at least one port is needed"));
    }
    Ok(out)
}

fn check_paths(paths: &[String]) -> Result<(), ConfigError> {
    if paths.len() > MAX_PATHS {
        return Err(invalid(
            "ws_path",
            paths.join(","),
            format!("at most {MAX_PATHS} prefixes"),
        ));
    }
    for p in paths {
        if !p.starts_with('/') {
            return Err(invalid("ws_path", p, "a path prefix starts with '/'"));
        }
        if p.len() > PATH_LEN {
            return Err(invalid("ws_path", p, format!("at most {PATH_LEN} bytes")));
        }
        if p.bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(invalid(
                "ws_path",
                p,
                "no white space or control characters",
            ));
        }
    }
    Ok(())
}

/// A group name or a numeric gid.
fn resolve_group(g: &str) -> Option<u32> {
    if let Ok(n) = g.trim().parse::<u32>() {
        return Some(n);
    }
    let name = std::ffi::CString::new(g.trim()).ok()?;
    let mut grp: libc::group = unsafe_zeroed_group();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: valid C string, out-struct, buffer and result pointer, sizes as passed.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    (rc == 0 && !out.is_null()).then_some(grp.gr_gid)
}

fn unsafe_zeroed_group() -> libc::group {
    // SAFETY: `struct group` is plain data (ints and pointers); all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// The interface of the IPv4 default route, else of the IPv6 one.
pub fn default_route_iface() -> Option<String> {
    let v4 = std::fs::read_to_string("/proc/net/route").ok();
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").ok();
    v4.as_deref()
        .and_then(default_iface_v4)
        .or_else(|| v6.as_deref().and_then(default_iface_v6))
}

fn default_iface_v4(table: &str) -> Option<String> {
    // Columns: Iface Destination Gateway Flags RefCnt Use Metric Mask ...; lowest metric wins.
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let up = u32::from_str_radix(f.get(3)?, 16).ok()? & 1 != 0;
            let default = *f.get(1)? == "00000000" && *f.get(7)? == "00000000";
            let metric: u32 = f.get(6)?.parse().ok()?;
            (up && default).then(|| (metric, f[0].to_owned()))
        })
        .min()
        .map(|(_, i)| i)
}

fn default_iface_v6(table: &str) -> Option<String> {
    // Columns: dest dest_len src src_len next_hop metric refcnt use flags iface.
    table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let default = f.first()?.bytes().all(|b| b == b'0') && *f.get(1)? == "00";
            let metric = u32::from_str_radix(f.get(5)?, 16).ok()?;
            let iface = *f.get(9)?;
            (default && iface != "lo").then(|| (metric, iface.to_owned()))
        })
        .min()
        .map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AgentArgs,
    }

    fn args(flags: &[&str]) -> AgentArgs {
        let mut v = vec!["wsguard"];
        v.extend_from_slice(flags);
        Cli::try_parse_from(v).unwrap().args
    }

    fn merge(toml: &str, flags: &[&str]) -> Result<AgentConfig, ConfigError> {
        let file = FileConfig::parse(toml).unwrap();
        AgentConfig::merge(&file, &args(flags), || Some("eth9".into()))
    }

    fn err(toml: &str, flags: &[&str]) -> String {
        merge(toml, flags).unwrap_err().to_string()
    }

    #[test]
    fn defaults_match_product() {
        let c = merge("", &[]).unwrap();
        assert_eq!(c.interfaces, ["eth9"]);
        assert_eq!(
            (c.xdp_mode, c.ports.as_slice(), c.threshold),
            (XdpMode::Auto, &[80][..], 20)
        );
        assert_eq!(
            (c.window, c.ban_ttl, c.ban_max_ttl),
            (
                Duration::from_secs(10),
                Duration::from_secs(600),
                Duration::from_secs(86400)
            )
        );
        assert_eq!(
            (c.mode, c.max_bans, c.log_format),
            (Mode::Enforce, 1_000_000, LogFormat::Text)
        );
        assert_eq!(c.socket, PathBuf::from("/run/wsguard/wsguard.sock"));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/wsguard"));
        assert_eq!(c.pin_dir, PathBuf::from("/sys/fs/bpf/wsguard"));
        assert_eq!(c.metrics_addr, Some("0.0.0.0:9477".parse().unwrap()));
        assert!(c.ws_paths.is_empty() && c.allow.is_empty() && !c.detach_on_exit);
        assert!(c.proxy_protocol_from.is_empty());
        assert_eq!((c.api_gid, c.breaker), (None, BreakerConfig::default()));
    }

    #[test]
    fn flags_override_file_override_defaults() {
        let toml = r#"
            iface = ["eth0", "eth1"]
            ports = [80, 8080]
            threshold = 5
            window = "30s"
            mode = "observe"
            metrics_addr = "127.0.0.1:9000"
            allow = ["10.0.0.0/8"]
            ws_path = ["/ws"]
            detach_on_exit = true
            api_group = "0"
            ban_rate_limit = 7
        "#;
        let c = merge(toml, &[]).unwrap();
        assert_eq!(
            (c.interfaces.len(), c.ports.as_slice(), c.threshold),
            (2, &[80, 8080][..], 5)
        );
        assert_eq!(
            (c.mode, c.window, c.api_gid),
            (Mode::Observe, Duration::from_secs(30), Some(0))
        );
        assert_eq!(
            (c.ws_paths.as_slice(), c.detach_on_exit, c.breaker.limit),
            (&["/ws".to_owned()][..], true, 7)
        );
        let c = merge(
            toml,
            &[
                "--iface",
                "veth0",
                "--ports",
                "443, 8443,443",
                "--threshold",
                "9",
                "--mode",
                "enforce",
                "--metrics-addr",
                "off",
                "--allow",
                "192.0.2.0/24",
                "--allow",
                "::ffff:198.51.100.1",
            ],
        )
        .unwrap();
        assert_eq!(
            (c.interfaces.as_slice(), c.ports.as_slice()),
            (&["veth0".to_owned()][..], &[443, 8443][..])
        );
        assert_eq!(
            (c.threshold, c.mode, c.metrics_addr),
            (9, Mode::Enforce, None)
        );
        assert_eq!(
            c.allow,
            [
                "192.0.2.0/24".parse().unwrap(),
                "198.51.100.1".parse().unwrap()
            ]
        );
        assert_eq!(
            c.window,
            Duration::from_secs(30),
            "file value kept where no flag is given"
        );
    }

    #[test]
    fn every_bad_value_names_key_and_value() {
        let cases: &[(&str, &[&str], &str)] = &[
            (
                "",
                &["--ban-ttl", "10x"],
                r#"invalid value for ban_ttl: "10x": invalid duration"#,
            ),
            (
                "",
                &["--window", "soon"],
                r#"invalid value for window: "soon""#,
            ),
            ("", &["--window", "0s"], "window must be >= 1ms, got 0"),
            (
                "",
                &["--ban-max-ttl", "5m"],
                "ban_max_ttl must be >= ban_ttl (10m), got 5m",
            ),
            ("", &["--threshold", "0"], "threshold must be >= 1, got 0"),
            (
                "",
                &["--threshold", "many"],
                r#"invalid value for threshold: "many""#,
            ),
            (
                "",
                &["--threshold", "99999999999"],
                r#"invalid value for threshold: "99999999999": too large"#,
            ),
            ("", &["--max-bans", "0"], "max_bans must be >= 1, got 0"),
            (
                "",
                &["--ports", "80,http"],
                r#"invalid value for ports: "80,http": "http" is not a port number"#,
            ),
            ("", &["--ports", "0"], r#"invalid value for ports: "0""#),
            (
                "",
                &["--ports", "70000"],
                r#"invalid value for ports: "70000""#,
            ),
            (
                "",
                &["--ws-path", "ws"],
                r#"invalid value for ws_path: "ws": a path prefix starts with '/'"#,
            ),
            (
                "",
                &["--allow", "10.0.0.1/8"],
                r#"invalid value for allow: "10.0.0.1/8""#,
            ),
            (
                "",
                &["--allow", "nope"],
                r#"invalid value for allow: "nope""#,
            ),
            (
                "",
                &["--metrics-addr", "localhost"],
                r#"invalid value for metrics_addr: "localhost""#,
            ),
            (
                "",
                &["--iface", "a-name-way-too-long"],
                r#"invalid value for iface: "a-name-way-too-long""#,
            ),
            (
                "",
                &["--api-group", "no-such-group-xyz"],
                r#"invalid value for api_group: "no-such-group-xyz": no such group"#,
            ),
            (
                "",
                &["--ban-rate-limit", "0"],
                "ban_rate_limit must be >= 1, got 0",
            ),
            (
                "",
                &["--ban-rate-limit", "50", "--ban-rate-hard-limit", "10"],
                "ban_rate_hard_limit must be >= ban_rate_limit (50), got 10",
            ),
            ("threshold = 0", &[], "threshold must be >= 1, got 0"),
            (
                "ban_ttl = \"1w\"",
                &[],
                r#"invalid value for ban_ttl: "1w""#,
            ),
            ("ports = [0]", &[], r#"invalid value for ports: "0""#),
            ("max_bans = -1", &[], "max_bans must be >= 1, got -1"),
        ];
        for (toml, flags, want) in cases {
            let got = err(toml, flags);
            assert!(got.contains(want), "{flags:?} {toml}: {got}");
        }
        let long = format!("/{}", "a".repeat(PATH_LEN));
        assert!(err("", &["--ws-path", &long]).contains("at most 64 bytes"));
        let many: Vec<String> = (0..=MAX_PATHS).map(|i| format!("/p{i}")).collect();
        let flags: Vec<&str> = many
            .iter()
            .flat_map(|p| ["--ws-path", p.as_str()])
            .collect();
        assert!(err("", &flags).contains("at most 8 prefixes"));
    }

    #[test]
    fn toml_rejects_unknown_keys_and_wrong_types() {
        let e = FileConfig::parse("thresold = 5").unwrap_err();
        assert!(e.contains("unknown field `thresold`"), "{e}");
        let e = FileConfig::parse("threshold = \"5\"").unwrap_err();
        assert!(e.contains("threshold"), "{e}");
        let e = FileConfig::parse("mode = \"loud\"").unwrap_err();
        assert!(e.contains("loud"), "{e}");
    }

    #[test]
    fn proxy_protocol_from_flags_override_the_file_and_reach_logs() {
        let toml = "proxy_protocol_from = [\"198.18.0.0/24\"]\n\
                    [[logs.sources]]\nname = \"i\"\npaths = [\"/a.log\"]\nformat = \"ingress-nginx\"\n";
        let c = merge(toml, &[]).unwrap();
        let net: Cidr = "198.18.0.0/24".parse().unwrap();
        assert_eq!(c.proxy_protocol_from, [net]);
        assert_eq!(c.logs.unwrap().trusted_proxies, [net]);
        let c = merge(
            toml,
            &[
                "--proxy-protocol-from",
                "198.18.0.5",
                "--proxy-protocol-from",
                "fd00:5753::5",
            ],
        )
        .unwrap();
        assert_eq!(
            c.proxy_protocol_from,
            [
                "198.18.0.5".parse::<Cidr>().unwrap(),
                "fd00:5753::5".parse().unwrap()
            ]
        );
        let e = err("proxy_protocol_from = [\"::/0\"]", &[]);
        assert!(
            e.contains(r#"invalid value for proxy_protocol_from: "::/0""#),
            "{e}"
        );
        let e = err("", &["--proxy-protocol-from", "lb"]);
        assert!(
            e.contains(r#"invalid value for proxy_protocol_from: "lb""#),
            "{e}"
        );
    }

    #[test]
    fn logs_table_is_validated_with_the_agent_defaults() {
        let toml = r#"
            threshold = 7
            window = "30s"
            ws_path = ["/ws"]
            state_dir = "/tmp/wsg"
            [[logs.sources]]
            name = "ingress"
            paths = ["/var/log/ingress.log"]
            format = "ingress-nginx"
        "#;
        let c = merge(toml, &[]).unwrap();
        let l = c.logs.expect("[logs] kept");
        assert_eq!(l.sources.len(), 1);
        assert_eq!(l.state_dir, PathBuf::from("/tmp/wsg/logs"));
        let r = &l.rules[0];
        assert_eq!(
            (r.threshold.count, r.threshold.window),
            (7, Duration::from_secs(30))
        );
        assert_eq!(merge("", &[]).unwrap().logs, None);

        let bad = "[[logs.sources]]\nname = \"x\"\npaths = [\"/a\"]\nformat = \"nginx\"\n\
                   [[logs.rules]]\nname = \"r\"\nstatuses = [400]\nwindow = \"soon\"\n";
        let e = err(bad, &[]);
        assert!(
            e.contains("logs.rules[0].window") && e.contains("soon"),
            "{e}"
        );
        let e = FileConfig::parse("[logs]\nsourcez = []").unwrap_err();
        assert!(e.contains("sourcez"), "{e}");
    }

    #[test]
    fn config_file_errors_name_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("agent.toml");
        std::fs::write(&p, "bogus = 1").unwrap();
        let a = AgentArgs {
            config: Some(p.clone()),
            ..Default::default()
        };
        let e = AgentConfig::load(&a).unwrap_err().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains("bogus"),
            "{e}"
        );
        let a = AgentArgs {
            config: Some(d.path().join("missing.toml")),
            ..Default::default()
        };
        assert!(
            AgentConfig::load(&a)
                .unwrap_err()
                .to_string()
                .contains("cannot read config file")
        );
    }

    #[test]
    fn no_default_route_is_an_error_unless_iface_given() {
        let file = FileConfig::default();
        assert_eq!(
            AgentConfig::merge(&file, &args(&[]), || None),
            Err(ConfigError::NoInterface)
        );
        assert!(AgentConfig::merge(&file, &args(&["--iface", "eth0"]), || None).is_ok());
    }

    #[test]
    fn default_route_tables() {
        let v4 = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
                  eth1\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n\
                  eth2\t00000000\t010200C0\t0003\t0\t0\t200\t00000000\n\
                  eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\n";
        assert_eq!(default_iface_v4(v4).as_deref(), Some("eth0"));
        assert_eq!(default_iface_v4("Iface\tDestination\n"), None);
        let v6 = "fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001     eth0\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth3\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n";
        assert_eq!(default_iface_v6(v6).as_deref(), Some("eth3"));
    }
}
