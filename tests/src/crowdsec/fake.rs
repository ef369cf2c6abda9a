//! A misbehaving LAPI for the fail-static tests: a plain HTTP/1.1 server on a thread inside a
//! lab namespace that answers `/v1/decisions/stream` with whatever the test sets (a good
//! answer, garbage, wrong types, a huge body, a slow trickle, a 5xx). Not a stand-in for
//! LAPI's behaviour (the real one is [`super::Lapi`]): only for answers LAPI would never give.

use anyhow::{Context as _, Result};
use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::NetNs;

#[derive(Clone, Debug)]
pub enum Answer {
    /// 200 with this body.
    Body(Vec<u8>),
    /// This status and body.
    Status(u16, Vec<u8>),
    /// 200 with a body of this many bytes of a JSON string (Content-Length given).
    Huge(usize),
    /// 200 with a chunked body that never ends within the test's patience (one byte per 200
    /// ms, at most 30 s).
    Slow,
}

pub struct FakeLapi {
    pub addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    pub requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeLapi {
    /// Listen on 127.0.0.1:`port` inside `ns`.
    pub fn start(ns: &NetNs, port: u16, first: Answer) -> Result<Self> {
        let file = fs::File::open(Path::new("/run/netns").join(ns.name()))?;
        let answer = Arc::new(Mutex::new(first));
        let requests = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (a, r, s) = (answer.clone(), requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // SAFETY: a valid namespace fd; CLONE_NEWNET only switches this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let _ = tx.send(Err(std::io::Error::last_os_error().to_string()));
                return;
            }
            let l = match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = l.set_nonblocking(true);
            let _ = tx.send(Ok(()));
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        r.fetch_add(1, Ordering::Relaxed);
                        let ans = a.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        let stop = s.clone();
                        std::thread::spawn(move || serve(c, ans, &stop));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(10))
            .context("fake LAPI thread")?
            .map_err(anyhow::Error::msg)?;
        Ok(Self {
            addr: ([127, 0, 0, 1], port).into(),
            answer,
            requests,
            stop,
            thread: Some(thread),
        })
    }

    pub fn set(&self, a: Answer) {
        *self.answer.lock().unwrap_or_else(|p| p.into_inner()) = a;
    }
}

fn serve(mut c: TcpStream, ans: Answer, stop: &AtomicBool) {
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let mut r = BufReader::new(match c.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    // The request head; the agent's GET has no body.
    let mut line = String::new();
    for _ in 0..100 {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
    }
    let head = |status: u16, len: Option<usize>| {
        let mut h = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nConnection: close\r\n"
        );
        match len {
            Some(n) => h.push_str(&format!("Content-Length: {n}\r\n\r\n")),
            None => h.push_str("Transfer-Encoding: chunked\r\n\r\n"),
        }
        h
    };
    let _ = match ans {
        Answer::Body(b) => c
            .write_all(head(200, Some(b.len())).as_bytes())
            .and_then(|()| c.write_all(&b)),
        Answer::Status(s, b) => c
            .write_all(head(s, Some(b.len())).as_bytes())
            .and_then(|()| c.write_all(&b)),
        Answer::Huge(n) => (|| {
            c.write_all(head(200, Some(n)).as_bytes())?;
            c.write_all(b"\"")?;
            let chunk = vec![b'a'; 64 << 10];
            let mut left = n.saturating_sub(2);
            while left > 0 {
                let k = left.min(chunk.len());
                c.write_all(&chunk[..k])?;
                left -= k;
            }
            c.write_all(b"\"")
        })(),
        Answer::Slow => (|| {
            c.write_all(head(200, None).as_bytes())?;
            c.write_all(b"1\r\n{\r\n")?;
            for _ in 0..150 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
                c.write_all(b"1\r\n \r\n")?;
            }
            Ok(())
        })(),
    };
    let mut sink = [0u8; 64];
    let _ = c.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = c.read(&mut sink);
}

impl Drop for FakeLapi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
