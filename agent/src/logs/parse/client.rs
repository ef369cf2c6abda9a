//! Client addresses: parsing the forms logs write them in, and choosing the client behind
//! trusted proxies.

use std::net::IpAddr;

use ipnet::IpNet;

use super::ParseError;

/// An address as logs write it: `198.51.100.7`, `198.51.100.7:443`, `2001:db8::1`,
/// `[2001:db8::1]:443`, and RFC 7239 `for=` forms (`for="[2001:db8::1]:443"`). IPv4-mapped IPv6
/// is returned as IPv4, so one client never counts under two spellings.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    let mut t = s.trim();
    if let Some(rest) = strip_prefix_ci(t, "for=") {
        t = rest
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('"');
    }
    let ip = if let Some(rest) = t.strip_prefix('[') {
        // `[v6]` or `[v6]:port`
        let (inner, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        inner.parse::<IpAddr>().ok()?
    } else if let Ok(ip) = t.parse::<IpAddr>() {
        ip
    } else {
        // `v4:port` only: a bare v6 address has several colons and parsed above.
        let (a, port) = t.rsplit_once(':')?;
        if !is_port(port) {
            return None;
        }
        IpAddr::V4(a.parse().ok()?)
    };
    Some(unmap(ip))
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

pub fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

pub fn is_trusted(ip: &IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|n| n.contains(ip))
}

/// The client a line should be counted against.
///
/// The peer is believed unless it is a trusted proxy; then the forwarded header is walked from
/// the right (the entry the proxy itself appended) past further trusted proxies, and the first
/// untrusted entry is the client, as nginx's `real_ip_recursive on` does. Entries left of it
/// were written by the client itself and prove nothing. If every entry is a trusted proxy, the
/// leftmost one is taken.
pub fn resolve(
    peer: IpAddr,
    forwarded: Option<&str>,
    trusted: &[IpNet],
) -> Result<IpAddr, ParseError> {
    if !is_trusted(&peer, trusted) {
        return Ok(peer);
    }
    let header = forwarded.map(str::trim).unwrap_or("");
    if header.is_empty() || header == "-" {
        return Err(ParseError::ProxyWithoutForwarded);
    }
    let mut last = None;
    for entry in header.rsplit(',') {
        let ip = parse_ip(entry).ok_or(ParseError::BadForwarded)?;
        if !is_trusted(&ip, trusted) {
            return Ok(ip);
        }
        last = Some(ip);
    }
    last.ok_or(ParseError::BadForwarded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn address_forms() {
        assert_eq!(parse_ip("198.51.100.7"), Some(ip("198.51.100.7")));
        assert_eq!(parse_ip(" 198.51.100.7:443 "), Some(ip("198.51.100.7")));
        assert_eq!(parse_ip("2001:db8::1"), Some(ip("2001:db8::1")));
        assert_eq!(parse_ip("[2001:db8::1]:8080"), Some(ip("2001:db8::1")));
        assert_eq!(parse_ip("[2001:db8::1]"), Some(ip("2001:db8::1")));
        assert_eq!(parse_ip("::ffff:198.51.100.7"), Some(ip("198.51.100.7")));
        assert_eq!(
            parse_ip("For=\"[2001:db8::1]:4711\";proto=https"),
            Some(ip("2001:db8::1"))
        );
        for bad in [
            "",
            "-",
            "unknown",
            "198.51.100.7:",
            "198.51.100.7:abc",
            "198.51.100.7:123456",
            "[2001:db8::1",
            "[2001:db8::1]x",
            "2001:db8::1:99999x",
            "1.2.3",
        ] {
            assert_eq!(parse_ip(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn forwarded_is_only_believed_from_a_trusted_proxy() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = Some("203.0.113.9, 10.1.1.1");
        // An untrusted peer's header is the peer's own claim: ignored.
        assert_eq!(
            resolve(ip("198.51.100.7"), xff, &trusted),
            Ok(ip("198.51.100.7"))
        );
        // A trusted peer: the rightmost untrusted entry, skipping the inner proxy.
        assert_eq!(
            resolve(ip("10.0.0.2"), xff, &trusted),
            Ok(ip("203.0.113.9"))
        );
        // A client cannot hide behind a forged left-most entry.
        assert_eq!(
            resolve(ip("10.0.0.2"), Some("1.1.1.1, 203.0.113.9"), &trusted),
            Ok(ip("203.0.113.9"))
        );
        assert_eq!(
            resolve(ip("10.0.0.2"), Some("10.9.9.9"), &trusted),
            Ok(ip("10.9.9.9"))
        );
        assert_eq!(
            resolve(ip("10.0.0.2"), None, &trusted),
            Err(ParseError::ProxyWithoutForwarded)
        );
        assert_eq!(
            resolve(ip("10.0.0.2"), Some("-"), &trusted),
            Err(ParseError::ProxyWithoutForwarded)
        );
        assert_eq!(
            resolve(ip("10.0.0.2"), Some("203.0.113.9, garbage"), &trusted),
            Err(ParseError::BadForwarded)
        );
        // Nothing trusted: the header never matters.
        assert_eq!(resolve(ip("10.0.0.2"), xff, &[]), Ok(ip("10.0.0.2")));
    }
}
