//! `wsguard agent`: the node daemon.
//!
//! Order matters: the config is validated before anything touches the kernel; the data path
//! is opened and reconciled with the state file before the API reports ready; on SIGTERM or
//! SIGINT the state is flushed and programs, links and pins stay in place and keep enforcing
//! (fail-static) unless `--detach-on-exit`.

mod backend;
mod batch;
mod kernel;
mod lapi;
mod logs;
mod proxy;
mod shared;
mod startup;

use std::{
    os::fd::{AsRawFd, RawFd},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix,
    task::{AbortHandle, JoinHandle},
};
use tracing::{error, info, warn};

use crate::{
    api::Backend,
    config::{AgentArgs, AgentConfig, LogFormat},
    datapath::DataPath,
    logs::{LogEvent, LogsHandle},
    paths, server,
};
pub use logs::LogsView;
use shared::Agent;

/// Shortest gap between two state writes: bursts of changes coalesce into one write.
const SAVE_DEBOUNCE: Duration = Duration::from_millis(200);
/// The gap after a write is this many times as long as the write took: the file is rewritten
/// in full, so with a million bans (a quarter gigabyte) back-to-back writes would cost an
/// import one full write per request; this keeps writing to at most a fifth of the time.
const SAVE_BACKOFF: u32 = 4;
/// Log events in flight between the source threads and the policy; when full the sources
/// wait (a log line is never dropped for lack of room).
const LOG_EVENTS: usize = 1024;
/// How long the API socket may take to accept connections at start.
const API_BIND_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let cfg = AgentConfig::load(&args).context("invalid agent configuration")?;
    init_tracing(cfg.log_format);
    info!(
        version = env!("CARGO_PKG_VERSION"),
        interfaces = %cfg.interfaces.join(","),
        mode = cfg.mode.as_str(),
        ports = ?cfg.ports,
        "starting"
    );
    // Log sources open before the kernel is touched: a busy syslog port or an unreadable
    // offsets file stops the start with nothing changed. Their events wait in the channel
    // until the policy is up.
    let logs = match &cfg.logs {
        Some(l) => {
            let (tx, rx) = tokio::sync::mpsc::channel(LOG_EVENTS);
            let h = LogsHandle::start(l, tx).context("cannot start the log sources ([logs])")?;
            info!(sources = l.sources.len(), "log sources started");
            Some((h, rx))
        }
        None => None,
    };
    let lapi = match &cfg.crowdsec {
        Some(c) => Some(std::sync::Arc::new(lapi::Link::new(c, &cfg.state_dir)?)),
        None => None,
    };
    let inner = startup::open(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let agent = Arc::new(Agent::new(cfg, inner));
    if let Some(l) = lapi {
        let _ = agent.lapi.set(l);
    }
    rt.block_on(serve(agent, logs))
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WSGUARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().flatten_event(true).try_init(),
    };
}

type Logs = (LogsHandle, tokio::sync::mpsc::Receiver<LogEvent>);

async fn serve(agent: Arc<Agent>, logs: Option<Logs>) -> anyhow::Result<()> {
    let backend: Arc<dyn Backend> = agent.clone();
    let mut tasks: Vec<JoinHandle<()>> = vec![
        tokio::spawn(bursts(agent.clone())),
        tokio::spawn(sweeper(agent.clone())),
        tokio::spawn(saver(agent.clone())),
    ];
    if let Some((h, rx)) = logs {
        agent.set_logs(h);
        tasks.push(tokio::spawn(log_events(agent.clone(), rx)));
    }
    tasks.extend(lapi::spawn(&agent));
    let (api_watch, api) = start_api(&agent, backend.clone()).await?;
    tasks.push(api_watch);
    if let Some(addr) = agent.cfg.metrics_addr {
        let b = backend.clone();
        let a = agent.clone();
        let logs: Option<crate::metrics::LogsProbe> = agent
            .cfg
            .logs
            .is_some()
            .then(|| Arc::new(move || a.logs_view()) as crate::metrics::LogsProbe);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve_metrics(addr, b, logs).await {
                error!(%addr, "metrics endpoint stopped: {e:#}");
            }
        }));
    }
    agent.mark_dirty();
    agent.set_ready();
    info!(socket = %agent.cfg.socket.display(), "ready");

    let mut term = unix::signal(unix::SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = unix::signal(unix::SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
        _ = agent.exit.notified() => {
            // `wsguard detach` asked for this from an API request whose answer is still being
            // written: aborting the server now would leave the CLI with a dropped connection.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    }
    // Before the consumer goes: the sources save offsets only past events it took.
    let a = agent.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || a.stop_logs()).await {
        error!("stopping the log sources: {e}");
    }
    for t in &tasks {
        t.abort();
    }
    api.abort();
    shutdown(&agent)
}

/// Start the API server and wait until its socket accepts connections: "ready" (log line and
/// `/readyz`) must never come before a client can connect. A bind failure (another agent on
/// the socket, a bad path) stops the start.
/// Returns the task that reports the server's end, and the server's abort handle.
async fn start_api(
    agent: &Arc<Agent>,
    backend: Arc<dyn Backend>,
) -> anyhow::Result<(JoinHandle<()>, AbortHandle)> {
    let opts = server::ServerOptions {
        socket: agent.cfg.socket.clone(),
        mutate_gid: agent.cfg.api_gid,
        audit_log: agent.cfg.state_dir.join(paths::AUDIT_LOG),
    };
    let socket = opts.socket.clone();
    // A socket file already there (stale, or another agent's) is not ours: only a file bound
    // after the server started counts, or a probe could reach another process's listener.
    let before = socket_id(&socket);
    let mut api = tokio::spawn(server::serve_api(opts, backend));
    let end = tokio::time::Instant::now() + API_BIND_TIMEOUT;
    loop {
        if api.is_finished() {
            return match (&mut api).await {
                Ok(Err(e)) => Err(e.context("cannot start the API server")),
                Ok(Ok(())) => anyhow::bail!("the API server stopped at start"),
                Err(e) => anyhow::bail!("the API server task failed at start: {e}"),
            };
        }
        let now = socket_id(&socket);
        if now.is_some() && now != before && tokio::net::UnixStream::connect(&socket).await.is_ok()
        {
            break;
        }
        if tokio::time::Instant::now() > end {
            api.abort();
            anyhow::bail!(
                "the API socket {} did not accept connections within {API_BIND_TIMEOUT:?}",
                socket.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let abort = api.abort_handle();
    let watch = tokio::spawn(async move {
        // The data plane keeps enforcing without the API; say so loudly and keep running.
        match api.await {
            Ok(Err(e)) => error!("API server stopped: {e:#}"),
            Ok(Ok(())) => error!("API server stopped"),
            Err(e) if e.is_cancelled() => {}
            Err(e) => error!("API server task failed: {e}"),
        }
    });
    Ok((watch, abort))
}

/// Identity of the file at `path`: inode and change time (an inode number alone can be
/// reused by the file that replaces a stale socket).
fn socket_id(path: &std::path::Path) -> Option<(u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::symlink_metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Log bursts -> policy (same rails as kernel bursts).
async fn log_events(agent: Arc<Agent>, mut rx: tokio::sync::mpsc::Receiver<LogEvent>) {
    while let Some(ev) = rx.recv().await {
        agent.on_log_event(ev);
    }
}

fn shutdown(agent: &Agent) -> anyhow::Result<()> {
    if let Some(l) = agent.lapi.get() {
        l.save();
    }
    let saved = agent.save_state_at_exit();
    if let Err(e) = &saved {
        error!("cannot write the state file on exit: {e}");
    }
    if agent.detached.load(Ordering::SeqCst) {
        info!("detached: programs, links and pins removed");
    } else if agent.cfg.detach_on_exit {
        DataPath::detach_all(&agent.cfg.pin_dir).context("--detach-on-exit: cannot detach")?;
        info!("--detach-on-exit: programs, links and pins removed");
    } else {
        info!("exiting; programs and pins stay in place and keep enforcing");
    }
    saved.context("cannot write the state file").map(|_| ())
}

struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Kernel burst events → policy → ban maps.
async fn bursts(agent: Arc<Agent>) {
    let fd = agent.lock().dp.bursts_fd();
    // SAFETY: the ring buffer's fd belongs to the DataPath inside `agent`, which this task
    // keeps alive (Arc) for as long as the AsyncFd exists, and it is never closed or reused.
    let afd = match unsafe { AsyncFd::register_with_interest(Fd(fd), Interest::READABLE) } {
        Ok(a) => Some(a),
        Err(e) => {
            warn!("cannot watch the burst ring buffer, polling it instead: {e}");
            None
        }
    };
    loop {
        match &afd {
            Some(a) => match a.readable().await {
                Ok(mut guard) => guard.clear_ready(),
                Err(e) => {
                    error!("burst ring buffer: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
        // Drain after clearing readiness so an event arriving in between wakes us again.
        loop {
            let events = agent.lock().dp.poll_bursts();
            if events.is_empty() {
                break;
            }
            for ev in &events {
                agent.on_burst(ev);
            }
        }
    }
}

/// Expiry every second; the node's own addresses every 30 s.
async fn sweeper(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        agent.sweep();
        if n % 30 == 29 {
            agent.refresh_node_addrs();
        }
        n += 1;
    }
}

/// Writes the state file after changes, at most every `SAVE_DEBOUNCE` and, while changes keep
/// coming, never sooner than `SAVE_BACKOFF` times the last write's duration after it; once they
/// stop for `SAVE_DEBOUNCE` it writes at once, so the file trails the last change of a burst
/// (a large import) by one write, not by a backoff. A change during a write or a wait leaves a
/// permit in `dirty`, so the last change is always written (and the exit path writes whatever
/// is still unsaved).
async fn saver(agent: Arc<Agent>) {
    let mut gap = SAVE_DEBOUNCE;
    loop {
        agent.dirty.notified().await;
        let until = tokio::time::Instant::now() + gap;
        loop {
            let before = agent.changes();
            tokio::time::sleep(SAVE_DEBOUNCE).await;
            if agent.changes() == before || tokio::time::Instant::now() >= until {
                break;
            }
        }
        // The permit may be from a change the last write already held.
        if !agent.unsaved() {
            continue;
        }
        let a = agent.clone();
        let t = tokio::time::Instant::now();
        match tokio::task::spawn_blocking(move || a.save_state()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!("cannot write the state file: {e}"),
            Err(e) => error!("state writer: {e}"),
        }
        gap = SAVE_DEBOUNCE.max(t.elapsed() * SAVE_BACKOFF);
    }
}
