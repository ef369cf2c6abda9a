//! Two nodes sharing one LAPI, like a cluster: a switch namespace with a bridge, node
//! namespaces `a` (198.18.0.1) and `b` (198.18.0.2), each with the echo backend behind real
//! nginx and its own `wsguard agent` on its NIC, LAPI in a namespace of its own
//! (198.18.0.250:8080), and peers (198.18.0.10 …) that can reach both nodes. Every link is
//! made inside the lab's namespaces; everything goes on drop.

use anyhow::{Result, bail};
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use super::{Lapi, PORT};

pub const LAPI_IP_TEXT: &str = "198.18.0.250";
use crate::{
    lab::{
        BACKEND_ADDR, Bins,
        nginx::Nginx,
        proc::Proc,
        topology::{HTTP_PORT, NODE_IF},
        wsguard::LabAgent,
    },
    netns::NetNs,
};

pub const LAPI_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 250);

pub struct Node {
    // Drop order: the agent first, then nginx and the backend, then the namespace.
    pub agent: Option<LabAgent>,
    pub nginx: Nginx,
    _backend: Proc,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub dir: PathBuf,
    pub ns: NetNs,
}

pub struct Peer {
    pub name: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub ns: NetNs,
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub peers: Vec<Peer>,
    pub lapi: Lapi,
    pub lapi_ns: NetNs,
    pub bins: Bins,
    switch: NetNs,
    dir: tempfile::TempDir,
}

fn plug(ns: &NetNs, switch: &NetNs, port: &str) -> Result<()> {
    ns.ip(&[
        "link",
        "add",
        NODE_IF,
        "type",
        "veth",
        "peer",
        "name",
        port,
        "netns",
        switch.name(),
    ])?;
    switch.ip(&["link", "set", port, "master", "br0"])?;
    switch.ip(&["link", "set", port, "up"])?;
    ns.ip(&["link", "set", NODE_IF, "up"])?;
    Ok(())
}

fn address(ns: &NetNs, host: u8) -> Result<(Ipv4Addr, Ipv6Addr)> {
    let v4 = Ipv4Addr::new(198, 18, 0, host);
    let v6: Ipv6Addr = format!("fd00:5753::{host:x}").parse()?;
    ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", NODE_IF])?;
    ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", NODE_IF, "nodad"])?;
    Ok((v4, v6))
}

impl Cluster {
    /// The network, LAPI, and `nodes` nodes with nginx and the backend (agents separately).
    pub fn start(bins: Bins, nodes: usize, peers: &[&str]) -> Result<Self> {
        Self::start_with(bins, nodes, peers, None)
    }

    /// Like `start`, with LAPI on HTTPS (`https://198.18.0.250:8080/`).
    pub fn start_with(
        bins: Bins,
        nodes: usize,
        peers: &[&str],
        tls: Option<&super::Pki>,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("wsguard-cluster-")
            .tempdir()?;
        let switch = NetNs::new()?;
        switch.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let lapi_ns = NetNs::new()?;
        plug(&lapi_ns, &switch, "plapi")?;
        address(&lapi_ns, 250)?;
        let lapi = Lapi::start_with(&lapi_ns, tls)?;
        let mut c = Self {
            nodes: Vec::new(),
            peers: Vec::new(),
            lapi,
            lapi_ns,
            bins,
            switch,
            dir,
        };
        for i in 0..nodes {
            let ns = NetNs::new()?;
            plug(&ns, &c.switch, &format!("pn{i}"))?;
            let (ip4, ip6) = address(&ns, 1 + i as u8)?;
            let ndir = c.dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&ndir)?;
            let mut backend = Proc::spawn(
                &ns,
                "backend",
                &ndir,
                &c.bins.backend,
                &["--listen", BACKEND_ADDR],
            )?;
            backend.wait_for("listening on", Duration::from_secs(10))?;
            let nginx = Nginx::start(&ns, &ndir, BACKEND_ADDR.parse()?, HTTP_PORT)?;
            c.nodes.push(Node {
                agent: None,
                nginx,
                _backend: backend,
                ip4,
                ip6,
                dir: ndir,
                ns,
            });
        }
        for (i, name) in peers.iter().enumerate() {
            let ns = NetNs::new()?;
            plug(&ns, &c.switch, &format!("pp{i}"))?;
            let (ip4, ip6) = address(&ns, 10 + i as u8)?;
            c.peers.push(Peer {
                name: (*name).to_owned(),
                ip4,
                ip6,
                ns,
            });
        }
        Ok(c)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn lapi_url() -> String {
        format!("http://{LAPI_IP}:{PORT}/")
    }

    pub fn peer(&self, name: &str) -> &Peer {
        self.peers
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no peer {name:?}"))
    }

    /// Start node `i`'s agent with `config` as its config file, plus `extra` flags.
    pub fn start_agent(&mut self, i: usize, config: &str, extra: &[&str]) -> Result<()> {
        let bin = match &self.bins.wsguard {
            Some(p) => p.clone(),
            None => crate::agent::wsguard_bin()?,
        };
        let node = &mut self.nodes[i];
        let cfg = node.dir.join("agent.toml");
        std::fs::write(&cfg, config)?;
        let cfg = cfg.display().to_string();
        let mut args = vec!["--config", cfg.as_str(), "--metrics-addr", "off"];
        args.extend_from_slice(extra);
        let agent = LabAgent::start(&node.ns, &bin, &node.dir, &args)?;
        node.agent = Some(agent);
        Ok(())
    }

    pub fn agent(&self, i: usize) -> &LabAgent {
        self.nodes[i].agent.as_ref().expect("agent started")
    }

    pub fn agent_mut(&mut self, i: usize) -> &mut LabAgent {
        self.nodes[i].agent.as_mut().expect("agent started")
    }

    /// `wsguard-lab-client ARGS --bind ADDR` in `peer`'s namespace.
    pub fn client(&self, peer: &str, tag: &str, args: &[&str]) -> Result<Proc> {
        let p = self.peer(peer);
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(["--bind".to_owned(), p.ip4.to_string()]);
        Proc::spawn(
            &p.ns,
            &format!("{peer}-{tag}"),
            self.dir(),
            &self.bins.client,
            &all,
        )
    }

    /// Bad handshakes (`no_upgrade`) from `peer` to node `i` at `rate`/s for `duration`.
    pub fn attack(&self, peer: &str, i: usize, rate: u32, duration: &str) -> Result<Proc> {
        let target = SocketAddr::new(IpAddr::V4(self.nodes[i].ip4), HTTP_PORT).to_string();
        let rate = rate.to_string();
        self.client(
            peer,
            &format!("attack{i}"),
            &[
                "attack",
                "--target",
                &target,
                "--reason",
                "no_upgrade",
                "--rate",
                &rate,
                "--duration",
                duration,
                "--path",
                "/ws",
                "--report-every",
                "1s",
            ],
        )
    }

    /// Echo requests from `peer` (source `from`) to node `i`: how many of `count` came back.
    pub fn ping(&self, peer: &str, from: IpAddr, i: usize, count: u32) -> Result<u32> {
        let p = self.peer(peer);
        let dst = match from {
            IpAddr::V4(_) => IpAddr::V4(self.nodes[i].ip4),
            IpAddr::V6(_) => IpAddr::V6(self.nodes[i].ip6),
        };
        let (src, dst, n) = (from.to_string(), dst.to_string(), count.to_string());
        let out = p.ns.exec(
            &[
                "ping", "-n", "-q", "-c", &n, "-i", "0.2", "-W", "1", "-I", &src, &dst,
            ],
            Duration::from_secs(u64::from(count) + 10),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        match text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .and_then(|l| l.split(',').nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
        {
            Some(n) => Ok(n),
            None => bail!("unexpected ping output: {text}"),
        }
    }

    /// The logs to look at when a cluster test fails.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(a) = &n.agent {
                let text = a.log_text();
                let lines: Vec<&str> = text.lines().collect();
                out.push_str(&format!("--- node {i} agent log (last 40 lines)\n"));
                for l in &lines[lines.len().saturating_sub(40)..] {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        let text = self.lapi.log();
        let lines: Vec<&str> = text.lines().collect();
        out.push_str("--- LAPI log (last 30 lines)\n");
        for l in &lines[lines.len().saturating_sub(30)..] {
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    pub fn check<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| e.context(format!("cluster logs:\n{}", self.diagnostics())))
    }
}
