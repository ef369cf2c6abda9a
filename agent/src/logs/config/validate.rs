//! `LogsFile` -> `LogsConfig`: every value checked, every error naming its key and value.

use std::{collections::HashSet, net::SocketAddr, path::Path, time::Duration};

use super::{
    Input, JsonFieldsFile, LogDefaults, LogsConfig, LogsConfigError, LogsFile, RuleConfig,
    RuleFile, RuleKind, SourceConfig, SourceFile, StartAt, StatusSpec, bad,
};
use crate::{
    addr::Cidr,
    duration,
    logs::{
        detect::Threshold,
        parse::{Format, JsonFields, PatternMatch, StatusMatch},
    },
};

/// The statuses of the built-in rule: the answers a WebSocket server gives a bad handshake.
pub const DEFAULT_STATUSES: [u16; 3] = [400, 403, 426];

fn name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn int_in(key: String, v: i64, lo: i64, hi: i64) -> Result<i64, LogsConfigError> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(bad(
            key,
            v.to_string(),
            format!("must be between {lo} and {hi}"),
        ))
    }
}

fn dur(key: String, v: &str, min: Duration) -> Result<Duration, LogsConfigError> {
    let d = duration::parse(v).map_err(|e| bad(key.clone(), v, e))?;
    if d < min {
        return Err(bad(
            key,
            v,
            format!("must be at least {}", duration::human(min)),
        ));
    }
    Ok(d)
}

fn status_range(key: &str, s: &StatusSpec) -> Result<(u16, u16), LogsConfigError> {
    let shown = match s {
        StatusSpec::Code(c) => c.to_string(),
        StatusSpec::Text(t) => t.clone(),
    };
    let why = "use a status code (426), a class (4xx) or a range (400-499) within 100-599";
    let err = || bad(key, shown.clone(), why);
    let (lo, hi) = match s {
        StatusSpec::Code(c) => (*c, *c),
        StatusSpec::Text(t) => {
            let t = t.trim();
            if let Some(class) = t.strip_suffix("xx").or_else(|| t.strip_suffix("XX")) {
                let c: i64 = class.parse().map_err(|_| err())?;
                (c * 100, c * 100 + 99)
            } else if let Some((a, b)) = t.split_once('-') {
                let a: i64 = a.trim().parse().map_err(|_| err())?;
                let b: i64 = b.trim().parse().map_err(|_| err())?;
                (a, b)
            } else {
                let c: i64 = t.parse().map_err(|_| err())?;
                (c, c)
            }
        }
    };
    if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
        return Err(err());
    }
    Ok((lo as u16, hi as u16))
}

impl LogsFile {
    pub fn validate(&self, d: &LogDefaults) -> Result<LogsConfig, LogsConfigError> {
        let default_t = Threshold {
            count: d.threshold,
            window: d.window,
        };
        let rules = if self.rules.is_empty() {
            vec![default_rule(d)]
        } else {
            let mut seen = HashSet::new();
            let mut out = Vec::new();
            for (i, r) in self.rules.iter().enumerate() {
                let rule = validate_rule(i, r, default_t)?;
                if !seen.insert(rule.name.clone()) {
                    return Err(bad(
                        format!("logs.rules[{i}].name"),
                        &r.name,
                        "duplicate rule name",
                    ));
                }
                out.push(rule);
            }
            out
        };
        let mut sources = Vec::new();
        let mut names = HashSet::new();
        let mut ports = HashSet::new();
        for (i, s) in self.sources.iter().enumerate() {
            let src = validate_source(i, s, &rules)?;
            if !names.insert(src.name.clone()) {
                return Err(bad(
                    format!("logs.sources[{i}].name"),
                    &s.name,
                    "duplicate source name",
                ));
            }
            if let Input::Syslog(a) = src.input
                && !ports.insert(a)
            {
                return Err(bad(
                    format!("logs.sources[{i}].syslog"),
                    a.to_string(),
                    "another source listens there",
                ));
            }
            sources.push(src);
        }
        let trusted_proxies = match &self.trusted_proxies {
            None => d.proxy_protocol_from.clone(),
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    p.parse::<Cidr>()
                        .map_err(|e| bad(format!("logs.trusted_proxies[{i}]"), p, e))
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let upstream = Threshold {
            count: match self.upstream_error_threshold {
                Some(v) => int_in(
                    "logs.upstream_error_threshold".into(),
                    v,
                    1,
                    u32::MAX.into(),
                )? as u32,
                None => d.threshold,
            },
            window: match &self.upstream_error_window {
                Some(v) => dur(
                    "logs.upstream_error_window".into(),
                    v,
                    Duration::from_millis(1),
                )?,
                None => d.window,
            },
        };
        Ok(LogsConfig {
            sources,
            rules,
            trusted_proxies,
            state_dir: self
                .state_dir
                .clone()
                .unwrap_or_else(|| d.state_dir.join("logs")),
            max_line_len: match self.max_line_len {
                Some(v) => int_in("logs.max_line_len".into(), v, 256, 1 << 20)? as usize,
                None => 16 * 1024,
            },
            poll_interval: match &self.poll_interval {
                Some(v) => {
                    let p = dur("logs.poll_interval".into(), v, Duration::from_millis(10))?;
                    if p > Duration::from_secs(10) {
                        return Err(bad("logs.poll_interval", v, "must be at most 10s"));
                    }
                    p
                }
                None => Duration::from_millis(250),
            },
            upstream,
            max_tracked_sources: match self.max_tracked_sources {
                Some(v) => int_in("logs.max_tracked_sources".into(), v, 1, 10_000_000)? as usize,
                None => 100_000,
            },
        })
    }
}

fn default_rule(d: &LogDefaults) -> RuleConfig {
    RuleConfig {
        name: "bad_handshake".into(),
        kind: RuleKind::Status(StatusMatch {
            statuses: DEFAULT_STATUSES.iter().map(|&s| (s, s)).collect(),
            path_prefixes: d.ws_paths.clone(),
        }),
        threshold: Threshold {
            count: d.threshold,
            window: d.window,
        },
        reason: "bad WebSocket handshakes (status 400/403/426) in access logs".into(),
    }
}

fn validate_rule(i: usize, r: &RuleFile, t: Threshold) -> Result<RuleConfig, LogsConfigError> {
    let k = |f: &str| format!("logs.rules[{i}].{f}");
    if !name_ok(&r.name) {
        return Err(bad(
            k("name"),
            &r.name,
            "use 1-64 letters, digits, '_' or '-'",
        ));
    }
    let kind = match (&r.statuses, &r.pattern) {
        (Some(st), None) => {
            if st.is_empty() {
                return Err(bad(k("statuses"), "[]", "list at least one status"));
            }
            let statuses = st
                .iter()
                .map(|s| status_range(&k("statuses"), s))
                .collect::<Result<Vec<_>, _>>()?;
            if r.ban_on_5xx != Some(true)
                && let Some(&(lo, hi)) = statuses.iter().find(|(_, hi)| *hi >= 500)
            {
                return Err(bad(
                    k("statuses"),
                    if lo == hi {
                        lo.to_string()
                    } else {
                        format!("{}-{hi}", lo.max(500))
                    },
                    "5xx answers are the server's fault and never count against clients; \
                     set ban_on_5xx = true in this rule if you really mean it",
                ));
            }
            let paths = r.paths.clone().unwrap_or_default();
            if let Some(p) = paths.iter().find(|p| !p.starts_with('/')) {
                return Err(bad(k("paths"), p, "a path prefix starts with '/'"));
            }
            RuleKind::Status(StatusMatch {
                statuses,
                path_prefixes: paths,
            })
        }
        (None, Some(p)) => {
            if r.paths.is_some() {
                return Err(bad(k("paths"), "[..]", "paths apply to status rules only"));
            }
            if r.ban_on_5xx.is_some() {
                return Err(bad(k("ban_on_5xx"), "set", "applies to status rules only"));
            }
            PatternMatch::new(p).map_err(|e| bad(k("pattern"), p, e))?;
            RuleKind::Pattern(p.clone())
        }
        (Some(_), Some(_)) => {
            return Err(bad(
                k("pattern"),
                r.pattern.clone().unwrap_or_default(),
                "a rule has either statuses or a pattern, not both",
            ));
        }
        (None, None) => {
            return Err(bad(
                k("statuses"),
                "",
                "a rule needs statuses (access logs) or a pattern (application logs)",
            ));
        }
    };
    let threshold = Threshold {
        count: match r.threshold {
            Some(v) => int_in(k("threshold"), v, 1, u32::MAX.into())? as u32,
            None => t.count,
        },
        window: match &r.window {
            Some(v) => dur(k("window"), v, Duration::from_millis(1))?,
            None => t.window,
        },
    };
    let reason = match &r.reason {
        Some(s) if s.trim().is_empty() => return Err(bad(k("reason"), s, "must not be empty")),
        Some(s) => s.clone(),
        None => format!("log rule {}", r.name),
    };
    Ok(RuleConfig {
        name: r.name.clone(),
        kind,
        threshold,
        reason,
    })
}

fn validate_source(
    i: usize,
    s: &SourceFile,
    rules: &[RuleConfig],
) -> Result<SourceConfig, LogsConfigError> {
    let k = |f: &str| format!("logs.sources[{i}].{f}");
    if !name_ok(&s.name) {
        return Err(bad(
            k("name"),
            &s.name,
            "use 1-64 letters, digits, '_' or '-'",
        ));
    }
    let format = match s.format.as_str() {
        "ingress-nginx" => Format::IngressNginx,
        "combined" => Format::Combined,
        "json" => Format::Json(json_fields(&k("fields"), s.fields.as_ref())?),
        "text" => Format::Text,
        other => {
            return Err(bad(
                k("format"),
                other,
                "use ingress-nginx, combined, json or text",
            ));
        }
    };
    if s.fields.is_some() && !matches!(format, Format::Json(_)) {
        return Err(bad(
            k("fields"),
            &s.format,
            "fields apply to format \"json\" only",
        ));
    }
    let input = match (&s.paths, &s.syslog) {
        (Some(paths), None) => {
            if paths.is_empty() {
                return Err(bad(k("paths"), "[]", "list at least one file or glob"));
            }
            for p in paths {
                if !Path::new(p).is_absolute() || p.contains('\0') {
                    return Err(bad(k("paths"), p, "use an absolute path"));
                }
            }
            Input::Files(paths.clone())
        }
        (None, Some(a)) => {
            let addr: SocketAddr = a.parse().map_err(|_| {
                bad(
                    k("syslog"),
                    a,
                    "use a loopback addr:port, e.g. 127.0.0.1:5140",
                )
            })?;
            if !addr.ip().is_loopback() {
                return Err(bad(
                    k("syslog"),
                    a,
                    "the syslog listener binds to loopback only",
                ));
            }
            Input::Syslog(addr)
        }
        _ => {
            return Err(bad(
                k("paths"),
                &s.name,
                "a source has exactly one of paths and syslog",
            ));
        }
    };
    let start_at = match (s.start_at.as_deref(), &input) {
        (None | Some("end"), _) => StartAt::End,
        (Some("beginning"), Input::Files(_)) => StartAt::Beginning,
        (Some("beginning"), Input::Syslog(_)) => {
            return Err(bad(k("start_at"), "beginning", "applies to files only"));
        }
        (Some(other), _) => return Err(bad(k("start_at"), other, "use end or beginning")),
    };
    let applies = |r: &RuleConfig| match r.kind {
        RuleKind::Status(_) => format.is_access(),
        RuleKind::Pattern(_) => true,
    };
    let picked = match &s.rules {
        None => rules
            .iter()
            .enumerate()
            .filter(|(_, r)| match r.kind {
                RuleKind::Status(_) => format.is_access(),
                RuleKind::Pattern(_) => !format.is_access(),
            })
            .map(|(j, _)| j)
            .collect::<Vec<_>>(),
        Some(names) => {
            let mut v = Vec::new();
            for n in names {
                let j = rules
                    .iter()
                    .position(|r| &r.name == n)
                    .ok_or_else(|| bad(k("rules"), n, "no rule has this name"))?;
                if !applies(&rules[j]) {
                    return Err(bad(
                        k("rules"),
                        n,
                        "a status rule cannot apply to format text",
                    ));
                }
                if !v.contains(&j) {
                    v.push(j);
                }
            }
            v
        }
    };
    if picked.is_empty() {
        return Err(bad(
            k("rules"),
            &s.format,
            "no rule applies to this source (text sources need a pattern rule)",
        ));
    }
    Ok(SourceConfig {
        name: s.name.clone(),
        input,
        format,
        start_at,
        rules: picked,
    })
}

fn json_fields(key: &str, f: Option<&JsonFieldsFile>) -> Result<JsonFields, LogsConfigError> {
    let mut out = JsonFields::default();
    let Some(f) = f else { return Ok(out) };
    for (name, given, slot) in [
        ("client", &f.client, &mut out.client),
        ("status", &f.status, &mut out.status),
        ("path", &f.path, &mut out.path),
        ("request", &f.request, &mut out.request),
        ("forwarded", &f.forwarded, &mut out.forwarded),
        ("upstream", &f.upstream, &mut out.upstream),
    ] {
        if let Some(v) = given {
            if v.is_empty() {
                return Err(bad(
                    format!("{key}.{name}"),
                    v,
                    "a field name must not be empty",
                ));
            }
            *slot = v.clone();
        }
    }
    Ok(out)
}
