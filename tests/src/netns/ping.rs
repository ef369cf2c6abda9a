//! A `ping` stream in the background and what it reported.

use anyhow::{Context as _, Result, bail, ensure};
use std::time::{Duration, Instant};

/// What one `ping` run reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PingStats {
    pub transmitted: u32,
    pub received: u32,
}

pub(super) fn parse_ping(text: &str) -> Option<PingStats> {
    // "10 packets transmitted, 10 received, 0% packet loss, time 9ms"
    let line = text
        .lines()
        .find(|l| l.contains(" packets transmitted, "))?;
    let mut parts = line.split(", ");
    let transmitted = parts.next()?.strip_suffix(" packets transmitted")?.trim();
    let received = parts.next()?.strip_suffix(" received")?.trim();
    Some(PingStats {
        transmitted: transmitted.parse().ok()?,
        received: received.parse().ok()?,
    })
}

/// A `ping` running in the background (from `b` to `a`), so a test can change the data path
/// while packets flow. Killed on drop.
pub struct PingStream {
    pub(super) child: Option<std::process::Child>,
    pub(super) count: u32,
}

impl PingStream {
    /// Wait for the stream to end (it sends `count` requests) and report what it saw.
    pub fn finish(mut self) -> Result<PingStats> {
        let child = self.child.take().context("stream already finished")?;
        let deadline = Instant::now() + Duration::from_secs(u64::from(self.count) / 50 + 30);
        let mut child = child;
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("ping stream did not end by its deadline");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let stats = parse_ping(&text).with_context(|| format!("unexpected ping output: {text}"))?;
        ensure!(
            stats.transmitted == self.count,
            "ping sent {} of {} requests: {text}",
            stats.transmitted,
            self.count
        );
        Ok(stats)
    }
}

impl Drop for PingStream {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
