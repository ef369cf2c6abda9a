//! A memory cgroup of a test's own (cgroup v1, `/sys/fs/cgroup/memory`), the way a pod's
//! container limit holds the agent: processes are placed in it before they exec (so every map
//! they create is charged to it), its figures are read back, and it is removed on drop, its
//! leftover processes moved out first.
//!
//! Kubernetes quantities (`384Mi`, `1Gi`) are parsed here too, so a test can take the limit
//! from the DaemonSet manifest.

use anyhow::{Context as _, Result, bail, ensure};
use std::{
    ffi::CString,
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

/// Where the v1 memory controller is mounted.
pub const MEMORY_ROOT: &str = "/sys/fs/cgroup/memory";

/// The name prefix of every group this creates (`wsguard-test-<pid>-<n>-<random>`).
pub const PREFIX: &str = "wsguard-test-";

/// `memory.oom_control`, as the kernel prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OomControl {
    pub oom_kill_disable: u64,
    pub under_oom: u64,
    /// OOM kills inside the group since it was created.
    pub oom_kill: u64,
}

/// A memory cgroup directly under [`MEMORY_ROOT`]; removed on drop.
pub struct MemCgroup {
    path: PathBuf,
    /// `<path>/cgroup.procs` as a C string, for [`MemCgroup::enter`]'s pre-exec hook (which
    /// must not allocate).
    procs: CString,
}

impl MemCgroup {
    /// A new group with `memory.limit_in_bytes` set to `limit` (none: the parent's, i.e.
    /// unlimited; for measuring).
    pub fn new(limit: Option<u64>) -> Result<Self> {
        let root = Path::new(MEMORY_ROOT);
        ensure!(
            root.join("memory.limit_in_bytes").exists(),
            "no cgroup v1 memory controller at {MEMORY_ROOT}"
        );
        let path = root.join(format!("{PREFIX}{}", crate::netns::unique()));
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        let procs = CString::new(
            path.join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )?;
        let cg = Self { path, procs };
        if let Some(limit) = limit {
            cg.write("memory.limit_in_bytes", &limit.to_string())?;
            let set = cg.read_u64("memory.limit_in_bytes")?;
            // The kernel rounds down to a whole page.
            ensure!(
                set <= limit && limit - set < 4096,
                "memory.limit_in_bytes is {set}, wanted {limit}"
            );
        }
        Ok(cg)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn read(&self, file: &str) -> Result<String> {
        let p = self.path.join(file);
        fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))
    }

    pub fn read_u64(&self, file: &str) -> Result<u64> {
        let t = self.read(file)?;
        t.trim()
            .parse()
            .with_context(|| format!("{file}: not a number: {t:?}"))
    }

    pub fn write(&self, file: &str, value: &str) -> Result<()> {
        let p = self.path.join(file);
        fs::write(&p, value).with_context(|| format!("write {value:?} to {}", p.display()))
    }

    pub fn oom_control(&self) -> Result<OomControl> {
        let t = self.read("memory.oom_control")?;
        let field = |name: &str| -> Result<u64> {
            t.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .with_context(|| format!("memory.oom_control has no {name}: {t:?}"))?
                .trim()
                .parse()
                .with_context(|| format!("memory.oom_control {name}: {t:?}"))
        };
        Ok(OomControl {
            oom_kill_disable: field("oom_kill_disable")?,
            under_oom: field("under_oom")?,
            oom_kill: field("oom_kill")?,
        })
    }

    /// One line of `memory.stat` (`rss`, `cache`, `total_rss`…), in bytes.
    pub fn stat(&self, key: &str) -> Result<u64> {
        let t = self.read("memory.stat")?;
        t.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .with_context(|| format!("memory.stat has no {key}"))?
            .trim()
            .parse()
            .with_context(|| format!("memory.stat {key}"))
    }

    /// Start the peaks (`memory.max_usage_in_bytes`, `memory.kmem.max_usage_in_bytes`) again
    /// from the current usage.
    pub fn reset_peaks(&self) -> Result<()> {
        self.write("memory.max_usage_in_bytes", "0")?;
        self.write("memory.kmem.max_usage_in_bytes", "0")
    }

    /// The pids in the group.
    pub fn pids(&self) -> Result<Vec<u32>> {
        Ok(self
            .read("cgroup.procs")?
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    /// Make `cmd`'s process join the group between fork and exec, before it runs anything
    /// (so before the agent creates a map); its children (nsenter's exec of the agent, for
    /// one) stay in it.
    pub fn enter(&self, cmd: &mut Command) {
        let procs = self.procs.clone();
        // SAFETY: the hook only calls open(2), write(2) and close(2) on memory prepared
        // before the fork, all async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0": the writing process itself.
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
                Ok(())
            });
        }
    }
}

/// Peaks seen by a [`Sampler`], in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sampled {
    /// `memory.usage_in_bytes` (user memory, page cache and kernel memory).
    pub usage: u64,
    /// `memory.usage_in_bytes` minus the page cache (`total_cache`): what reclaim cannot give
    /// back (no swap), the part a limit must hold.
    pub without_cache: u64,
    /// `total_rss` of `memory.stat`: the processes' anonymous memory.
    pub rss: u64,
    /// `memory.kmem.usage_in_bytes`: the BPF maps, slab, page tables.
    pub kmem: u64,
    /// Samples taken.
    pub samples: u64,
}

/// Samples a group's figures every 10 ms on a thread until [`Sampler::finish`]: peaks the
/// kernel does not keep (usage without the page cache).
pub struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Sampled>>,
}

impl Sampler {
    pub fn start(cg: &MemCgroup) -> Self {
        let dir = cg.path.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let num = |f: &str| -> u64 {
                fs::read_to_string(dir.join(f))
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
                    .unwrap_or(0)
            };
            let mut m = Sampled::default();
            // Bounded by the flag and by an hour, whichever comes first.
            let end = Instant::now() + Duration::from_secs(3600);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < end {
                let usage = num("memory.usage_in_bytes");
                let stat = fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
                let key = |k: &str| -> u64 {
                    stat.lines()
                        .find_map(|l| l.strip_prefix(k)?.strip_prefix(' '))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0)
                };
                m.usage = m.usage.max(usage);
                m.without_cache = m
                    .without_cache
                    .max(usage.saturating_sub(key("total_cache")));
                m.rss = m.rss.max(key("total_rss"));
                m.kmem = m.kmem.max(num("memory.kmem.usage_in_bytes"));
                m.samples += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            m
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> Sampled {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The memory cgroup this process is in (its leftovers go back there), as a directory.
fn home_group() -> PathBuf {
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let rel = own
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
            ctrl.split(',').any(|c| c == "memory").then_some(path)
        })
        .unwrap_or("/");
    let p = Path::new(MEMORY_ROOT).join(rel.trim_start_matches('/'));
    if p.join("cgroup.procs").exists() {
        p
    } else {
        PathBuf::from(MEMORY_ROOT)
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        let home = home_group().join("cgroup.procs");
        // A test that failed may leave a process behind: move it out (it is killed by its own
        // guard), then remove the group. Bounded: a few seconds at most.
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            for pid in self.pids().unwrap_or_default() {
                let _ = fs::write(&home, pid.to_string());
            }
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() > end => {
                    eprintln!("cannot remove {}: {e}", self.path.display());
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// A `kB` field of `/proc/PID/status` (`VmHWM:`, `VmRSS:`), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("/proc/{pid}/status has no {field}"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("no value")?
        .parse()?)
}

/// KiB of BPF maps mapped into `pid` and resident (the `Rss:` of its `anon_inode:bpf-map`
/// mappings in `/proc/PID/smaps`): the agent maps `BAN_TABLE_V4`, whose pages the kernel puts
/// in the mapping at once, so they count in VmRSS and VmHWM although they are the map's own
/// kernel memory (counted under the maps, charged once).
pub fn bpf_mapped_kib(pid: u32) -> Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut total = 0;
    let mut in_map = false;
    for l in s.lines() {
        let mut f = l.split_whitespace();
        match (f.next(), f.next()) {
            (Some("Rss:"), Some(v)) if in_map => total += v.parse::<u64>()?,
            // A mapping's header: an address range first.
            (Some(range), _) if range.contains('-') && !range.ends_with(':') => {
                in_map = l.ends_with("anon_inode:bpf-map");
            }
            _ => {}
        }
    }
    Ok(total)
}

/// Bytes the kernel reports for the BPF maps `pid` holds open (`memlock:` of each map fd in
/// `/proc/PID/fdinfo`, each map once): what the maps themselves take, preallocated or not.
pub fn map_memlock(pid: u32) -> Result<u64> {
    let mut total = 0;
    let mut seen = std::collections::HashSet::new();
    for e in fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(text) = fs::read_to_string(e?.path()) else {
            continue;
        };
        if !text.contains("map_type:") {
            continue;
        }
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(m)) = (field("map_id:"), field("memlock:"))
            && seen.insert(id)
        {
            total += m;
        }
    }
    Ok(total)
}

/// The memory cgroup `pid` is in, relative to [`MEMORY_ROOT`] (`/wsguard-test-…`).
pub fn memory_group_of(pid: u32) -> Result<String> {
    let t = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    t.lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
            ctrl.split(',')
                .any(|c| c == "memory")
                .then(|| path.to_owned())
        })
        .with_context(|| format!("pid {pid} is in no memory cgroup: {t:?}"))
}

/// A Kubernetes quantity in bytes: `384Mi`, `1Gi`, `512M`, `1.5Gi`, `400000000`, `1e9`.
/// A fraction of a byte rounds up, as Kubernetes does.
pub fn parse_quantity(q: &str) -> Result<u64> {
    let bad = || format!("{q:?} is not a Kubernetes memory quantity (like 384Mi or 1Gi)");
    let s = q.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') || num.matches('.').count() > 1
    {
        bail!(bad());
    }
    let (mult, exp10): (u128, i32) = match suffix {
        "" => (1, 0),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        e if e.starts_with(['e', 'E']) => (
            1,
            e[1..]
                .parse::<i32>()
                .ok()
                .filter(|x| (0..=18).contains(x))
                .with_context(bad)?,
        ),
        _ => bail!(bad()),
    };
    // digits.fraction × mult × 10^exp10, exactly, rounded up.
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits: u128 = format!("{int}{frac}").parse().with_context(bad)?;
    let scale = 10u128.pow(frac.len() as u32);
    let value = digits
        .checked_mul(mult)
        .and_then(|v| v.checked_mul(10u128.pow(exp10 as u32)))
        .with_context(bad)?;
    let bytes = value.div_ceil(scale);
    u64::try_from(bytes).ok().with_context(bad)
}

#[cfg(test)]
mod tests {
    use super::parse_quantity;

    #[test]
    fn quantities() {
        for (q, want) in [
            ("384Mi", 384 << 20),
            ("1Gi", 1 << 30),
            ("1.5Gi", 3 << 29),
            ("512M", 512_000_000),
            ("128974848", 128_974_848),
            ("1e9", 1_000_000_000),
            ("100k", 100_000),
            ("0.5Ki", 512),
        ] {
            assert_eq!(parse_quantity(q).unwrap(), want, "{q}");
        }
        for q in [
            "", "Mi", "384MB", "384 Mi", "1..5Gi", ".5Gi", "-1Gi", "1Zi", "384mi",
        ] {
            let e = parse_quantity(q).unwrap_err().to_string();
            assert!(e.contains(&format!("{q:?}")), "{q}: {e}");
        }
    }
}
