//! PROXY protocol headers as a sender writes them (HAProxy's `doc/proxy-protocol.txt`), built
//! here independently of wsguard's parser so that the tests check it rather than echo it: a
//! lab client that pretends to be a load balancer, and packet tests.

use std::net::{IpAddr, SocketAddr};

/// The 12-byte v2 signature.
pub const V2_SIG: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\r\n`; both ends must be of one family (the
/// v4 side of a mixed pair is written as IPv4-mapped IPv6, as senders do).
pub fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (proto, s, d) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ("TCP4", s.to_string(), d.to_string()),
        (s, d) => ("TCP6", v6(s), v6(d)),
    };
    format!("PROXY {proto} {s} {d} {} {}\r\n", src.port(), dst.port()).into_bytes()
}

fn v6(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().to_string(),
        IpAddr::V6(v6) => v6.to_string(),
    }
}

/// A v2 PROXY header (command PROXY, TCP over the family of `src`) with `tlvs` appended to the
/// address block.
pub fn v2(src: SocketAddr, dst: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let mut block = Vec::new();
    let fam = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            block.extend_from_slice(&s.octets());
            block.extend_from_slice(&d.octets());
            0x11
        }
        (s, d) => {
            for ip in [s, d] {
                let a = match ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                block.extend_from_slice(&a.octets());
            }
            0x21
        }
    };
    block.extend_from_slice(&src.port().to_be_bytes());
    block.extend_from_slice(&dst.port().to_be_bytes());
    block.extend_from_slice(tlvs);
    header(0x21, fam, &block)
}

/// A v2 LOCAL header (the proxy's own connection: a health check), no address block.
pub fn v2_local() -> Vec<u8> {
    header(0x20, 0x00, &[])
}

fn header(ver_cmd: u8, fam: u8, block: &[u8]) -> Vec<u8> {
    let mut h = V2_SIG.to_vec();
    h.push(ver_cmd);
    h.push(fam);
    h.extend_from_slice(&(block.len() as u16).to_be_bytes());
    h.extend_from_slice(block);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_examples() {
        let s: SocketAddr = "192.168.0.1:56324".parse().unwrap();
        let d: SocketAddr = "192.168.0.11:443".parse().unwrap();
        assert_eq!(
            v1(s, d),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
        let s6: SocketAddr = "[fd00::7]:1000".parse().unwrap();
        assert_eq!(
            v1(s6, d),
            b"PROXY TCP6 fd00::7 ::ffff:192.168.0.11 1000 443\r\n".to_vec()
        );
        let h = v2(s, d, &[]);
        assert_eq!(h.len(), 16 + 12);
        assert_eq!(
            (&h[..12], h[12], h[13], &h[14..16]),
            (&V2_SIG[..], 0x21, 0x11, &[0, 12][..])
        );
        assert_eq!(&h[16..20], &[192, 168, 0, 1]);
        assert_eq!(v2(s6, d, &[4, 0, 1, 0]).len(), 16 + 36 + 4);
        assert_eq!(v2_local(), [&V2_SIG[..], &[0x20, 0, 0, 0]].concat());
    }
}
