//! The packets the bench measures: (path name, frame, verdict, programs, set-up) rows. Another
//! path is a new list here and a new phase in main.rs; the PROXY-protocol packets and their
//! flows are built in proxied.rs.

use anyhow::{Result, ensure};
use wsguard_common::maps::{BAN_MAY_PRESERVE, FLOW_ESTABLISHED};
use wsguard_tests::{
    dataplane::{TC_ACT_OK, XDP_DROP, XDP_PASS, flow_key},
    packet::{Pkt, bad_request, ws_request},
};

use crate::{
    Bench, PORT, SERVER,
    bans::{self, ttl_ban},
    proxied,
    run::Prog,
};

/// wsguard ÷ reference targets, in work over the floor.
pub const BANNED_TARGET: f64 = 1.5;
pub const CLEAN_TARGET: f64 = 2.0;

pub type Setup = fn(&mut Bench) -> Result<()>;

pub struct Case {
    pub path: &'static str,
    pub frame: Vec<u8>,
    /// The action every program must return (checked on every call).
    pub verdict: u32,
    /// What runs besides the floor of `verdict`.
    pub progs: &'static [Prog],
    /// wsguard ÷ reference at most this (comparison cases only).
    pub target: Option<f64>,
    /// Run once before the case's phase (state the packet needs, e.g. its flow).
    pub setup: Option<Setup>,
    /// Run before every call of the case, outside the timing (state a run could use up).
    pub before_call: Option<Setup>,
    /// Runs per call at most (state that must outlast the call).
    pub max_repeat: Option<u32>,
}

const BANNED_PROGS: &[Prog] = &[
    Prog::Reference,
    Prog::Wsguard,
    Prog::WsguardLookup,
    Prog::XdpFilter,
];
const CLEAN_PROGS: &[Prog] = &[Prog::Reference, Prog::Wsguard, Prog::XdpFilter];
const OWN_BANNED: &[Prog] = &[Prog::Wsguard, Prog::WsguardLookup];
const OWN_CLEAN: &[Prog] = &[Prog::Wsguard];

/// A WebSocket client (in a clean /24) whose flow is established.
const WS_CLIENT: &str = "198.18.0.11";
const WS_FRAME: &[u8] = &[0x82, 0x84, 1, 2, 3, 4, 5, 6, 7, 8];

fn clean_frame(src: &str, dst: &str) -> Vec<u8> {
    Pkt::tcp(src, 40000, dst, 443).payload(&[0x17; 64]).build()
}

fn ws_data() -> Vec<u8> {
    Pkt::tcp(WS_CLIENT, 40000, SERVER, PORT)
        .payload(WS_FRAME)
        .build()
}

/// The same four packets for wsguard, the reference and xdp-filter.
pub fn comparison() -> Vec<Case> {
    let banned = bans::BANNED.to_string();
    let neighbour = bans::NEIGHBOUR.to_string();
    vec![
        Case {
            path: "banned source, SYN to a watched port",
            frame: Pkt::tcp(&banned, 40000, SERVER, PORT).syn().build(),
            verdict: XDP_DROP,
            progs: BANNED_PROGS,
            target: Some(BANNED_TARGET),
            setup: None,
            before_call: None,
            max_repeat: None,
        },
        Case {
            path: "clean source, clean /24",
            frame: clean_frame("198.18.0.10", SERVER),
            verdict: XDP_PASS,
            progs: CLEAN_PROGS,
            target: Some(CLEAN_TARGET),
            setup: None,
            before_call: None,
            max_repeat: None,
        },
        Case {
            path: "clean source next to a ban (same /24)",
            frame: clean_frame(&neighbour, SERVER),
            verdict: XDP_PASS,
            progs: CLEAN_PROGS,
            target: Some(CLEAN_TARGET),
            setup: None,
            before_call: None,
            max_repeat: None,
        },
        Case {
            path: "established WebSocket data, watched port",
            frame: ws_data(),
            verdict: XDP_PASS,
            progs: CLEAN_PROGS,
            target: Some(CLEAN_TARGET),
            setup: Some(establish_ws),
            before_call: None,
            max_repeat: None,
        },
        // The same data packet on a flow a trusted proxy opened (its header read, the handshake
        // passed): from the proxy's address, which is all the reference and xdp-filter look up.
        // Within the clean-path budget of direct flows: the same target.
        Case {
            path: "established proxied WebSocket data (trusted PROXY sender)",
            frame: proxied::ws_data(),
            verdict: XDP_PASS,
            progs: CLEAN_PROGS,
            target: Some(CLEAN_TARGET),
            setup: Some(|b| proxied::establish(&mut b.dp)),
            before_call: None,
            max_repeat: None,
        },
    ]
}

/// Open the WebSocket through the real path (request in, 101 out).
fn establish_ws(b: &mut Bench) -> Result<()> {
    let req = Pkt::tcp(WS_CLIENT, 40000, SERVER, PORT).payload(&ws_request("/"));
    b.dp.xdp(&req.build())?;
    let answer = req
        .reply()
        .payload(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        .build();
    ensure!(b.dp.tc(&answer)? == TC_ACT_OK);
    let key = flow_key(WS_CLIENT, 40000, SERVER, PORT);
    ensure!(
        b.dp.flow(&key)?.map(|f| f.state) == Some(FLOW_ESTABLISHED),
        "the WebSocket flow is not established"
    );
    Ok(())
}

/// A request padded to exactly `len` bytes with an extra header, before its final CRLF.
pub fn padded(mut req: Vec<u8>, len: usize) -> Vec<u8> {
    let end = req.len() - 2;
    let pad = len - req.len() - "X-Pad: \r\n".len();
    let header = format!("X-Pad: {}\r\n", "p".repeat(pad));
    req.splice(end..end, header.into_bytes());
    assert_eq!(req.len(), len);
    req
}

/// Where wsguard's cost over the reference goes: the reference's lookup behind wsguard's
/// parser, on the two packets whose ratios are tightest, and the banned one's lookup path in steps.
pub fn decomposition() -> Vec<Case> {
    vec![
        Case {
            path: "banned source, SYN to a watched port",
            frame: Pkt::tcp(&bans::BANNED.to_string(), 40000, SERVER, PORT)
                .syn()
                .build(),
            verdict: XDP_DROP,
            progs: &[
                Prog::Reference,
                Prog::ReferenceParsed,
                Prog::Probe,
                Prog::Screened,
                Prog::Judged,
                Prog::WsguardLookup,
            ],
            target: None,
            setup: None,
            before_call: None,
            max_repeat: None,
        },
        Case {
            path: "clean source next to a ban (same /24)",
            frame: clean_frame(&bans::NEIGHBOUR.to_string(), SERVER),
            verdict: XDP_PASS,
            // The lookup copy stops at the ban verdict: wsguard without its TCP step.
            progs: &[
                Prog::Reference,
                Prog::ReferenceParsed,
                Prog::WsguardLookup,
                Prog::Wsguard,
            ],
            target: None,
            setup: None,
            before_call: None,
            max_repeat: None,
        },
    ]
}

/// wsguard's other paths with the exact bans only (1M).
pub fn own_exact() -> Vec<Case> {
    let bad = padded(bad_request("/chat"), 512);
    let request = |src: &str| Pkt::tcp(src, 40001, SERVER, PORT).payload(&bad).build();
    vec![
        Case {
            path: "banned, 512 B request on a watched port",
            frame: request(&bans::BANNED.to_string()),
            verdict: XDP_DROP,
            progs: OWN_BANNED,
            target: None,
            setup: None,
            before_call: None,
            max_repeat: None,
        },
        Case {
            path: "banned, 512 B request on a watched port, ban may preserve flows",
            frame: request(&bans::PRESERVING.to_string()),
            verdict: XDP_DROP,
            progs: OWN_BANNED,
            target: None,
            setup: Some(|b| {
                let mut v = ttl_ban();
                v.flags |= BAN_MAY_PRESERVE;
                b.dp.ban_tabled(bans::PRESERVING.octets(), v)?;
                Ok(())
            }),
            before_call: None,
            max_repeat: None,
        },
        Case {
            path: "banned, SYN, allowlist looked up (ban without the writer's promise)",
            frame: Pkt::tcp(&bans::UNCHECKED.to_string(), 40000, SERVER, PORT)
                .syn()
                .build(),
            verdict: XDP_DROP,
            progs: OWN_BANNED,
            target: None,
            setup: Some(|b| {
                let mut v = ttl_ban();
                v.flags = 0;
                b.dp.ban_tabled(bans::UNCHECKED.octets(), v)?;
                Ok(())
            }),
            before_call: None,
            max_repeat: None,
        },
        Case {
            path: "clean v6, unwatched port",
            frame: clean_frame("fd00::10", "fd00:1::1"),
            verdict: XDP_PASS,
            progs: OWN_CLEAN,
            target: None,
            setup: None,
            before_call: None,
            max_repeat: None,
        },
    ]
}

/// A later packet of a proxied flow cut at its header (its real client banned): the proxy
/// retransmits the header + request segment, past the flow's RST budget. This row measures
/// that stable drop only: every call is preceded by `proxied::rearm_cut`, which checks that no
/// run of the previous call was answered with a RST and dates the last RST now, and a call is
/// short enough (`max_repeat`) to end well inside `RST_INTERVAL_NS`. The cut itself (the header
/// segment turned into a RST) rewrites its packet, so it is a one-run-per-call row of the
/// handshake table.
pub fn own_proxied_cut() -> Case {
    Case {
        path: "cut proxied flow (banned real client), later packet past the RST budget",
        frame: proxied::cut_segment(),
        verdict: XDP_DROP,
        progs: OWN_CLEAN,
        target: None,
        setup: Some(|b| {
            ensure!(
                proxied::BANNED_CLIENT
                    .parse::<std::net::Ipv4Addr>()?
                    .octets()
                    == bans::exact(6)
            );
            proxied::ban_client(&mut b.dp)?;
            proxied::cut_flow(&mut b.dp)
        }),
        before_call: Some(|b| proxied::rearm_cut(&mut b.dp)),
        max_repeat: Some(100_000),
    }
}

/// With 10k CIDR bans over the 1M exact ones.
pub fn own_cidr() -> Vec<Case> {
    vec![
        Case {
            path: "banned CIDR, SYN",
            frame: Pkt::tcp(&bans::CIDR_BANNED.to_string(), 40000, SERVER, PORT)
                .syn()
                .build(),
            verdict: XDP_DROP,
            progs: OWN_BANNED,
            target: None,
            setup: None,
            before_call: None,
            max_repeat: None,
        },
        Case {
            path: "clean source, clean /24",
            frame: clean_frame("198.18.0.10", SERVER),
            verdict: XDP_PASS,
            progs: OWN_CLEAN,
            target: None,
            setup: None,
            before_call: None,
            max_repeat: None,
        },
        Case {
            path: "clean source next to a ban (exact miss, then the CIDR trie)",
            frame: clean_frame(&bans::NEIGHBOUR.to_string(), SERVER),
            verdict: XDP_PASS,
            progs: OWN_CLEAN,
            target: None,
            setup: None,
            before_call: None,
            max_repeat: None,
        },
        Case {
            path: "established WebSocket data, watched port",
            frame: ws_data(),
            verdict: XDP_PASS,
            progs: OWN_CLEAN,
            target: None,
            setup: Some(establish_ws),
            before_call: None,
            max_repeat: None,
        },
    ]
}

/// With the pre-filter emptied (every bucket "maybe banned"), as a build whose agent does not
/// fill it would run: comparison only, the agent always fills it.
pub fn own_no_filter() -> Vec<Case> {
    vec![
        Case {
            path: "no filter: clean source",
            frame: clean_frame("198.18.0.10", SERVER),
            verdict: XDP_PASS,
            progs: OWN_CLEAN,
            target: None,
            setup: None,
            before_call: None,
            max_repeat: None,
        },
        Case {
            path: "no filter: banned source, SYN",
            frame: Pkt::tcp(&bans::BANNED.to_string(), 40000, SERVER, PORT)
                .syn()
                .build(),
            verdict: XDP_DROP,
            progs: OWN_BANNED,
            target: None,
            setup: None,
            before_call: None,
            max_repeat: None,
        },
    ]
}
