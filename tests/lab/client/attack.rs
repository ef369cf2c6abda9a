//! Attackers: raw handshakes of one kind at a fixed rate, each on a fresh connection.

use anyhow::Context as _;
use clap::ValueEnum as _;
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::{sync::watch, task::JoinSet};
use wsguard_tests::lab::{proxy_header, summary::AttackSummary};

use crate::{
    AttackArgs, ProxyVersion, Reason,
    net::{Outcome, exchange, host_header, stopped},
};

/// The sample key of RFC 6455: any valid one will do, the server only hashes it.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// The source port a PROXY header claims (any will do: nothing answers it).
const CLAIMED_PORT: u16 = 40000;
/// More connections in flight than this would only measure the client's own limits.
const MAX_IN_FLIGHT: usize = 1024;

/// The request an attacker of `reason` sends: a valid handshake with one thing wrong.
pub fn request(reason: Reason, target: SocketAddr, path: &str) -> Vec<u8> {
    let method = if reason == Reason::BadMethod {
        "POST"
    } else {
        "GET"
    };
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\n",
        host_header(target)
    );
    if reason != Reason::NoUpgrade {
        r.push_str("Upgrade: websocket\r\n");
    }
    r.push_str(if reason == Reason::NoConnectionUpgrade {
        "Connection: keep-alive\r\n"
    } else {
        "Connection: Upgrade\r\n"
    });
    if reason != Reason::NoKey {
        r.push_str(&format!("Sec-WebSocket-Key: {KEY}\r\n"));
    }
    let version = if reason == Reason::BadVersion {
        "8"
    } else {
        "13"
    };
    r.push_str(&format!("Sec-WebSocket-Version: {version}\r\n"));
    if reason == Reason::BadMethod {
        r.push_str("Content-Length: 0\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

pub async fn run(
    args: AttackArgs,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<AttackSummary> {
    anyhow::ensure!(
        (1..=100_000).contains(&args.rate),
        "--rate must be 1..=100000"
    );
    let start = Instant::now();
    let deadline = start + args.duration;
    let http = request(args.reason, args.target, &args.path);
    let (pieces, delay) = match args.proxy_header {
        None => (vec![http], Duration::ZERO),
        Some(v) => {
            let bind = args
                .bind
                .context("--proxy-header needs --bind (the header's default client)")?;
            let claim = SocketAddr::new(args.proxy_claim.unwrap_or(bind), CLAIMED_PORT);
            let header = match v {
                ProxyVersion::V1 => proxy_header::v1(claim, args.target),
                ProxyVersion::V2 => proxy_header::v2(claim, args.target, &[]),
            };
            if args.proxy_split {
                // Its own segment, the way HAProxy's send-proxy-v2 sends it.
                (vec![header, http], Duration::from_millis(5))
            } else {
                (vec![[header, http].concat()], Duration::ZERO)
            }
        }
    };
    let req = Arc::new(pieces);
    let summary = Arc::new(Mutex::new(AttackSummary {
        reason: args
            .reason
            .to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default(),
        ..Default::default()
    }));
    if let Some(every) = args.report_every {
        let s = summary.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let mut snap = s.lock().expect("summary lock").clone();
                snap.elapsed_ms = start.elapsed().as_millis() as u64;
                if let Ok(j) = serde_json::to_string(&snap) {
                    println!("{j}");
                }
            }
        });
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1) / args.rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = JoinSet::new();
    let mut attempts = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(deadline.into()) => break,
            _ = stopped(&mut stop) => break,
        }
        if args.count.is_some_and(|c| attempts >= c) {
            break;
        }
        while tasks.len() >= MAX_IN_FLIGHT {
            tasks.join_next().await;
        }
        attempts += 1;
        summary.lock().expect("summary lock").attempts = attempts;
        let (req, s, a) = (req.clone(), summary.clone(), args.clone());
        tasks.spawn(async move {
            let outcome = exchange(a.target, a.bind, &req, delay, a.timeout).await;
            record(&mut s.lock().expect("summary lock"), outcome);
        });
    }
    // Every task is bounded by two timeouts; the extra second is slack, not a wait for more.
    let _ = tokio::time::timeout(args.timeout * 2 + Duration::from_secs(1), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let mut out = summary.lock().expect("summary lock").clone();
    out.elapsed_ms = start.elapsed().as_millis() as u64;
    out.is_final = true;
    Ok(out)
}

fn record(s: &mut AttackSummary, outcome: Outcome) {
    match outcome {
        Outcome::TimedOut => s.timed_out += 1,
        Outcome::Failed => s.connect_failed += 1,
        Outcome::NoResponse => {
            s.connected += 1;
            s.no_response += 1;
        }
        Outcome::Closed => {
            s.connected += 1;
            s.closed += 1;
        }
        Outcome::Status(code) => {
            s.connected += 1;
            *s.statuses.entry(code.to_string()).or_default() += 1;
        }
    }
}
