//! The running log detector: one thread per log source (file polling and syslog reception are
//! blocking I/O, kept off the daemon's async runtime), events out through a tokio mpsc channel.

use std::{
    fs,
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use tokio::sync::mpsc::{self, error::TrySendError};

use super::{
    config::{Input, LogsConfig, SourceConfig},
    follow::Follower,
    metrics::{FileStatus, SourceMetrics, SourceSnapshot},
    pipeline::{LogEvent, Pipeline},
};

#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("cannot create the log offsets directory {path}: {err}")]
    StateDir { path: PathBuf, err: std::io::Error },
    #[error(
        "log source {source_name}: cannot read its offsets file {path}: {err} (remove it to start over at the end of the files)"
    )]
    Offsets {
        source_name: String,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("log source {source_name}: cannot listen for syslog on {addr}: {err}")]
    Bind {
        source_name: String,
        addr: SocketAddr,
        err: std::io::Error,
    },
    #[error("log source {source_name}: {err}")]
    Setup { source_name: String, err: String },
}

struct Source {
    name: String,
    metrics: Arc<SourceMetrics>,
    syslog: Option<SocketAddr>,
    thread: Option<JoinHandle<()>>,
}

/// Handle on the running log sources. Dropping it stops them (offsets are saved).
pub struct LogsHandle {
    stop: Arc<AtomicBool>,
    sources: Vec<Source>,
}

impl LogsHandle {
    /// Open every source (bind syslog sockets, load offsets) so configuration problems are
    /// errors now, then start one thread each. Events go to `events`; when it is full the
    /// sources wait (nothing is dropped), when it is closed they stop.
    pub fn start(cfg: &LogsConfig, events: mpsc::Sender<LogEvent>) -> Result<Self, LogsError> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut handle = Self {
            stop: stop.clone(),
            sources: Vec::new(),
        };
        let has_files = cfg
            .sources
            .iter()
            .any(|s| matches!(s.input, Input::Files(_)));
        if has_files {
            fs::create_dir_all(&cfg.state_dir).map_err(|err| LogsError::StateDir {
                path: cfg.state_dir.clone(),
                err,
            })?;
        }
        for src in &cfg.sources {
            let metrics = Arc::new(SourceMetrics::default());
            let pipeline =
                Pipeline::new(src, cfg, metrics.clone()).map_err(|err| LogsError::Setup {
                    source_name: src.name.clone(),
                    err,
                })?;
            let (worker, syslog): (Box<dyn FnOnce() + Send>, _) = match &src.input {
                Input::Files(patterns) => {
                    let path = cfg.state_dir.join(format!("offsets_{}.json", src.name));
                    let follower = Follower::new(
                        patterns.clone(),
                        src.start_at,
                        cfg.max_line_len,
                        path.clone(),
                    )
                    .map_err(|err| LogsError::Offsets {
                        source_name: src.name.clone(),
                        path,
                        err,
                    })?;
                    let (stop, events, metrics, every) = (
                        stop.clone(),
                        events.clone(),
                        metrics.clone(),
                        cfg.poll_interval,
                    );
                    let name = src.name.clone();
                    (
                        Box::new(move || {
                            follow_loop(&name, follower, pipeline, metrics, events, &stop, every)
                        }),
                        None,
                    )
                }
                Input::Syslog(addr) => {
                    let sock = bind(src, *addr)?;
                    let bound = sock.local_addr().ok();
                    let (stop, events, max) = (stop.clone(), events.clone(), cfg.max_line_len);
                    let m = metrics.clone();
                    (
                        Box::new(move || syslog_loop(sock, pipeline, m, events, &stop, max)),
                        bound,
                    )
                }
            };
            let thread = thread::Builder::new()
                .name(format!("log-{}", src.name))
                .spawn(worker)
                .map_err(|e| LogsError::Setup {
                    source_name: src.name.clone(),
                    err: format!("cannot start its thread: {e}"),
                })?;
            handle.sources.push(Source {
                name: src.name.clone(),
                metrics,
                syslog,
                thread: Some(thread),
            });
        }
        Ok(handle)
    }

    /// Counters and file status of every source, in configuration order.
    pub fn snapshot(&self) -> Vec<SourceSnapshot> {
        self.sources
            .iter()
            .map(|s| s.metrics.snapshot(&s.name))
            .collect()
    }

    /// The address a syslog source is bound to (useful with port 0).
    pub fn syslog_addr(&self, source: &str) -> Option<SocketAddr> {
        self.sources.iter().find(|s| s.name == source)?.syslog
    }

    /// Stop every source and wait for it (files save their offsets on the way out).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in &mut self.sources {
            if let Some(t) = s.thread.take() {
                t.thread().unpark();
                if t.join().is_err() {
                    log::error!("log source {}: its thread panicked", s.name);
                }
            }
        }
    }
}

impl Drop for LogsHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn bind(src: &SourceConfig, addr: SocketAddr) -> Result<UdpSocket, LogsError> {
    let err = |err| LogsError::Bind {
        source_name: src.name.clone(),
        addr,
        err,
    };
    let sock = UdpSocket::bind(addr).map_err(err)?;
    // Short, so a stop is noticed quickly.
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(err)?;
    Ok(sock)
}

/// Hand events on, waiting while the channel is full. `false`: stop (asked to, or nobody
/// listens any more).
fn send_all(events: &mpsc::Sender<LogEvent>, out: &mut Vec<LogEvent>, stop: &AtomicBool) -> bool {
    for mut ev in out.drain(..) {
        loop {
            match events.try_send(ev) {
                Ok(()) => break,
                Err(TrySendError::Closed(_)) => return false,
                Err(TrySendError::Full(back)) => {
                    if stop.load(Ordering::Relaxed) {
                        return false;
                    }
                    ev = back;
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    true
}

fn follow_loop(
    name: &str,
    mut follower: Follower,
    mut pipeline: Pipeline,
    metrics: Arc<SourceMetrics>,
    events: mpsc::Sender<LogEvent>,
    stop: &AtomicBool,
    every: Duration,
) {
    let mut out = Vec::new();
    let mut last_errors: Vec<Option<String>> = Vec::new();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let now = Instant::now();
        let (stats, statuses) =
            follower.poll(now, &mut |line, _cut| pipeline.line(line, now, &mut out));
        SourceMetrics::add(&metrics.rotations, stats.rotations);
        SourceMetrics::add(&metrics.truncations, stats.truncations);
        SourceMetrics::add(&metrics.truncated_lines, stats.truncated_lines);
        report_changes(name, &statuses, &mut last_errors);
        metrics.set_files(statuses);
        // Offsets only move past lines whose events were handed on.
        let delivered = send_all(&events, &mut out, stop);
        if delivered && let Err(e) = follower.persist(now, stopping) {
            log::warn!("log source {name}: cannot save offsets: {e}");
        }
        if stopping || !delivered {
            return;
        }
        thread::park_timeout(every);
    }
}

/// Log a pattern's error when it appears or changes, not on every poll.
fn report_changes(name: &str, statuses: &[FileStatus], last: &mut Vec<Option<String>>) {
    last.resize(statuses.len(), None);
    for (st, prev) in statuses.iter().zip(last.iter_mut()) {
        if st.error != *prev {
            match &st.error {
                Some(e) => log::warn!("log source {name}: {}: {e}", st.pattern),
                None => log::info!("log source {name}: following {}", st.following.join(", ")),
            }
            prev.clone_from(&st.error);
        }
    }
}

fn syslog_loop(
    sock: UdpSocket,
    mut pipeline: Pipeline,
    metrics: Arc<SourceMetrics>,
    events: mpsc::Sender<LogEvent>,
    stop: &AtomicBool,
    max_line_len: usize,
) {
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                log::warn!("syslog receive failed: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let mut d = &buf[..n];
        if d.len() > max_line_len {
            d = &d[..max_line_len];
            SourceMetrics::add(&metrics.truncated_lines, 1);
        }
        pipeline.datagram(d, Instant::now(), &mut out);
        if !send_all(&events, &mut out, stop) {
            return;
        }
    }
}
