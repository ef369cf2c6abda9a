//! Syslog framing, as nginx's `access_log syslog:server=...` sends it (RFC 3164:
//! `<190>Oct 10 13:55:36 host nginx: MESSAGE`) and as RFC 5424 senders do
//! (`<190>1 2024-10-10T13:55:36Z host app - - - MESSAGE`). Only the message is kept; the
//! timestamp and host are not needed because bursts are timed on arrival.

use super::ParseError;

/// The message part of a datagram.
pub fn message(datagram: &str) -> Result<&str, ParseError> {
    let d = datagram.trim_end_matches(['\r', '\n', '\0']);
    let rest = d.strip_prefix('<').ok_or(ParseError::BadSyslog)?;
    let close = rest.find('>').ok_or(ParseError::BadSyslog)?;
    let pri = &rest[..close];
    if pri.is_empty() || pri.len() > 3 || !pri.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::BadSyslog);
    }
    let rest = &rest[close + 1..];
    if let Some(r) = rest.strip_prefix("1 ") {
        return rfc5424(r);
    }
    Ok(rfc3164(rest))
}

/// After `<PRI>1 `: TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA [MSG].
fn rfc5424(s: &str) -> Result<&str, ParseError> {
    let mut rest = s;
    for _ in 0..5 {
        let (tok, r) = rest.split_once(' ').ok_or(ParseError::BadSyslog)?;
        if tok.is_empty() {
            return Err(ParseError::BadSyslog);
        }
        rest = r;
    }
    let rest = skip_structured_data(rest)?;
    let msg = rest.strip_prefix(' ').unwrap_or(rest);
    Ok(msg.strip_prefix('\u{feff}').unwrap_or(msg))
}

fn skip_structured_data(s: &str) -> Result<&str, ParseError> {
    if let Some(r) = s.strip_prefix('-') {
        return Ok(r);
    }
    let b = s.as_bytes();
    let mut i = 0;
    // One or more `[...]` elements; `]`, `"` and `\` are escaped with `\` inside values.
    while b.get(i) == Some(&b'[') {
        let mut in_quotes = false;
        i += 1;
        loop {
            match b.get(i) {
                None => return Err(ParseError::BadSyslog),
                Some(b'\\') => i += 2,
                Some(b'"') => {
                    in_quotes = !in_quotes;
                    i += 1;
                }
                Some(b']') if !in_quotes => {
                    i += 1;
                    break;
                }
                Some(_) => i += 1,
            }
        }
    }
    if i == 0 {
        return Err(ParseError::BadSyslog);
    }
    // `i` is just past an ASCII `]`: a char boundary.
    Ok(&s[i..])
}

/// After `<PRI>`: an optional `Mmm dd hh:mm:ss HOSTNAME `, then an optional `TAG:` / `TAG[pid]:`.
/// RFC 3164 says a header that does not parse is part of the message, so this never fails.
fn rfc3164(s: &str) -> &str {
    let b = s.as_bytes();
    let stamp = b.len() > 16
        && b[..3].iter().all(u8::is_ascii_alphabetic)
        && b[3] == b' '
        && (b[4] == b' ' || b[4].is_ascii_digit())
        && b[5].is_ascii_digit()
        && b[6] == b' '
        && b[7..15].iter().enumerate().all(|(i, c)| {
            if i == 2 || i == 5 {
                *c == b':'
            } else {
                c.is_ascii_digit()
            }
        })
        && b[15] == b' ';
    if !stamp {
        return s;
    }
    let after = &s[16..];
    let Some((_host, rest)) = after.split_once(' ') else {
        return "";
    };
    // A tag is a short run of non-space characters ending in `:` and followed by a space.
    match rest.split_once(' ') {
        Some((tag, msg)) if tag.ends_with(':') && tag.len() <= 48 => msg,
        _ => rest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_rfc3164() {
        let d = "<190>Oct 10 13:55:36 node-1 nginx: 1.2.3.4 - - [t] \"GET / HTTP/1.1\" 400 0\n";
        assert_eq!(message(d), Ok("1.2.3.4 - - [t] \"GET / HTTP/1.1\" 400 0"));
        let pid = "<13>Oct  1 03:04:05 h app[42]: hello world";
        assert_eq!(message(pid), Ok("hello world"));
        // No timestamp: the rest is the message.
        assert_eq!(message("<13>just text"), Ok("just text"));
        assert_eq!(message("<13>Oct 10 13:55:36 host"), Ok(""));
    }

    #[test]
    fn rfc5424() {
        let d = "<165>1 2024-10-10T13:55:36.123Z host app 123 ID47 - \u{feff}the message";
        assert_eq!(message(d), Ok("the message"));
        let sd = r#"<165>1 2024-10-10T13:55:36Z host app - - [ex@1 a="x\]y" b="]"][b@2 c="d"] msg"#;
        assert_eq!(message(sd), Ok("msg"));
        assert_eq!(message("<165>1 - - - - - -"), Ok(""));
    }

    #[test]
    fn bad_framing() {
        for bad in [
            "",
            "no pri",
            "<>x",
            "<1234>x",
            "<1a>x",
            "<13",
            "<165>1 a b c",
            "<165>1 a  b c d - m",
            "<165>1 a b c d e [unterminated",
            "<165>1 a b c d e x",
        ] {
            assert_eq!(message(bad), Err(ParseError::BadSyslog), "{bad:?}");
        }
    }
}
