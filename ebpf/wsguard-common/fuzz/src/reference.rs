//! A deliberately plain reference for the handshake classifier: whole lines, slices and
//! iterators instead of a byte-at-a-time state machine. The fuzz target and the host tests
//! (`tests/classify.rs` includes this file) check that both agree on every input.
//!
//! It implements the rules written at the top of `src/http.rs`; when they change, change both.

use wsguard_common::{
    http::{BadReason, Classification, Verdict},
    maps::{Config, MAX_INSPECT, PATH_LEN},
};

const TCHAR_SPECIALS: &[u8] = b"!#$%&'*+-.^_`|~";

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || TCHAR_SPECIALS.contains(&b)
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn verdict(verdict: Verdict) -> Classification {
    Classification {
        verdict,
        reason: None,
    }
}

enum RequestLine<'a> {
    NotHttp,
    /// A plausible start; the target once it is complete.
    Partial(Option<&'a [u8]>),
    Complete {
        method: &'a [u8],
        target: &'a [u8],
    },
}

/// `line` is everything before the first LF; `complete` says whether that LF was there.
fn request_line(line: &[u8], complete: bool) -> RequestLine<'_> {
    // A CR may only end the line. In a partial line a final CR still waits for its LF.
    let (body, cr) = match line.split_last() {
        Some((b'\r', body)) => (body, true),
        _ => (line, false),
    };
    if body.contains(&b'\r') {
        return RequestLine::NotHttp;
    }
    let ends = complete || cr;
    let mut parts = body.splitn(3, |&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    if method.len() > 16 || !method.iter().all(|&b| is_tchar(b)) {
        return RequestLine::NotHttp;
    }
    let Some(target) = parts.next() else {
        return if ends || method.is_empty() {
            RequestLine::NotHttp
        } else {
            RequestLine::Partial(None)
        };
    };
    if method.is_empty() || !target.iter().all(|&b| b > b' ' && b != 0x7f) {
        return RequestLine::NotHttp;
    }
    let Some(version) = parts.next() else {
        return if ends {
            RequestLine::NotHttp
        } else {
            RequestLine::Partial(None)
        };
    };
    if target.is_empty() || version.len() > 8 {
        return RequestLine::NotHttp;
    }
    let version_ok = version
        .iter()
        .zip(b"HTTP/1.#")
        .all(|(&b, &want)| match want {
            b'#' => b.is_ascii_digit(),
            _ => b == want,
        });
    if !version_ok || (ends && version.len() != 8) {
        return RequestLine::NotHttp;
    }
    if complete {
        RequestLine::Complete { method, target }
    } else {
        RequestLine::Partial(Some(target))
    }
}

#[derive(Default)]
struct Seen {
    upgrade: bool,
    connection: bool,
    key: bool,
    version: bool,
}

fn list_holds(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|e| trim_ows(e).eq_ignore_ascii_case(token))
}

fn header(line: &[u8], seen: &mut Seen) {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return;
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if !name.iter().all(|&b| is_tchar(b)) {
        return;
    }
    let name = name.to_ascii_lowercase();
    match name.as_slice() {
        b"upgrade" => seen.upgrade |= list_holds(value, b"websocket"),
        b"connection" => seen.connection |= list_holds(value, b"upgrade"),
        b"sec-websocket-key" => seen.key |= !trim_ows(value).is_empty(),
        b"sec-websocket-version" => seen.version |= trim_ows(value) == b"13",
        _ => {}
    }
}

/// The verdict for `payload` as the kernel would give it (first [`MAX_INSPECT`] bytes).
pub fn classify(payload: &[u8], cfg: &Config) -> Classification {
    let data = &payload[..payload.len().min(MAX_INSPECT)];
    match data {
        [] | [0x16] => return verdict(Verdict::Incomplete),
        [0x16, 0x03, ..] => return verdict(Verdict::Tls),
        [0x16, ..] => return verdict(Verdict::Ignored),
        _ => {}
    }
    let (line, rest) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let in_scope = |target: &[u8]| cfg.path_in_scope(&target[..target.len().min(PATH_LEN)]);
    let (method, target) = match request_line(line, rest.is_some()) {
        RequestLine::NotHttp => return verdict(Verdict::Ignored),
        RequestLine::Partial(Some(t)) if !in_scope(t) => return verdict(Verdict::Ignored),
        RequestLine::Partial(_) => return verdict(Verdict::Incomplete),
        RequestLine::Complete { method, target } => (method, target),
    };
    let in_scope = in_scope(target);
    let mut rest = rest.unwrap_or_default();
    let mut seen = Seen::default();
    loop {
        let Some(i) = rest.iter().position(|&b| b == b'\n') else {
            let body = rest.strip_suffix(b"\r").unwrap_or(rest);
            let bare_cr = body.contains(&b'\r');
            return verdict(if bare_cr || !in_scope {
                Verdict::Ignored
            } else {
                Verdict::Incomplete
            });
        };
        let line = &rest[..i];
        rest = &rest[i + 1..];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.contains(&b'\r') {
            return verdict(Verdict::Ignored);
        }
        if line.is_empty() {
            break;
        }
        header(line, &mut seen);
    }
    if !in_scope {
        return verdict(Verdict::Ignored);
    }
    let reason = if method != b"GET" {
        BadReason::BadMethod
    } else if !seen.upgrade {
        BadReason::NoUpgrade
    } else if !seen.connection {
        BadReason::NoConnectionUpgrade
    } else if !seen.key {
        BadReason::NoKey
    } else if !seen.version {
        BadReason::BadVersion
    } else {
        return verdict(Verdict::Valid);
    };
    Classification {
        verdict: Verdict::Bad,
        reason: Some(reason),
    }
}
