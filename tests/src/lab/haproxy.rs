//! Real HAProxy (Debian's 2.6) as the L4 load balancer in front of the node: TCP mode, one
//! frontend on the load balancer's own addresses, one server (the node's nginx) reached with
//! `send-proxy` (PROXY v1) or `send-proxy-v2`, optionally health-checked with `option httpchk`.
//! Its config, pid-less foreground process and logs live in the lab's directory; the process
//! is a [`Proc`], killed with its group on drop.

use anyhow::{Result, bail};
use std::{
    fs,
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{nginx::HEALTH_PATH, proc::Proc};
use crate::netns::NetNs;

pub const HAPROXY: &str = "/usr/sbin/haproxy";

/// Which PROXY protocol header HAProxy prepends to every connection to the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendProxy {
    /// `send-proxy`: the text line, `PROXY TCP4 …\r\n`.
    V1,
    /// `send-proxy-v2`: the binary header, in a segment of its own before the client's bytes.
    V2,
}

impl SendProxy {
    pub fn keyword(self) -> &'static str {
        match self {
            Self::V1 => "send-proxy",
            Self::V2 => "send-proxy-v2",
        }
    }

    /// As wsguard's metrics label it.
    pub fn label(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        }
    }
}

/// What the load balancer looks like.
#[derive(Debug, Clone)]
pub struct LbSpec {
    /// The frontend's addresses (the load balancer peer's own), both on `port`.
    pub listen: Vec<IpAddr>,
    pub port: u16,
    /// The node's nginx, as the one server.
    pub server: SocketAddr,
    pub send_proxy: SendProxy,
    /// `option httpchk GET <nginx health path>` every this often, the check carrying the same
    /// PROXY header kind (`check-send-proxy`: LOCAL for v2, the checker's own addresses for
    /// v1). `None`: no health checks.
    pub check_every: Option<Duration>,
}

/// The configuration file for `spec`, logging to stdout.
pub fn config(spec: &LbSpec) -> String {
    let binds: String = spec
        .listen
        .iter()
        .map(|ip| {
            let addr = SocketAddr::new(*ip, spec.port);
            format!("    bind {addr}\n")
        })
        .collect();
    let (check_opts, check_lines) = match spec.check_every {
        None => (String::new(), String::new()),
        Some(every) => (
            format!(
                " check check-send-proxy inter {}ms",
                every.as_millis().max(1)
            ),
            format!("    option httpchk GET {HEALTH_PATH}\n    http-check expect status 200\n"),
        ),
    };
    let server = spec.server;
    let send = spec.send_proxy.keyword();
    format!(
        r#"# wsguard lab: an L4 load balancer speaking the PROXY protocol to the node.
global
    log stdout format raw local0 info
    maxconn 8192

defaults
    mode tcp
    log global
    option tcplog
    option dontlognull
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    timeout client-fin 1s
    timeout server-fin 1s

frontend lab_lb
{binds}    default_backend lab_nodes

backend lab_nodes
{check_lines}    server node {server} {send}{check_opts}
"#
    )
}

pub struct Haproxy {
    proc: Proc,
    pub spec: LbSpec,
    pub config: PathBuf,
}

impl Haproxy {
    /// Write the config under `dir/haproxy`, check it, start HAProxy in `ns` and wait until
    /// its frontend accepts connections.
    pub fn start(ns: &NetNs, dir: &Path, spec: LbSpec) -> Result<Self> {
        let home = dir.join("haproxy");
        fs::create_dir_all(&home)?;
        let path = home.join("haproxy.cfg");
        fs::write(&path, config(&spec))?;
        let cfg = path.display().to_string();
        let check = ns.exec(&[HAPROXY, "-c", "-q", "-f", &cfg], Duration::from_secs(10))?;
        if !check.status.success() {
            bail!(
                "haproxy refuses its config {cfg}: {}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }
        // -db: foreground, no fork, so the process group is HAProxy's whole life.
        let proc = Proc::spawn(ns, "haproxy", dir, Path::new(HAPROXY), &["-db", "-f", &cfg])?;
        let mut lb = Self {
            proc,
            spec,
            config: path,
        };
        lb.wait_ready(ns)?;
        Ok(lb)
    }

    fn wait_ready(&mut self, ns: &NetNs) -> Result<()> {
        let end = Instant::now() + Duration::from_secs(10);
        let targets: Vec<SocketAddr> = self
            .spec
            .listen
            .iter()
            .map(|ip| SocketAddr::new(*ip, self.spec.port))
            .collect();
        loop {
            let t = targets.clone();
            let up = ns.run(move || {
                t.iter()
                    .all(|a| TcpStream::connect_timeout(a, Duration::from_millis(300)).is_ok())
            })?;
            if up {
                return Ok(());
            }
            if !self.proc.running() {
                bail!("haproxy exited at start:\n{}", self.log());
            }
            if Instant::now() > end {
                bail!("haproxy did not listen within 10s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// HAProxy's log lines (stdout) and warnings (stderr).
    pub fn log(&self) -> String {
        format!("{}{}", self.proc.out_text(), self.proc.err_text())
    }

    pub fn running(&mut self) -> bool {
        self.proc.running()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        // Hard stop; Proc's drop reaps it and anything left in its group.
        self.proc.signal(libc::SIGTERM);
        let _ = self.proc.wait(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_the_header_kind_and_the_checks() {
        let spec = LbSpec {
            listen: vec![
                "198.18.0.10".parse().unwrap(),
                "fd00:5753::a".parse().unwrap(),
            ],
            port: 80,
            server: "198.18.0.1:80".parse().unwrap(),
            send_proxy: SendProxy::V2,
            check_every: Some(Duration::from_millis(200)),
        };
        let c = config(&spec);
        assert!(c.contains("bind 198.18.0.10:80\n") && c.contains("bind [fd00:5753::a]:80\n"));
        assert!(c.contains(
            "server node 198.18.0.1:80 send-proxy-v2 check check-send-proxy inter 200ms"
        ));
        assert!(c.contains("option httpchk GET /lab-nginx-health"));
        let c = config(&LbSpec {
            send_proxy: SendProxy::V1,
            check_every: None,
            ..spec
        });
        assert!(c.contains("server node 198.18.0.1:80 send-proxy\n"), "{c}");
        assert!(!c.contains("httpchk"));
    }
}
