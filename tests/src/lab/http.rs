//! Just enough HTTP/1.x for the lab's peers: the backend judges request heads, the attackers
//! read the status of an answer, and both must not depend on a library's leniency.

use std::time::Duration;

/// A request head. Header names are lower-cased; repeated headers are joined with ", " the way
/// a proxy would merge them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parse a request head (request line and headers, with or without the final blank line).
pub fn parse_head(raw: &[u8]) -> Option<Head> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path, version) = (first.next()?, first.next()?, first.next()?);
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':')?;
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match headers.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => {
                v.push_str(", ");
                v.push_str(value);
            }
            None => headers.push((name, value.to_owned())),
        }
    }
    Some(Head {
        method: method.into(),
        path: path.into(),
        version: version.into(),
        headers,
    })
}

/// The status code of a response that starts with `HTTP/1.x NNN`.
pub fn response_status(raw: &[u8]) -> Option<u16> {
    let line = raw.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/1."))?;
    parts.next()?.parse().ok()
}

/// `500ms`, `2s`, `1m`, `1h`: the lab's command lines use the operator's notation.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("invalid duration {s:?}: missing unit (ms, s, m, h)"))?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let ms = match unit {
        "ms" => n,
        "s" => n * 1_000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        _ => {
            return Err(format!(
                "invalid duration {s:?}: unit must be ms, s, m or h"
            ));
        }
    };
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_handshake_and_merges_repeated_headers() {
        let raw = b"GET /ws HTTP/1.1\r\nHost: x\r\nconnection:  keep-alive \r\nConnection: Upgrade\r\n\r\n";
        let h = parse_head(raw).unwrap();
        assert_eq!((h.method.as_str(), h.path.as_str()), ("GET", "/ws"));
        assert_eq!(h.header("connection"), Some("keep-alive, Upgrade"));
        assert_eq!(h.header("upgrade"), None);
    }

    #[test]
    fn rejects_what_is_not_http1() {
        assert!(parse_head(b"\x16\x03\x01\x00").is_none());
        assert!(parse_head(b"GET / HTTP/2\r\n\r\n").is_none());
    }

    #[test]
    fn reads_statuses_and_durations() {
        assert_eq!(response_status(b"HTTP/1.1 101 Switching"), Some(101));
        assert_eq!(response_status(b"SSH-2.0"), None);
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
    }
}
