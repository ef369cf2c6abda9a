//! nginx access-log lines: `combined` (optionally followed by nginx's `main` extra
//! `"$http_x_forwarded_for"`) and the ingress-nginx default format (`upstreaminfo`):
//!
//! ```text
//! $remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent
//! "$http_referer" "$http_user_agent" $request_length $request_time [$proxy_upstream_name]
//! [$proxy_alternative_upstream_name] $upstream_addr $upstream_response_length
//! $upstream_response_time $upstream_status $req_id
//! ```
//!
//! The upstream fields hold lists (`a:80, b:80` or `a:80 : b:80`) when nginx tried several
//! upstreams. Everything is borrowed from the line; nothing is unescaped (nginx writes `"` as
//! `\x22`, or as `\"` with `escape=json`), which path-prefix matching does not need.

use super::ParseError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessRecord<'a> {
    pub peer: &'a str,
    /// The raw request line; `-` or escaped junk for requests nginx could not parse.
    pub request: &'a str,
    pub status: u16,
    /// The trailing `"$http_x_forwarded_for"` of nginx's `main` format, when present.
    pub forwarded: Option<&'a str>,
    /// `$upstream_addr` of the ingress-nginx format (`-` when nginx answered by itself).
    pub upstream: Option<&'a str>,
}

struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    /// Up to the next space (not included), or the end.
    fn token(&mut self) -> Result<&'a str, ParseError> {
        let rest = self.rest();
        let end = rest.find(' ').unwrap_or(rest.len());
        if end == 0 {
            return Err(ParseError::BadFormat);
        }
        self.pos += end;
        Ok(&rest[..end])
    }

    fn space(&mut self) -> Result<(), ParseError> {
        if self.rest().starts_with(' ') {
            self.pos += 1;
            Ok(())
        } else {
            Err(ParseError::BadFormat)
        }
    }

    /// `"..."`, where a backslash escapes the next byte.
    fn quoted(&mut self) -> Result<&'a str, ParseError> {
        let b = self.rest().as_bytes();
        if b.first() != Some(&b'"') {
            return Err(ParseError::BadFormat);
        }
        let mut i = 1;
        while i < b.len() {
            match b[i] {
                b'\\' => i += 2,
                b'"' => {
                    let start = self.pos + 1;
                    self.pos += i + 1;
                    // Both ends sit next to ASCII quotes: always char boundaries.
                    return Ok(&self.s[start..self.pos - 1]);
                }
                _ => i += 1,
            }
        }
        Err(ParseError::BadFormat)
    }

    /// `[...]` (no nesting).
    fn bracketed(&mut self) -> Result<&'a str, ParseError> {
        let rest = self.rest();
        if !rest.starts_with('[') {
            return Err(ParseError::BadFormat);
        }
        let end = rest.find(']').ok_or(ParseError::BadFormat)?;
        self.pos += end + 1;
        Ok(&rest[1..end])
    }
}

fn status(tok: &str) -> Result<u16, ParseError> {
    let b = tok.as_bytes();
    if b.len() != 3 || !b.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::BadStatus);
    }
    let n = u16::from(b[0] - b'0') * 100 + u16::from(b[1] - b'0') * 10 + u16::from(b[2] - b'0');
    if (100..=599).contains(&n) {
        Ok(n)
    } else {
        Err(ParseError::BadStatus)
    }
}

/// The part both formats share, up to and including the user agent.
fn common<'a>(c: &mut Cursor<'a>) -> Result<AccessRecord<'a>, ParseError> {
    let peer = c.token()?;
    c.space()?;
    c.token()?; // `-` (ident)
    c.space()?;
    // $remote_user may be empty only if nginx logged it as `-`; anything up to the time field.
    let rest = c.rest();
    let user_end = rest.find(" [").ok_or(ParseError::BadFormat)?;
    c.pos += user_end + 1;
    c.bracketed()?;
    c.space()?;
    let request = c.quoted()?;
    c.space()?;
    let status = status(c.token()?)?;
    c.space()?;
    c.token()?; // $body_bytes_sent
    c.space()?;
    c.quoted()?; // referer
    c.space()?;
    c.quoted()?; // user agent
    Ok(AccessRecord {
        peer,
        request,
        status,
        forwarded: None,
        upstream: None,
    })
}

fn trim_eol(line: &str) -> &str {
    line.trim_end_matches(['\r', '\n', ' ', '\t'])
}

/// nginx `combined`. Anything after the user agent is allowed (formats that extend
/// `combined`); a quoted field right after it is taken as `$http_x_forwarded_for`, as in
/// nginx's stock `main` format.
pub fn parse_combined(line: &str) -> Result<AccessRecord<'_>, ParseError> {
    let line = trim_eol(line);
    if line.trim_start().is_empty() {
        return Err(ParseError::Empty);
    }
    let mut c = Cursor { s: line, pos: 0 };
    let mut rec = common(&mut c)?;
    if c.rest().starts_with(" \"") {
        c.space()?;
        // Not a complete quoted field: part of whatever the extended format appends.
        rec.forwarded = c.quoted().ok();
    }
    Ok(rec)
}

/// The ingress-nginx default (`upstreaminfo`) format.
pub fn parse_ingress(line: &str) -> Result<AccessRecord<'_>, ParseError> {
    let line = trim_eol(line);
    if line.trim_start().is_empty() {
        return Err(ParseError::Empty);
    }
    let mut c = Cursor { s: line, pos: 0 };
    let mut rec = common(&mut c)?;
    c.space()?;
    c.token()?; // $request_length
    c.space()?;
    c.token()?; // $request_time
    c.space()?;
    c.bracketed()?; // [$proxy_upstream_name]
    c.space()?;
    c.bracketed()?; // [$proxy_alternative_upstream_name]
    c.space()?;
    // addr, response length, response time, upstream status, req id: each maybe a list.
    let mut groups = [""; 5];
    let mut n = 0;
    let mut start: Option<usize> = None;
    let mut cont = false;
    let rest = c.rest();
    let mut end_of_prev = 0;
    for (off, tok) in split_spaces(rest) {
        if cont || tok == ":" {
            cont = tok == ":" || tok.ends_with(',');
            end_of_prev = off + tok.len();
            continue;
        }
        if let Some(s) = start {
            if n == groups.len() {
                return Err(ParseError::BadFormat);
            }
            groups[n] = &rest[s..end_of_prev];
            n += 1;
        }
        start = Some(off);
        end_of_prev = off + tok.len();
        cont = tok.ends_with(',');
    }
    if let Some(s) = start {
        if n == groups.len() {
            return Err(ParseError::BadFormat);
        }
        groups[n] = &rest[s..end_of_prev];
        n += 1;
    }
    // Controllers before v0.20 had no $req_id.
    if n < 4 {
        return Err(ParseError::BadFormat);
    }
    rec.upstream = Some(groups[0]);
    Ok(rec)
}

/// Non-empty space-separated tokens with their byte offsets.
fn split_spaces(s: &str) -> impl Iterator<Item = (usize, &str)> {
    let base = s.as_ptr() as usize;
    s.split(' ')
        .filter(|t| !t.is_empty())
        .map(move |t| (t.as_ptr() as usize - base, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMBINED: &str = r#"198.51.100.7 - - [10/Oct/2024:13:55:36 +0000] "GET /ws/chat HTTP/1.1" 426 16 "-" "python-requests/2.31""#;
    const INGRESS: &str = r#"198.51.100.7 - - [10/Oct/2024:13:55:36 +0000] "GET /ws/chat HTTP/1.1" 400 0 "-" "Go-http-client/1.1" 143 0.002 [default-chat-8080] [] 10.244.1.5:8080 0 0.002 400 6f1c7c0e0bfcd1a0b4b2b9e3c9d5f4a1"#;

    #[test]
    fn combined_fields() {
        let r = parse_combined(COMBINED).unwrap();
        assert_eq!(r.peer, "198.51.100.7");
        assert_eq!(r.request, "GET /ws/chat HTTP/1.1");
        assert_eq!(r.status, 426);
        assert_eq!(r.forwarded, None);
        let extended = format!("{COMBINED} \"unterminated 1 2 3");
        assert_eq!(parse_combined(&extended).unwrap().forwarded, None);
        let main = format!("{COMBINED} \"203.0.113.9, 10.0.0.1\"\r\n");
        assert_eq!(
            parse_combined(&main).unwrap().forwarded,
            Some("203.0.113.9, 10.0.0.1")
        );
        // Escaped quotes inside quoted fields, a user name with a space.
        let esc = r#"::1 - bob smith [t] "GET /a\"b HTTP/1.1" 403 1 "-" "x\"y""#;
        let r = parse_combined(esc).unwrap();
        assert_eq!(
            (r.peer, r.request, r.status),
            ("::1", r#"GET /a\"b HTTP/1.1"#, 403)
        );
    }

    #[test]
    fn ingress_fields_and_upstream_lists() {
        let r = parse_ingress(INGRESS).unwrap();
        assert_eq!((r.peer, r.status), ("198.51.100.7", 400));
        assert_eq!(r.upstream, Some("10.244.1.5:8080"));
        // nginx answered by itself: no upstream.
        let own =
            r#"198.51.100.7 - - [t] "\x16\x03\x01" 400 150 "-" "-" 0 0.000 [] [] - - - - 3f1e"#;
        let r = parse_ingress(own).unwrap();
        assert_eq!(
            (r.request, r.status, r.upstream),
            (r"\x16\x03\x01", 400, Some("-"))
        );
        // Two upstreams tried (`, ` list) and an internal redirect (` : ` list).
        let lists = r#"2001:db8::7 - - [t] "GET /ws HTTP/1.1" 502 0 "-" "ua" 10 1.0 [ns-svc-80] [] 10.0.0.1:80, 10.0.0.2:80 0, 0 0.5, 0.5 502, 502 abc"#;
        let r = parse_ingress(lists).unwrap();
        assert_eq!(r.upstream, Some("10.0.0.1:80, 10.0.0.2:80"));
        assert_eq!(r.status, 502);
        let redirect = r#"1.2.3.4 - - [t] "GET / HTTP/1.1" 200 5 "-" "ua" 10 1.0 [a] [] 10.0.0.1:80 : 10.0.0.2:80 5 : 5 0.1 : 0.2 404 : 200 abc"#;
        assert_eq!(
            parse_ingress(redirect).unwrap().upstream,
            Some("10.0.0.1:80 : 10.0.0.2:80")
        );
    }

    #[test]
    fn malformed_lines_are_errors_not_panics() {
        let cases: &[(&str, ParseError)] = &[
            ("", ParseError::Empty),
            ("   \n", ParseError::Empty),
            ("198.51.100.7", ParseError::BadFormat),
            (
                r#"1.2.3.4 - - [t "GET / HTTP/1.1" 400 0 "-" "-""#,
                ParseError::BadFormat,
            ),
            (
                r#"1.2.3.4 - - [t] "GET / HTTP/1.1 400 0 "-" "-""#,
                ParseError::BadFormat,
            ),
            (
                r#"1.2.3.4 - - [t] "GET / HTTP/1.1" 40x 0 "-" "-""#,
                ParseError::BadStatus,
            ),
            (
                r#"1.2.3.4 - - [t] "GET / HTTP/1.1" 4000 0 "-" "-""#,
                ParseError::BadStatus,
            ),
            (
                r#"1.2.3.4 - - [t] "GET / HTTP/1.1" 099 0 "-" "-""#,
                ParseError::BadStatus,
            ),
            (
                r#"1.2.3.4 - - [t] "GET / HTTP/1.1" 600 0 "-" "-""#,
                ParseError::BadStatus,
            ),
            (
                r#"1.2.3.4 - - [t] "GET / HTTP/1.1" 400 0 "-" "unterminated"#,
                ParseError::BadFormat,
            ),
            (
                r#"1.2.3.4 - - [t] "GET / HTTP/1.1" 400 0 "-" "\"#,
                ParseError::BadFormat,
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse_combined(line).map(|_| ()), Err(*want), "{line:?}");
        }
        // A combined line is not an ingress line; too many upstream groups is not either.
        assert_eq!(parse_ingress(COMBINED), Err(ParseError::BadFormat));
        let extra = format!("{INGRESS} extra");
        assert_eq!(parse_ingress(&extra), Err(ParseError::BadFormat));
        let short = r#"1.2.3.4 - - [t] "GET / HTTP/1.1" 400 0 "-" "ua" 10 1.0 [a] [] - -"#;
        assert_eq!(parse_ingress(short), Err(ParseError::BadFormat));
        // Multi-byte text right before a delimiter must not split a char.
        assert!(parse_combined("é - - [é] \"é\" 400 0 \"é\" \"é").is_err());
        assert!(parse_ingress("é - - [é] \"é\" 400 0 \"é\" \"é\" é é [é] [é] é").is_err());
    }
}
