//! A small blocking HTTP/1.1 client for the agent's Unix socket. One request per connection
//! (`Connection: close`), so a response ends at EOF; the CLI needs nothing more, and staying
//! synchronous keeps the CLI free of an async runtime.

use std::{
    io::{self, BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Serialize, de::DeserializeOwned};

use super::{CliError, Result};
use crate::api::ApiError;

/// Long enough for a 10k-entry import batch on a busy node.
const TIMEOUT: Duration = Duration::from_secs(120);

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call("GET", path, None)
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.call("POST", path, Some(to_json(body)?))
    }

    /// POST a body already in JSON.
    pub fn post_json<T: DeserializeOwned>(&self, path: &str, json: Vec<u8>) -> Result<T> {
        self.call("POST", path, Some(json))
    }

    pub fn delete<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.call("DELETE", path, Some(to_json(body)?))
    }

    /// A GET's body as the agent sent it (a success; an error answer becomes the error).
    pub fn get_bytes(&self, path: &str) -> Result<Vec<u8>> {
        self.call_bytes("GET", path, None)
    }

    /// The error for a success answer this CLI cannot read.
    pub fn not_understood(&self, e: impl std::fmt::Display) -> CliError {
        CliError::runtime(format!(
            "the agent at {} sent an answer this CLI does not understand ({e}); are the CLI and \
             the agent the same version?",
            self.socket.display()
        ))
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T> {
        let bytes = self.call_bytes(method, path, body)?;
        serde_json::from_slice(&bytes).map_err(|e| self.not_understood(e))
    }

    fn call_bytes(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<Vec<u8>> {
        let (status, bytes) = self
            .request(method, path, body.as_deref())
            .map_err(|e| self.io_error(e))?;
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        match serde_json::from_slice::<ApiError>(&bytes) {
            Ok(e) => Err(e.into()),
            Err(_) => Err(CliError::runtime(format!(
                "the agent answered {method} {path} with HTTP {status}: {}",
                String::from_utf8_lossy(&bytes).trim()
            ))),
        }
    }

    fn io_error(&self, e: io::Error) -> CliError {
        let s = self.socket.display();
        let hint = "is the agent running? start it with `wsguard agent …`, or point --socket \
                    (or WSGUARD_SOCKET) at its socket";
        CliError::runtime(match e.kind() {
            io::ErrorKind::NotFound => format!("no agent socket at {s}: {hint}"),
            io::ErrorKind::ConnectionRefused => {
                format!("nothing is listening on {s} (a stale socket): {hint}")
            }
            io::ErrorKind::PermissionDenied => format!(
                "permission denied on the agent socket {s}: run as root (e.g. `sudo wsguard …`)"
            ),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => format!(
                "the agent at {s} did not answer within {}s",
                TIMEOUT.as_secs()
            ),
            _ => format!("talking to the agent at {s}: {e}"),
        })
    }

    fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> io::Result<(u16, Vec<u8>)> {
        let mut s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: wsguard\r\nConnection: close\r\nAccept: application/json\r\n"
        );
        if let Some(b) = body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        head.push_str("\r\n");
        let mut msg = head.into_bytes();
        msg.extend_from_slice(body.unwrap_or_default());
        // The agent may answer (a refusal, say) and close before it has read the whole request;
        // the write then fails with EPIPE but the answer is waiting: read it before giving up.
        let written = s.write_all(&msg);
        match (written, read_response(BufReader::new(s))) {
            (_, Ok(answer)) => Ok(answer),
            (Err(w), Err(_)) => Err(w),
            (Ok(()), Err(r)) => Err(r),
        }
    }
}

fn to_json<B: Serialize>(b: &B) -> Result<Vec<u8>> {
    serde_json::to_vec(b).map_err(|e| CliError::runtime(format!("cannot encode the request: {e}")))
}

fn bad(m: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.into())
}

fn read_response(mut r: impl BufRead) -> io::Result<(u16, Vec<u8>)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("not an HTTP answer: {:?}", line.trim())))?;
    let (mut length, mut chunked) = (None, false);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(bad("the answer ended inside its headers"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.eq_ignore_ascii_case("chunked");
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok((status, body))
}

/// Percent-encode a query value (addresses and source names; IPv6 colons are fine as is).
pub fn query_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_length_and_chunked_bodies() {
        let (s, b) = read_response(&b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]"[..]).unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"[]"[..]));
        let (s, b) = read_response(
            &b"HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n2\r\n\"}\r\n0\r\n\r\n"[..],
        )
        .unwrap();
        assert_eq!((s, b.as_slice()), (409, &b"{\"a\"}"[..]));
        assert!(read_response(&b"garbage\r\n"[..]).is_err());
    }

    #[test]
    fn missing_socket_says_how_to_start_the_agent() {
        let c = Client::new(Path::new("/nonexistent/wsguard.sock"));
        let e = c.get::<serde_json::Value>("/v1/status").unwrap_err();
        assert_eq!(e.code, 1);
        assert!(e.message.contains("/nonexistent/wsguard.sock"), "{e}");
        assert!(
            e.message
                .contains("is the agent running? start it with `wsguard agent"),
            "{e}"
        );
    }

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(query_value("fd00::1"), "fd00::1");
        assert_eq!(query_value("a b&c"), "a%20b%26c");
    }
}
