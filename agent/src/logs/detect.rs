//! Burst detection: per source address per rule, the kernel detector's fixed window (it opens
//! at the first hit, a hit after it has run out opens a new one) and exactly one burst when the
//! count reaches the threshold in a window. 5xx lines are counted per log source in the same
//! way, for the upstream-error burst.
//!
//! Time is passed in by the caller (`Instant`s of arrival), so this is pure logic.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threshold {
    pub count: u32,
    pub window: Duration,
}

#[derive(Clone, Copy, Debug)]
struct Window {
    start: Instant,
    count: u32,
}

impl Window {
    /// Count one hit; `Some(count)` exactly when this hit makes the burst.
    fn hit(&mut self, now: Instant, t: Threshold) -> Option<u32> {
        if now.saturating_duration_since(self.start) >= t.window {
            *self = Window {
                start: now,
                count: 0,
            };
        }
        self.count = self.count.saturating_add(1);
        (self.count == t.count).then_some(self.count)
    }
}

/// What `Detector::hit` did with a hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hit {
    Counted,
    /// This hit completed a burst of `count`.
    Burst(u32),
    /// Too many sources are tracked; the hit was dropped (and counted by the caller).
    TableFull,
}

pub struct Detector {
    rules: Vec<Threshold>,
    tracks: HashMap<(usize, IpAddr), Window>,
    max_tracks: usize,
    upstream: Threshold,
    upstream_window: Option<Window>,
    last_prune: Option<Instant>,
}

impl Detector {
    /// `rules[i]` is the threshold of rule `i`; `max_tracks` bounds memory under a flood of
    /// one-off sources.
    pub fn new(rules: Vec<Threshold>, upstream: Threshold, max_tracks: usize) -> Self {
        Self {
            rules,
            tracks: HashMap::new(),
            max_tracks,
            upstream,
            upstream_window: None,
            last_prune: None,
        }
    }

    pub fn hit(&mut self, rule: usize, addr: IpAddr, now: Instant) -> Hit {
        let t = self.rules[rule];
        if !self.tracks.contains_key(&(rule, addr)) && self.tracks.len() >= self.max_tracks {
            self.prune(now);
            if self.tracks.len() >= self.max_tracks {
                return Hit::TableFull;
            }
        }
        let w = self.tracks.entry((rule, addr)).or_insert(Window {
            start: now,
            count: 0,
        });
        match w.hit(now, t) {
            Some(n) => Hit::Burst(n),
            None => Hit::Counted,
        }
    }

    /// A 5xx line; `Some(count)` when it completes an upstream-error burst.
    pub fn server_error(&mut self, now: Instant) -> Option<u32> {
        let t = self.upstream;
        self.upstream_window
            .get_or_insert(Window {
                start: now,
                count: 0,
            })
            .hit(now, t)
    }

    /// Forget windows that have run out. Cheap to call often: it does the work at most once
    /// per shortest window.
    pub fn maintain(&mut self, now: Instant) {
        let every = self
            .rules
            .iter()
            .map(|t| t.window)
            .min()
            .unwrap_or(Duration::from_secs(1));
        if self
            .last_prune
            .is_none_or(|p| now.saturating_duration_since(p) >= every)
        {
            self.prune(now);
        }
    }

    fn prune(&mut self, now: Instant) {
        let rules = &self.rules;
        self.tracks
            .retain(|(r, _), w| now.saturating_duration_since(w.start) < rules[*r].window);
        self.last_prune = Some(now);
    }

    pub fn tracked(&self) -> usize {
        self.tracks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Threshold = Threshold {
        count: 20,
        window: Duration::from_secs(10),
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_burst_at_the_threshold_per_window() {
        let mut d = Detector::new(vec![T], T, 100);
        let t0 = Instant::now();
        let a = ip("198.51.100.7");
        let ms = Duration::from_millis;
        for i in 0..19 {
            assert_eq!(d.hit(0, a, t0 + ms(i * 100)), Hit::Counted, "hit {i}");
        }
        assert_eq!(d.hit(0, a, t0 + ms(1900)), Hit::Burst(20));
        // The rest of the window never fires again.
        for i in 0..100 {
            assert_eq!(d.hit(0, a, t0 + ms(2000 + i * 50)), Hit::Counted);
        }
        // A new window needs the full threshold again.
        let t1 = t0 + ms(10_000);
        for i in 0..19 {
            assert_eq!(d.hit(0, a, t1 + ms(i)), Hit::Counted);
        }
        assert_eq!(d.hit(0, a, t1 + ms(19)), Hit::Burst(20));
    }

    #[test]
    fn sources_and_rules_are_counted_apart() {
        let small = Threshold {
            count: 2,
            window: Duration::from_secs(10),
        };
        let mut d = Detector::new(vec![small, small], T, 100);
        let t = Instant::now();
        let (a, b) = (ip("198.51.100.7"), ip("2001:db8::7"));
        assert_eq!(d.hit(0, a, t), Hit::Counted);
        assert_eq!(d.hit(1, a, t), Hit::Counted);
        assert_eq!(d.hit(0, b, t), Hit::Counted);
        assert_eq!(d.hit(0, a, t), Hit::Burst(2));
        assert_eq!(d.hit(1, a, t), Hit::Burst(2));
    }

    #[test]
    fn spread_out_hits_never_burst() {
        let mut d = Detector::new(vec![T], T, 100);
        let t0 = Instant::now();
        // 19 per window, forever: just under the threshold.
        for w in 0..10u64 {
            for i in 0..19u64 {
                let now = t0 + Duration::from_secs(w * 10) + Duration::from_millis(i * 10);
                assert_eq!(d.hit(0, ip("198.51.100.7"), now), Hit::Counted);
            }
        }
    }

    #[test]
    fn table_is_bounded_and_pruned() {
        let mut d = Detector::new(vec![T], T, 3);
        let t = Instant::now();
        for i in 1..=3u8 {
            assert_eq!(d.hit(0, IpAddr::from([198, 51, 100, i]), t), Hit::Counted);
        }
        assert_eq!(d.hit(0, ip("198.51.100.9"), t), Hit::TableFull);
        // A tracked source still counts while full.
        assert_eq!(d.hit(0, ip("198.51.100.1"), t), Hit::Counted);
        // Once their windows have run out, the slots are reused.
        let later = t + Duration::from_secs(10);
        assert_eq!(d.hit(0, ip("198.51.100.9"), later), Hit::Counted);
        assert_eq!(d.tracked(), 1);
        d.maintain(later + Duration::from_secs(10));
        assert_eq!(d.tracked(), 0);
    }

    #[test]
    fn upstream_errors_burst_per_source() {
        let t3 = Threshold {
            count: 3,
            window: Duration::from_secs(1),
        };
        let mut d = Detector::new(vec![T], t3, 10);
        let t = Instant::now();
        assert_eq!(d.server_error(t), None);
        assert_eq!(d.server_error(t), None);
        assert_eq!(d.server_error(t), Some(3));
        assert_eq!(d.server_error(t), None);
        assert_eq!(d.server_error(t + Duration::from_secs(1)), None);
    }
}
