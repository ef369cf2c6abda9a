//! Rate limit and circuit breaker on automatic bans (kernel bursts, log detectors).
//!
//! A storm of distinct sources is more likely a misconfiguration (a broken client release, a
//! NAT'd office, a wrong threshold) than thousands of attackers, so past `limit` new automatic
//! bans per `window` the breaker opens: further automatic bans are created in observe mode
//! (visible, nothing dropped) and an alert is raised. Past `hard_limit` per window they are
//! refused (`rate_limited`) so a storm cannot fill the ban map. The breaker closes once a whole
//! window passes with the rate back under `limit`. Manual and import bans are never limited.

use std::{collections::VecDeque, time::Duration};

use time::OffsetDateTime;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// New automatic bans per window above which the breaker opens.
    pub limit: u32,
    pub window: Duration,
    /// New automatic bans per window above which they are refused.
    pub hard_limit: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            limit: 100,
            window: Duration::from_secs(10),
            hard_limit: 1000,
        }
    }
}

/// What the breaker lets an automatic ban become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Pass,
    /// Create it, but in observe mode.
    Observe,
    Refuse,
}

#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    /// Times of recent attempts, oldest first; never longer than `hard_limit + 1`, which is
    /// all the decisions need, so a storm cannot grow it without bound.
    recent: VecDeque<OffsetDateTime>,
    /// Last time the rate was above `limit`.
    tripped_at: Option<OffsetDateTime>,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            recent: VecDeque::new(),
            tripped_at: None,
        }
    }

    /// Count an attempt to ban a new source automatically and say what it may become.
    pub fn admit(&mut self, now: OffsetDateTime) -> Gate {
        self.prune(now);
        if self.recent.len() > self.cfg.hard_limit as usize {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        let n = self.recent.len();
        if n > self.cfg.limit as usize {
            self.tripped_at = Some(now);
        }
        if n > self.cfg.hard_limit as usize {
            Gate::Refuse
        } else if self.is_open(now) {
            Gate::Observe
        } else {
            Gate::Pass
        }
    }

    pub fn is_open(&self, now: OffsetDateTime) -> bool {
        self.tripped_at.is_some_and(|t| now - t < self.cfg.window)
    }

    fn prune(&mut self, now: OffsetDateTime) {
        while self
            .recent
            .front()
            .is_some_and(|t| now - *t >= self.cfg.window)
        {
            self.recent.pop_front();
        }
    }
}
