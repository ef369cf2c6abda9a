//! The PROXY-protocol side of the harness: trusted senders, the senders noted, rates by
//! client, and the frame a program leaves (for the RSTs it writes).

use anyhow::{Context as _, Result};
use aya::{
    maps::{HashMap, LpmTrie, lpm_trie::Key},
    programs::{TestRun, TestRunOptions, Xdp},
};
use std::net::IpAddr;
use wsguard_common::maps::{CFG_PROXY_TRUST, ProxySenderValue, RateValue, names};

use super::{DataPlane, addr16, program};

impl DataPlane {
    /// Run the XDP program once; its action and the frame as it left the program (rewritten,
    /// shortened or grown).
    pub fn xdp_out(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let xdp: &mut Xdp = program(&mut self.ebpf, wsguard_common::maps::programs::XDP)?;
        let mut out = vec![0u8; frame.len() + 256];
        let r = xdp
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN (XDP)")?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    /// Trust `addr/prefix` as a PROXY-protocol sender (and set `CFG_PROXY_TRUST`), as the
    /// agent's `set_proxy_trust` does.
    pub fn trust_proxy(&mut self, addr: &str, prefix: u32) -> Result<()> {
        match addr.parse::<IpAddr>()? {
            IpAddr::V4(v4) => {
                let mut m: LpmTrie<_, [u8; 4], u32> =
                    LpmTrie::try_from(self.map(names::PROXY_FROM_V4)?)?;
                m.insert(&Key::new(prefix, v4.octets()), 1, 0)?;
            }
            IpAddr::V6(v6) => {
                let mut m: LpmTrie<_, [u8; 16], u32> =
                    LpmTrie::try_from(self.map(names::PROXY_FROM_V6)?)?;
                m.insert(&Key::new(prefix, v6.octets()), 1, 0)?;
            }
        }
        let mut cfg = self.config()?;
        cfg.flags |= CFG_PROXY_TRUST;
        self.set_config(&cfg)
    }

    /// The `PROXY_SENDERS` entry of a sender, if any.
    pub fn proxy_sender(&mut self, addr: &str) -> Result<Option<ProxySenderValue>> {
        let m: HashMap<_, [u8; 16], ProxySenderValue> =
            HashMap::try_from(self.map(names::PROXY_SENDERS)?)?;
        match m.get(&addr16(addr), 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The bad-handshake rate entry of a client address, if any.
    pub fn rate(&mut self, addr: &str) -> Result<Option<RateValue>> {
        let m: HashMap<_, [u8; 16], RateValue> = HashMap::try_from(self.map(names::RATES)?)?;
        match m.get(&addr16(addr), 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}
