//! The handshake path: one run per call, a fresh flow each (a repeated run would find the flow
//! and skip the classifier), next to the pass floor also run once per call. The proxied rows
//! are the same path behind a trusted PROXY sender: the header parsed, then the request
//! classified, in one first payload segment; and the cut, a banned real client's header segment
//! turned into a RST towards the server (it rewrites its frame: hence one run per call too).

use anyhow::{Result, ensure};
use wsguard_common::maps::{FlowKey, PROXY_CLIENT, PROXY_CUT, PROXY_NONE};
use wsguard_tests::{
    dataplane::{XDP_PASS, addr16, flow_key},
    packet::{Pkt, bad_request, ws_request},
};

use crate::{
    Bench, PORT, ROUNDS, SERVER,
    cases::padded,
    proxied,
    run::{Prog, test_run},
    table::{OwnRow, Stat},
};

/// Runs per program per round.
const RUNS: usize = 2_000;
const CLIENT: &str = "198.18.0.9";

/// The flow a run must record, deleted after it: its key, PROXY state and real client.
struct Fresh {
    key: FlowKey,
    proxy: u8,
    real_client: [u8; 16],
}

impl Bench {
    pub fn handshakes(&mut self) -> Result<Vec<OwnRow>> {
        let valid = padded(ws_request("/chat"), 512);
        let bad = padded(bad_request("/chat"), 512);
        let frame = |req: &[u8]| Pkt::tcp(CLIENT, 40000, SERVER, PORT).payload(req).build();
        let (direct_valid, direct_bad) = (frame(&valid), frame(&bad));
        let proxied_frame = |client: &str, v2: bool| {
            proxied::first_segment(client, proxied::FRESH_PORT, v2, &valid).build()
        };
        let v2 = proxied_frame(proxied::CLIENT, true);
        let v1 = proxied_frame(proxied::CLIENT, false);
        let cut = proxied_frame(proxied::BANNED_CLIENT, true);
        let direct = Fresh {
            key: flow_key(CLIENT, 40000, SERVER, PORT),
            proxy: PROXY_NONE,
            real_client: [0; 16],
        };
        let behind = |proxy, client| Fresh {
            key: proxied::key(proxied::FRESH_PORT),
            proxy,
            real_client: addr16(client),
        };
        let (ok_proxied, ko_cut) = (
            behind(PROXY_CLIENT, proxied::CLIENT),
            behind(PROXY_CUT, proxied::BANNED_CLIENT),
        );
        proxied::ban_client(&mut self.dp)?;
        let rows: [(&str, &[u8], Option<&Fresh>); 6] = [
            ("", &direct_valid, None),
            (
                "handshake, valid 512 B request (fresh flow)",
                &direct_valid,
                Some(&direct),
            ),
            (
                "handshake, bad 512 B request (fresh flow)",
                &direct_bad,
                Some(&direct),
            ),
            (
                "proxied: PROXY v2 header + valid 512 B request (fresh flow)",
                &v2,
                Some(&ok_proxied),
            ),
            (
                "proxied: PROXY v1 header + valid 512 B request (fresh flow)",
                &v1,
                Some(&ok_proxied),
            ),
            (
                "proxied: banned real client's v2 header + request: cut, RST to the server (fresh flow)",
                &cut,
                Some(&ko_cut),
            ),
        ];
        let mut samples = vec![Vec::new(); rows.len()];
        for _ in 0..ROUNDS {
            for (i, (_, f, fresh)) in rows.iter().enumerate() {
                let prog = if i == 0 {
                    Prog::FloorPass
                } else {
                    Prog::Wsguard
                };
                samples[i].push(self.single(prog, f, *fresh)?);
            }
        }
        let floor = &samples[0];
        Ok(rows
            .iter()
            .zip(&samples)
            .skip(1)
            .map(|((path, _, _), s)| OwnRow {
                path: (*path).into(),
                program: "wsguard",
                floor: Stat::of(floor, floor),
                stat: Stat::of(s, floor),
            })
            .collect())
    }

    /// Mean kernel ns of `RUNS` single runs, each passed; `fresh`: check the flow the run
    /// recorded, then delete it.
    fn single(&mut self, prog: Prog, frame: &[u8], fresh: Option<&Fresh>) -> Result<f64> {
        let mut total = 0u64;
        for _ in 0..RUNS {
            let run = test_run(self.fd(prog), frame, 1)?;
            ensure!(run.action == XDP_PASS, "{prog:?}: action {}", run.action);
            if let Some(want) = fresh {
                let flow = self.dp.flow(&want.key)?;
                ensure!(
                    flow.is_some_and(
                        |f| f.proxy_state() == want.proxy && f.real_client == want.real_client
                    ),
                    "the handshake path recorded {flow:?}, not a flow of PROXY state {} and real \
                     client {:?}",
                    want.proxy,
                    want.real_client
                );
                self.dp.delete_flow(&want.key)?;
            }
            total += u64::from(run.kernel_ns);
        }
        Ok(total as f64 / RUNS as f64)
    }
}
