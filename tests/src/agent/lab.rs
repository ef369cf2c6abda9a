//! A lab for the real agent: a veth pair between a protected namespace (`lab.a`, where the
//! agent runs on `if_a`) and a client namespace (`lab.b`), a private bpffs for the pins, and a
//! tempdir for the state, socket and log. Everything goes away on drop.

use anyhow::{Context as _, Result, ensure};
use aya::{
    maps::{HashMap, LpmTrie, Map, MapData},
    programs::{SchedClassifier, TcAttachType},
};
use serde_json::{Value, json};
use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};
use wsguard_common::maps::{BanValue, names, programs};

use super::{Agent, http, send_frames};
use crate::{
    netns::{BpfFs, VethLab},
    packet::{Pkt, bad_request},
};

/// Source ports of crafted handshakes: every burst opens new flows (a flow is judged once).
static NEXT_PORT: AtomicU16 = AtomicU16::new(20000);

pub struct AgentLab {
    pub lab: VethLab,
    pub bpffs: BpfFs,
    pub dir: tempfile::TempDir,
}

impl AgentLab {
    pub fn new() -> Result<Self> {
        Ok(Self {
            lab: VethLab::new()?,
            bpffs: BpfFs::new()?,
            dir: tempfile::tempdir()?,
        })
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs.path().join("wsguard")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("wsguard.sock")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// The lab's paths and interface plus `extra` (no `--threshold`: `start` adds 5).
    pub fn base_args(&self) -> Vec<String> {
        let p = |p: PathBuf| p.to_string_lossy().into_owned();
        [
            "--iface",
            &self.lab.if_a,
            "--pin-dir",
            &p(self.pin_dir()),
            "--state-dir",
            &p(self.state_dir()),
            "--socket",
            &p(self.socket()),
            "--xdp-mode",
            "generic",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// Start with the base args, `--threshold 5`, metrics off, and `extra`; wait until ready.
    pub fn start(&self, extra: &[&str]) -> Result<Agent> {
        self.start_env(extra, &[])
    }

    pub fn start_env(&self, extra: &[&str], env: &[(&str, &str)]) -> Result<Agent> {
        let mut args = vec!["--threshold", "5"];
        if !extra.contains(&"--metrics-addr") {
            args.extend(["--metrics-addr", "off"]);
        }
        args.extend_from_slice(extra);
        self.start_raw(&args, env)
    }

    /// Base args and exactly `extra`; wait until ready.
    pub fn start_raw(&self, extra: &[&str], env: &[(&str, &str)]) -> Result<Agent> {
        let base = self.base_args();
        let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        let before = std::fs::read_to_string(self.log())
            .unwrap_or_default()
            .matches(" ready")
            .count();
        let mut a = Agent::start_env(&self.lab.a, &self.log(), &args, env)?;
        a.wait_log(" ready", before + 1, Duration::from_secs(30))?;
        Ok(a)
    }

    /// `n` bad handshakes from `src` (to `a`'s address of the same family), each the first
    /// request of a new flow.
    pub fn burst(&self, src: impl Into<IpAddr>, n: u16) -> Result<()> {
        let src: IpAddr = src.into();
        let dst: IpAddr = match src {
            IpAddr::V4(_) => self.lab.ip_a.into(),
            IpAddr::V6(_) => self.lab.ip6_a.into(),
        };
        let base = NEXT_PORT.fetch_add(n, Ordering::Relaxed);
        let frames: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                Pkt::tcp(&src.to_string(), base + i, &dst.to_string(), 80)
                    .payload(&bad_request("/"))
                    .build()
            })
            .collect();
        send_frames(&self.lab.b, &self.lab.if_b, &frames)
    }

    pub fn state(&self) -> Result<Value> {
        let p = self.state_dir().join("state.json");
        let bytes = std::fs::read(&p).with_context(|| format!("read {}", p.display()))?;
        // Through the agent's reader: version 2 groups bans, this gives every ban whole.
        let state = wsguard::state::parse(&bytes).map_err(anyhow::Error::msg)?;
        Ok(serde_json::to_value(state)?)
    }

    /// Wait (bounded) until the state file satisfies `ok`; returns it.
    pub fn wait_state(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Result<Value> {
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(s) = self.state()
                && ok(&s)
            {
                return Ok(s);
            }
            ensure!(
                Instant::now() < end,
                "state never had {what}: {:?}",
                self.state().ok()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The saved ban of `addr`, waiting for the debounced write.
    pub fn wait_ban(&self, addr: Ipv4Addr) -> Result<Value> {
        let a = addr.to_string();
        let s = self.wait_state(&format!("a ban of {a}"), |s| {
            bans_of(s).iter().any(|b| b["cidr"] == a)
        })?;
        Ok(bans_of(&s)
            .into_iter()
            .find(|b| b["cidr"] == a)
            .expect("checked"))
    }

    /// Echo requests from `from` answered by `a`, of 3.
    pub fn pings(&self, from: Ipv4Addr) -> Result<u32> {
        self.lab.ping_from(from, 3, "0.2")
    }

    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> Result<http::Response> {
        http::api(&self.socket(), method, path, body.as_ref())
    }

    /// `GET path` that must answer 200, as JSON.
    pub fn get(&self, path: &str) -> Result<Value> {
        let r = self.api("GET", path, None)?;
        ensure!(r.status == 200, "GET {path}: {} {}", r.status, r.text());
        r.json()
    }

    /// `POST /v1/bans` for one address; the raw response (tests check refusals too).
    pub fn ban_add(&self, addr: &str, ttl_s: Option<u64>, observe: bool) -> Result<http::Response> {
        let body = json!({"addrs": [addr], "ttl_s": ttl_s, "permanent": false,
                          "reason": "test", "observe": observe, "hard": false});
        self.api("POST", "/v1/bans", Some(body))
    }

    /// Every ban the API lists.
    pub fn bans(&self) -> Result<Vec<Value>> {
        Ok(self
            .get("/v1/bans")?
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The API's ban of `addr` (a host), if any.
    pub fn ban(&self, addr: &str) -> Result<Option<Value>> {
        Ok(self.bans()?.into_iter().find(|b| b["addr"] == addr))
    }

    /// The metrics endpoint's text, fetched from inside the agent's namespace.
    pub fn metrics(&self, addr: &str) -> Result<String> {
        let addr = addr.to_owned();
        let r = self.lab.a.run(move || http::get_tcp(&addr, "/metrics"))??;
        ensure!(r.status == 200, "GET /metrics: {}", r.status);
        Ok(r.text())
    }

    /// Host IPv4 bans in the pinned maps, and the number of entries in all four ban maps.
    pub fn kernel_bans(&self) -> Result<(Vec<Ipv4Addr>, usize)> {
        let open = |name: &str| -> Result<MapData> {
            let p = self.pin_dir().join("maps").join(name);
            MapData::from_pin(&p).with_context(|| format!("open pinned {}", p.display()))
        };
        let v4: HashMap<_, [u8; 4], BanValue> =
            HashMap::try_from(Map::HashMap(open(names::BANS_V4)?))?;
        let hosts: Vec<Ipv4Addr> = v4
            .keys()
            .filter_map(|k| k.ok())
            .map(Ipv4Addr::from)
            .collect();
        let v6: HashMap<_, [u8; 16], BanValue> =
            HashMap::try_from(Map::HashMap(open(names::BANS_V6)?))?;
        let c4: LpmTrie<_, [u8; 4], BanValue> =
            LpmTrie::try_from(Map::LpmTrie(open(names::BAN_CIDRS_V4)?))?;
        let c6: LpmTrie<_, [u8; 16], BanValue> =
            LpmTrie::try_from(Map::LpmTrie(open(names::BAN_CIDRS_V6)?))?;
        let total = hosts.len() + v6.keys().count() + c4.keys().count() + c6.keys().count();
        Ok((hosts, total))
    }

    /// The XDP program ids attached to the protected interface (`ip -j link`): one per
    /// attachment.
    pub fn xdp_prog_ids(&self) -> Result<Vec<u32>> {
        let json = self
            .lab
            .a
            .ip(&["-j", "link", "show", "dev", &self.lab.if_a])?;
        let Some(xdp) = json.split("\"xdp\":").nth(1) else {
            return Ok(Vec::new());
        };
        // `xdp` names the program once, then once more per attachment under `attached`.
        let xdp = xdp.split("\"attached\":").nth(1).unwrap_or(xdp);
        Ok(xdp
            .split("\"prog\":{")
            .skip(1)
            .filter_map(|p| p.split("\"id\":").nth(1))
            .filter_map(|id| id.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .collect())
    }

    /// wsguard TC egress programs on the protected interface: TCX attachments (queried from
    /// the kernel: the machine's bpftool predates TCX) plus clsact filters (`tc`).
    pub fn tc_attachments(&self) -> Result<usize> {
        let iface = self.lab.if_a.clone();
        let tcx = self.lab.a.run(move || {
            SchedClassifier::query_tcx(&iface, TcAttachType::Egress).map(|(_, progs)| {
                progs
                    .iter()
                    .filter_map(|p| p.name_as_str())
                    .filter(|n| is_tc_egress(n))
                    .count()
            })
        })?;
        // No TCX on this kernel reads as none attached that way.
        let tcx = tcx.unwrap_or(0);
        let out = self.lab.a.exec(
            &["tc", "filter", "show", "dev", &self.lab.if_a, "egress"],
            Duration::from_secs(10),
        )?;
        // One line per filter; it names the program twice (object section and kernel name).
        let clsact = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.split_whitespace().any(is_tc_egress))
            .count();
        Ok(tcx + clsact)
    }
}

/// The kernel keeps 15 bytes of a program's name (BPF_OBJ_NAME_LEN).
fn is_tc_egress(name: &str) -> bool {
    name.len() >= 15 && programs::TC_EGRESS.starts_with(name)
}

/// The `bans` array of a state file.
pub fn bans_of(state: &Value) -> Vec<Value> {
    state["bans"].as_array().cloned().unwrap_or_default()
}

/// The value of an unlabelled or labelled sample in Prometheus text, e.g.
/// `sample(text, "wsguard_bans_refused_total{reason=\"full\"}")`.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Poll `ok` (bounded, 15 s) until it holds; the error says `what` never happened.
pub fn wait_until(what: &str, mut ok: impl FnMut() -> Result<bool>) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(15);
    let mut last = None;
    loop {
        match ok() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        ensure!(
            Instant::now() < end,
            "{what} never happened (last error: {last:?})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Seconds since the Unix epoch of an RFC 3339 UTC time (`2030-01-02T03:04:05.5Z`).
pub fn unix_secs(t: &str) -> Result<f64> {
    crate::lab::expect::rfc3339_secs(t)
}

/// A ban's TTL in seconds (`expires_at - created_at`), from the state file or the API.
pub fn ttl_secs(ban: &Value) -> Result<f64> {
    let s = |k: &str| ban[k].as_str().with_context(|| format!("no {k} in {ban}"));
    Ok(unix_secs(s("expires_at")?)? - unix_secs(s("created_at")?)?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339() {
        assert_eq!(super::unix_secs("1970-01-01T00:00:00Z").unwrap(), 0.0);
        assert_eq!(
            super::unix_secs("2000-03-01T00:00:01.5Z").unwrap(),
            951_868_801.5
        );
        assert!(super::unix_secs("2000-03-01 00:00:01").is_err());
    }
}
