//! TC egress: read the server's answer to a handshake. Never drops.

use aya_ebpf::{
    EbpfContext as _,
    bindings::TC_ACT_OK,
    cty::c_void,
    helpers::generated::{bpf_ktime_get_boot_ns, bpf_skb_load_bytes},
    macros::classifier,
    programs::TcContext,
};
use wsguard_common::{
    BadReason, Verdict,
    http::response_status,
    maps::{
        BAN_MAY_PRESERVE, Counter, FLOW_ANSWERED, FLOW_ESTABLISHED, FLOW_HANDSHAKE, FlowKey,
        FlowValue, PROXY_CLIENT, PROXY_NONE, PROXY_UNTRUSTED,
    },
    proxy::is_v4_mapped,
};

use crate::{
    atomic::or_u32,
    ban::live_ban,
    counters::count,
    inspect::record_bad,
    maps::{FLOWS, PORTS, config},
    parse::{IPPROTO_TCP, parse_l3, parse_tcp},
};

/// Bytes of the status line we read: `HTTP/1.1 101`.
const STATUS_LEN: usize = 12;
const TLS_HANDSHAKE: u8 = 0x16;
const TLS_APP_DATA: u8 = 0x17;

#[classifier]
pub fn wsguard_tc_egress(ctx: TcContext) -> i32 {
    let _ = try_egress(&ctx);
    TC_ACT_OK
}

#[inline(always)]
fn try_egress(ctx: &TcContext) -> Result<(), ()> {
    let l3 = parse_l3(ctx, ctx.len() as usize).map_err(|_| ())?;
    if l3.proto != IPPROTO_TCP {
        return Ok(());
    }
    let tcp = parse_tcp(ctx, &l3).map_err(|_| ())?;
    // A status line, or a TLS record header, fits in the first 12 bytes of any real answer.
    if tcp.payload_len < STATUS_LEN || !PORTS.get(tcp.sport as u32).is_some_and(|w| *w != 0) {
        return Ok(());
    }
    let mut head = [0u8; STATUS_LEN];
    // SAFETY: `head` is STATUS_LEN writable bytes; the helper checks the skb bounds itself.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr() as *const _,
            tcp.payload_off as u32,
            head.as_mut_ptr() as *mut c_void,
            STATUS_LEN as u32,
        )
    };
    if rc != 0 {
        return Ok(());
    }
    if !(head[0] == b'H' || head[0] == TLS_HANDSHAKE || head[0] == TLS_APP_DATA) {
        return Ok(());
    }
    // Egress packets go server -> client; flows are keyed client -> server.
    let key = FlowKey {
        client: l3.dst16(),
        server: l3.src16(),
        client_port: tcp.dport.to_be(),
        server_port: tcp.sport.to_be(),
    };
    let flow = FLOWS.get_ptr_mut(key).ok_or(())?;
    // SAFETY: a live map value; only the egress path of this flow writes `state` after insert.
    let flow = unsafe { &mut *flow };
    if flow.state != FLOW_HANDSHAKE {
        return Ok(());
    }
    if flow.verdict == Verdict::Tls as u8 {
        // Payload in both directions: for TLS that is as established as we can see.
        flow.state = FLOW_ESTABLISHED;
        if let Some(client) = charged(flow, &key) {
            mark_preservable(&client, flow.first_seen_ns);
        }
        return Ok(());
    }
    let Some(status) = response_status(&head) else {
        return Ok(());
    };
    let client = charged(flow, &key);
    if status == 101 {
        flow.state = FLOW_ESTABLISHED;
        if let Some(client) = &client {
            mark_preservable(client, flow.first_seen_ns);
        }
    } else {
        flow.state = FLOW_ANSWERED;
    }
    if (500..600).contains(&status) {
        // The server's fault (outage, deploy): never counted against the client.
        count(Counter::UpstreamErrors);
    } else if (400..500).contains(&status)
        && flow.verdict == Verdict::Valid as u8
        && let Some(client) = &client
    {
        // Bad requests were counted on ingress already; only count what looked valid there.
        count(Counter::HsBad);
        let cfg = config();
        // SAFETY: helper without arguments.
        let now = unsafe { bpf_ktime_get_boot_ns() };
        record_bad(client, BadReason::ServerRejected, tcp.sport, cfg, now);
    }
    Ok(())
}

/// Who answers for a flow's requests: its real client behind a trusted proxy, its source for a
/// direct flow or an untrusted sender's, nobody for a proxy's own or unread flows.
#[inline(always)]
fn charged(flow: &FlowValue, key: &FlowKey) -> Option<[u8; 16]> {
    match flow.proxy_state() {
        PROXY_CLIENT => Some(flow.real_client),
        PROXY_NONE | PROXY_UNTRUSTED => Some(key.client),
        _ => None,
    }
}

/// A flow that started before a ban of its client just became established: it is preserved
/// from now on, so the ban must send its client's packets through the flow lookup. The agent
/// sets the flag for flows that already existed when it wrote the ban; this covers handshakes
/// still in flight then.
#[inline(always)]
fn mark_preservable(client: &[u8; 16], first_seen_ns: u64) {
    let cfg = config();
    let v6 = !is_v4_mapped(client);
    let addr = if v6 {
        client.as_ptr()
    } else {
        client[12..].as_ptr()
    };
    if let Some(ban) = live_ban(v6, addr, cfg) {
        // SAFETY: a live map value; `flags` is an aligned u32 other writers only OR into or
        // replace whole.
        unsafe {
            if (*ban).flags & BAN_MAY_PRESERVE == 0 && first_seen_ns < (*ban).created_ns {
                or_u32(&mut (*ban).flags, BAN_MAY_PRESERVE);
            }
        }
    }
}
