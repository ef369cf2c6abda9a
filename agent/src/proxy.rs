//! Behind an L4 load balancer (issue 12): the agent's half of the PROXY protocol support. The
//! kernel reads the headers (`wsguard_common::proxy`, the data path's proxy maps); here live
//! the setting that says whose headers are believed, and how the rest of the agent treats the
//! senders it names.
//!
//! `proxy_protocol_from = [CIDR, ...]` (flag `--proxy-protocol-from`, repeatable) lists the
//! trusted PROXY senders. Decisions where the issue is silent:
//! - A value that is not an address or CIDR, or a `/0` (everyone could then choose the address
//!   they are judged by), stops the agent at start naming the key and the value. Duplicates
//!   are kept once. A range wider than a load balancer subnet (IPv4 shorter than /16, IPv6
//!   shorter than /48) is accepted with a warning at start.
//! - Every trusted sender is an allowlist entry with source `proxy` (reason `proxy_protocol_from`):
//!   never dropped, never banned (a manual ban is refused, exit 3, naming the setting), never
//!   charged. `wsguard allow rm` refuses it like a config entry, with the hint to edit the
//!   setting. It is not written to the state file: the config is its only source.
//! - `[logs] trusted_proxies` unset means "the same as `proxy_protocol_from`": the load balancer
//!   the data plane reads PROXY headers from is then also believed for the forwarded header of a
//!   log line (and a line from it naming no client is skipped rather than charged to it). Set,
//!   even to `[]`, it is exactly what `[logs]` says; the load balancer stays allowlisted either
//!   way, so a log burst can never ban it.

use crate::{addr::Cidr, config::ConfigError};

/// The config key (and, with dashes, the flag), as messages name it.
pub const KEY: &str = "proxy_protocol_from";

/// The allowlist reason of a trusted sender: it names the setting that made it.
pub const ALLOW_REASON: &str = "trusted PROXY protocol sender (proxy_protocol_from)";

/// Entries per address family the kernel's trusted-sender tries hold (checked here so that a
/// too long list stops the agent before it touches the kernel).
pub const MAX_PER_FAMILY: usize = 1024;

/// Validate `proxy_protocol_from`.
pub fn trusted_from(raw: &[String]) -> Result<Vec<Cidr>, ConfigError> {
    let mut out: Vec<Cidr> = Vec::with_capacity(raw.len());
    for v in raw {
        let c: Cidr = v.parse().map_err(|e| invalid(v, e))?;
        if c.is_everything() {
            return Err(invalid(
                v,
                "a /0 would believe a PROXY header from anyone, letting every client pick the \
                 address it is judged by; list the load balancers' addresses or subnets",
            ));
        }
        if !out.contains(&c) {
            out.push(c);
        }
    }
    for v4 in [true, false] {
        let n = out.iter().filter(|c| c.is_v4() == v4).count();
        if n > MAX_PER_FAMILY {
            let family = if v4 { "IPv4" } else { "IPv6" };
            return Err(invalid(
                &format!("{n} {family} entries"),
                format!("at most {MAX_PER_FAMILY} per address family; list subnets instead"),
            ));
        }
    }
    Ok(out)
}

/// Entries wider than a typical load balancer subnet (IPv4 shorter than /16, IPv6 shorter
/// than /48): allowed, but the agent warns at start, since any host in them can claim to relay
/// any client.
pub fn wide(cidrs: &[Cidr]) -> Vec<Cidr> {
    cidrs
        .iter()
        .filter(|c| c.prefix_len() < if c.is_v4() { 16 } else { 48 })
        .copied()
        .collect()
}

fn invalid(value: &str, why: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        key: KEY,
        value: value.to_owned(),
        why: why.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[&str]) -> Result<Vec<Cidr>, String> {
        let raw: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        trusted_from(&raw).map_err(|e| e.to_string())
    }

    #[test]
    fn addresses_and_networks_of_both_families() {
        assert_eq!(
            parse(&[
                "198.18.0.5",
                "fd00:5753::/64",
                "198.18.0.5",
                "::ffff:198.18.1.1"
            ])
            .unwrap(),
            ["198.18.0.5", "fd00:5753::/64", "198.18.1.1"]
                .map(|s| s.parse::<Cidr>().unwrap())
                .to_vec()
        );
        assert!(parse(&[]).unwrap().is_empty());
    }

    mod allowlist {
        use std::time::Duration;

        use time::macros::datetime;

        use crate::{
            addr::Cidr,
            model::{AllowSource, BanSource, Mode},
            policy::{
                AllowError, BanRequest, BreakerConfig, Policy, PolicyConfig, RefuseReason, Ttl,
            },
        };

        fn c(s: &str) -> Cidr {
            s.parse().unwrap()
        }

        fn policy() -> Policy {
            let cfg = PolicyConfig {
                ban_ttl: Duration::from_secs(600),
                ban_max_ttl: Duration::from_secs(86400),
                max_bans: 100,
                mode: Mode::Enforce,
                breaker: BreakerConfig::default(),
                offense_memory: Duration::from_secs(86400),
            };
            Policy::new(cfg, &[c("192.0.2.10")], &[c("203.0.113.0/24")])
        }

        fn req(addr: &str, source: BanSource) -> BanRequest {
            BanRequest {
                cidr: c(addr),
                source,
                reason: "test".into(),
                ttl: Ttl::Default,
                observe: false,
                hard: false,
            }
        }

        const T0: time::OffsetDateTime = datetime!(2030-01-01 00:00:00 UTC);

        #[test]
        fn trusted_senders_are_listed_never_banned_and_cannot_be_removed() {
            let mut p = policy();
            assert!(
                p.set_proxy_trust(&[c("198.18.0.5"), c("fd00::/64")])
                    .is_empty()
            );
            let proxies: Vec<_> = p
                .allow_entries()
                .filter(|e| e.source == AllowSource::Proxy)
                .map(|e| (e.cidr, e.reason.as_str()))
                .collect();
            assert_eq!(
                proxies,
                [
                    (c("198.18.0.5"), super::super::ALLOW_REASON),
                    (c("fd00::/64"), super::super::ALLOW_REASON)
                ]
            );
            for (addr, source) in [
                ("198.18.0.5", BanSource::Manual),
                ("198.18.0.5", BanSource::Kernel),
                ("198.18.0.5", BanSource::Log),
                ("198.18.0.0/24", BanSource::Import),
                ("fd00::7", BanSource::Crowdsec),
            ] {
                let e = p.ban(req(addr, source), T0).unwrap_err();
                assert_eq!(e.reason(), RefuseReason::Allowlisted, "{addr}");
                let m = e.to_string();
                assert!(
                    m.contains("proxy_protocol_from") && m.contains("every client behind it"),
                    "{addr}: {m}"
                );
            }
            // A client behind it is bannable as usual.
            p.ban(req("198.18.0.77", BanSource::Kernel), T0).unwrap();
            let e = p.allow_rm(&c("198.18.0.5")).unwrap_err();
            assert_eq!(
                e,
                AllowError::Protected {
                    cidr: c("198.18.0.5"),
                    kind: AllowSource::Proxy
                }
            );
            assert!(e.to_string().contains("proxy_protocol_from"), "{e}");
        }

        #[test]
        fn trusting_a_banned_sender_lifts_its_ban() {
            let mut p = policy();
            p.ban(req("198.18.0.5", BanSource::Kernel), T0).unwrap();
            p.ban(req("198.18.0.6", BanSource::Kernel), T0).unwrap();
            let lifted = p.set_proxy_trust(&[c("198.18.0.5")]);
            assert_eq!(lifted.len(), 1);
            assert_eq!(lifted[0].cidr, c("198.18.0.5"));
            assert!(p.get(&c("198.18.0.5")).is_none());
            assert!(p.get(&c("198.18.0.6")).is_some());
            // Trusting nobody again: the sender is an ordinary source once more.
            assert!(p.set_proxy_trust(&[]).is_empty());
            assert!(p.allow_entries().all(|e| e.source != AllowSource::Proxy));
            p.ban(req("198.18.0.5", BanSource::Manual), T0).unwrap();
        }
    }

    #[test]
    fn at_most_the_kernel_capacity_per_family() {
        let many: Vec<String> = (0..=MAX_PER_FAMILY)
            .map(|i| format!("10.{}.{}.1", i / 256, i % 256))
            .collect();
        let e = trusted_from(&many).unwrap_err().to_string();
        assert!(
            e.contains("proxy_protocol_from") && e.contains("1025 IPv4 entries"),
            "{e}"
        );
        assert!(trusted_from(&many[..MAX_PER_FAMILY]).is_ok());
    }

    #[test]
    fn wide_entries_are_the_ones_warned_about() {
        let c = trusted_from(
            &["10.0.0.0/8", "10.1.0.0/16", "fd00::/32", "fd00:1::/48"].map(String::from),
        )
        .unwrap();
        assert_eq!(wide(&c), [c[0], c[2]]);
    }

    #[test]
    fn bad_values_name_the_key_and_the_value() {
        for (v, why) in [
            ("lb.example", "expected an IPv4 or IPv6 address"),
            ("198.18.0.5/33", "prefix length"),
            ("198.18.0.5/24", "host bits"),
            ("0.0.0.0/0", "a /0"),
            ("::/0", "a /0"),
        ] {
            let e = parse(&["198.18.0.1", v]).unwrap_err();
            assert!(
                e.contains(&format!("invalid value for proxy_protocol_from: {v:?}"))
                    && e.contains(why),
                "{v}: {e}"
            );
        }
    }
}
