//! The real `wsguard agent` run as the DaemonSet runs it, in a lab namespace: the ConfigMap's
//! config, the container's args, root with every capability but the DaemonSet's dropped
//! (bounding, permitted and effective sets; none inheritable or ambient), no_new_privs
//! (allowPrivilegeEscalation: false), a read-only root filesystem with only the DaemonSet's
//! volumes writable, and /sys and /proc/sys read-only as in every unprivileged container. It
//! must attach, answer its probes, ban a source from a burst of bad handshakes and drop its
//! packets; and it must fail to start with any one of the added capabilities missing, so none
//! is there without a reason.
//!
//! Not reproduced: the container runtime's seccomp profile (RuntimeDefault allows bpf() and
//! perf_event_open() to holders of CAP_BPF / CAP_PERFMON in containerd and CRI-O), and the pod's
//! memory cgroup.

use anyhow::{Context as _, Result, bail, ensure};
use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};
use wsguard_tests::{
    agent::{send_frames, wsguard_bin},
    netns::{BpfFs, NetNs, VethLab},
    packet::{Pkt, bad_request},
};

use crate::{
    kube::{METRICS_PORT, added_caps, agent_container, config_text, daemonset, rendered},
    pod_spec::JUSTIFIED_CAPS,
};

/// Bit numbers (linux/capability.h) of the capabilities the DaemonSet may add.
fn cap_bit(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other}: add its bit number to cap_bit"),
    }
}

/// Sets up the pod's mounts in the private mount namespace `unshare` made, then execs the
/// rest of its arguments. $1: the test's bpffs (hostPath /sys/fs/bpf), $2 and $3: the test's
/// directories behind the hostPaths /run/wsguard and /var/lib/wsguard.
const POD_MOUNTS: &str = r#"set -eu
bpffs=$1 run=$2 state=$3
shift 3
mount --bind "$bpffs" /sys/fs/bpf
# /run and /var/lib: empty and read-only but for the volume, as in the image.
for pair in "/run:$run" "/var/lib:$state"; do
    dir=${pair%%:*} src=${pair#*:}
    mount -t tmpfs -o mode=0755 wsguard-pod "$dir"
    mkdir "$dir/wsguard"
    mount --bind "$src" "$dir/wsguard"
    mount -o remount,ro "$dir"
done
# readOnlyRootFilesystem: true
mount -o remount,bind,ro /
mount -o remount,bind,ro /sys
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
exec "$@"
"#;

/// One agent pod on the lab's protected side; killed on drop.
struct Pod {
    child: Option<Child>,
    log: PathBuf,
    metrics: SocketAddr,
    _bpffs: BpfFs,
    dir: tempfile::TempDir,
}

impl Pod {
    /// `caps`: the capability names to keep, as the manifest spells them.
    fn start(lab: &VethLab, caps: &[String]) -> Result<Self> {
        let bpffs = BpfFs::new()?;
        let dir = tempfile::tempdir()?;
        let (run, state) = (dir.path().join("run"), dir.path().join("state"));
        fs::create_dir(&run)?;
        fs::create_dir(&state)?;
        // The ConfigMap's file, as the config volume would hold it.
        let docs = rendered("base");
        let config = dir.path().join("wsguard.toml");
        fs::write(&config, config_text(&docs))?;
        let args: Vec<String> = agent_container(daemonset(&docs))["args"]
            .as_array()
            .context("args")?
            .iter()
            .map(|a| a.as_str().unwrap_or_default().to_owned())
            .collect();
        ensure!(
            args == ["agent", "--config", "/etc/wsguard/wsguard.toml"],
            "the DaemonSet's args changed: {args:?}; update this test"
        );
        let set = std::iter::once("-all".to_owned())
            .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
            .collect::<Vec<_>>()
            .join(",");
        let log = dir.path().join("agent.log");
        let out = fs::File::create(&log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.a.name()))
            .args(["unshare", "--mount", "--propagation", "private", "--"])
            .args(["sh", "-c", POD_MOUNTS, "pod-mounts"])
            .args([bpffs.path(), &run, &state])
            .args(["setpriv", "--reuid=0", "--regid=0", "--clear-groups"])
            .args(["--no-new-privs", "--inh-caps=-all", "--ambient-caps=-all"])
            .arg(format!("--bounding-set={set}"))
            .arg("--")
            .arg(wsguard_bin()?)
            .args(["agent", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawn nsenter … wsguard agent")?;
        Ok(Self {
            child: Some(child),
            log,
            metrics: SocketAddr::new(lab.ip_a.into(), METRICS_PORT as u16),
            _bpffs: bpffs,
            dir,
        })
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The exit status, if the agent has exited.
    fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("not started"),
        }
    }

    /// Poll `/readyz` as kubelet's readiness probe does, until 200; fail if the agent exits.
    fn wait_ready(&mut self, ns: &NetNs) -> Result<()> {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.exited()? {
                bail!("the agent exited ({st}):\n{}", self.log_text());
            }
            if http_get(ns, self.metrics, "/readyz").is_ok_and(|(code, _)| code == 200) {
                return Ok(());
            }
            ensure!(
                Instant::now() < end,
                "/readyz not 200 within 30s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait for the agent to exit by itself; it must not get ready meanwhile.
    fn wait_failed(&mut self, ns: &NetNs) -> Result<std::process::ExitStatus> {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.exited()? {
                return Ok(st);
            }
            ensure!(
                http_get(ns, self.metrics, "/readyz").map_or(true, |(code, _)| code != 200),
                "the agent got ready:\n{}",
                self.log_text()
            );
            ensure!(
                Instant::now() < end,
                "the agent neither failed nor got ready within 30s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A plain HTTP/1.0 GET from inside `ns`, as a probe or a scrape: (status, body).
fn http_get(ns: &NetNs, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let path = path.to_owned();
    ns.run(move || -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut resp = String::new();
        s.take(1 << 20).read_to_string(&mut resp)?;
        let code = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("not an HTTP response: {resp:?}"))?;
        let body = resp
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        Ok((code, body))
    })?
}

/// The value of the sample `name` (with its labels) in a Prometheus text page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn status_field(pid: u32, field: &str) -> Result<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// A lab whose protected side routes by default through the veth: the ConfigMap names no
/// interface, so the agent picks the default route's, as on a node.
fn lab() -> Result<VethLab> {
    let lab = VethLab::new()?;
    let gw = lab.ip_b.to_string();
    lab.a
        .ip(&["route", "add", "default", "via", &gw, "dev", &lab.if_a])?;
    Ok(lab)
}

#[test]
fn agent_enforces_with_only_the_daemonset_capabilities() -> Result<()> {
    let caps = added_caps(&rendered("base"));
    let lab = lab()?;
    let mut pod = Pod::start(&lab, &caps)?;
    pod.wait_ready(&lab.a)?;

    // What the process really holds: the DaemonSet's set and nothing else.
    let want: u64 = caps.iter().map(|c| 1u64 << cap_bit(c)).sum();
    let pid = pod.pid();
    for field in ["CapEff:", "CapPrm:", "CapBnd:"] {
        let have = u64::from_str_radix(&status_field(pid, field)?, 16)?;
        ensure!(have == want, "{field} {have:#x}, want {want:#x} ({caps:?})");
    }
    for field in ["CapInh:", "CapAmb:"] {
        ensure!(
            u64::from_str_radix(&status_field(pid, field)?, 16)? == 0,
            "{field}"
        );
    }
    ensure!(status_field(pid, "NoNewPrivs:")? == "1", "no_new_privs");
    // The root filesystem is read-only to it (seen through its own mount namespace).
    let scratch = Path::new(&format!("/proc/{pid}/root")).join(
        pod.dir
            .path()
            .strip_prefix("/")
            .context("absolute tempdir")?
            .join("probe"),
    );
    let err = fs::write(&scratch, b"x").expect_err("the agent's root filesystem is writable");
    ensure!(err.raw_os_error() == Some(libc::EROFS), "{err}");

    // The probes and the scrape the DaemonSet and ServiceMonitor configure.
    ensure!(
        http_get(&lab.a, pod.metrics, "/healthz")?.0 == 200,
        "/healthz"
    );
    let (code, page) = http_get(&lab.a, pod.metrics, "/metrics")?;
    ensure!(
        code == 200 && page.contains("wsguard_build_info"),
        "{code}: {page}"
    );

    // Enforcement: a burst above the ConfigMap's threshold (20) bans the source in the kernel.
    let (bad, clean) = (lab.ip_b2, lab.ip_b);
    ensure!(
        lab.ping_from(bad, 3, "0.2")? == 3,
        "reachable before the burst"
    );
    let frames: Vec<Vec<u8>> = (0..30)
        .map(|i| {
            Pkt::tcp(&bad.to_string(), 42000 + i, &lab.ip_a.to_string(), 80)
                .payload(&bad_request("/"))
                .build()
        })
        .collect();
    send_frames(&lab.b, &lab.if_b, &frames)?;
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, page) = http_get(&lab.a, pod.metrics, "/metrics")?;
        if sample(&page, "wsguard_bans_active{source=\"kernel\"}").is_some_and(|n| n >= 1.0) {
            break;
        }
        ensure!(
            Instant::now() < end,
            "no kernel ban within 15s:\n{page}\n{}",
            pod.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        lab.ping_from(bad, 3, "0.2")? == 0,
        "the banned source still answered"
    );
    ensure!(
        lab.ping_from(clean, 3, "0.2")? == 3,
        "a clean source lost packets"
    );
    let (_, page) = http_get(&lab.a, pod.metrics, "/metrics")?;
    let dropped = sample(&page, "wsguard_packets_total{action=\"dropped\"}");
    ensure!(
        dropped.is_some_and(|n| n >= 3.0),
        "dropped: {dropped:?}\n{page}"
    );
    // The pins went to the host's bpffs through the volume, so they outlive the pod.
    ensure!(
        pod._bpffs.path().join("wsguard").is_dir(),
        "no pins under the hostPath bpffs"
    );
    Ok(())
}

#[test]
fn agent_fails_without_any_one_added_capability() -> Result<()> {
    let caps = added_caps(&rendered("base"));
    let mut sorted = caps.clone();
    sorted.sort();
    let mut justified: Vec<String> = JUSTIFIED_CAPS.iter().map(|c| c.to_string()).collect();
    justified.sort();
    ensure!(
        sorted == justified,
        "{caps:?}: see daemonset_security_context_is_least_privilege"
    );
    let lab = lab()?;
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let mut pod = Pod::start(&lab, &fewer)?;
        let st = pod.wait_failed(&lab.a)?;
        let log = pod.log_text();
        ensure!(!st.success(), "without {missing}: exit {st}\n{log}");
        ensure!(
            log.contains("cannot load the data path"),
            "without {missing}: the agent failed for another reason:\n{log}"
        );
    }
    Ok(())
}
