//! What the rest of the agent asks of LAPI: publishing this node's bans, `ban rm` deleting
//! in LAPI, and the status and metrics.

use std::sync::{Arc, atomic::Ordering};

use tracing::warn;

use super::{Link, RM_WAIT, delete_in_lapi, lock, ms};
use crate::{
    addr::Cidr,
    api::{ApiError, RemoveResponse},
    crowdsec::{CrowdsecStatusJson, outbox::PushBan, scenario_of},
    daemon::shared::Agent,
    model::{Ban, BanSource, Mode},
};

impl Agent {
    pub(in crate::daemon) fn lapi(&self) -> Option<&Arc<Link>> {
        self.lapi.get()
    }

    /// Queue this node's new or extended bans for publishing (never `crowdsec` ones: no echo).
    pub(in crate::daemon) fn lapi_publish<'a>(&self, bans: impl IntoIterator<Item = &'a Ban>) {
        let Some(link) = self.lapi().filter(|l| l.pushes()) else {
            return;
        };
        let mut queued = 0;
        {
            let mut l = lock(&link.ledger);
            let mut o = lock(&link.outbox);
            for b in bans.into_iter().filter(|b| b.source != BanSource::Crowdsec) {
                let expires = b.expires_at.map(ms);
                let job = PushBan {
                    cidr: b.cidr,
                    scenario: scenario_of(b.source, &b.reason),
                    reason: b.reason.clone(),
                    expires,
                    simulated: b.mode == Mode::Observe,
                };
                if o.push_ban(job) {
                    queued += 1;
                    l.mark_pushed(b.cidr, expires.unwrap_or(i64::MAX));
                } else {
                    link.counters.pushes_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if queued > 0 {
            link.push_wake.notify_one();
            link.save_wake.notify_one();
        }
    }

    /// `ban rm` with `[crowdsec]`: lift here; unless `--local`, delete LAPI's decisions for
    /// the address too (so every node lifts it), or queue the deletion if LAPI is away.
    pub(in crate::daemon) fn lapi_ban_rm(
        &self,
        link: &Link,
        cidrs: Vec<Cidr>,
        local: bool,
    ) -> Result<RemoveResponse, ApiError> {
        let mut resp = RemoveResponse::default();
        let mut to_delete = Vec::new();
        {
            let mut g = self.lock();
            let mut l = lock(&link.ledger);
            let mut o = lock(&link.outbox);
            for c in cidrs {
                let removed = g.remove_ban(&c);
                let ids = l.suppress(&c);
                let pushed = l.was_pushed(&c);
                l.forget_pushed(&c);
                o.drop_bans_of(&c);
                let from_lapi = removed
                    .as_ref()
                    .is_some_and(|b| b.source == BanSource::Crowdsec);
                match removed {
                    Some(_) => resp.removed.push(c.to_string()),
                    None => resp.missing.push(c.to_string()),
                }
                let in_lapi = !ids.is_empty() || pushed;
                if in_lapi && !local && link.pushes() {
                    to_delete.push((c, ids));
                } else if in_lapi && (from_lapi || !ids.is_empty()) {
                    resp.lapi_kept.push(c.to_string());
                }
            }
        }
        if !resp.removed.is_empty() {
            self.mark_dirty();
        }
        link.save_wake.notify_one();
        let rt = tokio::runtime::Handle::try_current().ok();
        for (c, ids) in to_delete {
            let done = rt.as_ref().and_then(|rt| {
                rt.block_on(async {
                    tokio::time::timeout(RM_WAIT, delete_in_lapi(&link.api, &c, &ids))
                        .await
                        .ok()
                })
            });
            match done {
                Some(Ok(n)) => resp.lapi_deleted.push((c.to_string(), n)),
                other => {
                    let why = match other {
                        Some(Err(e)) => e.to_string(),
                        _ => format!("no answer within {RM_WAIT:?}"),
                    };
                    warn!(addr = %c, "cannot delete the ban in LAPI, queued: {why}");
                    lock(&link.outbox).push_delete(c, ids);
                    link.push_wake.notify_one();
                    resp.lapi_queued.push(c.to_string());
                }
            }
        }
        Ok(resp)
    }

    pub(in crate::daemon) fn lapi_status(&self) -> Option<CrowdsecStatusJson> {
        let link = self.lapi()?;
        let enforced = {
            let g = self.lock();
            let i = BanSource::ALL
                .iter()
                .position(|s| *s == BanSource::Crowdsec)
                .expect("in ALL");
            g.policy.active_by_source()[i]
        };
        let tracked = lock(&link.ledger).len() as u64;
        let f = link.counters.facts().clone();
        let (last_pull, last_push, down_since) = f.status();
        Some(CrowdsecStatusJson {
            url: link.cfg().url.shown.clone(),
            up: link.counters.up.load(Ordering::Relaxed),
            last_pull,
            last_push,
            down_since,
            decisions_enforced: enforced,
            decisions_tracked: tracked,
            push: link.pushes(),
            push_queue: link.queue_len(),
            last_error: f.last_error,
        })
    }

    pub(in crate::daemon) fn lapi_metrics(&self) -> Option<crate::crowdsec::CrowdsecMetrics> {
        let link = self.lapi()?;
        Some(link.counters.metrics(link.queue_len()))
    }
}
