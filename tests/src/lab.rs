//! The lab: the situation wsguard exists for, built from real parts. A node namespace runs the
//! Rust echo backend behind real nginx (configured like ingress-nginx), peers in namespaces of
//! their own run legitimate WebSocket clients and attackers through a bridge, and wsguard can
//! be attached to the node's NIC. Everything is an RAII guard: a failing test leaves nothing.

pub mod expect;
pub mod haproxy;
pub mod http;
pub mod nginx;
pub mod proc;
pub mod proxied;
pub mod proxy_header;
pub mod summary;
pub mod topology;
pub mod wsguard;

use anyhow::{Context as _, Result, bail};
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use self::{
    nginx::{Listen, Nginx},
    proc::Proc,
    topology::{HTTP_PORT, Peer, PeerSpec, Topology},
    wsguard::LabAgent,
};

/// Where the echo backend listens inside the node (nginx proxies to it).
pub const BACKEND_ADDR: &str = "127.0.0.1:8080";
/// The WebSocket path the clients use.
pub const WS_PATH: &str = "/ws";

/// The lab's programs. Integration tests get them from cargo with [`lab_bins!`]; the demo
/// finds them next to its own executable.
#[derive(Debug, Clone)]
pub struct Bins {
    pub backend: PathBuf,
    pub client: PathBuf,
    /// None: `target/debug/wsguard`, built when the agent is first started.
    pub wsguard: Option<PathBuf>,
}

impl Bins {
    /// The binaries in the same directory as the running executable (`target/<profile>/`).
    pub fn siblings() -> Result<Self> {
        let exe = std::env::current_exe()?;
        let dir = exe.parent().context("executable without a directory")?;
        let bins = Self {
            backend: dir.join("wsguard-lab-backend"),
            client: dir.join("wsguard-lab-client"),
            wsguard: Some(dir.join("wsguard")),
        };
        for p in [&bins.backend, &bins.client, &dir.join("wsguard")] {
            if !p.exists() {
                bail!("{} is missing: build it first", p.display());
            }
        }
        Ok(bins)
    }
}

/// The lab binaries of this package as cargo built them for the calling integration test; the
/// `wsguard` binary is built when a test first starts the agent.
#[macro_export]
macro_rules! lab_bins {
    () => {
        $crate::lab::Bins {
            backend: env!("CARGO_BIN_EXE_wsguard-lab-backend").into(),
            client: env!("CARGO_BIN_EXE_wsguard-lab-client").into(),
            wsguard: None,
        }
    };
}

pub struct Lab {
    // Field order is drop order: the agent goes first, the namespaces and the files last.
    pub agent: Option<LabAgent>,
    pub nginx: Nginx,
    backend: Option<Proc>,
    pub topo: Topology,
    pub bins: Bins,
    dir: tempfile::TempDir,
}

impl Lab {
    /// The network, the backend and nginx; wsguard is started separately.
    pub fn start(bins: Bins, peers: &[PeerSpec]) -> Result<Self> {
        Self::start_with(bins, peers, Listen::Plain)
    }

    /// Like [`Lab::start`], with nginx's port listening as `listen` says.
    pub fn start_with(bins: Bins, peers: &[PeerSpec], listen: Listen) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("wsguard-lab-").tempdir()?;
        let topo = Topology::new(peers)?;
        let backend = start_backend(&topo, &bins, dir.path())?;
        let addr: SocketAddr = BACKEND_ADDR.parse()?;
        let nginx = Nginx::start_with(&topo.node, dir.path(), addr, HTTP_PORT, listen)?;
        Ok(Self {
            agent: None,
            nginx,
            backend: Some(backend),
            topo,
            bins,
            dir,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn peer(&self, name: &str) -> &Peer {
        self.topo.peer(name)
    }

    /// Start wsguard on the node's NIC with the lab's paths plus `extra` flags.
    pub fn start_agent(&mut self, extra: &[&str]) -> Result<&mut LabAgent> {
        let bin = match &self.bins.wsguard {
            Some(p) => p.clone(),
            None => crate::agent::wsguard_bin()?,
        };
        let agent = LabAgent::start(&self.topo.node, &bin, self.dir(), extra)?;
        Ok(self.agent.insert(agent))
    }

    pub fn agent(&mut self) -> &mut LabAgent {
        self.agent.as_mut().expect("the agent was started")
    }

    /// Kill the backend: nginx answers 502 until [`Lab::start_backend`].
    pub fn stop_backend(&mut self) {
        if let Some(mut b) = self.backend.take() {
            b.kill();
        }
    }

    /// (Re)start the backend and wait until it listens.
    pub fn start_backend(&mut self) -> Result<()> {
        self.stop_backend();
        self.backend = Some(start_backend(&self.topo, &self.bins, self.dir())?);
        Ok(())
    }

    /// `ws://NODE:80/ws`.
    pub fn ws_url(&self, v6: bool) -> String {
        match self.topo.node_ip(v6) {
            IpAddr::V4(ip) => format!("ws://{ip}:{HTTP_PORT}{WS_PATH}"),
            IpAddr::V6(ip) => format!("ws://[{ip}]:{HTTP_PORT}{WS_PATH}"),
        }
    }

    pub fn http_target(&self, v6: bool) -> SocketAddr {
        SocketAddr::new(self.topo.node_ip(v6), HTTP_PORT)
    }

    /// `wsguard-lab-client SUBCOMMAND ARGS…` in `peer`'s namespace, bound to its address.
    pub fn client(&self, peer: &str, tag: &str, v6: bool, args: &[&str]) -> Result<Proc> {
        let p = self.peer(peer);
        let bind = p.ip(v6).to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&["--bind", &bind]);
        Proc::spawn(
            &p.ns,
            &format!("{peer}-{tag}"),
            self.dir(),
            &self.bins.client,
            &all,
        )
    }

    /// `count` legitimate WebSockets from `peer`, a message every 100 ms, for `duration`.
    pub fn legit(&self, peer: &str, v6: bool, count: u32, duration: &str) -> Result<Proc> {
        let url = self.ws_url(v6);
        let n = count.to_string();
        let args = [
            "legit",
            "--target",
            &url,
            "--count",
            &n,
            "--interval",
            "100ms",
            "--duration",
            duration,
            "--report-every",
            "1s",
        ];
        self.client(peer, "legit", v6, &args)
    }

    /// Bad handshakes of `reason` from `peer` at `rate` per second.
    pub fn attack(
        &self,
        peer: &str,
        v6: bool,
        reason: &str,
        rate: u32,
        duration: &str,
        path: &str,
    ) -> Result<Proc> {
        let target = self.http_target(v6).to_string();
        let rate = rate.to_string();
        let args = [
            "attack",
            "--target",
            &target,
            "--reason",
            reason,
            "--rate",
            &rate,
            "--duration",
            duration,
            "--path",
            path,
            "--report-every",
            "1s",
        ];
        self.client(peer, &format!("attack-{reason}"), v6, &args)
    }

    pub fn synflood(&self, peer: &str, v6: bool, rate: u32, duration: &str) -> Result<Proc> {
        let target = self.http_target(v6).to_string();
        let rate = rate.to_string();
        let args = [
            "synflood",
            "--target",
            &target,
            "--rate",
            &rate,
            "--duration",
            duration,
        ];
        self.client(peer, "synflood", v6, &args)
    }

    /// What to look at when a lab test fails: the tails of every log.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        let mut section = |name: &str, text: String| {
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            out.push_str(&format!("--- {name} (last {} lines)\n", tail.len()));
            for l in tail {
                out.push_str(l);
                out.push('\n');
            }
        };
        section("nginx error.log", self.nginx.error_log());
        section("nginx access.log", self.nginx.access_log());
        if let Some(b) = &self.backend {
            section("backend stderr", b.err_text());
        }
        if let Some(a) = &self.agent {
            section("agent log", a.log_text());
        }
        out
    }

    /// `r`, with the lab's logs attached when it is an error.
    pub fn check<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| e.context(format!("lab logs:\n{}", self.diagnostics())))
    }
}

fn start_backend(topo: &Topology, bins: &Bins, dir: &Path) -> Result<Proc> {
    let mut p = Proc::spawn(
        &topo.node,
        "backend",
        dir,
        &bins.backend,
        &["--listen", BACKEND_ADDR],
    )?;
    p.wait_for("listening on", Duration::from_secs(10))?;
    Ok(p)
}
