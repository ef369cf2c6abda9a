//! One line in, the rules it matches and the client each match counts against.

use std::net::IpAddr;

use ipnet::IpNet;
use regex::Regex;

use super::{
    ParseError, access,
    client::{parse_ip, resolve},
    json::{self, JsonFields},
    request_path,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Format {
    /// nginx `combined` (and formats that extend it, such as `main`).
    Combined,
    /// The ingress-nginx default (`upstreaminfo`).
    IngressNginx,
    Json(JsonFields),
    /// Free text (application logs): only pattern rules apply.
    Text,
}

impl Format {
    /// Whether lines carry a status code (status rules apply).
    pub fn is_access(&self) -> bool {
        !matches!(self, Self::Text)
    }
}

/// A status rule: a status in one of the ranges, on a path with one of the prefixes (any path
/// when there are none: the kernel's default scope).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusMatch {
    pub statuses: Vec<(u16, u16)>,
    pub path_prefixes: Vec<String>,
}

impl StatusMatch {
    pub fn matches(&self, status: u16, path: Option<&str>) -> bool {
        self.statuses
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&status))
            && (self.path_prefixes.is_empty()
                || path.is_some_and(|p| self.path_prefixes.iter().any(|x| p.starts_with(x))))
    }
}

/// A pattern rule: a regex over the whole line with a named capture `client`, and optionally
/// `forwarded` (then `client` is the immediate peer and `forwarded` is believed only from a
/// trusted proxy, as for access logs).
#[derive(Clone, Debug)]
pub struct PatternMatch {
    regex: Regex,
    client: usize,
    forwarded: Option<usize>,
}

impl PatternMatch {
    pub fn new(pattern: &str) -> Result<Self, String> {
        let regex = Regex::new(pattern).map_err(|e| e.to_string())?;
        let index = |name: &str| regex.capture_names().position(|n| n == Some(name));
        let client = index("client")
            .ok_or("the pattern needs a named capture for the address: (?P<client>...)")?;
        let forwarded = index("forwarded");
        Ok(Self {
            regex,
            client,
            forwarded,
        })
    }

    pub fn as_str(&self) -> &str {
        self.regex.as_str()
    }
}

#[derive(Clone, Debug)]
pub enum Matcher {
    Status(StatusMatch),
    Pattern(PatternMatch),
}

/// What a line said besides rule hits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub status: Option<u16>,
    /// For 5xx lines: the upstream nginx tried, when the format logs it.
    pub upstream: Option<String>,
}

impl Verdict {
    pub fn is_server_error(&self) -> bool {
        self.status.is_some_and(|s| s >= 500)
    }
}

/// A parser for one source's format with that source's rules (indices into `matchers` are the
/// rule numbers reported in hits).
#[derive(Clone, Debug)]
pub struct LineClassifier {
    pub format: Format,
    pub matchers: Vec<Matcher>,
    pub trusted: Vec<IpNet>,
}

impl LineClassifier {
    /// Parse `line` and push `(matcher index, client)` for every rule it matches onto `hits`
    /// (cleared first). On error `hits` is left empty: a skipped line never counts.
    pub fn classify(
        &self,
        line: &str,
        hits: &mut Vec<(usize, IpAddr)>,
    ) -> Result<Verdict, ParseError> {
        hits.clear();
        let r = self.classify_inner(line, hits);
        if r.is_err() {
            hits.clear();
        }
        r
    }

    fn classify_inner(
        &self,
        line: &str,
        hits: &mut Vec<(usize, IpAddr)>,
    ) -> Result<Verdict, ParseError> {
        let mut verdict = Verdict::default();
        match &self.format {
            Format::Text => {
                if line.trim().is_empty() {
                    return Err(ParseError::Empty);
                }
            }
            Format::Combined | Format::IngressNginx => {
                let rec = match self.format {
                    Format::Combined => access::parse_combined(line)?,
                    _ => access::parse_ingress(line)?,
                };
                let path = request_path(rec.request);
                self.access(rec.peer, rec.status, path, rec.forwarded, hits)?;
                verdict.status = Some(rec.status);
                if rec.status >= 500 {
                    verdict.upstream = rec.upstream.map(str::to_owned);
                }
            }
            Format::Json(fields) => {
                let rec = json::parse_json(line, fields)?;
                let path = rec.path.as_deref();
                self.access(&rec.peer, rec.status, path, rec.forwarded.as_deref(), hits)?;
                verdict.status = Some(rec.status);
                if rec.status >= 500 {
                    verdict.upstream = rec.upstream.map(|u| u.into_owned());
                }
            }
        }
        for (i, m) in self.matchers.iter().enumerate() {
            let Matcher::Pattern(p) = m else { continue };
            let Some(caps) = p.regex.captures(line) else {
                continue;
            };
            let peer = caps
                .get(p.client)
                .and_then(|c| parse_ip(c.as_str()))
                .ok_or(ParseError::BadAddress)?;
            let fwd = p.forwarded.and_then(|f| caps.get(f)).map(|m| m.as_str());
            hits.push((i, resolve(peer, fwd, &self.trusted)?));
        }
        Ok(verdict)
    }

    fn access(
        &self,
        peer: &str,
        status: u16,
        path: Option<&str>,
        forwarded: Option<&str>,
        hits: &mut Vec<(usize, IpAddr)>,
    ) -> Result<(), ParseError> {
        // The peer is checked on every line, matched or not: a line whose address field is not
        // an address is malformed, and the operator should see it counted.
        let peer = parse_ip(peer).ok_or(ParseError::BadAddress)?;
        let mut client = None;
        for (i, m) in self.matchers.iter().enumerate() {
            let Matcher::Status(s) = m else { continue };
            if s.matches(status, path) {
                let c = match client {
                    Some(c) => c,
                    None => *client.insert(resolve(peer, forwarded, &self.trusted)?),
                };
                hits.push((i, c));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ws_4xx() -> Matcher {
        Matcher::Status(StatusMatch {
            statuses: vec![(400, 400), (403, 403), (426, 426)],
            path_prefixes: vec!["/ws".into()],
        })
    }

    fn classifier(format: Format, matchers: Vec<Matcher>) -> LineClassifier {
        LineClassifier {
            format,
            matchers,
            trusted: vec!["10.0.0.0/8".parse().unwrap()],
        }
    }

    fn combined(addr: &str, path: &str, status: u16, xff: &str) -> String {
        format!(r#"{addr} - - [t] "GET {path} HTTP/1.1" {status} 0 "-" "ua" "{xff}""#)
    }

    #[test]
    fn status_rules_match_status_and_path_prefix() {
        let c = classifier(Format::Combined, vec![ws_4xx()]);
        let mut hits = Vec::new();
        let v = c
            .classify(&combined("198.51.100.7", "/ws/chat", 426, "-"), &mut hits)
            .unwrap();
        assert_eq!(v.status, Some(426));
        assert_eq!(hits, vec![(0, ip("198.51.100.7"))]);
        for (path, status) in [("/api", 426), ("/ws", 404), ("/ws", 200), ("/ws", 502)] {
            c.classify(&combined("198.51.100.7", path, status, "-"), &mut hits)
                .unwrap();
            assert!(hits.is_empty(), "{path} {status}");
        }
    }

    #[test]
    fn five_xx_is_an_upstream_error_not_a_hit() {
        let c = classifier(Format::IngressNginx, vec![ws_4xx()]);
        let line = r#"198.51.100.7 - - [t] "GET /ws HTTP/1.1" 503 0 "-" "ua" 1 0.1 [svc] [] 10.244.0.9:8080 0 0.1 503 id"#;
        let mut hits = Vec::new();
        let v = c.classify(line, &mut hits).unwrap();
        assert!(hits.is_empty() && v.is_server_error());
        assert_eq!(v.upstream.as_deref(), Some("10.244.0.9:8080"));
        // An explicit 5xx rule does count.
        let five = Matcher::Status(StatusMatch {
            statuses: vec![(500, 599)],
            path_prefixes: vec![],
        });
        let c = classifier(Format::IngressNginx, vec![ws_4xx(), five]);
        c.classify(line, &mut hits).unwrap();
        assert_eq!(hits, vec![(1, ip("198.51.100.7"))]);
    }

    #[test]
    fn trusted_proxy_and_forwarded_header() {
        let c = classifier(Format::Combined, vec![ws_4xx()]);
        let mut hits = Vec::new();
        c.classify(&combined("10.0.0.5", "/ws", 400, "203.0.113.9"), &mut hits)
            .unwrap();
        assert_eq!(hits, vec![(0, ip("203.0.113.9"))]);
        // From an untrusted peer the header is ignored.
        c.classify(
            &combined("198.51.100.7", "/ws", 400, "203.0.113.9"),
            &mut hits,
        )
        .unwrap();
        assert_eq!(hits, vec![(0, ip("198.51.100.7"))]);
        // A trusted proxy that names nobody: skipped, the proxy is never counted.
        assert_eq!(
            c.classify(&combined("10.0.0.5", "/ws", 400, "-"), &mut hits),
            Err(ParseError::ProxyWithoutForwarded)
        );
        assert!(hits.is_empty());
        assert_eq!(
            c.classify(&combined("nonsense", "/ws", 200, "-"), &mut hits),
            Err(ParseError::BadAddress)
        );
    }

    #[test]
    fn json_lines() {
        let c = classifier(Format::Json(JsonFields::default()), vec![ws_4xx()]);
        let mut hits = Vec::new();
        let line = r#"{"remote_addr":"10.0.0.5","http_x_forwarded_for":"2001:db8::9","status":"403","request_uri":"/ws/x"}"#;
        c.classify(line, &mut hits).unwrap();
        assert_eq!(hits, vec![(0, ip("2001:db8::9"))]);
    }

    #[test]
    fn pattern_rules_capture_the_client() {
        let spring = PatternMatch::new(
            r"Handshake failed due to invalid Upgrade header: null.*remote=(?P<client>[0-9a-fA-F.:\[\]]+)",
        )
        .unwrap();
        let c = classifier(Format::Text, vec![Matcher::Pattern(spring)]);
        let mut hits = Vec::new();
        let line = "2024-10-10 13:55:36.123 ERROR 1 --- [nio-8080-exec-1] o.s.w.s.s.s.DefaultHandshakeHandler : Handshake failed due to invalid Upgrade header: null remote=/198.51.100.7:51234";
        // `/198...` is not captured by the class: no match, not an error.
        c.classify(line, &mut hits).unwrap();
        assert!(hits.is_empty());
        let line = line.replace("remote=/", "remote=");
        c.classify(&line, &mut hits).unwrap();
        assert_eq!(hits, vec![(0, ip("198.51.100.7"))]);
        let bad = "Handshake failed due to invalid Upgrade header: null remote=::::::";
        assert_eq!(c.classify(bad, &mut hits), Err(ParseError::BadAddress));
        assert_eq!(c.classify("  ", &mut hits), Err(ParseError::Empty));
        assert!(
            PatternMatch::new("no capture")
                .unwrap_err()
                .contains("(?P<client>")
        );
        assert!(PatternMatch::new("(unclosed").is_err());
    }
}
