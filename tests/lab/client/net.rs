//! Sockets shared by the subcommands: bound sources, bounded connects, raw request/answer.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
    sync::watch,
};
use wsguard_tests::lab::http::response_status;

/// Flips to true on SIGTERM or SIGINT, so a run stopped by the lab still prints its summary.
pub fn stop_on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = tx.send(true);
    });
    rx
}

/// Resolves when a stop was asked for (never, if the sender is gone without asking).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// What became of one connection attempt.
pub enum Outcome {
    /// No answer to the SYN in time: what a source dropped by XDP sees.
    TimedOut,
    Failed,
    /// Connected, but no HTTP status line came back in time.
    NoResponse,
    /// Connected, then the peer closed or reset the connection before any status line.
    Closed,
    Status(u16),
}

/// Connect from `bind` (any port) to `target`; a timeout is reported as `TimedOut`.
pub async fn connect(
    target: SocketAddr,
    bind: Option<IpAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let sock = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = bind {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    match tokio::time::timeout(timeout, sock.connect(target)).await {
        Ok(r) => r,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// `Host` header value for a target (brackets around IPv6).
pub fn host_header(target: SocketAddr) -> String {
    match target.port() {
        80 => match target.ip() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        },
        _ => target.to_string(),
    }
}

/// Connect, send `pieces` (pausing `delay` between them, each its own TCP segment), and read
/// the status line of the answer.
pub async fn exchange(
    target: SocketAddr,
    bind: Option<IpAddr>,
    pieces: &[Vec<u8>],
    delay: Duration,
    timeout: Duration,
) -> Outcome {
    let mut stream = match connect(target, bind, timeout).await {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::TimedOut => return Outcome::TimedOut,
        Err(_) => return Outcome::Failed,
    };
    // Without Nagle each write leaves as its own segment, so split requests really are split.
    let _ = stream.set_nodelay(true);
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(delay).await;
        }
        if stream.write_all(piece).await.is_err() {
            return Outcome::Closed;
        }
    }
    let mut buf = Vec::with_capacity(256);
    let mut ended = false;
    let read = async {
        let mut chunk = [0u8; 512];
        while buf.len() < 4096 && !buf.contains(&b'\n') {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    ended = true;
                    break;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(timeout, read).await;
    match response_status(&buf) {
        Some(s) => Outcome::Status(s),
        None if ended => Outcome::Closed,
        None => Outcome::NoResponse,
    }
}
