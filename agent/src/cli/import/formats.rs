//! Parsing import files: plain lines (with nginx `deny` lines), CSV `addr,ttl,reason`, and
//! JSON in the `ban list` shape. The whole input is parsed before anything is sent, and every
//! bad line is reported with its number.

use serde::Deserialize;
use time::OffsetDateTime;

use std::collections::HashMap;

use crate::{addr::Cidr, duration};

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

/// Where an entry came from, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    Line(usize),
    Entry(usize),
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            At::Line(n) => write!(f, "line {n}"),
            At::Entry(n) => write!(f, "entry {n}"),
        }
    }
}

/// What entries share: a blocklist of a million addresses has one of these, stored once.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Terms {
    pub ttl_s: Option<u64>,
    pub permanent: bool,
    pub reason: Option<String>,
    pub observe: bool,
    pub hard: bool,
}

/// One entry: its address, its terms (an index into [`Outcome::terms`]) and where it came
/// from. About 48 bytes, so a million-line file costs tens of megabytes, not hundreds.
#[derive(Clone, Copy, Debug)]
pub struct Parsed {
    pub at: At,
    pub cidr: Cidr,
    pub terms: u32,
    /// An absolute expiry (JSON): the TTL is recomputed from it when the entry is sent, so a
    /// large import does not drift by the time it took.
    pub expires_at: Option<OffsetDateTime>,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub entries: Vec<Parsed>,
    pub terms: Vec<Terms>,
    /// Lines or entries deliberately left out (nginx directives other than `deny ADDR;`,
    /// expired bans of a JSON export), with why.
    pub skipped: Vec<String>,
    ids: HashMap<Terms, u32>,
}

impl Outcome {
    fn push(&mut self, at: At, cidr: Cidr, terms: Terms, expires_at: Option<OffsetDateTime>) {
        // Consecutive entries mostly share their terms: found without hashing.
        let id = match self.entries.last() {
            Some(p) if self.terms[p.terms as usize] == terms => p.terms,
            _ => *self.ids.entry(terms).or_insert_with_key(|t| {
                self.terms.push(t.clone());
                (self.terms.len() - 1) as u32
            }),
        };
        self.entries.push(Parsed {
            at,
            cidr,
            terms: id,
            expires_at,
        });
    }

    /// The terms of `p` to send `now`: an absolute expiry becomes the TTL left.
    pub fn terms_at(&self, p: &Parsed, now: OffsetDateTime) -> (&Terms, Option<u64>) {
        let t = &self.terms[p.terms as usize];
        let ttl_s = match p.expires_at {
            Some(when) => {
                let d = when - now;
                let s = d.whole_seconds() + i64::from(d.subsec_nanoseconds() > 0);
                Some(s.max(1) as u64)
            }
            None => t.ttl_s,
        };
        (t, ttl_s)
    }
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

fn terms(ttl: Ttl, reason: Option<String>, d: &Defaults) -> Terms {
    let (ttl_s, permanent) = match ttl {
        Ttl::Default => (d.ttl_s, false),
        Ttl::Secs(s) => (Some(s), false),
        Ttl::Permanent => (None, true),
    };
    Terms {
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
            Ok(c) => out.push(At::Line(n), c, terms(Ttl::Default, None, d), None),
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
        out.push(At::Line(n), cidr, terms(ttl, f.get(2).cloned(), d), None);
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
        let at = At::Entry(i + 1);
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
        let mut t = terms(ttl, b.reason, d);
        t.observe = b.mode == Some(crate::model::Mode::Observe);
        t.hard = b.hard;
        out.push(at, cidr, t, expires_at);
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
        assert_eq!(o.entries[1].cidr.to_string(), "203.0.113.0/24");
        assert_eq!(o.terms[o.entries[0].terms as usize].ttl_s, Some(60));
        assert_eq!(o.terms.len(), 1, "one set of terms for both");
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
        let addrs: Vec<String> = o.entries.iter().map(|e| e.cidr.to_string()).collect();
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
        let e: Vec<_> = o
            .entries
            .iter()
            .map(|p| &o.terms[p.terms as usize])
            .collect();
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
        let (a, ttl_s) = o.terms_at(&o.entries[0], now);
        assert_eq!(o.entries[0].cidr.to_string(), "198.51.100.0/24");
        assert!(a.observe && a.hard && (599..=600).contains(&ttl_s.unwrap()));
        assert!(o.terms_at(&o.entries[1], now).0.permanent);
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
