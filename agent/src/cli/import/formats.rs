//! Parsing import files: plain lines (with nginx `deny` lines), CSV `addr,ttl,reason`, and
//! JSON in the `ban list` shape. The whole input is parsed before anything is sent, and every
//! bad line is reported with its number.

use serde::Deserialize;
use time::OffsetDateTime;

use crate::{addr::Cidr, api::ImportEntry, duration};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Lines,
    Csv,
    Json,
}

/// Applied to entries that carry no TTL or reason of their own.
#[derive(Clone, Debug, Default)]
pub struct Defaults {
    pub ttl_s: Option<u64>,
    pub reason: Option<String>,
}

/// One entry and where it came from (`line 12`, `entry 3`), for error messages.
#[derive(Clone, Debug)]
pub struct Parsed {
    pub at: String,
    pub cidr: Cidr,
    pub entry: ImportEntry,
    /// An absolute expiry (JSON): `entry.ttl_s` is recomputed from it when the entry is sent,
    /// so a large import does not drift by the time it took.
    pub expires_at: Option<OffsetDateTime>,
}

impl Parsed {
    /// The entry to send `now`.
    pub fn at_time(&self, now: OffsetDateTime) -> ImportEntry {
        let mut e = self.entry.clone();
        if let Some(t) = self.expires_at {
            let d = t - now;
            let s = d.whole_seconds() + i64::from(d.subsec_nanoseconds() > 0);
            e.ttl_s = Some(s.max(1) as u64);
        }
        e
    }
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub entries: Vec<Parsed>,
    /// Lines or entries deliberately left out (nginx directives other than `deny ADDR;`,
    /// expired bans of a JSON export), with why.
    pub skipped: Vec<String>,
}

/// The format `--format` names, else the one the text looks like.
pub fn detect(text: &str) -> Format {
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'));
    match first {
        Some(l) if l.starts_with('[') => Format::Json,
        Some(l) if l.contains(',') => Format::Csv,
        _ => Format::Lines,
    }
}

pub fn parse(text: &str, format: Format, d: &Defaults) -> Result<Outcome, Vec<String>> {
    match format {
        Format::Lines => lines(text, d),
        Format::Csv => csv(text, d),
        Format::Json => json(text, d, OffsetDateTime::now_utc()),
    }
}

fn entry(cidr: Cidr, ttl: Ttl, reason: Option<String>, d: &Defaults) -> ImportEntry {
    let (ttl_s, permanent) = match ttl {
        Ttl::Default => (d.ttl_s, false),
        Ttl::Secs(s) => (Some(s), false),
        Ttl::Permanent => (None, true),
    };
    ImportEntry {
        addr: cidr.to_string(),
        ttl_s,
        permanent,
        reason: reason
            .filter(|r| !r.trim().is_empty())
            .or_else(|| d.reason.clone()),
        observe: false,
        hard: false,
    }
}

#[derive(Clone, Copy)]
enum Ttl {
    Default,
    Secs(u64),
    Permanent,
}

fn is_nginx_deny(l: &str) -> bool {
    l.strip_prefix("deny")
        .is_some_and(|r| r.starts_with([' ', '\t']))
}

/// One address or CIDR per line, `#` comments. If the file holds nginx `deny` directives it is
/// read as an nginx config: only `deny ADDR;` lines count, everything else is skipped.
fn lines(text: &str, d: &Defaults) -> Result<Outcome, Vec<String>> {
    let nginx = text.lines().any(|l| is_nginx_deny(l.trim_start()));
    let mut out = Outcome::default();
    let mut bad = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let l = raw.split('#').next().unwrap_or("").trim();
        if l.is_empty() {
            continue;
        }
        let value = if nginx {
            if !is_nginx_deny(l) {
                out.skipped.push(format!("line {n}: not a deny directive"));
                continue;
            }
            let Some(v) = l["deny".len()..].trim().strip_suffix(';') else {
                bad.push(format!(
                    "line {n}: {l:?}: an nginx deny directive ends with `;`"
                ));
                continue;
            };
            let v = v.trim();
            if v == "all" {
                out.skipped
                    .push(format!("line {n}: `deny all;` is not an address"));
                continue;
            }
            v
        } else {
            l
        };
        match value.parse::<Cidr>() {
            Ok(c) => out.entries.push(Parsed {
                at: format!("line {n}"),
                cidr: c,
                entry: entry(c, Ttl::Default, None, d),
                expires_at: None,
            }),
            Err(e) => bad.push(format!("line {n}: {e}")),
        }
    }
    if bad.is_empty() { Ok(out) } else { Err(bad) }
}

/// Split one CSV record: commas separate, double quotes quote, `""` is a quote.
pub fn csv_fields(line: &str) -> Result<Vec<String>, String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        let cur = fields.last_mut().expect("never empty");
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            ('"', true) => quoted = false,
            ('"', false) if cur.trim().is_empty() => {
                cur.clear();
                quoted = true;
            }
            (',', false) => fields.push(String::new()),
            (c, _) => cur.push(c),
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    Ok(fields)
}

/// `"…"` when the value needs quoting, for export.
pub fn csv_quote(v: &str) -> String {
    if v.contains([',', '"', '\n', '\r']) || v.trim() != v {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_owned()
    }
}

/// `addr,ttl,reason`: TTL empty (the default), `permanent`, or a duration; reason optional.
/// A first line `addr,ttl,reason` is a header.
fn csv(text: &str, d: &Defaults) -> Result<Outcome, Vec<String>> {
    let mut out = Outcome::default();
    let mut bad = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let f = match csv_fields(l) {
            Ok(f) => f,
            Err(e) => {
                bad.push(format!("line {n}: {e}"));
                continue;
            }
        };
        if n == 1 && f[0].trim().eq_ignore_ascii_case("addr") {
            continue;
        }
        if f.len() > 3 {
            bad.push(format!(
                "line {n}: {} fields; expected addr,ttl,reason (quote a reason that holds commas)",
                f.len()
            ));
            continue;
        }
        let cidr = match f[0].trim().parse::<Cidr>() {
            Ok(c) => c,
            Err(e) => {
                bad.push(format!("line {n}: {e}"));
                continue;
            }
        };
        let ttl = match f.get(1).map(|t| t.trim()).unwrap_or("") {
            "" => Ttl::Default,
            t if t.eq_ignore_ascii_case("permanent") => Ttl::Permanent,
            t => match duration::parse(t) {
                Ok(dur) if dur.as_secs() >= 1 => Ttl::Secs(dur.as_secs()),
                Ok(_) => {
                    bad.push(format!("line {n}: TTL {t:?} is shorter than a second"));
                    continue;
                }
                Err(e) => {
                    bad.push(format!(
                        "line {n}: {e} (or `permanent`, or empty for the default)"
                    ));
                    continue;
                }
            },
        };
        out.entries.push(Parsed {
            at: format!("line {n}"),
            cidr,
            entry: entry(cidr, ttl, f.get(2).cloned(), d),
            expires_at: None,
        });
    }
    if bad.is_empty() { Ok(out) } else { Err(bad) }
}

/// An element of a `ban list -o json` array; only `addr` is required.
#[derive(Deserialize)]
struct JsonBan {
    addr: String,
    prefix_len: Option<u8>,
    reason: Option<String>,
    /// Missing: the default TTL; `null`: permanent.
    #[serde(default, deserialize_with = "present")]
    expires_at: Option<Option<String>>,
    mode: Option<crate::model::Mode>,
    #[serde(default)]
    hard: bool,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

fn json(text: &str, d: &Defaults, now: OffsetDateTime) -> Result<Outcome, Vec<String>> {
    let items: Vec<serde_json::Value> =
        serde_json::from_str(text).map_err(|e| vec![format!("not a JSON array of bans: {e}")])?;
    let mut out = Outcome::default();
    let mut bad = Vec::new();
    for (i, v) in items.into_iter().enumerate() {
        let at = format!("entry {}", i + 1);
        let b: JsonBan = match serde_json::from_value(v) {
            Ok(b) => b,
            Err(e) => {
                bad.push(format!("{at}: {e}"));
                continue;
            }
        };
        let text = match b.prefix_len {
            Some(p) => format!("{}/{p}", b.addr),
            None => b.addr.clone(),
        };
        let cidr = match text.parse::<Cidr>() {
            Ok(c) => c,
            Err(e) => {
                bad.push(format!("{at}: {e}"));
                continue;
            }
        };
        let (ttl, expires_at) = match &b.expires_at {
            None => (Ttl::Default, None),
            Some(None) => (Ttl::Permanent, None),
            Some(Some(t)) => match super::super::output::parse_time(t) {
                None => {
                    bad.push(format!("{at}: expires_at {t:?} is not an RFC 3339 time"));
                    continue;
                }
                Some(when) if when <= now => {
                    out.skipped.push(format!("{at}: {cidr} expired at {t}"));
                    continue;
                }
                Some(when) => (Ttl::Secs(1), Some(when)),
            },
        };
        let mut e = entry(cidr, ttl, b.reason, d);
        e.observe = b.mode == Some(crate::model::Mode::Observe);
        e.hard = b.hard;
        let p = Parsed {
            at,
            cidr,
            entry: e,
            expires_at,
        };
        out.entries.push(Parsed {
            entry: p.at_time(now),
            ..p
        });
    }
    if bad.is_empty() { Ok(out) } else { Err(bad) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> Defaults {
        Defaults {
            ttl_s: Some(60),
            reason: Some("waf".into()),
        }
    }

    #[test]
    fn lines_with_comments_and_every_bad_line_numbered() {
        let o = lines("# list\n198.51.100.7\n\n203.0.113.0/24 # net\n", &d()).unwrap();
        assert_eq!(o.entries.len(), 2);
        assert_eq!(o.entries[1].entry.addr, "203.0.113.0/24");
        assert_eq!(o.entries[0].entry.ttl_s, Some(60));
        let e = lines("1.2.3.4\nnope\n1.2.3.4/40\n", &d()).unwrap_err();
        assert_eq!(e.len(), 2);
        assert!(
            e[0].starts_with("line 2: ") && e[0].contains("\"nope\""),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("line 3: ") && e[1].contains("prefix length"),
            "{e:?}"
        );
    }

    #[test]
    fn nginx_deny_lines() {
        let conf = "location / {\n  allow 10.0.0.1;\n  deny 198.51.100.7;\n  deny 2001:db8::/32;\n  deny all;\n}\n";
        let o = lines(conf, &d()).unwrap();
        let addrs: Vec<&str> = o.entries.iter().map(|e| e.entry.addr.as_str()).collect();
        assert_eq!(addrs, ["198.51.100.7", "2001:db8::/32"]);
        assert_eq!(o.skipped.len(), 4);
        let e = lines("deny 1.2.3.4\ndeny 1.2.3.999;\n", &d()).unwrap_err();
        assert!(
            e[0].starts_with("line 1:") && e[1].starts_with("line 2:"),
            "{e:?}"
        );
    }

    #[test]
    fn csv_ttls_reasons_and_quotes() {
        let o = csv(
            "addr,ttl,reason\n198.51.100.7,1h,flood\n203.0.113.0/24,permanent,\"a, b\"\n2001:db8::1,,\n",
            &d(),
        )
        .unwrap();
        let e: Vec<_> = o.entries.iter().map(|p| &p.entry).collect();
        assert_eq!(
            (e[0].ttl_s, e[0].reason.as_deref()),
            (Some(3600), Some("flood"))
        );
        assert!(e[1].permanent && e[1].reason.as_deref() == Some("a, b"));
        assert_eq!(
            (e[2].ttl_s, e[2].reason.as_deref()),
            (Some(60), Some("waf"))
        );
        let bad = csv("1.2.3.4,10x,r\n1.2.3.4,1h,a,b\n", &d()).unwrap_err();
        assert!(
            bad[0].starts_with("line 1:") && bad[0].contains("\"10x\""),
            "{bad:?}"
        );
        assert!(bad[1].starts_with("line 2:"), "{bad:?}");
        assert_eq!(
            csv_fields(&csv_quote("say \"hi\", ok")).unwrap(),
            ["say \"hi\", ok"]
        );
    }

    #[test]
    fn json_ban_list_shape() {
        let now = OffsetDateTime::now_utc();
        let later = (now + time::Duration::seconds(600))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let text = format!(
            r#"[{{"addr":"198.51.100.0","prefix_len":24,"reason":"r","expires_at":"{later}","mode":"observe","hard":true}},
                {{"addr":"2001:db8::1","expires_at":null}},
                {{"addr":"192.0.2.1","expires_at":"2000-01-01T00:00:00Z"}}]"#
        );
        let o = json(&text, &d(), now).unwrap();
        assert_eq!(o.entries.len(), 2);
        let a = &o.entries[0].entry;
        assert_eq!(a.addr, "198.51.100.0/24");
        assert!(a.observe && a.hard && (599..=600).contains(&a.ttl_s.unwrap()));
        assert!(o.entries[1].entry.permanent);
        assert_eq!(o.skipped.len(), 1);
        let e = json(r#"[{"addr":"x"},{"nope":1}]"#, &d(), now).unwrap_err();
        assert!(
            e[0].starts_with("entry 1:") && e[1].starts_with("entry 2:"),
            "{e:?}"
        );
    }

    #[test]
    fn detects_formats() {
        assert_eq!(detect("# x\n[\n]"), Format::Json);
        assert_eq!(detect("addr,ttl,reason\n"), Format::Csv);
        assert_eq!(detect("1.2.3.4\n"), Format::Lines);
        assert_eq!(detect("deny 1.2.3.4;\n"), Format::Lines);
    }
}
