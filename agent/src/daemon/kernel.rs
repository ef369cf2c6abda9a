//! Translations between the agent's model (wall-clock times) and the kernel's map values
//! (`CLOCK_BOOTTIME` nanoseconds), and the node facts the agent reads from the kernel.

use std::net::{IpAddr, Ipv6Addr};

use time::OffsetDateTime;
use wsguard_common::maps::{BAN_HARD, BAN_OBSERVE, CFG_OBSERVE, CFG_PATH_SCOPE, Config, PATH_LEN};

use crate::{
    addr::Cidr,
    config::AgentConfig,
    model::{Ban, BanSource, Mode},
};
use wsguard_common::maps::BanValue;

/// Both clocks read at (nearly) the same instant.
#[derive(Clone, Copy, Debug)]
pub struct Clocks {
    pub wall: OffsetDateTime,
    pub boot_ns: u64,
}

impl Clocks {
    pub fn now() -> Self {
        Self {
            wall: OffsetDateTime::now_utc(),
            boot_ns: crate::datapath::boot_ns(),
        }
    }

    pub fn boot_of(&self, t: OffsetDateTime) -> u64 {
        let delta = (t - self.wall).whole_nanoseconds();
        let v = i128::from(self.boot_ns) + delta;
        v.clamp(0, i128::from(u64::MAX)) as u64
    }

    pub fn wall_of(&self, ns: u64) -> OffsetDateTime {
        let delta = i128::from(ns) - i128::from(self.boot_ns);
        self.wall + time::Duration::nanoseconds_i128(delta)
    }
}

pub fn ban_value(ban: &Ban, c: &Clocks) -> BanValue {
    let mut flags = 0;
    if ban.mode == Mode::Observe {
        flags |= BAN_OBSERVE;
    }
    if ban.hard {
        flags |= BAN_HARD;
    }
    BanValue {
        // 0 means permanent, so an already-due expiry is pinned to 1ns, which is in the past.
        expires_ns: ban.expires_at.map_or(0, |e| c.boot_of(e).max(1)),
        created_ns: c.boot_of(ban.created_at),
        drops: 0,
        flags,
        _pad: 0,
    }
}

/// The reason of a ban [`adopted_ban`] made.
pub const ADOPTED_REASON: &str = "adopted from pinned maps";

/// A ban found in the pinned maps with nothing known about it: the kernel does not record the
/// source, so it is adopted as `manual` (an operator can see and remove it) with a reason
/// that says where it came from.
/// A kernel entry's expiry (wall clock), mode and hardness.
pub fn timing_of(v: &BanValue, c: &Clocks) -> (Option<OffsetDateTime>, Mode, bool) {
    let mode = if v.flags & BAN_OBSERVE != 0 {
        Mode::Observe
    } else {
        Mode::Enforce
    };
    let expires_at = (v.expires_ns != 0).then(|| c.wall_of(v.expires_ns));
    (expires_at, mode, v.flags & BAN_HARD != 0)
}

pub fn adopted_ban(cidr: Cidr, v: &BanValue, c: &Clocks) -> Ban {
    let (expires_at, mode, hard) = timing_of(v, c);
    Ban {
        cidr,
        source: BanSource::Manual,
        reason: ADOPTED_REASON.into(),
        mode,
        hard,
        created_at: c.wall_of(v.created_ns),
        expires_at,
        offenses: 1,
        origin: None,
        scenario: None,
    }
}

/// The kernel's CONFIG for `cfg`, keeping the CIDR counts the data path maintains.
pub fn kernel_config(cfg: &AgentConfig, current: &Config) -> Config {
    let mut k = Config::new();
    k.cidr_v4 = current.cidr_v4;
    k.cidr_v6 = current.cidr_v6;
    k.window_ns = u64::try_from(cfg.window.as_nanos()).unwrap_or(u64::MAX);
    k.threshold = cfg.threshold;
    if cfg.mode == Mode::Observe {
        k.flags |= CFG_OBSERVE;
    }
    if !cfg.ws_paths.is_empty() {
        k.flags |= CFG_PATH_SCOPE;
    }
    for (i, p) in cfg.ws_paths.iter().enumerate() {
        let b = p.as_bytes();
        let n = b.len().min(PATH_LEN);
        k.paths[i][..n].copy_from_slice(&b[..n]);
        k.path_lens[i] = n as u8;
    }
    k.n_paths = cfg.ws_paths.len() as u32;
    k
}

/// A 16-byte map address (IPv4-mapped for IPv4) as an `IpAddr`, unmapped.
pub fn ip16(a: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(a);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// Every address configured on the node (all interfaces of this network namespace).
pub fn node_addrs() -> Vec<Cidr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        if let Some(ip) = sockaddr_ip(ifa.ifa_addr) {
            let c = Cidr::host(ip);
            if !out.contains(&c) {
                out.push(c);
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: non-null sockaddr from getifaddrs; the family says which larger struct it is.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let sin = &*(sa as *const libc::sockaddr_in);
                Some(IpAddr::from(
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                ))
            }
            libc::AF_INET6 => {
                let sin6 = &*(sa as *const libc::sockaddr_in6);
                Some(IpAddr::from(sin6.sin6_addr.s6_addr))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn clocks_round_trip_and_permanent_is_zero() {
        let c = Clocks {
            wall: datetime!(2030-01-01 00:00:00 UTC),
            boot_ns: 5_000_000_000,
        };
        let t = c.wall + time::Duration::seconds(600);
        assert_eq!(c.boot_of(t), 605_000_000_000);
        assert_eq!(c.wall_of(c.boot_of(t)), t);
        assert_eq!(
            c.boot_of(c.wall - time::Duration::seconds(10)),
            0,
            "clamped at boot"
        );
        let ban = Ban {
            cidr: "198.51.100.7".parse().unwrap(),
            source: BanSource::Kernel,
            reason: String::new(),
            mode: Mode::Observe,
            hard: true,
            created_at: c.wall,
            expires_at: None,
            offenses: 1,
            origin: None,
            scenario: None,
        };
        let v = ban_value(&ban, &c);
        assert_eq!(
            (v.expires_ns, v.created_ns, v.flags),
            (0, 5_000_000_000, BAN_OBSERVE | BAN_HARD)
        );
        let back = adopted_ban(ban.cidr, &v, &c);
        assert_eq!(
            (back.mode, back.hard, back.expires_at, back.created_at),
            (Mode::Observe, true, None, c.wall)
        );
    }

    #[test]
    fn node_addrs_include_loopback() {
        assert!(node_addrs().contains(&"127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn mapped_addresses_unmap() {
        assert_eq!(
            ip16(wsguard_common::maps::v4_mapped([198, 51, 100, 7])),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
    }
}
