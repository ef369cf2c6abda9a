//! The lab behind an L4 load balancer: real HAProxy in a peer namespace of its own (`lb`) in
//! TCP mode, sending PROXY v1 or v2 headers to the node's nginx, which reads them the way
//! ingress-nginx does with `use-proxy-protocol: "true"`. Clients and attackers connect to the
//! load balancer; the node sees every proxied flow come from the load balancer's address.

use anyhow::{Context as _, Result};
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use super::{
    Bins, Lab, WS_PATH,
    haproxy::{Haproxy, LbSpec, SendProxy},
    nginx::Listen,
    proc::Proc,
    topology::{HTTP_PORT, NODE_PORT, PeerSpec},
};

/// The load balancer's peer name.
pub const LB: &str = "lb";
/// nginx's plain readiness port on the node's loopback (its site port needs a PROXY header).
pub const NGINX_HEALTH_PORT: u16 = 8079;

/// How the load balancer is set up.
#[derive(Debug, Clone, Copy)]
pub struct LbOptions {
    pub send_proxy: SendProxy,
    /// The load balancer reaches the node over IPv6 (else IPv4); clients of both families
    /// reach the load balancer either way.
    pub to_node_v6: bool,
    /// HAProxy health checks (`option httpchk`, with the PROXY header) this often.
    pub check_every: Option<Duration>,
}

impl LbOptions {
    pub fn new(send_proxy: SendProxy) -> Self {
        Self {
            send_proxy,
            to_node_v6: false,
            check_every: None,
        }
    }
}

pub struct ProxiedLab {
    // Field order is drop order: HAProxy and the pass program live in the lab's namespaces.
    pub lb: Haproxy,
    _napi: aya::Ebpf,
    pub lab: Lab,
}

impl ProxiedLab {
    /// The lab with nginx behind `listen … proxy_protocol`, the `lb` peer (added to `peers`)
    /// running HAProxy; wsguard is started separately.
    pub fn start(bins: Bins, peers: &[PeerSpec], opts: LbOptions) -> Result<Self> {
        let mut specs = vec![PeerSpec::new(LB)];
        specs.extend_from_slice(peers);
        let lab = Lab::start_with(
            bins,
            &specs,
            Listen::ProxyProtocol {
                health_port: NGINX_HEALTH_PORT,
            },
        )?;
        let p = lab.peer(LB);
        let spec = LbSpec {
            listen: vec![p.ip4.into(), p.ip6.into()],
            port: HTTP_PORT,
            server: SocketAddr::new(lab.topo.node_ip(opts.to_node_v6), HTTP_PORT),
            send_proxy: opts.send_proxy,
            check_every: opts.check_every,
        };
        let lb = Haproxy::start(&p.ns, lab.dir(), spec)?;
        let napi = switch_port_napi(&lab)?;
        Ok(Self {
            lb,
            _napi: napi,
            lab,
        })
    }

    /// The load balancer's address of the family `v6` selects.
    pub fn lb_ip(&self, v6: bool) -> IpAddr {
        self.lab.peer(LB).ip(v6)
    }

    /// The address the node sees proxied flows come from.
    pub fn lb_source(&self) -> IpAddr {
        self.lb_ip(self.lb.spec.server.is_ipv6())
    }

    /// `ws://LB:80/ws`.
    pub fn ws_url(&self, v6: bool) -> String {
        match self.lb_ip(v6) {
            IpAddr::V4(ip) => format!("ws://{ip}:{HTTP_PORT}{WS_PATH}"),
            IpAddr::V6(ip) => format!("ws://[{ip}]:{HTTP_PORT}{WS_PATH}"),
        }
    }

    pub fn target(&self, v6: bool) -> SocketAddr {
        SocketAddr::new(self.lb_ip(v6), HTTP_PORT)
    }

    /// `count` legitimate WebSockets from `peer` through the load balancer.
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
        self.lab.client(peer, "legit", v6, &args)
    }

    /// Bad handshakes of `reason` from `peer` through the load balancer at `rate` per second;
    /// each attempt waits up to `timeout` for an answer (a cut flow ends long before).
    pub fn attack(
        &self,
        peer: &str,
        v6: bool,
        reason: &str,
        rate: u32,
        duration: &str,
        timeout: &str,
    ) -> Result<Proc> {
        let target = self.target(v6).to_string();
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
            "--timeout",
            timeout,
            "--path",
            WS_PATH,
            "--report-every",
            "1s",
        ];
        self.lab
            .client(peer, &format!("attack-{reason}"), v6, &args)
    }

    /// `r`, with the lab's and HAProxy's logs attached when it is an error.
    pub fn check<T>(&self, r: Result<T>) -> Result<T> {
        let lb = self.lb.log();
        let lines: Vec<&str> = lb.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        self.lab
            .check(r)
            .map_err(|e| e.context(format!("--- haproxy (last lines)\n{tail}")))
    }
}

/// The RSTs wsguard sends back to the load balancer leave the node's NIC with XDP_TX; on a veth
/// in native mode such frames reach the other end only if that end runs NAPI, i.e. has an XDP
/// program of its own (a real NIC's wire needs nothing). An XDP_PASS program (the object's
/// benchmark reference) on the switch's end of the node's NIC; detached when dropped.
fn switch_port_napi(lab: &Lab) -> Result<aya::Ebpf> {
    let mut ebpf = wsguard::bpf::load_unpinned()?;
    lab.topo.switch().run(|| -> Result<()> {
        let p: &mut aya::programs::Xdp = ebpf
            .program_mut("wsguard_bench_pass")
            .context("the object has no wsguard_bench_pass")?
            .try_into()?;
        p.load()?;
        p.attach(NODE_PORT, aya::programs::XdpMode::Driver)?;
        Ok(())
    })??;
    Ok(ebpf)
}
