//! The network lab: named network namespaces, a veth pair between two of them, and a bpffs
//! mounted in a private directory. Every piece is an RAII guard whose Drop removes it, so a
//! failing (panicking) test leaves nothing behind. Nothing here touches the host's own
//! interfaces: links are created inside the namespaces, never in the initial one.

use anyhow::{Context as _, Result, bail};
use std::{
    ffi::CString,
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

mod ping;
mod view;

pub use ping::{PingStats, PingStream};
pub use view::XdpAttachment;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `<pid>-<counter>-<random>`: unique across parallel tests and concurrent test processes.
pub fn unique() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mixed = (nanos ^ std::process::id().rotate_left(16) ^ n.wrapping_mul(0x9e37_79b9)) & 0xffff;
    format!("{}-{n}-{mixed:04x}", std::process::id())
}

/// Run a command with a deadline; it is killed when the deadline passes.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "{cmd:?} timed out after {timeout:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Run `ip ARGS`, failing on a non-zero exit.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = run_with_timeout(Command::new("ip").args(args), Duration::from_secs(10))?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new() -> Result<Self> {
        let name = format!("wsg-{}", unique());
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME cmd args…`, bounded by `timeout`; returns the output whatever the
    /// exit status.
    pub fn exec(&self, cmd: &[&str], timeout: Duration) -> Result<Output> {
        run_with_timeout(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(cmd),
            timeout,
        )
    }

    /// `ip -n NAME args…`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Run `f` on a dedicated thread that has entered this namespace (setns affects only the
    /// calling thread, so the test's own threads stay where they are).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = fs::File::open(Path::new("/run/netns").join(&self.name))
            .with_context(|| format!("open netns {}", self.name))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: a valid namespace fd; CLONE_NEWNET only switches this thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns {}: {}", self.name, std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread in netns {} panicked", self.name))?
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Two namespaces joined by a veth pair: `a`/`if_a` is the protected side, `b`/`if_b` the
/// clients. Each side has one IPv4 and one IPv6 address; `b` has an extra IPv4 address so a
/// test can send from a banned and a clean source over the same link.
pub struct VethLab {
    // Field order is drop order: the namespaces go last (deleting them deletes the veth).
    pub if_a: String,
    pub if_b: String,
    pub ip_a: Ipv4Addr,
    pub ip_b: Ipv4Addr,
    pub ip_b2: Ipv4Addr,
    pub ip6_a: Ipv6Addr,
    pub ip6_b: Ipv6Addr,
    pub a: NetNs,
    pub b: NetNs,
}

impl VethLab {
    pub fn new() -> Result<Self> {
        let (a, b) = (NetNs::new()?, NetNs::new()?);
        let lab = Self {
            if_a: "wsg-a".into(),
            if_b: "wsg-b".into(),
            ip_a: Ipv4Addr::new(198, 18, 0, 1),
            ip_b: Ipv4Addr::new(198, 18, 0, 2),
            ip_b2: Ipv4Addr::new(198, 18, 0, 3),
            ip6_a: "fd00:5753::1".parse()?,
            ip6_b: "fd00:5753::2".parse()?,
            a,
            b,
        };
        // Created inside `a` with the peer moved straight into `b`: never in the host's ns.
        lab.a.ip(&[
            "link",
            "add",
            &lab.if_a,
            "type",
            "veth",
            "peer",
            "name",
            &lab.if_b,
            "netns",
            lab.b.name(),
        ])?;
        for (ns, ifc, v4s, v6) in [
            (&lab.a, &lab.if_a, vec![lab.ip_a], lab.ip6_a),
            (&lab.b, &lab.if_b, vec![lab.ip_b, lab.ip_b2], lab.ip6_b),
        ] {
            for v4 in v4s {
                ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", ifc])?;
            }
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", ifc, "nodad"])?;
            ns.ip(&["link", "set", ifc, "up"])?;
        }
        Ok(lab)
    }

    /// Ping `a` from `b` with source `from`: how many of `count` echo requests were answered.
    pub fn ping_from(&self, from: Ipv4Addr, count: u32, interval: &str) -> Result<u32> {
        let (src, dst, n) = (from.to_string(), self.ip_a.to_string(), count.to_string());
        let out = self.b.exec(
            &[
                "ping", "-n", "-q", "-c", &n, "-i", interval, "-W", "1", "-I", &src, &dst,
            ],
            Duration::from_secs(u64::from(count) + 10),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        ping::parse_ping(&text)
            .map(|s| s.received)
            .with_context(|| {
                format!(
                    "unexpected ping output: {text} {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    }

    /// Start `count` pings from `from` to `a`, one every `interval` seconds, in the background.
    pub fn ping_stream(&self, from: Ipv4Addr, count: u32, interval: &str) -> Result<PingStream> {
        let (src, dst, n) = (from.to_string(), self.ip_a.to_string(), count.to_string());
        let child = Command::new("ip")
            .args(["netns", "exec", self.b.name()])
            .args([
                "ping", "-n", "-q", "-c", &n, "-i", interval, "-W", "1", "-I", &src, &dst,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn ping")?;
        Ok(PingStream {
            child: Some(child),
            count,
        })
    }
}

/// A bpffs mounted on a fresh private directory, unmounted and removed on drop. Pins of a
/// test go here, never under /sys/fs/bpf.
pub struct BpfFs {
    path: PathBuf,
    mounted: bool,
}

impl BpfFs {
    pub fn new() -> Result<Self> {
        let mut fs = Self::empty_dir()?;
        mount_bpffs(&fs.path)?;
        fs.mounted = true;
        Ok(fs)
    }

    /// Only the empty directory, for code that is expected to mount bpffs itself; drop still
    /// unmounts whatever got mounted there.
    pub fn empty_dir() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("wsg-bpffs-{}", unique()));
        fs::create_dir(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self {
            path,
            mounted: true,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether bpffs is mounted exactly here.
    pub fn is_mounted(&self) -> bool {
        let me = self.path.to_string_lossy().into_owned();
        fs::read_to_string("/proc/self/mounts")
            .map(|m| {
                m.lines().any(|l| {
                    let f: Vec<_> = l.split(' ').collect();
                    f.len() > 2 && f[1] == me && f[2] == "bpf"
                })
            })
            .unwrap_or(false)
    }
}

fn mount_bpffs(path: &Path) -> Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: valid C strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "mount bpffs on {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        // Bounded: a directory has only so many stacked mounts.
        for _ in 0..8 {
            if !self.mounted || !self.is_mounted() {
                break;
            }
            let target =
                CString::new(self.path.as_os_str().as_bytes()).expect("no NUL in a temp path");
            // SAFETY: valid C string. MNT_DETACH: pins still open in this process must not
            // block the unmount.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
                eprintln!(
                    "cleanup: umount {}: {}",
                    self.path.display(),
                    std::io::Error::last_os_error()
                );
                break;
            }
        }
        let _ = fs::remove_dir(&self.path);
    }
}
