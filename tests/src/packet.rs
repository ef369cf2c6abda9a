//! Crafted Ethernet frames for BPF_PROG_TEST_RUN: TCP or UDP over IPv4 or IPv6, with VLAN
//! tags, IPv4 options and IPv6 extension headers. Checksums are filled in where cheap; the
//! programs under test never check them.

use std::net::IpAddr;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88a8;

#[derive(Clone, Debug)]
pub struct Pkt {
    /// Tag protocol ids, outermost first.
    pub vlans: Vec<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 options (padded to 4 bytes by the builder).
    pub ip_options: Vec<u8>,
    /// IPv6 extension headers: (header type, body after the next-header/length bytes).
    pub ext_headers: Vec<(u8, Vec<u8>)>,
    /// IPv4 flags and fragment offset (8-byte units), as on the wire (IPv6: add a fragment
    /// extension header instead).
    pub frag_offset: u16,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    /// TCP sequence and acknowledgment numbers (1 and 1 unless set).
    pub seq: u32,
    pub ack: u32,
    /// TCP options (padded to 4 bytes by the builder).
    pub tcp_options: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Pkt {
    /// A TCP ACK|PSH segment with no payload between the two addresses.
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self {
            vlans: Vec::new(),
            src: src.parse().expect("valid source address"),
            dst: dst.parse().expect("valid destination address"),
            ip_options: Vec::new(),
            ext_headers: Vec::new(),
            frag_offset: 0,
            proto: IPPROTO_TCP,
            sport,
            dport,
            flags: TCP_ACK | TCP_PSH,
            seq: 1,
            ack: 1,
            tcp_options: Vec::new(),
            payload: Vec::new(),
        }
    }

    pub fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    pub fn ack(mut self, ack: u32) -> Self {
        self.ack = ack;
        self
    }

    pub fn tcp_options(mut self, opts: &[u8]) -> Self {
        self.tcp_options = opts.to_vec();
        self
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self {
            proto: IPPROTO_UDP,
            flags: 0,
            ..Self::tcp(src, sport, dst, dport)
        }
    }

    pub fn flags(mut self, flags: u8) -> Self {
        self.flags = flags;
        self
    }

    pub fn syn(self) -> Self {
        self.flags(TCP_SYN)
    }

    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    pub fn vlan(mut self, tpid: u16) -> Self {
        self.vlans.push(tpid);
        self
    }

    pub fn ip_options(mut self, opts: &[u8]) -> Self {
        self.ip_options = opts.to_vec();
        self
    }

    /// IPv4 fragment: `offset` in 8-byte units, `more` sets More Fragments.
    pub fn fragment(mut self, offset: u16, more: bool) -> Self {
        self.frag_offset = (offset & 0x1fff) | if more { 0x2000 } else { 0 };
        self
    }

    pub fn ext_header(mut self, kind: u8, body: &[u8]) -> Self {
        self.ext_headers.push((kind, body.to_vec()));
        self
    }

    /// The same flow seen from the other side (server -> client).
    pub fn reply(&self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            payload: Vec::new(),
            ..self.clone()
        }
    }

    fn l4(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == IPPROTO_TCP {
            let mut opts = self.tcp_options.clone();
            while !opts.len().is_multiple_of(4) {
                opts.push(0);
            }
            l4.extend_from_slice(&self.seq.to_be_bytes());
            l4.extend_from_slice(&self.ack.to_be_bytes());
            l4.push((((20 + opts.len()) / 4) << 4) as u8); // data offset
            l4.push(self.flags);
            l4.extend_from_slice(&65535u16.to_be_bytes()); // window
            l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
            l4.extend_from_slice(&opts);
        } else {
            l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(&self.payload);
        l4
    }

    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4();
        let mut f = Vec::with_capacity(14 + 8 + 60 + l4.len());
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst mac
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src mac
        let ethertype: u16 = if self.src.is_ipv4() { 0x0800 } else { 0x86dd };
        for tpid in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&[0x00, 0x2a]); // TCI: VLAN 42
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut opts = self.ip_options.clone();
                while !opts.len().is_multiple_of(4) {
                    opts.push(0);
                }
                let ihl = 20 + opts.len();
                let mut h = vec![0x40 | (ihl / 4) as u8, 0];
                h.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
                h.extend_from_slice(&[0x12, 0x34]);
                h.extend_from_slice(&self.frag_offset.to_be_bytes());
                h.extend_from_slice(&[64, self.proto, 0, 0]);
                h.extend_from_slice(&s.octets());
                h.extend_from_slice(&d.octets());
                h.extend_from_slice(&opts);
                let sum = checksum(&h);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                f.extend_from_slice(&h);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut ext = Vec::new();
                let kinds: Vec<u8> = self.ext_headers.iter().map(|(k, _)| *k).collect();
                for (i, (_, body)) in self.ext_headers.iter().enumerate() {
                    let next = kinds.get(i + 1).copied().unwrap_or(self.proto);
                    let mut b = body.clone();
                    let kind = kinds[i];
                    if kind == 44 {
                        // Fragment header: fixed 8 bytes.
                        b.resize(6, 0);
                        ext.push(next);
                        ext.push(0);
                        ext.extend_from_slice(&b);
                    } else {
                        while (b.len() + 2) % 8 != 0 {
                            b.push(0);
                        }
                        ext.push(next);
                        ext.push(((b.len() + 2) / 8 - 1) as u8);
                        ext.extend_from_slice(&b);
                    }
                }
                let first = kinds.first().copied().unwrap_or(self.proto);
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
                f.push(first);
                f.push(64);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                f.extend_from_slice(&ext);
            }
            _ => panic!("source and destination must be the same family"),
        }
        f.extend_from_slice(&l4);
        f
    }
}

/// A TCP segment as a frame carries it, for checking what a program wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 header length, or 40 plus the extension headers for IPv6.
    pub ip_header_len: usize,
    pub ttl: u8,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub tcp_header_len: usize,
    pub window: u16,
    pub payload: Vec<u8>,
    /// Both checksums (IPv4 header, TCP with its pseudo-header) verify.
    pub checksums_ok: bool,
    /// Bytes of the frame past the IP length.
    pub trailer: usize,
}

/// Parse an untagged Ethernet frame holding TCP over IPv4 or IPv6 (no extension headers).
pub fn parse_segment(f: &[u8]) -> Option<Segment> {
    let mac = |o: usize| -> [u8; 6] { f[o..o + 6].try_into().unwrap() };
    if f.len() < 14 {
        return None;
    }
    let (src, dst, ihl, ttl, l4_end, mut ok, pseudo) = match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 => {
            let h = f.get(14..34)?;
            let ihl = usize::from(h[0] & 0xf) * 4;
            if h[9] != IPPROTO_TCP {
                return None;
            }
            let tot = usize::from(u16::from_be_bytes([h[2], h[3]]));
            let s: [u8; 4] = h[12..16].try_into().ok()?;
            let d: [u8; 4] = h[16..20].try_into().ok()?;
            let ok = checksum(f.get(14..14 + ihl)?) == 0;
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&s);
            pseudo.extend_from_slice(&d);
            pseudo.extend_from_slice(&[0, IPPROTO_TCP]);
            pseudo.extend_from_slice(&((tot - ihl) as u16).to_be_bytes());
            (
                IpAddr::from(s),
                IpAddr::from(d),
                ihl,
                h[8],
                14 + tot,
                ok,
                pseudo,
            )
        }
        0x86dd => {
            let h = f.get(14..54)?;
            if h[6] != IPPROTO_TCP {
                return None;
            }
            let plen = usize::from(u16::from_be_bytes([h[4], h[5]]));
            let s: [u8; 16] = h[8..24].try_into().ok()?;
            let d: [u8; 16] = h[24..40].try_into().ok()?;
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&s);
            pseudo.extend_from_slice(&d);
            pseudo.extend_from_slice(&(plen as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_TCP]);
            (
                IpAddr::from(s),
                IpAddr::from(d),
                40,
                h[7],
                54 + plen,
                true,
                pseudo,
            )
        }
        _ => return None,
    };
    let tcp = f.get(14 + ihl..l4_end)?;
    let doff = usize::from(tcp[12] >> 4) * 4;
    let mut all = pseudo;
    all.extend_from_slice(tcp);
    ok &= checksum(&all) == 0;
    Some(Segment {
        dst_mac: mac(0),
        src_mac: mac(6),
        src,
        dst,
        ip_header_len: ihl,
        ttl,
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        seq: u32::from_be_bytes(tcp[4..8].try_into().ok()?),
        ack: u32::from_be_bytes(tcp[8..12].try_into().ok()?),
        flags: tcp[13],
        tcp_header_len: doff,
        window: u16::from_be_bytes([tcp[14], tcp[15]]),
        payload: tcp.get(doff..)?.to_vec(),
        checksums_ok: ok,
        trailer: f.len() - l4_end,
    })
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A valid WebSocket handshake request.
pub fn ws_request(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: ws.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// The incident's bad handshake: no Upgrade header ("invalid Upgrade header: null").
pub fn bad_request(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_layout() {
        let f = Pkt::tcp("198.18.0.1", 40000, "198.18.0.2", 80)
            .payload(b"hi")
            .build();
        assert_eq!(f.len(), 14 + 20 + 20 + 2);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(checksum(&f[14..34]), 0, "header checksum verifies");
        assert_eq!(&f[26..30], &[198, 18, 0, 1]);
    }

    #[test]
    fn ipv6_with_extension_headers() {
        let f = Pkt::tcp("fd00::1", 1, "fd00::2", 80)
            .ext_header(0, &[])
            .ext_header(60, &[])
            .build();
        assert_eq!(f[14 + 6], 0, "first next-header is hop-by-hop");
        assert_eq!(f[14 + 40], 60, "hop-by-hop points at destination options");
        assert_eq!(f[14 + 48], IPPROTO_TCP, "destination options point at TCP");
        assert_eq!(f.len(), 14 + 40 + 16 + 20);
    }

    #[test]
    fn vlan_tags() {
        let f = Pkt::tcp("198.18.0.1", 1, "198.18.0.2", 80)
            .vlan(TPID_8021AD)
            .vlan(TPID_8021Q)
            .build();
        assert_eq!(&f[12..14], &[0x88, 0xa8]);
        assert_eq!(&f[16..18], &[0x81, 0x00]);
        assert_eq!(&f[20..22], &[0x08, 0x00]);
    }
}
