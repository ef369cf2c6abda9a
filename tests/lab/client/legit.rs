//! Legitimate users: long-lived WebSockets, one message every interval, every lost echo and
//! every dropped connection counted. They reconnect after a refusal or a disconnect, the way
//! browsers and SDKs do, which is what turns an upstream outage into a reconnect storm.

use futures_util::{SinkExt as _, StreamExt as _};
use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::{net::TcpStream, sync::watch, task::JoinSet};
use tokio_tungstenite::{
    WebSocketStream, client_async,
    tungstenite::{Error as WsError, Message, client::IntoClientRequest as _},
};
use wsguard_tests::lab::summary::LegitSummary;

use crate::{
    LegitArgs,
    net::{connect, stopped},
};

type Shared = Arc<Mutex<LegitSummary>>;

struct Worker {
    id: u32,
    args: LegitArgs,
    target: SocketAddr,
    deadline: Instant,
    summary: Shared,
    stop: watch::Receiver<bool>,
}

pub async fn run(args: LegitArgs, stop: watch::Receiver<bool>) -> anyhow::Result<LegitSummary> {
    anyhow::ensure!(
        (1..=10_000).contains(&args.count),
        "--count must be 1..=10000"
    );
    let target = resolve(&args.target)?;
    let start = Instant::now();
    let deadline = start + args.duration;
    let summary: Shared = Arc::default();
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
    let mut workers = JoinSet::new();
    for id in 0..args.count {
        let w = Worker {
            id,
            args: args.clone(),
            target,
            deadline,
            summary: summary.clone(),
            stop: stop.clone(),
        };
        workers.spawn(w.run());
    }
    // Workers end at the deadline; the slack covers one last bounded exchange and close.
    let slack = args.timeout * 2 + Duration::from_secs(1);
    let _ = tokio::time::timeout(args.duration + slack, async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    workers.abort_all();
    let mut out = summary.lock().expect("summary lock").clone();
    out.elapsed_ms = start.elapsed().as_millis() as u64;
    out.is_final = true;
    Ok(out)
}

/// The socket address of a `ws://` URL (IP literals only: the lab has no DNS).
fn resolve(url: &str) -> anyhow::Result<SocketAddr> {
    let req = url.into_client_request()?;
    let uri = req.uri();
    let host = uri.host().unwrap_or_default();
    let ip: IpAddr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| anyhow::anyhow!("--target {url}: the host must be an IP address"))?;
    Ok(SocketAddr::new(ip, uri.port_u16().unwrap_or(80)))
}

enum End {
    /// The deadline passed or a stop was asked for: the worker is done.
    Done,
    /// The WebSocket broke; reconnect.
    Lost,
}

impl Worker {
    async fn run(mut self) {
        while Instant::now() < self.deadline && !*self.stop.borrow() {
            match self.open().await {
                Some(ws) => {
                    self.count(|s| s.connections += 1);
                    if let End::Done = self.session(ws).await {
                        return;
                    }
                    self.count(|s| s.disconnects += 1);
                }
                None => self.count(|s| s.connect_failures += 1),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.args.backoff) => {}
                _ = tokio::time::sleep_until(self.deadline.into()) => return,
                _ = stopped(&mut self.stop) => return,
            }
        }
    }

    fn count(&self, f: impl FnOnce(&mut LegitSummary)) {
        f(&mut self.summary.lock().expect("summary lock"));
    }

    async fn open(&self) -> Option<WebSocketStream<TcpStream>> {
        let stream = connect(self.target, self.args.bind, self.args.timeout)
            .await
            .ok()?;
        let _ = stream.set_nodelay(true);
        let handshake = client_async(self.args.target.as_str(), stream);
        match tokio::time::timeout(self.args.timeout, handshake).await {
            Ok(Ok((ws, _))) => Some(ws),
            Ok(Err(WsError::Http(resp))) => {
                let code = resp.status().as_u16().to_string();
                self.count(|s| *s.statuses.entry(code).or_default() += 1);
                None
            }
            _ => None,
        }
    }

    async fn session(&mut self, mut ws: WebSocketStream<TcpStream>) -> End {
        let mut tick = tokio::time::interval(self.args.interval);
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tokio::time::sleep_until(self.deadline.into()) => break,
                _ = stopped(&mut self.stop) => break,
            }
            seq += 1;
            let text = format!("{}-{seq}", self.id);
            let sent =
                tokio::time::timeout(self.args.timeout, ws.send(Message::text(text.as_str())));
            if !matches!(sent.await, Ok(Ok(()))) {
                self.count(|s| s.failures += 1);
                return End::Lost;
            }
            match tokio::time::timeout(self.args.timeout, echo_of(&mut ws, &text)).await {
                Ok(true) => self.count(|s| s.messages_ok += 1),
                Ok(false) => {
                    self.count(|s| s.failures += 1);
                    return End::Lost;
                }
                // A late echo is skipped by the next wait, so the socket stays usable.
                Err(_) => self.count(|s| s.failures += 1),
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), ws.close(None)).await;
        End::Done
    }
}

/// Wait for the echo of `text`; false when the WebSocket ends first.
async fn echo_of(ws: &mut WebSocketStream<TcpStream>, text: &str) -> bool {
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Text(t)) if t.as_str() == text => return true,
            Ok(Message::Close(_)) | Err(_) => return false,
            Ok(_) => {}
        }
    }
    false
}
