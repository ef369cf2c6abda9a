//! `wsguard agent`: the node daemon.
//!
//! Order matters: the config is validated before anything touches the kernel; the data path
//! is opened and reconciled with the state file before the API reports ready; on SIGTERM or
//! SIGINT the state is flushed and programs, links and pins stay in place and keep enforcing
//! (fail-static) unless `--detach-on-exit`.

mod backend;
mod kernel;
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
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    api::Backend,
    config::{AgentArgs, AgentConfig, LogFormat},
    datapath::DataPath,
    paths, server,
};
use shared::Agent;

/// Shortest gap between two state writes: bursts of changes coalesce into one write.
const SAVE_DEBOUNCE: Duration = Duration::from_millis(200);

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
    let inner = startup::open(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(Arc::new(Agent::new(cfg, inner))))
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

async fn serve(agent: Arc<Agent>) -> anyhow::Result<()> {
    let backend: Arc<dyn Backend> = agent.clone();
    let mut tasks: Vec<JoinHandle<()>> = vec![
        tokio::spawn(bursts(agent.clone())),
        tokio::spawn(sweeper(agent.clone())),
        tokio::spawn(saver(agent.clone())),
    ];
    let opts = server::ServerOptions {
        socket: agent.cfg.socket.clone(),
        mutate_gid: agent.cfg.api_gid,
        audit_log: agent.cfg.state_dir.join(paths::AUDIT_LOG),
    };
    let b = backend.clone();
    tasks.push(tokio::spawn(async move {
        // The data plane keeps enforcing without the API; say so loudly and keep running.
        if let Err(e) = server::serve_api(opts, b).await {
            error!("API server stopped: {e:#}");
        }
    }));
    if let Some(addr) = agent.cfg.metrics_addr {
        let b = backend.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve_metrics(addr, b).await {
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
        _ = agent.exit.notified() => {}
    }
    for t in &tasks {
        t.abort();
    }
    shutdown(&agent)
}

fn shutdown(agent: &Agent) -> anyhow::Result<()> {
    let saved = agent.save_state();
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

/// Writes the state file after changes, at most every `SAVE_DEBOUNCE`.
async fn saver(agent: Arc<Agent>) {
    loop {
        agent.dirty.notified().await;
        tokio::time::sleep(SAVE_DEBOUNCE).await;
        let a = agent.clone();
        match tokio::task::spawn_blocking(move || a.save_state()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!("cannot write the state file: {e}"),
            Err(e) => error!("state writer: {e}"),
        }
    }
}
