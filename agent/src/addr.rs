//! Addresses and CIDRs as operators type them. IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is stored as
//! IPv4 (PRODUCT.md), so one source is never banned twice under two spellings.

use ipnet::IpNet;
use std::{fmt, net::IpAddr, str::FromStr};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddrError {
    #[error(
        "invalid address {0:?}: expected an IPv4 or IPv6 address or CIDR, e.g. 198.51.100.7 or 2001:db8::/64"
    )]
    Invalid(String),
    #[error("invalid prefix length in {0:?}: at most /32 for IPv4 and /128 for IPv6")]
    PrefixLen(String),
    #[error("{given:?} has host bits set: did you mean {suggestion}?")]
    HostBits { given: String, suggestion: String },
}

/// An address (full-length prefix) or a network, canonical: no host bits, IPv4-mapped unmapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn host(ip: IpAddr) -> Self {
        let addr = unmap(ip);
        Self {
            addr,
            prefix: max_prefix(&addr),
        }
    }

    /// A network; `addr` must have no host bits beyond `prefix`.
    pub fn new(ip: IpAddr, prefix: u8) -> Result<Self, AddrError> {
        let shown = format!("{ip}/{prefix}");
        let (addr, prefix) = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if prefix >= 96 => (IpAddr::V4(v4), prefix - 96),
                _ => (ip, prefix),
            },
            IpAddr::V4(_) => (ip, prefix),
        };
        let net = IpNet::new(addr, prefix).map_err(|_| AddrError::PrefixLen(shown.clone()))?;
        if net.network() != addr {
            return Err(AddrError::HostBits {
                given: shown,
                suggestion: net.trunc().to_string(),
            });
        }
        Ok(Self { addr, prefix })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    pub fn is_host(&self) -> bool {
        self.prefix == max_prefix(&self.addr)
    }

    pub fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// `/0`: everything. Never bannable.
    pub fn is_everything(&self) -> bool {
        self.prefix == 0
    }

    pub fn net(&self) -> IpNet {
        IpNet::new(self.addr, self.prefix).expect("validated at construction")
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.net().contains(&unmap(*ip))
    }

    /// Whether the two share any address (one contains the other): they agree on the bits of
    /// the shorter prefix. Integer math, as an import asks it for every entry against every
    /// allowlisted network.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let p = self.prefix.min(other.prefix);
        match (self.addr, other.addr) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(p)).unwrap_or(0);
                (u32::from(a) ^ u32::from(b)) & mask == 0
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(p)).unwrap_or(0);
                (u128::from(a) ^ u128::from(b)) & mask == 0
            }
            _ => false,
        }
    }
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn max_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

impl FromStr for Cidr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, AddrError> {
        let t = s.trim();
        match t.split_once('/') {
            None => t
                .parse::<IpAddr>()
                .map(Self::host)
                .map_err(|_| AddrError::Invalid(s.into())),
            Some((a, p)) => {
                let ip: IpAddr = a.parse().map_err(|_| AddrError::Invalid(s.into()))?;
                let prefix: u8 = p.parse().map_err(|_| AddrError::PrefixLen(s.into()))?;
                Self::new(ip, prefix).map_err(|e| match e {
                    AddrError::PrefixLen(_) => AddrError::PrefixLen(s.into()),
                    other => other,
                })
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_host() {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor, not a String: a state file of a million bans parses a million of these.
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Cidr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address or CIDR")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Cidr, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_networks() {
        let h: Cidr = "198.51.100.7".parse().unwrap();
        assert!(h.is_host() && h.is_v4() && h.prefix_len() == 32);
        assert_eq!(h.to_string(), "198.51.100.7");
        let n: Cidr = "2001:db8::/64".parse().unwrap();
        assert_eq!(
            (n.prefix_len(), n.to_string().as_str()),
            (64, "2001:db8::/64")
        );
        assert!(n.contains(&"2001:db8::1".parse().unwrap()));
        assert!(!n.contains(&"2001:db9::1".parse().unwrap()));
    }

    #[test]
    fn ipv4_mapped_is_stored_as_ipv4() {
        let m: Cidr = "::ffff:198.51.100.7".parse().unwrap();
        assert_eq!(m, "198.51.100.7".parse().unwrap());
        let mn: Cidr = "::ffff:198.51.100.0/120".parse().unwrap();
        assert_eq!(mn, "198.51.100.0/24".parse().unwrap());
    }

    #[test]
    fn bad_input_names_the_value() {
        assert_eq!(
            "nope".parse::<Cidr>(),
            Err(AddrError::Invalid("nope".into()))
        );
        assert_eq!(
            "1.2.3.4/33".parse::<Cidr>(),
            Err(AddrError::PrefixLen("1.2.3.4/33".into()))
        );
        assert_eq!(
            "1.2.3.4/x".parse::<Cidr>(),
            Err(AddrError::PrefixLen("1.2.3.4/x".into()))
        );
        let e = "198.51.100.7/24".parse::<Cidr>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"198.51.100.7/24\" has host bits set: did you mean 198.51.100.0/24?"
        );
    }

    #[test]
    fn overlaps_and_everything() {
        let a: Cidr = "10.0.0.0/8".parse().unwrap();
        let b: Cidr = "10.1.2.3".parse().unwrap();
        let c: Cidr = "11.0.0.0/8".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a) && !a.overlaps(&c));
        // Every prefix length, both families, against the network arithmetic it replaces.
        let v6: Cidr = "fd00:5a::1:2".parse().unwrap();
        for p in 0..=128u8 {
            let n = Cidr::new(IpNet::new(v6.addr(), p).unwrap().trunc().addr(), p).unwrap();
            assert!(n.overlaps(&v6) && v6.overlaps(&n), "/{p}");
            let other: Cidr = "fd00:5b::1:2".parse().unwrap();
            let (x, y) = (n.net(), other.net());
            assert_eq!(n.overlaps(&other), x.contains(&y) || y.contains(&x), "/{p}");
        }
        for p in 0..=32u8 {
            let n = Cidr::new(IpNet::new(b.addr(), p).unwrap().trunc().addr(), p).unwrap();
            assert!(n.overlaps(&b), "/{p}");
            assert_eq!(n.overlaps(&c), p <= 7, "/{p}: 10.x and 11.x share 7 bits");
        }
        let v4: Cidr = "198.18.0.1".parse().unwrap();
        assert!(
            !v4.overlaps(&"::/1".parse().unwrap()),
            "families never overlap"
        );
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().is_everything());
        assert!("::/0".parse::<Cidr>().unwrap().is_everything());
    }
}
