//! The agent at a full ban map fits the DaemonSet's memory limit (issue 14).
//!
//! The limit is read from `deploy/kubernetes/base/daemonset.yaml` (the agent container's
//! `resources.limits.memory`) and `max_bans` from the ConfigMap, so the test follows the
//! manifests. A memory cgroup of the test's own gets that limit, and the agent is placed in it
//! between fork and exec, before it creates a map: since kernel 5.11 BPF map memory is charged
//! to the memory cgroup of the process that creates the map, as it is to the pod's. The CLI
//! runs inside the group too (`kubectl exec` runs it in the agent's container).
//!
//! In the group: start, import `max_bans` distinct bans (a full map), `ban list -o json`,
//! stop (SIGTERM: the exit path writes the state file once more) and start again with the pins
//! kept, then check every ban is still in the kernel and counted by `status`.
//!
//! Never OOM-killed: `memory.oom_control` must show `oom_kill 0` and `under_oom 0`, and each
//! agent must be the same live process from start to its check. `memory.failcnt` is printed,
//! not asserted: it counts every charge that hit the limit, and a charge that hit it and
//! succeeded after reclaiming page cache (state.json is written through it) is harmless.
//! `memory.kmem.usage_in_bytes` must cover the agent's maps, which proves the maps are charged
//! to the group. Peaks (`memory.max_usage_in_bytes`, kmem included in cgroup v1) and the
//! agents' VmHWM are printed (`--nocapture`).
//!
//! Short of memory, the kernel refuses a ban's map write (`Cannot allocate memory`: the import
//! fails, as it did under the former 512Mi limit after 680,000 bans) or OOM-kills a process;
//! either fails the test.
//!
//! With the debug build on 2 cores this takes about 60 s (1M bans imported, listed, saved and
//! restored); it peaked at 365 MiB without page cache under the 480Mi limit, 406 MiB under
//! 544Mi once the exact IPv4 ban table (36 MiB) came (page cache is
//! reclaimed at the limit, so `memory.failcnt` counts up without harm).

use anyhow::{Context as _, Result, ensure};
use serde::Deserialize;
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use wsguard::config::{AgentArgs, AgentConfig, FileConfig};
use wsguard_tests::{
    agent::{
        Agent,
        bans::{ban_list_text, kernel_ban_set},
        wsguard_bin,
    },
    cgroup::{self, MemCgroup, Sampler},
};

mod cli_support;
use cli_support::{Run, Setup, run, wait_full_start};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml_docs(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut out = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        out.push(
            serde_json::Value::deserialize(doc).with_context(|| format!("{}", path.display()))?,
        );
    }
    Ok(out)
}

/// The agent container's `resources.limits.memory` in the DaemonSet: the text and its bytes.
fn manifest_memory_limit() -> Result<(String, u64)> {
    let path = repo().join("deploy/kubernetes/base/daemonset.yaml");
    let docs = yaml_docs(&path)?;
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .with_context(|| format!("{}: no DaemonSet", path.display()))?;
    let agent = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "agent"))
        .with_context(|| format!("{}: no container named agent", path.display()))?;
    let q = &agent["resources"]["limits"]["memory"];
    let text = q
        .as_str()
        .map(str::to_owned)
        .or_else(|| q.as_u64().map(|n| n.to_string()))
        .with_context(|| {
            format!(
                "{}: the agent container has no resources.limits.memory",
                path.display()
            )
        })?;
    let bytes = cgroup::parse_quantity(&text).with_context(|| {
        format!(
            "{}: the agent container's resources.limits.memory",
            path.display()
        )
    })?;
    Ok((text, bytes))
}

/// `max_bans` of the agent's config in the ConfigMap, resolved by the agent's own config code
/// (its default when the file sets none), as the DaemonSet's agent gets it.
fn manifest_max_bans() -> Result<u32> {
    let path = repo().join("deploy/kubernetes/base/configmap.yaml");
    let docs = yaml_docs(&path)?;
    let toml_text = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .and_then(|d| d["data"]["wsguard.toml"].as_str())
        .with_context(|| format!("{}: no ConfigMap data wsguard.toml", path.display()))?;
    let file = FileConfig::parse(toml_text).map_err(anyhow::Error::msg)?;
    let c = AgentConfig::merge(&file, &AgentArgs::default(), || Some("eth0".into()))
        .context("the ConfigMap's wsguard.toml")?;
    Ok(c.max_bans)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// The lab and the group the agent and the CLI run in.
struct Pod<'a> {
    s: &'a Setup,
    cg: &'a MemCgroup,
    max_bans: String,
}

impl Pod<'_> {
    /// `wsguard ARGS` inside the group.
    fn cli(&self, args: &[&str]) -> Result<Run> {
        let mut c = Command::new(wsguard_bin()?);
        c.args(args)
            .env("WSGUARD_SOCKET", self.s.socket())
            .stdin(Stdio::null());
        self.cg.enter(&mut c);
        run(&mut c, self.s.dir.path())
    }

    /// The agent inside the group, with the pins and state of the lab's agent "a"; waits
    /// (long enough for a debug build to adopt or restore a full map) until its API answers.
    fn start(&self, run: &str) -> Result<Agent> {
        let s = self.s;
        let pin = s.pin_dir("a");
        let state = s.dir.path().join("state-a");
        let sock = s.socket();
        let args = [
            "--iface",
            &s.lab.if_a,
            "--pin-dir",
            pin.to_str().context("pin dir")?,
            "--state-dir",
            state.to_str().context("state dir")?,
            "--socket",
            sock.to_str().context("socket")?,
            "--metrics-addr",
            "off",
            "--xdp-mode",
            "generic",
            "--max-bans",
            &self.max_bans,
        ];
        let log = s.dir.path().join(format!("agent-{run}.log"));
        let mut a = Agent::start_with(&s.lab.a, &log, &args, &[], |c| self.cg.enter(c))?;
        let pid = a.pid().context("agent pid")?;
        let group = cgroup::memory_group_of(pid)?;
        ensure!(
            Path::new(&group).file_name() == self.cg.path().file_name(),
            "the agent (pid {pid}) is in memory cgroup {group}, not {}",
            self.cg.path().display()
        );
        wait_full_start(&mut a, || Ok(self.cli(&["status"])?.code == 0))?;
        Ok(a)
    }

    fn status(&self) -> Result<serde_json::Value> {
        let r = self.cli(&["status", "-o", "json"])?;
        ensure!(r.code == 0, "status: {r:?}");
        r.json()
    }
}

fn timed<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t = Instant::now();
    let r = f()?;
    eprintln!("[cgroup] {what}: {:.2?}", t.elapsed());
    Ok(r)
}

/// `agent` is the process it was at start (same pid, never exited nor killed).
fn still_alive(agent: &mut Agent, pid: u32, what: &str) -> Result<()> {
    ensure!(
        agent.is_running()? && agent.pid() == Some(pid),
        "the {what} agent (pid {pid}) is gone:\n{}",
        agent.log_text()
    );
    Ok(())
}

#[derive(Deserialize)]
struct Listed {
    addr: String,
    prefix_len: u8,
}

fn full_map_in_the_pod_limit(cg: &MemCgroup, limit: u64, n: u32) -> Result<()> {
    let sampler = Sampler::start(cg);
    let s = Setup::new()?;
    let pod = Pod {
        s: &s,
        cg,
        max_bans: n.to_string(),
    };
    let mut agent = timed("start", || pod.start("first"))?;
    let pid = agent.pid().context("pid")?;
    let st = pod.status()?;
    ensure!(
        st["ban_map"]["capacity"] == u64::from(n) && st["ban_map"]["entries"] == 0,
        "a fresh agent with max_bans {n}: {st}"
    );

    let (text, want) = ban_list_text(n);
    let f = s.write("bans.txt", &text)?;
    drop(text);
    let r = timed(&format!("import {n}"), || {
        pod.cli(&["import", f.to_str().context("path")?, "--ttl", "1d"])
    })?;
    ensure!(r.code == 0, "import: {r:?}");
    still_alive(&mut agent, pid, "first")?;

    let r = timed("ban list -o json", || {
        pod.cli(&["ban", "list", "-o", "json"])
    })?;
    ensure!(r.code == 0, "ban list: exit {}, {}", r.code, r.stderr);
    let listed: Vec<Listed> = serde_json::from_str(&r.stdout).context("ban list -o json")?;
    drop(r);
    ensure!(listed.len() == n as usize, "{} bans listed", listed.len());
    let listed: BTreeSet<String> = listed
        .into_iter()
        .map(|b| format!("{}/{}", b.addr, b.prefix_len))
        .collect();
    ensure!(listed == want, "the list is exactly the imported set");
    drop(listed);
    still_alive(&mut agent, pid, "first")?;

    let hwm_first = cgroup::proc_status_kib(pid, "VmHWM:")? << 10;
    let maps = cgroup::map_memlock(pid)?;
    let kmem = cg.read_u64("memory.kmem.usage_in_bytes")?;
    eprintln!(
        "[cgroup] full map: maps (memlock) {:.1} MiB, kmem usage {:.1} MiB, usage {:.1} MiB",
        mib(maps),
        mib(kmem),
        mib(cg.read_u64("memory.usage_in_bytes")?)
    );
    // The maps are charged to this group: kernel memory covers them (the rest of kmem is
    // slab, page tables, the socket and sockets' buffers).
    ensure!(kmem > 0, "no kernel memory charged to the group");
    ensure!(
        kmem >= maps / 10 * 9,
        "kmem {kmem} does not cover the agent's maps ({maps}): maps not charged to the group"
    );

    timed("stop (SIGTERM, state.json written)", || {
        let st = agent.stop_within(Duration::from_secs(300))?;
        ensure!(st.success(), "clean exit: {st}");
        Ok(())
    })?;
    let mut agent = timed("restart with pins", || pod.start("restart"))?;
    let pid = agent.pid().context("pid")?;
    let st = pod.status()?;
    ensure!(
        st["ban_map"]["entries"] == u64::from(n) && st["ban_map"]["capacity"] == u64::from(n),
        "restart kept every ban: {st}"
    );
    let kernel = timed("read the pinned maps", || kernel_ban_set(&s.pin_dir("a")))?;
    ensure!(
        kernel == want,
        "the kernel holds exactly the imported set: {} entries",
        kernel.len()
    );
    still_alive(&mut agent, pid, "restarted")?;
    let hwm_restart = cgroup::proc_status_kib(pid, "VmHWM:")? << 10;

    let sampled = sampler.finish();
    let oom = cg.oom_control()?;
    let peak = cg.read_u64("memory.max_usage_in_bytes")?;
    let kmem_peak = cg.read_u64("memory.kmem.max_usage_in_bytes")?;
    eprintln!(
        "[cgroup] limit {:.0} MiB: peak usage {:.1} MiB (kmem included), kmem peak {:.1} MiB, \
         sampled peak without page cache {:.1} MiB (rss {:.1}), failcnt {}, agent VmHWM {:.1} \
         MiB first, {:.1} MiB after the restart; {oom:?}",
        mib(limit),
        mib(peak),
        mib(kmem_peak),
        mib(sampled.without_cache),
        mib(sampled.rss),
        cg.read_u64("memory.failcnt")?,
        mib(hwm_first),
        mib(hwm_restart),
    );
    ensure!(
        oom.oom_kill == 0 && oom.under_oom == 0,
        "OOM in the group: {oom:?}"
    );
    drop(agent);
    wsguard::datapath::DataPath::detach_all(&s.pin_dir("a"))?;
    Ok(())
}

#[test]
fn a_full_ban_map_fits_the_daemonset_memory_limit() -> Result<()> {
    let (text, limit) = manifest_memory_limit()?;
    let n = manifest_max_bans()?;
    eprintln!("[cgroup] DaemonSet limit {text} ({limit} bytes), max_bans {n}");
    let t = Instant::now();
    // Declared first, dropped last: after the agents and the lab (pins) are gone.
    let cg = MemCgroup::new(Some(limit))?;
    let r = full_map_in_the_pod_limit(&cg, limit, n);
    eprintln!("[cgroup] total {:.2?}", t.elapsed());
    // On failure, say whether the group ran out of memory.
    r.with_context(|| {
        format!(
            "in {} (limit {text}): {:?}, failcnt {:?}, peak {:?}",
            cg.path().display(),
            cg.oom_control(),
            cg.read_u64("memory.failcnt"),
            cg.read_u64("memory.max_usage_in_bytes"),
        )
    })
}
