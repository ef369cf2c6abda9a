//! The lab's WebSocket echo backend. It judges handshakes the way the Spring server of the
//! original incident did (same statuses, same log line), so the lab reproduces what nginx and
//! wsguard see in production: a request without a valid `Upgrade` header gets a 400 and
//! "Handshake failed due to invalid Upgrade header: null". Paths given with `--reject-path`
//! get a 400 even for a valid handshake, the case only the egress program can see.

use clap::Parser;
use futures_util::{SinkExt as _, StreamExt as _};
use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, handshake::derive_accept_key, protocol::Role},
};
use wsguard_tests::lab::http::{Head, parse_head};

/// Bounds a peer that never finishes its header block.
const HEAD_LIMIT: usize = 16 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(about = "WebSocket echo backend that rejects bad handshakes like Spring does")]
struct Args {
    /// Address to listen on; repeatable (IPv4 and IPv6).
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    /// Paths answered with 400 even for a valid handshake.
    #[arg(
        long = "reject-path",
        env = "WSGUARD_LAB_REJECT_PATHS",
        value_delimiter = ',',
        default_value = "/reject"
    )]
    reject_paths: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let reject = Arc::new(args.reject_paths);
    for addr in &args.listen {
        let listener = TcpListener::bind(addr).await?;
        // The lab waits for this line before it sends traffic.
        println!("listening on {}", listener.local_addr()?);
        let reject = reject.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        tokio::spawn(serve(stream, peer, reject.clone()));
                    }
                    Err(e) => eprintln!("accept: {e}"),
                }
            }
        });
    }
    // The accept loops run until the lab stops this process.
    std::future::pending::<()>().await;
    Ok(())
}

async fn serve(mut stream: TcpStream, peer: SocketAddr, reject: Arc<Vec<String>>) {
    let Ok(Ok(Some((head, rest)))) =
        tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await
    else {
        return;
    };
    let client = head
        .header("x-forwarded-for")
        .map_or_else(|| peer.ip().to_string(), str::to_owned);
    match verdict(&head, &reject) {
        Ok(key) => {
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\n\r\n",
                derive_accept_key(key.as_bytes())
            );
            if stream.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
            let ws = WebSocketStream::from_partially_read(stream, rest, Role::Server, None).await;
            echo(ws).await;
        }
        Err((status, extra, message)) => {
            println!("client={client} path={} {message}", head.path);
            let body = format!("{message}\n");
            let resp = format!(
                "HTTP/1.1 {status}\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    }
}

/// The handshake key of a valid request, or the status, extra headers and log message of the
/// rejection, checked in Spring's order.
fn verdict<'a>(
    head: &'a Head,
    reject: &[String],
) -> Result<&'a str, (&'static str, &'static str, String)> {
    if !head.method.eq_ignore_ascii_case("GET") {
        let msg = format!(
            "Handshake failed due to invalid HTTP method: {}",
            head.method
        );
        return Err(("405 Method Not Allowed", "Allow: GET\r\n", msg));
    }
    let upgrade = head.header("upgrade");
    if !upgrade.is_some_and(|v| has_token(v, "websocket")) {
        let msg = format!(
            "Handshake failed due to invalid Upgrade header: {}",
            upgrade.unwrap_or("null")
        );
        return Err(("400 Bad Request", "", msg));
    }
    let connection = head.header("connection");
    if !connection.is_some_and(|v| has_token(v, "upgrade")) {
        let msg = format!(
            "Handshake failed due to invalid Connection header {}",
            connection.unwrap_or("null")
        );
        return Err(("400 Bad Request", "", msg));
    }
    let version = head.header("sec-websocket-version").unwrap_or("null");
    if version != "13" {
        let msg = format!("Handshake failed due to unsupported WebSocket version: {version}");
        return Err(("426 Upgrade Required", "Sec-WebSocket-Version: 13\r\n", msg));
    }
    let Some(key) = head.header("sec-websocket-key").filter(|k| !k.is_empty()) else {
        let msg = "Missing \"Sec-WebSocket-Key\" header".to_owned();
        return Err(("400 Bad Request", "", msg));
    };
    if reject.contains(&head.path) {
        let msg = format!(
            "Handshake rejected by the application for path {}",
            head.path
        );
        return Err(("400 Bad Request", "", msg));
    }
    Ok(key)
}

fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The parsed header block and whatever arrived after it.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<(Head, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    while buf.len() < HEAD_LIMIT {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok(parse_head(&buf).map(|h| (h, rest)));
        }
    }
    Ok(None)
}

async fn echo(mut ws: WebSocketStream<TcpStream>) {
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(_) | Message::Binary(_) => msg,
            Message::Close(_) => break,
            // tungstenite answers pings itself on the next write or flush.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}
