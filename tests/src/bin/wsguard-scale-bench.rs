//! `cargo xtask bench`, scale part (issue 14): the release agent with its default `max_bans`
//! (1M, maps preallocated) in a lab namespace, at 10k, 100k and 1M exact bans (addresses from a
//! file, one reason). For each size it prints, asserting nothing:
//! - import: `wsguard import FILE` from CLI start to exit, then how long until `state.json`
//!   holds every ban;
//! - list: `wsguard ban list -o json` from start to exit (stdout read and counted);
//! - restart: SIGTERM, exit, start again with the pins kept, until the API answers;
//! - agent RSS: the peak (VmHWM, reset through `/proc/PID/clear_refs` before each stage) and the
//!   steady RSS after it; the kernel maps (`memlock` of the agent's map fds) separately.
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
use wsguard_tests::netns::{BpfFs, VethLab};

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
        c
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
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.lab.a.name()))
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
            .stderr(log)
            .spawn()
            .context("spawn the agent")?;
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

fn proc_kib(pid: u32, field: &str) -> Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field}"))?;
    Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
}

fn reset_peak(pid: u32) -> Result<()> {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").context("reset VmHWM")
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Bytes charged for the BPF maps the agent holds open (`memlock` of each map fd).
fn map_memlock(pid: u32) -> Result<u64> {
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

fn run_ok(c: &mut Command, what: &str) -> Result<(Duration, u64)> {
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
    let st = child.wait()?;
    ensure!(st.success(), "{what}: {st}: {err}");
    Ok((t.elapsed(), n))
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

fn size(n: u32, wsguard: &Path) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let l = Lab {
        wsguard: wsguard.to_owned(),
        lab: VethLab::new()?,
        bpffs: BpfFs::new()?,
        dir,
    };
    let (mut agent, _) = l.start("first")?;
    let pid = agent.pid();
    let idle = proc_kib(pid, "VmRSS:")?;
    let file = l.dir.path().join("bans.txt");
    fs::write(&file, ban_file(n))?;

    // Import, then the state file.
    reset_peak(pid)?;
    let perf = Perf::start(n, "import")?;
    let (import, _) = run_ok(
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

    // List.
    reset_peak(pid)?;
    let perf = Perf::start(n, "list")?;
    let (list, bytes) = run_ok(l.cli().args(["ban", "list", "-o", "json"]), "ban list")?;
    drop(perf);
    let list_peak = proc_kib(pid, "VmHWM:")?;

    // Restart with the pins kept.
    let stop = agent.stop()?;
    drop(agent);
    let perf = Perf::start(n, "restart")?;
    let (agent, ready) = l.start("restart")?;
    drop(perf);
    let pid = agent.pid();
    let restart_peak = proc_kib(pid, "VmHWM:")?;
    std::thread::sleep(Duration::from_secs(2));
    let after = proc_kib(pid, "VmRSS:")?;
    let (_, st) = run_ok(l.cli().args(["status", "-o", "json"]), "status")?;
    let _ = st;

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
         restart peak {:.0}, steady after restart {:.0}; kernel maps (memlock) {:.0} MiB",
        "",
        mib(idle),
        mib(import_peak),
        mib(steady),
        mib(list_peak),
        mib(restart_peak),
        mib(after),
        maps as f64 / (1 << 20) as f64,
    );
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
    println!("agent with the default max_bans (1M, preallocated maps), exact bans from a file:");
    for n in sizes {
        size(n, &wsguard)?;
    }
    Ok(())
}
