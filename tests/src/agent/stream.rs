//! Steady traffic across agent restarts, to prove none of it is lost: numbered UDP datagrams
//! from chosen sources, and one established TCP connection exchanging echoes. Every loop is
//! bounded in count and time; `finish` stops the senders and reports what arrived.

use anyhow::{Context as _, Result, bail, ensure};
use std::{
    collections::{BTreeSet, HashMap},
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::NetNs;

/// Longest a stream may run, whatever the test does.
const MAX_RUN: Duration = Duration::from_secs(240);
const GAP: Duration = Duration::from_millis(5);

/// Run `f` on a new thread inside network namespace `ns`.
fn spawn_in<T: Send + 'static>(
    ns: &NetNs,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<JoinHandle<Result<T>>> {
    let file = std::fs::File::open(Path::new("/run/netns").join(ns.name()))
        .with_context(|| format!("open netns {}", ns.name()))?;
    let name = ns.name().to_owned();
    Ok(std::thread::spawn(move || {
        // SAFETY: a valid namespace fd; CLONE_NEWNET switches only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {name}: {}", std::io::Error::last_os_error());
        }
        f()
    }))
}

fn join<T>(h: JoinHandle<Result<T>>) -> Result<T> {
    h.join()
        .map_err(|_| anyhow::anyhow!("stream thread panicked"))?
}

/// What one source sent and what the receiver got from it.
#[derive(Debug, Default)]
pub struct Delivery {
    pub sent: u32,
    pub received: BTreeSet<u32>,
}

/// Sequence numbers received, per source.
type Arrivals = HashMap<IpAddr, BTreeSet<u32>>;

/// Numbered datagrams from each of `sources` (in `client`) to `dst:port` (in `server`).
pub struct UdpStream {
    stop_send: Arc<AtomicBool>,
    stop_recv: Arc<AtomicBool>,
    senders: Vec<(Ipv4Addr, JoinHandle<Result<u32>>)>,
    receiver: Option<JoinHandle<Result<Arrivals>>>,
}

/// A test that fails half-way stops its traffic too.
impl Drop for UdpStream {
    fn drop(&mut self) {
        self.stop_send.store(true, Ordering::SeqCst);
        self.stop_recv.store(true, Ordering::SeqCst);
    }
}

impl UdpStream {
    pub fn start(
        server: &NetNs,
        client: &NetNs,
        dst: Ipv4Addr,
        port: u16,
        sources: &[Ipv4Addr],
    ) -> Result<Self> {
        let stop_send = Arc::new(AtomicBool::new(false));
        let stop_recv = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let sr = stop_recv.clone();
        let receiver = spawn_in(server, move || {
            let sock = UdpSocket::bind((dst, port));
            let sock = match sock {
                Ok(s) => {
                    let _ = tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    bail!("bind {dst}:{port}: {e}");
                }
            };
            sock.set_read_timeout(Some(Duration::from_millis(100)))?;
            let mut got = Arrivals::new();
            let end = Instant::now() + MAX_RUN;
            let mut buf = [0u8; 64];
            while !sr.load(Ordering::SeqCst) && Instant::now() < end {
                if let Ok((n, from)) = sock.recv_from(&mut buf)
                    && n >= 4
                {
                    let seq = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes"));
                    got.entry(from.ip()).or_default().insert(seq);
                }
            }
            Ok(got)
        })?;
        rx.recv_timeout(Duration::from_secs(10))
            .context("receiver never started")?
            .map_err(anyhow::Error::msg)?;
        let mut senders = Vec::new();
        for src in sources {
            let (src, stop) = (*src, stop_send.clone());
            let h = spawn_in(client, move || {
                let sock = UdpSocket::bind((src, 0)).with_context(|| format!("bind {src}"))?;
                let to = SocketAddr::from((dst, port));
                let end = Instant::now() + MAX_RUN;
                let mut seq: u32 = 0;
                while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                    sock.send_to(&seq.to_be_bytes(), to)?;
                    seq += 1;
                    std::thread::sleep(GAP);
                }
                Ok(seq)
            })?;
            senders.push((src, h));
        }
        Ok(Self {
            stop_send,
            stop_recv,
            senders,
            receiver: Some(receiver),
        })
    }

    /// Stop sending, let the last datagrams land, and report per source.
    pub fn finish(mut self) -> Result<HashMap<Ipv4Addr, Delivery>> {
        self.stop_send.store(true, Ordering::SeqCst);
        let mut out = HashMap::new();
        for (src, h) in std::mem::take(&mut self.senders) {
            let sent = join(h)?;
            out.insert(
                src,
                Delivery {
                    sent,
                    ..Default::default()
                },
            );
        }
        std::thread::sleep(Duration::from_millis(500));
        self.stop_recv.store(true, Ordering::SeqCst);
        let mut got = join(self.receiver.take().context("finished twice")?)?;
        for (src, d) in &mut out {
            d.received = got.remove(&IpAddr::V4(*src)).unwrap_or_default();
        }
        Ok(out)
    }
}

/// One TCP connection from `src` (in `client`) to an echo server at `dst:port` (in `server`),
/// exchanging a numbered message every few milliseconds until `finish`.
pub struct TcpEcho {
    stop: Arc<AtomicBool>,
    client: Option<JoinHandle<Result<(u32, u32)>>>,
    server: Option<JoinHandle<Result<u32>>>,
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        // The client closes the connection, which ends the server.
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// TCP_INFO's count of retransmitted segments: any loss on the path shows up here.
fn retransmits(s: &TcpStream) -> Result<u32> {
    // SAFETY: all-zero tcp_info is valid plain data; getsockopt fills at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd, out-buffer and length.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    ensure!(rc == 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    Ok(info.tcpi_total_retrans)
}

impl TcpEcho {
    pub fn start(
        server: &NetNs,
        client: &NetNs,
        dst: Ipv4Addr,
        port: u16,
        src: Ipv4Addr,
    ) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let server = spawn_in(server, move || {
            let l = match TcpListener::bind((dst, port)) {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    bail!("listen {dst}:{port}: {e}");
                }
            };
            l.set_nonblocking(true)?;
            let end = Instant::now() + Duration::from_secs(20);
            let mut s = loop {
                match l.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        ensure!(Instant::now() < end, "no connection");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(MAX_RUN))?;
            let mut buf = [0u8; 4];
            let end = Instant::now() + MAX_RUN;
            while Instant::now() < end {
                match s.read_exact(&mut buf) {
                    Ok(()) => s.write_all(&buf)?,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e.into()),
                }
            }
            retransmits(&s)
        })?;
        rx.recv_timeout(Duration::from_secs(10))
            .context("echo server never started")?
            .map_err(anyhow::Error::msg)?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let client = spawn_in(client, move || {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            sock.bind(&SocketAddr::from((src, 0)).into())?;
            sock.connect_timeout(
                &SocketAddr::from((dst, port)).into(),
                Duration::from_secs(5),
            )?;
            let mut s: TcpStream = sock.into();
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let end = Instant::now() + MAX_RUN;
            let mut n: u32 = 0;
            let mut buf = [0u8; 4];
            while !st.load(Ordering::SeqCst) && Instant::now() < end {
                s.write_all(&n.to_be_bytes())?;
                s.read_exact(&mut buf)
                    .with_context(|| format!("echo {n}"))?;
                ensure!(u32::from_be_bytes(buf) == n, "echo {n} came back wrong");
                n += 1;
                std::thread::sleep(GAP);
            }
            let r = retransmits(&s)?;
            s.shutdown(std::net::Shutdown::Write)?;
            Ok((n, r))
        })?;
        Ok(Self {
            stop,
            client: Some(client),
            server: Some(server),
        })
    }

    /// Stop; (echoes completed, client retransmits, server retransmits).
    pub fn finish(mut self) -> Result<(u32, u32, u32)> {
        self.stop.store(true, Ordering::SeqCst);
        let (n, rc) = join(self.client.take().context("finished twice")?)?;
        let rs = join(self.server.take().context("finished twice")?)?;
        Ok((n, rc, rs))
    }
}
