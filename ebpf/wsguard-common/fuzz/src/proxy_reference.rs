//! A deliberately plain reference for the PROXY header parser: slices, `split` and the
//! standard library's address parsers and formatters instead of a byte-at-a-time machine. The
//! `proxy` fuzz target and the host tests (`tests/proxy.rs` includes this file) check that both
//! agree on every input.
//!
//! It implements the rules written at the top of `src/proxy.rs`; when they change, change both.
//! "Canonical" is defined here as "what the standard library prints for the parsed value".

use std::net::{Ipv4Addr, Ipv6Addr};
use wsguard_common::{
    maps::{MAX_INSPECT, v4_mapped},
    proxy::{Client, Header, V1_MAX, V2_SIG, Version},
};

pub fn parse(payload: &[u8]) -> Header {
    let data = &payload[..payload.len().min(MAX_INSPECT)];
    if data.is_empty() {
        Header::Absent
    } else if b"PROXY".starts_with(&data[..data.len().min(5)]) {
        v1(data)
    } else if V2_SIG.starts_with(&data[..data.len().min(12)]) {
        v2(data)
    } else {
        Header::Absent
    }
}

fn canonical<T: std::str::FromStr + ToString>(b: &[u8]) -> Option<T> {
    let s = std::str::from_utf8(b).ok()?;
    let v: T = s.parse().ok()?;
    (v.to_string() == s).then_some(v)
}

fn v1(data: &[u8]) -> Header {
    let bad = Header::Malformed {
        version: Version::V1,
    };
    let window = &data[..data.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return bad;
    };
    let Some(line) = window[..lf].strip_suffix(b"\r") else {
        return bad;
    };
    if line.contains(&b'\r') {
        return bad;
    }
    let len = (lf + 1) as u16;
    let Some(rest) = line.strip_prefix(b"PROXY ") else {
        return bad;
    };
    if rest == b"UNKNOWN" || rest.starts_with(b"UNKNOWN ") {
        return Header::Local {
            version: Version::V1,
            len,
        };
    }
    let f: Vec<&[u8]> = rest.split(|&b| b == b' ').collect();
    let [proto, src, dst, sport, _dport] = f[..] else {
        return bad;
    };
    let (Some(port), Some(_)) = (canonical::<u16>(sport), canonical::<u16>(f[4])) else {
        return bad;
    };
    let addr = match proto {
        b"TCP4" => match (canonical::<Ipv4Addr>(src), canonical::<Ipv4Addr>(dst)) {
            (Some(s), Some(_)) => v4_mapped(s.octets()),
            _ => return bad,
        },
        b"TCP6" => match (canonical::<Ipv6Addr>(src), canonical::<Ipv6Addr>(dst)) {
            (Some(s), Some(_)) => s.octets(),
            _ => return bad,
        },
        _ => return bad,
    };
    Header::Client(Client {
        version: Version::V1,
        len,
        addr,
        v6: Ipv6Addr::from(addr).to_ipv4_mapped().is_none(),
        port,
    })
}

fn v2(data: &[u8]) -> Header {
    let bad = Header::Malformed {
        version: Version::V2,
    };
    if data.len() < 16 || data[..12] != V2_SIG {
        return bad;
    }
    let (ver, cmd, fam) = (data[12] >> 4, data[12] & 0xf, data[13]);
    let len = usize::from(u16::from_be_bytes([data[14], data[15]]));
    let total = 16 + len;
    if ver != 2 || total > data.len() || ![0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32].contains(&fam)
    {
        return bad;
    }
    let local = Header::Local {
        version: Version::V2,
        len: total as u16,
    };
    let block = &data[16..total];
    let client = |addr: [u8; 16], port: &[u8]| {
        Header::Client(Client {
            version: Version::V2,
            len: total as u16,
            addr,
            v6: Ipv6Addr::from(addr).to_ipv4_mapped().is_none(),
            port: u16::from_be_bytes([port[0], port[1]]),
        })
    };
    match (cmd, fam) {
        (0, _) => local,
        (1, 0x11) if block.len() >= 12 => {
            client(v4_mapped(block[..4].try_into().unwrap()), &block[8..10])
        }
        (1, 0x21) if block.len() >= 36 => client(block[..16].try_into().unwrap(), &block[32..34]),
        (1, 0x00 | 0x31 | 0x32) => local,
        _ => bad,
    }
}
