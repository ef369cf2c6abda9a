//! Bans that mirror CrowdSec LAPI decisions (source `crowdsec`, issue 13). `daemon::lapi`
//! decides their expiry from the decisions it tracks; the policy keeps its rails: the
//! allowlist wins, the cap holds, and a ban of any other source is never taken over.

use super::{Policy, Refusal, src_idx};
use crate::model::{Ban, BanSource};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LapiChange {
    Created(Ban),
    /// Expiry, origin or scenario changed: rewrite it in the kernel.
    Updated(Ban),
    Unchanged,
    /// The address has a ban of another source (found or typed on this node): left alone.
    Local,
}

impl Policy {
    /// Make the `crowdsec` ban of `ban.cidr` exactly `ban` (its expiry, origin, scenario),
    /// creating it if the address has no ban.
    pub fn lapi_set(&mut self, ban: Ban) -> Result<LapiChange, Refusal> {
        debug_assert_eq!(ban.source, BanSource::Crowdsec);
        if let Err(r) = self.check_allowed(&ban.cidr) {
            self.count_refused(r.reason());
            return Err(r);
        }
        let Some(old) = self.get(&ban.cidr) else {
            if self.len() as u64 >= self.cfg.max_bans {
                let r = Refusal::Full {
                    cidr: ban.cidr,
                    max: self.cfg.max_bans,
                };
                self.count_refused(r.reason());
                return Err(r);
            }
            self.restore(ban.clone())?;
            self.counters.created[src_idx(BanSource::Crowdsec)] += 1;
            return Ok(LapiChange::Created(ban));
        };
        if old.source != BanSource::Crowdsec {
            return Ok(LapiChange::Local);
        }
        let new = Ban {
            created_at: old.created_at,
            ..ban
        };
        if new == old {
            return Ok(LapiChange::Unchanged);
        }
        self.restore(new.clone())?;
        Ok(LapiChange::Updated(new))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use time::macros::datetime;

    use super::*;
    use crate::{
        model::Mode,
        policy::{BanRequest, BreakerConfig, PolicyConfig, Ttl},
    };

    fn policy(max: u64) -> Policy {
        let cfg = PolicyConfig {
            ban_ttl: Duration::from_secs(600),
            ban_max_ttl: Duration::from_secs(86400),
            max_bans: max,
            mode: Mode::Enforce,
            breaker: BreakerConfig::default(),
            offense_memory: Duration::from_secs(86400),
        };
        Policy::new(cfg, &["127.0.0.0/8".parse().unwrap()], &[])
    }

    fn lapi(addr: &str, mins: i64) -> Ban {
        let t = datetime!(2030-01-01 00:00 UTC);
        Ban {
            cidr: addr.parse().unwrap(),
            source: BanSource::Crowdsec,
            reason: "cscli: manual".into(),
            mode: Mode::Enforce,
            hard: false,
            created_at: t,
            expires_at: Some(t + time::Duration::minutes(mins)),
            offenses: 0,
            origin: Some("cscli".into()),
            scenario: Some("manual".into()),
        }
    }

    #[test]
    fn creates_updates_and_never_takes_over_a_local_ban() {
        let mut p = policy(2);
        assert!(matches!(
            p.lapi_set(lapi("198.18.1.1", 10)),
            Ok(LapiChange::Created(_))
        ));
        assert_eq!(
            p.lapi_set(lapi("198.18.1.1", 10)),
            Ok(LapiChange::Unchanged)
        );
        assert!(
            matches!(p.lapi_set(lapi("198.18.1.1", 5)), Ok(LapiChange::Updated(b)) if b.expires_at == lapi("198.18.1.1", 5).expires_at)
        );
        let req = BanRequest {
            cidr: "198.18.1.2".parse().unwrap(),
            source: BanSource::Kernel,
            reason: "burst".into(),
            ttl: Ttl::Default,
            observe: false,
            hard: false,
        };
        p.ban(req, datetime!(2030-01-01 00:00 UTC)).unwrap();
        assert_eq!(p.lapi_set(lapi("198.18.1.2", 60)), Ok(LapiChange::Local));
        assert_eq!(
            p.get(&"198.18.1.2".parse().unwrap()).unwrap().source,
            BanSource::Kernel
        );
        assert!(matches!(
            p.lapi_set(lapi("198.18.1.3", 60)),
            Err(Refusal::Full { .. })
        ));
        assert!(matches!(
            p.lapi_set(lapi("127.0.0.1", 60)),
            Err(Refusal::Allowlisted { .. })
        ));
        assert_eq!(p.counters().created[src_idx(BanSource::Crowdsec)], 1);
        assert_eq!(p.active_by_source()[src_idx(BanSource::Crowdsec)], 1);
    }
}
