//! Log-based detection (issue 7): bad-handshake bursts found in ingress-nginx access logs and
//! application logs, for traffic the data plane cannot read (TLS terminated at the ingress).
//!
//! Sources (`config::LogsConfig`) are files/globs, followed across rotation and restarts
//! (`follow`, `offsets`), or a loopback syslog listener; each has a format (`parse`) and rules.
//! A line that matches a rule counts against its client; `detect` turns counts into bursts with
//! the kernel detector's fixed-window semantics; `LogEvent`s come out of an mpsc channel.
//!
//! Wiring (daemon side):
//! ```ignore
//! let logs_cfg = file.logs.validate(&LogDefaults { threshold, window, ws_paths, state_dir })?;
//! let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
//! let logs = LogsHandle::start(&logs_cfg, tx)?;          // errors: bind, offsets, state dir
//! while let Some(ev) = rx.recv().await {
//!     match ev {
//!         LogEvent::Burst(b) => { /* BanRequest { cidr: Cidr::host(b.addr), source: Log,
//!                                    reason: b.ban_reason(), ttl: Ttl::Default, .. } */ }
//!         LogEvent::UpstreamErrors(u) => { /* warn!, count */ }
//!     }
//! }
//! logs.snapshot();                                       // metrics and `status`
//! logs.stop();                                           // saves offsets
//! ```
//!
//! Decisions where the issue is silent:
//! - Bursts are timed by arrival, not by the timestamps in the lines: formats differ, clocks
//!   skew, and a restart never replays old lines anyway.
//! - A line from a trusted proxy that names no client is skipped (`proxy_without_forwarded`):
//!   counting it would ban the proxy, and with it everyone behind it.
//! - Files that appear after the start are read from their beginning (a new pod's log, a
//!   rotated-in file); files present at the very first start honour `start_at`.
//! - Upstream-error bursts are per log source (an outage is not per client).

pub mod config;
pub mod detect;
pub mod follow;
pub mod glob;
pub mod metrics;
pub mod offsets;
pub mod parse;
pub mod pipeline;
pub mod run;

pub use config::{LogDefaults, LogsConfig, LogsConfigError, LogsFile};
pub use metrics::{FileStatus, SourceSnapshot};
pub use pipeline::{LogBurst, LogEvent, Pipeline, UpstreamBurst};
pub use run::{LogsError, LogsHandle};
