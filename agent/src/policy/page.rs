//! Paging through the bans for the API's list (the CLI pages 10k at a time through 1M).

use super::{Policy, store};
use crate::{
    addr::Cidr,
    model::{Ban, BanSource},
};

/// Where the last page ended, so the next one resumes there instead of skipping from the
/// start (listing 1M bans in 10k pages would otherwise walk 50M entries).
#[derive(Clone, Copy, Debug)]
pub(super) struct PageCursor {
    generation: u64,
    source: Option<BanSource>,
    /// Offset (among the bans of `source`) of the ban after `last`.
    next_offset: usize,
    last: Cidr,
}

impl Policy {
    /// Bans in address order, `offset` into those of `source` (every source if `None`), at
    /// most `limit`. Consecutive pages resume where the previous one ended.
    pub fn page(&mut self, source: Option<BanSource>, offset: usize, limit: usize) -> Vec<Ban> {
        let store = &self.bans;
        let keep = |(_, r): &(&Cidr, &store::Rec)| source.is_none_or(|s| store.source(r) == s);
        let it: Box<dyn Iterator<Item = (&Cidr, &store::Rec)>> = match self.cursor {
            Some(c)
                if c.generation == self.generation
                    && c.source == source
                    && c.next_offset == offset =>
            {
                Box::new(store.after(c.last).filter(keep))
            }
            _ => Box::new(store.iter().filter(keep).skip(offset)),
        };
        let page: Vec<Ban> = it.take(limit).map(|(c, r)| store.ban(*c, r)).collect();
        self.cursor = page.last().map(|b| PageCursor {
            generation: self.generation,
            source,
            next_offset: offset + page.len(),
            last: b.cidr,
        });
        page
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

    fn policy(n: u32) -> Policy {
        let cfg = PolicyConfig {
            ban_ttl: Duration::from_secs(600),
            ban_max_ttl: Duration::from_secs(86400),
            max_bans: 100_000,
            mode: Mode::Enforce,
            breaker: BreakerConfig {
                limit: 3,
                window: Duration::from_secs(10),
                hard_limit: 5,
            },
            offense_memory: Duration::from_secs(86400),
        };
        let mut p = Policy::new(cfg, &[], &[]);
        for i in 0..n {
            let source = if i % 3 == 0 {
                BanSource::Import
            } else {
                BanSource::Manual
            };
            let req = BanRequest {
                cidr: format!("198.19.{}.{}", i / 250, i % 250 + 1)
                    .parse()
                    .unwrap(),
                source,
                reason: "t".into(),
                ttl: Ttl::Default,
                observe: false,
                hard: false,
            };
            p.ban(req, datetime!(2030-01-01 00:00 UTC)).unwrap();
        }
        p
    }

    fn skip_take(p: &Policy, source: Option<BanSource>, offset: usize, limit: usize) -> Vec<Cidr> {
        p.bans()
            .filter(|b| source.is_none_or(|s| b.source == s))
            .skip(offset)
            .take(limit)
            .map(|b| b.cidr)
            .collect()
    }

    fn cidrs(v: &[Ban]) -> Vec<Cidr> {
        v.iter().map(|b| b.cidr).collect()
    }

    #[test]
    fn consecutive_pages_equal_skip_and_take() {
        let mut p = policy(1000);
        for source in [None, Some(BanSource::Import), Some(BanSource::Manual)] {
            let mut offset = 0;
            let mut all = Vec::new();
            loop {
                let page = p.page(source, offset, 70);
                assert_eq!(cidrs(&page), skip_take(&p, source, offset, 70));
                if page.is_empty() {
                    break;
                }
                offset += page.len();
                all.extend(cidrs(&page));
            }
            assert_eq!(all, skip_take(&p, source, 0, usize::MAX));
        }
    }

    #[test]
    fn a_change_or_a_jump_between_pages_falls_back_to_skipping() {
        let mut p = policy(300);
        let first = p.page(None, 0, 100);
        assert_eq!(first.len(), 100);
        // A ban removed before the cursor: offsets shift, as with skip/take.
        p.unban(&first[10].cidr);
        assert_eq!(
            cidrs(&p.page(None, 100, 100)),
            skip_take(&p, None, 100, 100)
        );
        // A page out of order, another source, a repeated page.
        assert_eq!(cidrs(&p.page(None, 50, 10)), skip_take(&p, None, 50, 10));
        let s = Some(BanSource::Import);
        assert_eq!(cidrs(&p.page(s, 60, 10)), skip_take(&p, s, 60, 10));
        assert_eq!(cidrs(&p.page(s, 60, 10)), skip_take(&p, s, 60, 10));
        assert!(p.page(None, 10_000, 10).is_empty());
    }
}
