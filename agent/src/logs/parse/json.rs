//! JSON access logs (one object per line) with operator-chosen field names, e.g. ingress-nginx
//! with `log-format-escape-json` and a `log-format-upstream` of `{"remote_addr": "$remote_addr",
//! "status": $status, ...}`. A name is looked up as a literal key first, then as a dotted path
//! into nested objects (`http.request.path`).

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::ParseError;

/// Field names. `client` and `status` must be present in every line; the others are optional.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonFields {
    /// The immediate peer's address (`$remote_addr`).
    pub client: String,
    pub status: String,
    /// The request path (`$uri`, `$request_uri`); when absent, `request` is tried.
    pub path: String,
    /// The full request line (`$request`).
    pub request: String,
    /// The forwarded-for header (believed only from a trusted proxy).
    pub forwarded: String,
    pub upstream: String,
}

impl Default for JsonFields {
    fn default() -> Self {
        Self {
            client: "remote_addr".into(),
            status: "status".into(),
            path: "request_uri".into(),
            request: "request".into(),
            forwarded: "http_x_forwarded_for".into(),
            upstream: "upstream_addr".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonRecord<'a> {
    pub peer: Cow<'a, str>,
    pub status: u16,
    pub path: Option<Cow<'a, str>>,
    pub forwarded: Option<Cow<'a, str>>,
    pub upstream: Option<Cow<'a, str>>,
}

fn lookup<'v>(obj: &'v Map<String, Value>, name: &str) -> Option<&'v Value> {
    if let Some(v) = obj.get(name) {
        return Some(v);
    }
    if !name.contains('.') {
        return None;
    }
    let mut cur = obj;
    let mut parts = name.split('.').peekable();
    while let Some(p) = parts.next() {
        let v = cur.get(p)?;
        if parts.peek().is_none() {
            return Some(v);
        }
        cur = v.as_object()?;
    }
    None
}

fn string_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn status_of(v: &Value) -> Result<u16, ParseError> {
    let n = match v {
        Value::Number(n) => n.as_u64().ok_or(ParseError::BadStatus)?,
        Value::String(s) => s.trim().parse::<u64>().map_err(|_| ParseError::BadStatus)?,
        _ => return Err(ParseError::BadStatus),
    };
    if (100..=599).contains(&n) {
        Ok(n as u16)
    } else {
        Err(ParseError::BadStatus)
    }
}

pub fn parse_json<'a>(line: &'a str, f: &JsonFields) -> Result<JsonRecord<'a>, ParseError> {
    let t = line.trim();
    if t.is_empty() {
        return Err(ParseError::Empty);
    }
    if !t.starts_with('{') {
        return Err(ParseError::BadJson);
    }
    let obj: Map<String, Value> = serde_json::from_str(t).map_err(|_| ParseError::BadJson)?;
    let peer = match lookup(&obj, &f.client) {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(ParseError::MissingField),
    };
    let status = status_of(lookup(&obj, &f.status).ok_or(ParseError::MissingField)?)?;
    let opt = |name: &str| {
        lookup(&obj, name)
            .and_then(string_of)
            .filter(|s| !s.is_empty())
    };
    let path = opt(&f.path).or_else(|| {
        let req = opt(&f.request)?;
        super::request_path(&req).map(str::to_owned)
    });
    Ok(JsonRecord {
        peer: Cow::Owned(peer),
        status,
        path: path.map(Cow::Owned),
        forwarded: opt(&f.forwarded).map(Cow::Owned),
        upstream: opt(&f.upstream).map(Cow::Owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_field_names() {
        let line = r#"{"time":"2024-10-10T13:55:36+00:00","remote_addr":"198.51.100.7","request":"GET /ws/chat?x=1 HTTP/1.1","status":426,"http_x_forwarded_for":"-","upstream_addr":"10.244.1.5:8080"}"#;
        let r = parse_json(line, &JsonFields::default()).unwrap();
        assert_eq!(r.peer, "198.51.100.7");
        assert_eq!(r.status, 426);
        assert_eq!(r.path.as_deref(), Some("/ws/chat?x=1"));
        assert_eq!(r.forwarded.as_deref(), Some("-"));
        assert_eq!(r.upstream.as_deref(), Some("10.244.1.5:8080"));
    }

    #[test]
    fn configured_and_nested_field_names() {
        let f = JsonFields {
            client: "client.ip".into(),
            status: "http.status".into(),
            path: "http.path".into(),
            forwarded: "xff".into(),
            ..JsonFields::default()
        };
        let line = r#"{"client":{"ip":"2001:db8::7"},"http":{"status":"403","path":"/ws"},"xff":"203.0.113.9"}"#;
        let r = parse_json(line, &f).unwrap();
        assert_eq!((r.peer.as_ref(), r.status), ("2001:db8::7", 403));
        assert_eq!(r.path.as_deref(), Some("/ws"));
        assert_eq!(r.forwarded.as_deref(), Some("203.0.113.9"));
        // A literal dotted key wins over the nested path.
        let lit =
            r#"{"client.ip":"198.51.100.1","client":{"ip":"198.51.100.2"},"http":{"status":400}}"#;
        assert_eq!(parse_json(lit, &f).unwrap().peer, "198.51.100.1");
    }

    #[test]
    fn malformed_json_lines() {
        let f = JsonFields::default();
        let cases: &[(&str, ParseError)] = &[
            ("", ParseError::Empty),
            ("not json", ParseError::BadJson),
            ("[1,2]", ParseError::BadJson),
            (
                r#"{"remote_addr":"1.2.3.4","status":400"#,
                ParseError::BadJson,
            ),
            (r#"{"status":400}"#, ParseError::MissingField),
            (
                r#"{"remote_addr":7,"status":400}"#,
                ParseError::MissingField,
            ),
            (r#"{"remote_addr":"1.2.3.4"}"#, ParseError::MissingField),
            (
                r#"{"remote_addr":"1.2.3.4","status":"abc"}"#,
                ParseError::BadStatus,
            ),
            (
                r#"{"remote_addr":"1.2.3.4","status":-1}"#,
                ParseError::BadStatus,
            ),
            (
                r#"{"remote_addr":"1.2.3.4","status":4.5}"#,
                ParseError::BadStatus,
            ),
            (
                r#"{"remote_addr":"1.2.3.4","status":70000}"#,
                ParseError::BadStatus,
            ),
            (
                r#"{"remote_addr":"1.2.3.4","status":null}"#,
                ParseError::BadStatus,
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse_json(line, &f).map(|_| ()), Err(*want), "{line:?}");
        }
    }
}
