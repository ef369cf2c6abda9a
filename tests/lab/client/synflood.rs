//! A SYN flood without raw sockets: non-blocking connects that the client abandons after a
//! short hold. Each one puts a real SYN (and its retransmits) on the wire from the bound
//! source, which is what a banned attacker keeps sending.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::{
    collections::VecDeque,
    net::SocketAddr,
    time::{Duration, Instant},
};
use tokio::sync::watch;
use wsguard_tests::lab::summary::SynfloodSummary;

use crate::{SynfloodArgs, net::stopped};

/// How long a half-open connect is kept before it is dropped (and counted if it completed).
const HOLD: Duration = Duration::from_millis(300);
/// Bounds the file descriptors held at once.
const MAX_PENDING: usize = 8192;

pub async fn run(
    args: SynfloodArgs,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<SynfloodSummary> {
    anyhow::ensure!(
        (1..=100_000).contains(&args.rate),
        "--rate must be 1..=100000"
    );
    let start = Instant::now();
    let deadline = start + args.duration;
    let mut out = SynfloodSummary::default();
    let mut pending: VecDeque<(Instant, Socket)> = VecDeque::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / args.rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(deadline.into()) => break,
            _ = stopped(&mut stop) => break,
        }
        while pending
            .front()
            .is_some_and(|(t, _)| t.elapsed() >= HOLD || pending.len() >= MAX_PENDING)
        {
            let (_, s) = pending.pop_front().expect("front exists");
            settle(&mut out, &s);
        }
        if let Ok(s) = syn(args.target, args.bind) {
            out.syns += 1;
            pending.push_back((Instant::now(), s));
        }
    }
    for (_, s) in pending.drain(..) {
        settle(&mut out, &s);
    }
    out.elapsed_ms = start.elapsed().as_millis() as u64;
    Ok(out)
}

fn syn(target: SocketAddr, bind: Option<std::net::IpAddr>) -> std::io::Result<Socket> {
    let s = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    s.set_nonblocking(true)?;
    if let Some(ip) = bind {
        s.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    match s.connect(&SockAddr::from(target)) {
        Ok(()) => Ok(s),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(s),
        Err(e) => Err(e),
    }
}

fn settle(out: &mut SynfloodSummary, s: &Socket) {
    if s.peer_addr().is_ok() {
        out.established += 1;
    }
}
