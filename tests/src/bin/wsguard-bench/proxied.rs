//! The bench's PROXY-protocol (proxied) packets and the flow states they need, on a
//! `DataPlane` alone: `tests/tests/datapath_proxy_costs.rs` includes this file and checks every
//! packet's verdict and flow, so that a broken case fails a test, not only the bench.
//!
//! One trusted sender (the proxy, a /32 of `proxy_protocol_from`) carries the flows of two real
//! clients: a clean one and a banned one. The headers are built by the harness's own writer
//! (`wsguard_tests::lab::proxy_header`), independently of wsguard's parser.

use anyhow::{Result, ensure};
use std::net::SocketAddr;
use wsguard_common::maps::{
    BAN_NOT_ALLOWLISTED, BanValue, FLOW_ESTABLISHED, FlowKey, FlowValue, PROXY_CLIENT, PROXY_CUT,
    RST_BURST,
};
use wsguard_tests::{
    dataplane::{DataPlane, TC_ACT_OK, XDP_PASS, XDP_TX, addr16, boot_ns, flow_key},
    lab::proxy_header,
    packet::{Pkt, ws_request},
};

/// The bench's server and watched port (main.rs takes them from here).
pub const PORT: u16 = 80;
pub const SERVER: &str = "198.18.1.1";
/// The trusted PROXY sender.
pub const PROXY: &str = "198.18.5.1";
/// The clean real client behind it.
pub const CLIENT: &str = "198.19.50.1";
/// The banned one: one of the bench's exact bans (`bans::exact(6)`), so that the bench's full
/// ban map already holds it and [`ban_client`] only rewrites its value (a full map takes no new
/// key).
pub const BANNED_CLIENT: &str = "10.0.0.12";
/// The real client's port, as the header names it.
const CLIENT_PORT: u16 = 50_000;
/// The proxy's source ports: the established WebSocket, the fresh flows of the header +
/// request rows (deleted after each run), the cut flow.
pub const ESTABLISHED_PORT: u16 = 41_000;
pub const FRESH_PORT: u16 = 41_001;
pub const CUT_PORT: u16 = 41_002;
/// A masked binary WebSocket frame, as the direct rows send it.
const WS_FRAME: &[u8] = &[0x82, 0x84, 1, 2, 3, 4, 5, 6, 7, 8];

/// Trust the proxy, as the agent's `set_proxy_trust` does (`PROXY_FROM_V4`, `CFG_PROXY_TRUST`).
pub fn trust(dp: &mut DataPlane) -> Result<()> {
    dp.trust_proxy(PROXY, 32)
}

/// The PROXY header a sender writes for `client` (v2 or v1) towards the server.
pub fn header(client: &str, v2: bool) -> Vec<u8> {
    let src = SocketAddr::new(client.parse().expect("client address"), CLIENT_PORT);
    let dst = SocketAddr::new(SERVER.parse().expect("server address"), PORT);
    if v2 {
        proxy_header::v2(src, dst, &[])
    } else {
        proxy_header::v1(src, dst)
    }
}

/// The first payload segment of the proxy's flow from `sport`: the header naming `client`,
/// then `request` in the same segment (nginx's `proxy_protocol`, HAProxy's `send-proxy`).
pub fn first_segment(client: &str, sport: u16, v2: bool, request: &[u8]) -> Pkt {
    let mut payload = header(client, v2);
    payload.extend_from_slice(request);
    Pkt::tcp(PROXY, sport, SERVER, PORT).payload(&payload)
}

pub fn key(sport: u16) -> FlowKey {
    flow_key(PROXY, sport, SERVER, PORT)
}

/// Whether `flow` is a proxied flow of `client` in PROXY state `state`.
pub fn of_client(flow: Option<FlowValue>, client: &str, state: u8) -> bool {
    flow.is_some_and(|f| f.proxy_state() == state && f.real_client == addr16(client))
}

/// Open the proxied WebSocket through the real path, like the direct row's: the header +
/// request in (XDP), the 101 out (TC egress).
pub fn establish(dp: &mut DataPlane) -> Result<()> {
    let req = first_segment(CLIENT, ESTABLISHED_PORT, true, &ws_request("/"));
    ensure!(dp.xdp(&req.build())? == XDP_PASS);
    let answer = req
        .reply()
        .payload(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        .build();
    ensure!(dp.tc(&answer)? == TC_ACT_OK);
    let flow = dp.flow(&key(ESTABLISHED_PORT))?;
    ensure!(
        of_client(flow, CLIENT, PROXY_CLIENT) && flow.map(|f| f.state) == Some(FLOW_ESTABLISHED),
        "the proxied WebSocket is not established: {flow:?}"
    );
    Ok(())
}

/// A data packet of the established proxied WebSocket.
pub fn ws_data() -> Vec<u8> {
    Pkt::tcp(PROXY, ESTABLISHED_PORT, SERVER, PORT)
        .payload(WS_FRAME)
        .build()
}

/// Ban the real client behind the proxy, as the agent writes a ban (TTL, checked against the
/// allowlist; its pre-filter bucket cleared).
pub fn ban_client(dp: &mut DataPlane) -> Result<()> {
    let now = boot_ns();
    dp.ban(
        BANNED_CLIENT,
        32,
        BanValue {
            created_ns: now,
            expires_ns: now + 600_000_000_000,
            flags: BAN_NOT_ALLOWLISTED,
            ..Default::default()
        },
    )
}

/// The banned client's header + request segment on the cut flow's port.
pub fn cut_segment() -> Vec<u8> {
    first_segment(BANNED_CLIENT, CUT_PORT, true, &ws_request("/")).build()
}

/// Cut the banned client's flow at its header (the segment became a RST towards the server,
/// `XDP_PASS`) and spend its RST budget (`RST_BURST` retransmissions answered with `XDP_TX`,
/// one run each: a repeated run would reuse the RST it wrote), so that the flow's next
/// packets are dropped.
pub fn cut_flow(dp: &mut DataPlane) -> Result<()> {
    let _ = dp.delete_flow(&key(CUT_PORT));
    let seg = cut_segment();
    ensure!(
        dp.xdp(&seg)? == XDP_PASS,
        "the header segment is not passed"
    );
    ensure!(
        of_client(dp.flow(&key(CUT_PORT))?, BANNED_CLIENT, PROXY_CUT),
        "the banned client's flow is not cut"
    );
    for _ in 0..RST_BURST {
        ensure!(dp.xdp(&seg)? == XDP_TX, "a retransmission is not answered");
    }
    rearm_cut(dp)
}

/// Before every call on the cut flow's later packet: check that no packet of the previous call
/// was answered (the flow still cut, its RSTs still `RST_BURST`), and date its last RST now, so
/// that the interval (`RST_INTERVAL_NS`, 200 ms) outlasts the call and every run is the drop.
pub fn rearm_cut(dp: &mut DataPlane) -> Result<()> {
    let k = key(CUT_PORT);
    let mut flow = dp.flow(&k)?.filter(|f| f.proxy_state() == PROXY_CUT);
    let Some(f) = flow.as_mut() else {
        anyhow::bail!("the cut flow is gone");
    };
    ensure!(
        f.rsts == RST_BURST,
        "the cut flow sent {} RSTs, not {RST_BURST}: a run was not the drop",
        f.rsts
    );
    f.rst_ns = boot_ns();
    dp.set_flow(&k, *f)
}
