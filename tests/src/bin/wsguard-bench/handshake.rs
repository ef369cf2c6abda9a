//! The handshake path: one run per call, a fresh flow each (a repeated run would find the flow
//! and skip the classifier), next to the pass floor also run once per call.

use anyhow::{Result, ensure};
use wsguard_tests::{
    dataplane::{XDP_PASS, flow_key},
    packet::{Pkt, bad_request, ws_request},
};

use crate::{
    Bench, PORT, ROUNDS, SERVER,
    cases::padded,
    run::{Prog, test_run},
    table::{OwnRow, Stat},
};

/// Runs per program per round.
const RUNS: usize = 2_000;
const CLIENT: &str = "198.18.0.9";

impl Bench {
    pub fn handshakes(&mut self) -> Result<Vec<OwnRow>> {
        let valid = padded(ws_request("/chat"), 512);
        let bad = padded(bad_request("/chat"), 512);
        let frame = |req: &[u8]| Pkt::tcp(CLIENT, 40000, SERVER, PORT).payload(req).build();
        let (valid, bad) = (frame(&valid), frame(&bad));
        let (mut floor, mut ok, mut ko) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            floor.push(self.single(Prog::FloorPass, &valid, false)?);
            ok.push(self.single(Prog::Wsguard, &valid, true)?);
            ko.push(self.single(Prog::Wsguard, &bad, true)?);
        }
        Ok(vec![
            OwnRow {
                path: "handshake, valid 512 B request (fresh flow)".into(),
                program: "wsguard",
                floor: Stat::of(&floor, &floor),
                stat: Stat::of(&ok, &floor),
            },
            OwnRow {
                path: "handshake, bad 512 B request (fresh flow)".into(),
                program: "wsguard",
                floor: Stat::of(&floor, &floor),
                stat: Stat::of(&ko, &floor),
            },
        ])
    }

    /// Mean kernel ns of `RUNS` single runs; `fresh`: delete the flow the run recorded.
    fn single(&mut self, prog: Prog, frame: &[u8], fresh: bool) -> Result<f64> {
        let key = flow_key(CLIENT, 40000, SERVER, PORT);
        let mut total = 0u64;
        for _ in 0..RUNS {
            let run = test_run(self.fd(prog), frame, 1)?;
            ensure!(run.action == XDP_PASS, "{prog:?}: action {}", run.action);
            if fresh {
                ensure!(
                    self.dp.flow(&key)?.is_some(),
                    "the handshake path recorded no flow"
                );
                self.dp.delete_flow(&key)?;
            }
            total += u64::from(run.kernel_ns);
        }
        Ok(total as f64 / RUNS as f64)
    }
}
