//! `cargo xtask bench`, scale part (issue 14): the release agent with its default `max_bans`
//! (1M: the flow, rate and table maps preallocated, the ban maps growing with the bans) in a lab
//! namespace, at 10k, 100k and 1M exact bans (addresses from a file, one in ten IPv4 up to
//! 65,536 of them and the rest IPv6, one reason). For each size it prints, asserting nothing:
//! - import: `wsguard import FILE` from CLI start to exit, then how long until `state.json`
//!   holds every ban;
//! - list: `wsguard ban list -o json` from start to exit (stdout read and counted);
//! - restart: SIGTERM, exit, start again with the pins kept, until the API answers;
//! - agent RSS: the peak (VmHWM, reset through `/proc/PID/clear_refs` before each stage) and the
//!   steady RSS after it, both without the BPF map the agent maps (`BAN_TABLE_V4`, kernel
//!   memory whose pages count in the agent's RSS too); the kernel maps (`memlock` of the
//!   agent's map fds) separately.
//!
//! `WSGUARD_SCALE_CGROUP=1` runs the agent and the CLI in a memory cgroup of their own (cgroup
//! v1, no limit; `WSGUARD_SCALE_CGROUP=384Mi` sets one) and prints the group's peak usage per
//! stage (`memory.max_usage_in_bytes`, kernel memory and so the BPF maps included, reset before
//! each stage) and its kernel-memory peak: what a pod's memory limit must hold.
//!
//! `WSGUARD_SCALE_SIZES=10000,100000` limits the sizes. `WSGUARD_SCALE_PERF=DIR` records each
//! stage system-wide with `perf record` into `DIR/SIZE-STAGE.data`, and keeps the agent's logs
//! there (`DIR/SIZE-agent-first.log`, `…-restart.log`), for profiling. Needs the
//! release `wsguard` next to it (xtask builds it first).

use anyhow::{Context as _, Result, bail, ensure};
use std::{
    fs,
    io::Read as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime},
};
use wsguard_tests::{
    cgroup::{
        MemCgroup, Sampled, Sampler, bpf_mapped_kib, map_memlock, parse_quantity, proc_status_kib,
    },
    netns::{BpfFs, VethLab},
};

/// A release agent in the lab's first namespace; killed on drop.
struct Agent {
    child: Child,
}

impl Agent {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) -> Result<Duration> {
        let t = Instant::now();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(t.elapsed());
            }
            ensure!(Instant::now() < end, "the agent did not exit within 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct Lab {
    wsguard: PathBuf,
    lab: VethLab,
    bpffs: BpfFs,
    dir: tempfile::TempDir,
    /// The agent's and the CLI's memory cgroup, when measuring one.
    cg: Option<MemCgroup>,
}

impl Lab {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("wsguard.sock")
    }

    fn state_file(&self) -> PathBuf {
        self.dir.path().join("state/state.json")
    }

    fn cli(&self) -> Command {
        let mut c = Command::new(&self.wsguard);
        c.env("WSGUARD_SOCKET", self.socket())
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(cg) = &self.cg {
            cg.enter(&mut c);
        }
        c
    }

    /// `(peak usage, peak kernel memory)` of the group since the last reset, in bytes.
    fn peaks(&self) -> Result<Option<(u64, u64)>> {
        let Some(cg) = &self.cg else {
            return Ok(None);
        };
        Ok(Some((
            cg.read_u64("memory.max_usage_in_bytes")?,
            cg.read_u64("memory.kmem.max_usage_in_bytes")?,
        )))
    }

    fn reset_peaks(&self) -> Result<()> {
        match &self.cg {
            Some(cg) => cg.reset_peaks(),
            None => Ok(()),
        }
    }

    /// Start the agent and wait until its API answers; returns the time that took.
    fn start(&self, run: &str) -> Result<(Agent, Duration)> {
        let pin = self.bpffs.path().join("wsguard");
        let state = self.dir.path().join("state");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("agent-{run}.log")))?;
        let t = Instant::now();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.lab.a.name()))
            .arg(&self.wsguard)
            .arg("agent")
            .args(["--iface", &self.lab.if_a])
            .arg("--pin-dir")
            .arg(&pin)
            .arg("--state-dir")
            .arg(&state)
            .arg("--socket")
            .arg(self.socket())
            .args(["--metrics-addr", "off", "--xdp-mode", "generic"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(cg) = &self.cg {
            cg.enter(&mut cmd);
        }
        let child = cmd.spawn().context("spawn the agent")?;
        let mut agent = Agent { child };
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(st) = agent.child.try_wait()? {
                bail!("the agent exited at start: {st}");
            }
            let st = self
                .cli()
                .arg("status")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            if st.success() {
                return Ok((agent, t.elapsed()));
            }
            ensure!(Instant::now() < end, "the API never answered");
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// A `/proc/PID/status` figure without the mapped BPF maps (see [`bpf_mapped_kib`]): the
/// agent's own memory. The mapping is made at the open and stays whole, so it is as much of
/// the peak as of the current figure.
fn proc_kib(pid: u32, field: &str) -> Result<u64> {
    Ok(proc_status_kib(pid, field)?.saturating_sub(bpf_mapped_kib(pid)?))
}

fn reset_peak(pid: u32) -> Result<()> {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").context("reset VmHWM")
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// `n` distinct host addresses: a tenth IPv4 (198.19.0.0/16, at most 65536), the rest IPv6.
fn ban_file(n: u32) -> String {
    let mut text = String::with_capacity(n as usize * 24);
    for i in 0..n {
        if i % 10 == 0 && i / 10 < 65_536 {
            text.push_str(&Ipv4Addr::from(0xc613_0000 + i / 10).to_string());
        } else {
            let a = Ipv6Addr::new(0xfd00, 0x5a, 0, 0, 0, 0, (i >> 16) as u16, i as u16);
            text.push_str(&a.to_string());
        }
        text.push('\n');
    }
    text
}

/// How many bans `state.json` holds, counted without parsing: a complete file (version 2)
/// has one `["ADDR",...]` row per ban, and nothing else in it opens with `["`.
fn state_bans(path: &Path) -> usize {
    let Ok(bytes) = fs::read(path) else {
        return 0;
    };
    if !bytes.ends_with(b"]}") {
        return 0;
    }
    bytes.windows(2).filter(|w| w == b"[\"").count()
}

/// Run to exit, stdout read and counted; returns the time, the bytes and the process's peak
/// RSS (KiB, from wait4's rusage).
fn run_ok(c: &mut Command, what: &str) -> Result<(Duration, u64, u64)> {
    let t = Instant::now();
    let mut child = c.stdout(Stdio::piped()).spawn()?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut n = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let k = out.read(&mut buf)?;
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err)?;
    }
    let mut status = 0;
    // SAFETY: all-zero rusage is valid; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child, pointers to locals.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    ensure!(r > 0, "{what}: wait4: {}", std::io::Error::last_os_error());
    let st = <std::process::ExitStatus as std::os::unix::process::ExitStatusExt>::from_raw(status);
    ensure!(st.success(), "{what}: {st}: {err}");
    Ok((t.elapsed(), n, ru.ru_maxrss as u64))
}

/// `perf record -a` for one stage when `WSGUARD_SCALE_PERF` names a directory; stopped (SIGINT,
/// so it writes its file) on drop.
struct Perf(Option<Child>);

impl Perf {
    fn start(n: u32, stage: &str) -> Result<Self> {
        let Ok(dir) = std::env::var("WSGUARD_SCALE_PERF") else {
            return Ok(Self(None));
        };
        fs::create_dir_all(&dir)?;
        let child = Command::new("perf")
            .args([
                "record",
                "-a",
                "-F",
                "999",
                "--call-graph",
                "dwarf,16384",
                "-o",
            ])
            .arg(Path::new(&dir).join(format!("{n}-{stage}.data")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn perf record")?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(Self(Some(child)))
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let _ = c.wait();
        }
    }
}

fn size(n: u32, wsguard: &Path, cgroup: Option<Option<u64>>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let l = Lab {
        wsguard: wsguard.to_owned(),
        lab: VethLab::new()?,
        bpffs: BpfFs::new()?,
        dir,
        cg: cgroup.map(MemCgroup::new).transpose()?,
    };
    let (mut agent, _) = l.start("first")?;
    let pid = agent.pid();
    let idle = proc_kib(pid, "VmRSS:")?;
    let start_peaks = l.peaks()?;
    let file = l.dir.path().join("bans.txt");
    fs::write(&file, ban_file(n))?;

    // Import, then the state file.
    reset_peak(pid)?;
    l.reset_peaks()?;
    let perf = Perf::start(n, "import")?;
    let sampler = l.cg.as_ref().map(Sampler::start);
    let (import, _, import_cli) = run_ok(
        l.cli()
            .arg("import")
            .arg(&file)
            .args(["--ttl", "1d", "--reason", "scale bench"]),
        "import",
    )?;
    let imported = Instant::now();
    let since = SystemTime::now();
    let end = imported + Duration::from_secs(300);
    let saved = loop {
        let fresh = fs::metadata(l.state_file())
            .and_then(|m| m.modified())
            .is_ok_and(|m| m >= since);
        if fresh && state_bans(&l.state_file()) == n as usize {
            break imported.elapsed();
        }
        ensure!(
            Instant::now() < end,
            "state.json never held {n} bans within 300 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(perf);
    let import_peak = proc_kib(pid, "VmHWM:")?;
    std::thread::sleep(Duration::from_secs(2));
    let steady = proc_kib(pid, "VmRSS:")?;
    let maps = map_memlock(pid)?;
    let import_peaks = l.peaks()?;
    let import_sampled = sampler.map(Sampler::finish);

    // List.
    reset_peak(pid)?;
    l.reset_peaks()?;
    let perf = Perf::start(n, "list")?;
    let sampler = l.cg.as_ref().map(Sampler::start);
    let (list, bytes, list_cli) = run_ok(l.cli().args(["ban", "list", "-o", "json"]), "ban list")?;
    let list_sampled = sampler.map(Sampler::finish);
    drop(perf);
    let list_peak = proc_kib(pid, "VmHWM:")?;
    let list_peaks = l.peaks()?;

    // Restart with the pins kept.
    l.reset_peaks()?;
    let sampler = l.cg.as_ref().map(Sampler::start);
    let stop = agent.stop()?;
    drop(agent);
    let perf = Perf::start(n, "restart")?;
    let (agent, ready) = l.start("restart")?;
    drop(perf);
    let pid = agent.pid();
    let restart_peak = proc_kib(pid, "VmHWM:")?;
    std::thread::sleep(Duration::from_secs(2));
    let after = proc_kib(pid, "VmRSS:")?;
    let restart_peaks = l.peaks()?;
    let restart_sampled = sampler.map(Sampler::finish);

    println!(
        "{n:>8} bans: import {:.2} s (state.json complete {:.2} s after), list -o json {:.2} s \
         ({:.0} MiB), stop {:.2} s, restart to ready {:.2} s",
        import.as_secs_f64(),
        saved.as_secs_f64(),
        list.as_secs_f64(),
        bytes as f64 / (1 << 20) as f64,
        stop.as_secs_f64(),
        ready.as_secs_f64(),
    );
    println!(
        "{:>8}       agent RSS MiB: idle {:.0}, import peak {:.0}, steady {:.0}, list peak {:.0}, \
         restart peak {:.0}, steady after restart {:.0} (without {:.0} MiB of mapped \
         BAN_TABLE_V4); kernel maps (memlock) {:.0} MiB",
        "",
        mib(idle),
        mib(import_peak),
        mib(steady),
        mib(list_peak),
        mib(restart_peak),
        mib(after),
        mib(bpf_mapped_kib(pid)?),
        maps as f64 / (1 << 20) as f64,
    );
    println!(
        "{:>8}       CLI peak RSS MiB: import {:.0}, ban list -o json {:.0}",
        "",
        mib(import_cli),
        mib(list_cli)
    );
    if n == 1_000_000 {
        // Issue 14's targets at the default max_bans; printed, never asserted.
        let peak = [import_peak, steady, list_peak, restart_peak, after]
            .into_iter()
            .max()
            .unwrap_or(0);
        let t = |ok: bool| if ok { "MET" } else { "MISSED" };
        println!(
            "{:>8}       targets: import <= 2 s {}, state.json <= 2 s after {}, list <= 3 s {}, \
             restart <= 3 s {}, agent RSS <= 128 MiB {} (peak {:.0})",
            "",
            t(import.as_secs_f64() <= 2.0),
            t(saved.as_secs_f64() <= 2.0),
            t(list.as_secs_f64() <= 3.0),
            t(ready.as_secs_f64() <= 3.0),
            t(mib(peak) <= 128.0),
            mib(peak),
        );
    }
    if let Some(cg) = &l.cg {
        let s = |x: Option<Sampled>| {
            let x = x.unwrap_or_default();
            format!(
                "{:.0} (without page cache {:.0}: rss {:.0}, kmem {:.0})",
                mib(x.usage >> 10),
                mib(x.without_cache >> 10),
                mib(x.rss >> 10),
                mib(x.kmem >> 10)
            )
        };
        println!(
            "{:>8}       cgroup sampled peak MiB: import {}, list {}, restart {}",
            "",
            s(import_sampled),
            s(list_sampled),
            s(restart_sampled)
        );
        let p = |x: Option<(u64, u64)>| {
            let (u, k) = x.unwrap_or_default();
            format!("{:.0} (kmem {:.0})", mib(u >> 10), mib(k >> 10))
        };
        let oom = cg.oom_control()?;
        println!(
            "{:>8}       cgroup peak MiB: start {}, import {}, list {}, restart {}; now {:.0} \
             (kmem {:.0}, page cache {:.0}); failcnt {}, oom_kill {}",
            "",
            p(start_peaks),
            p(import_peaks),
            p(list_peaks),
            p(restart_peaks),
            mib(cg.read_u64("memory.usage_in_bytes")? >> 10),
            mib(cg.read_u64("memory.kmem.usage_in_bytes")? >> 10),
            mib(cg.stat("total_cache")? >> 10),
            cg.read_u64("memory.failcnt")?,
            oom.oom_kill,
        );
    }
    drop(agent);
    wsguard::datapath::DataPath::detach_all(&l.bpffs.path().join("wsguard"))?;
    if let Ok(to) = std::env::var("WSGUARD_SCALE_PERF") {
        for run in ["first", "restart"] {
            let log = format!("agent-{run}.log");
            fs::copy(
                l.dir.path().join(&log),
                Path::new(&to).join(format!("{n}-{log}")),
            )
            .with_context(|| format!("keep {log} in {to}"))?;
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let exe = std::env::current_exe()?;
    let wsguard = exe.parent().context("no directory")?.join("wsguard");
    ensure!(
        wsguard.exists(),
        "{} is missing: build it first",
        wsguard.display()
    );
    let sizes: Vec<u32> = match std::env::var("WSGUARD_SCALE_SIZES") {
        Ok(s) => s
            .split(',')
            .map(|v| v.trim().parse())
            .collect::<Result<_, _>>()?,
        Err(_) => vec![10_000, 100_000, 1_000_000],
    };
    // None: no group; Some(None): a group without a limit.
    let cgroup = match std::env::var("WSGUARD_SCALE_CGROUP") {
        Err(_) => None,
        Ok(v) if v == "1" => Some(None),
        Ok(v) => Some(Some(parse_quantity(&v).context("WSGUARD_SCALE_CGROUP")?)),
    };
    println!(
        "agent with the default max_bans (1M: flow, rate and table maps preallocated, ban maps \
         growing with the bans), exact bans from a file (one in ten IPv4, at most 65536; the \
         rest IPv6):"
    );
    for n in sizes {
        size(n, &wsguard, cgroup)?;
    }
    Ok(())
}
