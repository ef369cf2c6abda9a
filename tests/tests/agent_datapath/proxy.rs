//! PROXY-protocol flows cut on a real veth pair, with real sockets: a TCP server in the
//! protected namespace, a "load balancer" in the other that connects to it and sends a PROXY
//! header naming a client. Through the agent's data path API (`set_proxy_trust`, `put_ban`,
//! `cut_flows`, `settle_cuts`, `proxy_counters`, `proxy_senders`), in native and generic XDP,
//! IPv4 and IPv6, with the TCP options Linux sends and IPv4 options on the proxy's socket:
//! - a banned client's new flow: the server never reads the request (its socket is reset or
//!   never shows up), and the proxy's connection fails with ECONNRESET instead of hanging;
//! - a clean client's flow works, and one of a client banned after it was established keeps
//!   working (preserved) unless the ban is hard, when `cut_flows` cuts it at its next packet;
//! - the headers are counted, the senders of headers not believed are reported.

use anyhow::{Context as _, Result, bail, ensure};
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};
use wsguard::{
    addr::Cidr,
    datapath::{DataPath, DataPathOptions, OpenHooks, XdpMode},
};
use wsguard_common::maps::{BAN_HARD, BanValue};
use wsguard_tests::{
    netns::{BpfFs, VethLab},
    packet::ws_request,
};

use crate::support::*;

const PORT: u16 = 8080;
/// How long a socket waits for anything: far past a RST's round trip, so a hang fails the test
/// instead of passing it.
const WAIT: Duration = Duration::from_secs(5);

/// The protected side, attached in `mode`, trusting the other side's addresses as proxies.
fn setup(lab: &VethLab, bpffs: &BpfFs, mode: XdpMode) -> Result<(DataPathOptions, DataPath)> {
    let o = DataPathOptions {
        xdp_mode: mode,
        ..opts(bpffs, &[&lab.if_a], 1000)
    };
    let mut dp = open_in(lab, &o, OpenHooks::default())?;
    dp.set_ports(&[PORT])?;
    dp.set_proxy_trust(&[cidr("198.18.0.0/24"), cidr("fd00:5753::/64")])?;
    Ok((o, dp))
}

/// Native XDP_TX on a veth reaches the peer only when the peer runs NAPI (an XDP program of its
/// own, or GRO): give the proxy's side a pass-everything program, as a NIC needs nothing.
fn peer_napi(lab: &VethLab) -> Result<aya::Ebpf> {
    let mut ebpf = wsguard::bpf::load_unpinned()?;
    let iface = lab.if_b.clone();
    lab.b.run(|| -> Result<()> {
        let p: &mut aya::programs::Xdp = ebpf
            .program_mut("wsguard_bench_pass")
            .context("the pass program")?
            .try_into()?;
        p.load()?;
        p.attach(&iface, aya::programs::XdpMode::Driver)?;
        Ok(())
    })??;
    Ok(ebpf)
}

fn listen(lab: &VethLab, v6: bool) -> Result<TcpListener> {
    let addr: SocketAddr = if v6 {
        (IpAddr::V6(lab.ip6_a), PORT).into()
    } else {
        (IpAddr::V4(lab.ip_a), PORT).into()
    };
    let l = lab.a.run(|| TcpListener::bind(addr))??;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Connect from the proxy's side; over IPv4 with an IP option on every segment (four NOPs
/// would be dropped by nothing but are options all the same: `ihl` 6).
fn connect(lab: &VethLab, v6: bool) -> Result<TcpStream> {
    let addr: SocketAddr = if v6 {
        (IpAddr::V6(lab.ip6_a), PORT).into()
    } else {
        (IpAddr::V4(lab.ip_a), PORT).into()
    };
    let s = lab.b.run(|| TcpStream::connect_timeout(&addr, WAIT))??;
    if !v6 {
        let opts: [u8; 4] = [1, 1, 1, 0];
        // SAFETY: a valid socket and a 4-byte option buffer.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_OPTIONS,
                opts.as_ptr().cast(),
                opts.len() as u32,
            )
        };
        ensure!(rc == 0, "IP_OPTIONS: {}", std::io::Error::last_os_error());
    }
    s.set_read_timeout(Some(WAIT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Accept one connection within `WAIT` (None: none came).
fn accept(l: &TcpListener) -> Result<Option<TcpStream>> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(WAIT))?;
                return Ok(Some(s));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

fn header(client: &str, v6: bool) -> Vec<u8> {
    if v6 {
        format!("PROXY TCP6 {client} fd00:5753::1 40000 {PORT}\r\n").into_bytes()
    } else {
        format!("PROXY TCP4 {client} 198.18.0.1 40000 {PORT}\r\n").into_bytes()
    }
}

/// What the server saw of a connection that must have been cut before it read anything.
fn assert_server_never_read(l: &TcpListener, what: &str) -> Result<()> {
    let Some(mut s) = accept(l)? else {
        // Reset before it was accepted: gone from the queue. Never read either.
        return Ok(());
    };
    let mut buf = [0u8; 512];
    match s.read(&mut buf) {
        Ok(0) => Ok(()),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
        Ok(n) => bail!(
            "{what}: the server read {n} bytes: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => bail!("{what}: the server's read: {e} (reset expected, not a hang)"),
    }
}

/// The proxy's connection after the cut: its next read fails with ECONNRESET (the RST the data
/// plane sent back), well before `WAIT`. The time it took is printed, never asserted.
fn assert_proxy_reset(s: &mut TcpStream, started: Instant, what: &str) -> Result<()> {
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {
            println!(
                "{what}: the proxy's connection reset after {:?}",
                started.elapsed()
            );
            Ok(())
        }
        Ok(n) => bail!("{what}: the proxy read {n} bytes instead of a reset"),
        Err(e) => bail!("{what}: the proxy's read: {e} (a reset expected, not a hang)"),
    }
}

fn banned(hard: bool) -> BanValue {
    BanValue {
        flags: if hard { BAN_HARD } else { 0 },
        ..ban()
    }
}

/// A banned client's new flows through the proxy, in both XDP modes and both families: the
/// server never reads the request, the proxy's connection is reset.
#[test]
fn a_banned_clients_new_flow_is_reset_on_both_sides() -> Result<()> {
    for mode in [XdpMode::Native, XdpMode::Generic] {
        let lab = VethLab::new()?;
        let bpffs = BpfFs::new()?;
        let (o, mut dp) = setup(&lab, &bpffs, mode)?;
        let _detach = Detach(o.pin_dir.clone());
        let _napi = peer_napi(&lab)?;
        ensure!(
            dp.interfaces()[0].xdp_mode
                == if mode == XdpMode::Native {
                    "native"
                } else {
                    "generic"
                },
            "attached {:?}",
            dp.interfaces()
        );
        for (v6, client) in [(false, "198.19.30.1"), (true, "fd00:30::1")] {
            let what = format!("{mode:?} {}", if v6 { "IPv6" } else { "IPv4" });
            dp.put_ban(&cidr(client), &banned(false))?;
            let l = listen(&lab, v6)?;
            let before = dp.proxy_counters()?;
            let mut s = connect(&lab, v6)?;
            let mut req = header(client, v6);
            req.extend_from_slice(&ws_request("/"));
            let started = Instant::now();
            s.write_all(&req)?;
            assert_server_never_read(&l, &what)?;
            assert_proxy_reset(&mut s, started, &what)?;
            let after = dp.proxy_counters()?;
            ensure!(
                after.reset > before.reset && after.v1.client > before.v1.client,
                "{what}: counters {before:?} -> {after:?}"
            );
            // A clean client through the same proxy is served.
            drop(l);
            let l2 = listen(&lab, v6)?;
            let clean = if v6 { "fd00:31::1" } else { "198.19.31.1" };
            served(&lab, &l2, v6, clean, &what)?;
        }
        drop(dp);
    }
    Ok(())
}

/// A clean client's flow through the proxy: the server reads exactly the request (after the
/// header nginx would strip), answers, the proxy reads the answer.
fn served(lab: &VethLab, l: &TcpListener, v6: bool, client: &str, what: &str) -> Result<()> {
    let mut s = connect(lab, v6)?;
    let hdr = header(client, v6);
    let mut req = hdr.clone();
    req.extend_from_slice(&ws_request("/"));
    s.write_all(&req)?;
    let mut srv = accept(l)?.with_context(|| format!("{what}: {client} never accepted"))?;
    let mut got = vec![0u8; req.len()];
    srv.read_exact(&mut got)
        .with_context(|| format!("{what}: {client}'s request"))?;
    ensure!(got == req, "{what}: the server read something else");
    srv.write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")?;
    let mut ans = [0u8; 12];
    s.read_exact(&mut ans)
        .with_context(|| format!("{what}: {client}'s answer"))?;
    ensure!(&ans == b"HTTP/1.1 101", "{what}: answer {ans:?}");
    Ok(())
}

/// An established flow of a client banned afterwards: preserved by a plain ban (frames still
/// flow both ways), cut by a hard one through `cut_flows` at its next packet.
#[test]
fn established_flows_are_preserved_unless_the_ban_is_hard() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let (o, mut dp) = setup(&lab, &bpffs, XdpMode::Native)?;
    let _detach = Detach(o.pin_dir.clone());
    let _napi = peer_napi(&lab)?;
    for (i, hard) in [false, true].into_iter().enumerate() {
        let client = format!("198.19.32.{}", i + 1);
        let l = listen(&lab, false)?;
        let mut s = connect(&lab, false)?;
        let mut req = header(&client, false);
        req.extend_from_slice(&ws_request("/"));
        s.write_all(&req)?;
        let mut srv = accept(&l)?.context("never accepted")?;
        let mut got = vec![0u8; req.len()];
        srv.read_exact(&mut got)?;
        srv.write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")?;
        let mut ans = [0u8; 36];
        s.read_exact(&mut ans)?;
        // Established (the TC program saw the 101); now the client is banned.
        let c = cidr(&client);
        dp.put_ban(&c, &banned(hard))?;
        let frame = [0x81u8, 0x82, 1, 2, 3, 4, 0x61 ^ 1, 0x62 ^ 2];
        if !hard {
            // A plain ban cuts nothing: frames still reach the server, answers the proxy.
            s.write_all(&frame)?;
            let mut b = [0u8; 8];
            srv.read_exact(&mut b)
                .context("preserved: the server's read")?;
            ensure!(b == frame);
            srv.write_all(&[0x81, 0x02, b'o', b'k'])?;
            let mut a = [0u8; 4];
            s.read_exact(&mut a)
                .context("preserved: the proxy's read")?;
            continue;
        }
        ensure!(dp.cut_flows(&c)? == 1, "one live flow of {client} marked");
        ensure!(
            dp.settle_cuts()? == 1,
            "still marked before its next packet"
        );
        let started = Instant::now();
        s.write_all(&frame)?;
        let mut b = [0u8; 8];
        match srv.read(&mut b) {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Ok(0) => {}
            other => bail!("hard ban: the server's read {other:?}, a reset expected"),
        }
        assert_proxy_reset(&mut s, started, "hard ban")?;
        ensure!(dp.settle_cuts()? == 0, "the mark is gone once cut");
        ensure!(
            dp.config()?.flags & wsguard_common::maps::CFG_CUT_PENDING == 0,
            "the pending flag is cleared"
        );
    }
    Ok(())
}

/// With no trusted sender configured, a flow that begins with a PROXY header is never judged
/// (the server gets it untouched), counted untrusted, and its sender reported.
#[test]
fn unconfigured_headers_are_counted_and_their_sender_reported() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 1000);
    let mut dp = open_in(&lab, &o, OpenHooks::default())?;
    let _detach = Detach(o.pin_dir.clone());
    dp.set_ports(&[PORT])?;
    ensure!(dp.proxy_trust()?.is_empty());
    let l = listen(&lab, false)?;
    served(&lab, &l, false, "198.19.33.1", "unconfigured")?;
    let c = dp.proxy_counters()?;
    ensure!(c.v1.untrusted == 1 && c.v1.client == 0, "{c:?}");
    let senders = dp.proxy_senders()?;
    ensure!(
        senders.len() == 1
            && senders[0].addr == IpAddr::V4(lab.ip_b)
            && senders[0].v1
            && senders[0].unconfigured
            && !senders[0].untrusted,
        "{senders:?}"
    );
    // Trusting it now: the same sender's next flow is read as a PROXY flow.
    dp.set_proxy_trust(&[Cidr::host(IpAddr::V4(lab.ip_b))])?;
    ensure!(dp.proxy_trust()? == vec![Cidr::host(IpAddr::V4(lab.ip_b))]);
    served(&lab, &l, false, "198.19.33.2", "trusted")?;
    ensure!(dp.proxy_counters()?.v1.client == 1);
    // Refused, changing nothing.
    ensure!(dp.set_proxy_trust(&[cidr("0.0.0.0/0")]).is_err());
    ensure!(dp.proxy_trust()? == vec![Cidr::host(IpAddr::V4(lab.ip_b))]);
    dp.set_proxy_trust(&[])?;
    ensure!(dp.proxy_trust()?.is_empty());
    ensure!(dp.config()?.flags & wsguard_common::maps::CFG_PROXY_TRUST == 0);
    Ok(())
}

/// Runs the kill switch when the test ends, passed or failed, before the namespaces and the
/// bpffs go (declare it after them).
struct Detach(std::path::PathBuf);

impl Drop for Detach {
    fn drop(&mut self) {
        if self.0.exists()
            && let Err(e) = DataPath::detach_all(&self.0)
        {
            eprintln!("cleanup: detach {}: {e}", self.0.display());
        }
    }
}
