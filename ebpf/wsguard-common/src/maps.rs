//! `#[repr(C)]` layouts of every map key, value and event, and the map names.
//!
//! Every type is padding-free (explicit `_pad` fields) so its bytes are fully defined: the
//! kernel hashes keys byte for byte and `aya::Pod` requires it.

/// Bytes of TCP payload the request classifier inspects.
pub const MAX_INSPECT: usize = 1024;
/// WebSocket path prefixes the data plane can hold.
pub const MAX_PATHS: usize = 8;
/// Longest path prefix, in bytes.
pub const PATH_LEN: usize = 64;

/// Map names as they appear in the object file and under the pin directory.
pub mod names {
    /// The settings: the pin's name, and the name of the global the program reads them from.
    pub const CONFIG: &str = "CONFIG";
    /// The object's name for the `CONFIG` map: the data section that holds the global. The
    /// program reads it by address, without a lookup; the pin keeps its name (bpffs refuses
    /// dots), and the map is the same one-entry array of a `Config` as before.
    pub const CONFIG_SECTION: &str = ".data.config";
    pub const PORTS: &str = "PORTS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const BANS_V4: &str = "BANS_V4";
    pub const BANS_V6: &str = "BANS_V6";
    pub const BAN_CIDRS_V4: &str = "BAN_CIDRS_V4";
    pub const BAN_CIDRS_V6: &str = "BAN_CIDRS_V6";
    pub const ALLOW_V4: &str = "ALLOW_V4";
    pub const ALLOW_V6: &str = "ALLOW_V6";
    pub const FLOWS: &str = "FLOWS";
    pub const RATES: &str = "RATES";
    pub const BURSTS: &str = "BURSTS";
    pub const SCRATCH: &str = "SCRATCH";
    /// The ban pre-filter ([`crate::filter`]). Optional: all zeros (fresh) means "look up".
    pub const BAN_FILTER: &str = "BAN_FILTER";
    pub const HOST_FILTER: &str = "HOST_FILTER";
    pub const BAN_TABLE_V4: &str = "BAN_TABLE_V4";
    /// The global holding `BAN_TABLE_V4`'s bucket bits.
    pub const TABLE_BITS_V4: &str = "TABLE_BITS_V4";
    /// Trusted PROXY-protocol senders (layout 3), LPM tries like the allowlist's.
    pub const PROXY_FROM_V4: &str = "PROXY_FROM_V4";
    pub const PROXY_FROM_V6: &str = "PROXY_FROM_V6";
    /// Senders of PROXY headers that were not believed (layout 3): LRU, for `status`.
    pub const PROXY_SENDERS: &str = "PROXY_SENDERS";

    /// The object's name for the map pinned as `pinned`.
    pub fn in_object(pinned: &str) -> &str {
        if pinned == CONFIG {
            CONFIG_SECTION
        } else {
            pinned
        }
    }
}

/// Program names in the object file.
pub mod programs {
    pub const XDP: &str = "wsguard_xdp";
    pub const TC_EGRESS: &str = "wsguard_tc_egress";
}

/// Index into the per-CPU `COUNTERS` array. The order is part of the pinned-map layout: append
/// only, and bump [`LAYOUT_VERSION`] when a change cannot be read by the previous agent.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    Passed = 0,
    Dropped,
    WouldDrop,
    Allowlisted,
    Preserved,
    Unparsed,
    HsValid,
    HsBad,
    HsIncomplete,
    HsTls,
    HsIgnored,
    UpstreamErrors,
    /// First of [`crate::http::BAD_REASONS`] consecutive per-reason counters.
    BadReason0,
    EventsLost = Counter::BadReason0 as u32 + crate::http::BAD_REASONS as u32,
    // Layout 3: PROXY-protocol headers on the first payload of a flow on a watched port, by
    // version and result (`wsguard_common::proxy::ProxyResult`), one per flow.
    ProxyV1Client,
    ProxyV1Local,
    ProxyV1Malformed,
    ProxyV1Untrusted,
    ProxyV2Client,
    ProxyV2Local,
    ProxyV2Malformed,
    ProxyV2Untrusted,
    /// A flow from a trusted sender whose first payload carries no header (no version).
    ProxyMissing,
    /// Flows cut at their PROXY header (the real client is banned) or at their next packet
    /// (marked by `cut_flows` for a hard ban): the segment became a RST towards the server.
    Reset,
}

/// Number of slots in `COUNTERS`.
pub const COUNTERS_LEN: u32 = Counter::Reset as u32 + 1;

impl Counter {
    /// The counter of a PROXY header of `version` with `result`.
    pub const fn proxy(
        version: crate::proxy::Version,
        result: crate::proxy::ProxyResult,
    ) -> Counter {
        use crate::proxy::{ProxyResult as R, Version as V};
        match (version, result) {
            (_, R::Missing) => Counter::ProxyMissing,
            (V::V1, R::Client) => Counter::ProxyV1Client,
            (V::V1, R::Local) => Counter::ProxyV1Local,
            (V::V1, R::Malformed) => Counter::ProxyV1Malformed,
            (V::V1, R::Untrusted) => Counter::ProxyV1Untrusted,
            (V::V2, R::Client) => Counter::ProxyV2Client,
            (V::V2, R::Local) => Counter::ProxyV2Local,
            (V::V2, R::Malformed) => Counter::ProxyV2Malformed,
            (V::V2, R::Untrusted) => Counter::ProxyV2Untrusted,
        }
    }
}

/// Version of the map layouts below; the agent migrates pinned maps when it differs.
///
/// 2: [`BAN_MAY_PRESERVE`]. A ban without it has no flow to preserve, so the data plane skips
/// the flow lookup on its drop path; layout-1 bans never carried it and get it on migration.
///
/// 3: PROXY protocol. [`FlowValue`] grows (the real client, the proxy state, the RST
/// bookkeeping of a cut flow); `COUNTERS` gains the PROXY and reset counters; new maps
/// `PROXY_FROM_V4`, `PROXY_FROM_V6`, `PROXY_SENDERS`. Layout-2 flows become direct flows.
pub const LAYOUT_VERSION: u32 = 3;

/// `Config::flags`: global observe mode (nothing is dropped, would-be drops are counted).
pub const CFG_OBSERVE: u32 = 1 << 0;
/// `Config::flags`: only paths starting with one of `paths` are in WebSocket scope.
pub const CFG_PATH_SCOPE: u32 = 1 << 1;
/// `Config::flags`: a generation counter in the top 16 bits. The agent adds
/// [`CFG_GENERATION_ONE`] after it removes a ban or adds an allowlist entry, so a CPU stops
/// using the verdict it holds for a hot banned source at its next packet (a held verdict is
/// kept only while `flags` is unchanged) instead of up to one jiffy later.
pub const CFG_GENERATION: u32 = 0xffff_0000;
pub const CFG_GENERATION_ONE: u32 = 1 << 16;
/// `Config::flags` (layout 3): `proxy_protocol_from` is configured, so the PROXY headers of
/// senders in `PROXY_FROM_V4`/`PROXY_FROM_V6` are believed and those of others are not.
/// Without it no sender is trusted and a flow that begins with a PROXY header is never judged.
/// Owned by the data path (`set_proxy_trust`), kept across `set_config`.
pub const CFG_PROXY_TRUST: u32 = 1 << 2;
/// `Config::flags` (layout 3): some flow is marked [`PROXY_CUT_PENDING`], so every packet on a
/// watched port looks its flow up (only while set). Owned by the data path (`cut_flows` sets
/// it, `settle_cuts` clears it once no mark remains), kept across `set_config`.
pub const CFG_CUT_PENDING: u32 = 1 << 3;
/// `Config::flags`: every exact IPv4 ban is in `BAN_TABLE_V4` (see [`crate::table`]), so a
/// miss there is a miss; without it the program looks `BANS_V4` up after a miss. Owned by the
/// data path: cleared before the table can lack a ban, set once it holds them all.
pub const CFG_V4_TABLE: u32 = 1 << 4;
/// The `Config::flags` bits the data path owns.
pub const CFG_DATAPATH_BITS: u32 =
    CFG_GENERATION | CFG_PROXY_TRUST | CFG_CUT_PENDING | CFG_V4_TABLE;

/// Runtime settings, slot 0 of the `CONFIG` array. The agent rewrites it; no reload needed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Length of the rate window in nanoseconds.
    pub window_ns: u64,
    /// Bad handshakes per source per window that make a burst.
    pub threshold: u32,
    pub flags: u32,
    /// Number of entries in the CIDR ban tries; 0 lets the data plane skip the walk.
    pub cidr_v4: u32,
    pub cidr_v6: u32,
    /// Number of valid entries in `paths`.
    pub n_paths: u32,
    pub layout_version: u32,
    pub path_lens: [u8; MAX_PATHS],
    pub paths: [[u8; PATH_LEN]; MAX_PATHS],
}

impl Config {
    pub const fn new() -> Self {
        Self {
            window_ns: 10_000_000_000,
            threshold: 20,
            flags: 0,
            cidr_v4: 0,
            cidr_v6: 0,
            n_paths: 0,
            layout_version: LAYOUT_VERSION,
            path_lens: [0; MAX_PATHS],
            paths: [[0; PATH_LEN]; MAX_PATHS],
        }
    }

    /// Whether `path` (the request target as sent) is in WebSocket scope.
    pub fn path_in_scope(&self, path: &[u8]) -> bool {
        if self.flags & CFG_PATH_SCOPE == 0 {
            return true;
        }
        let mut i = 0;
        while i < MAX_PATHS && i < self.n_paths as usize {
            let len = self.path_lens[i] as usize;
            if len <= PATH_LEN && len <= path.len() && starts_with(path, &self.paths[i], len) {
                return true;
            }
            i += 1;
        }
        false
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::new()
    }
}

fn starts_with(path: &[u8], prefix: &[u8; PATH_LEN], len: usize) -> bool {
    let mut j = 0;
    while j < len && j < PATH_LEN && j < path.len() {
        if path[j] != prefix[j] {
            return false;
        }
        j += 1;
    }
    true
}

/// `BanValue::flags`: observe only, never drop.
pub const BAN_OBSERVE: u32 = 1 << 0;
/// `BanValue::flags`: drop established flows too.
pub const BAN_HARD: u32 = 1 << 1;
/// `BanValue::flags`: the writer checked that no allowlist entry covers any address of this
/// ban, so the data plane skips the allowlist lookup on its drop path (it is a third of that
/// path's cost). Without the flag the kernel looks the allowlist up, so a writer that never
/// sets it is only slower. Whoever adds an allowlist entry inserts it first, then clears this
/// flag on every ban the entry overlaps.
pub const BAN_NOT_ALLOWLISTED: u32 = 1 << 2;
/// `BanValue::flags` (layout 2): a flow of a covered source may have been established before
/// the ban, so the data plane looks flows up to preserve them. Without it a banned source's
/// packets are dropped without the flow lookup (the costliest step of the drop path). The
/// writer sets it when the flow table holds any flow of a covered source at the time of the
/// write; the TC program sets it when it sees a flow that started before the ban become
/// established. Never cleared while the ban lives.
pub const BAN_MAY_PRESERVE: u32 = 1 << 3;

/// Value of the exact (`BANS_V4`, `BANS_V6`) and CIDR (`BAN_CIDRS_*`) ban maps.
///
/// Times are `CLOCK_BOOTTIME` nanoseconds (`bpf_ktime_get_boot_ns`), which keep counting across
/// suspend, so a ban expires at its TTL even while the agent is down.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BanValue {
    /// 0 = permanent.
    pub expires_ns: u64,
    pub created_ns: u64,
    /// Packets dropped (or that would have been, for observe bans); atomically incremented.
    pub drops: u64,
    pub flags: u32,
    pub _pad: u32,
}

impl BanValue {
    pub const fn is_expired(&self, now_ns: u64) -> bool {
        self.expires_ns != 0 && self.expires_ns <= now_ns
    }
}

/// Value of the allowlist tries (`ALLOW_V4`, `ALLOW_V6`): only presence matters.
pub type AllowValue = u32;

/// `FlowValue::state`.
pub const FLOW_HANDSHAKE: u8 = 0;
/// The server answered with something other than 101 (or a TLS flow before the answer).
pub const FLOW_ANSWERED: u8 = 1;
/// A WebSocket (101 seen) or a TLS flow with payload in both directions.
pub const FLOW_ESTABLISHED: u8 = 2;

/// Key of `FLOWS`, oriented client → server. IPv4 addresses are IPv4-mapped IPv6.
/// Ports are in network byte order, as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub client: [u8; 16],
    pub server: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
}

/// `FlowValue::proxy`: a direct flow (no PROXY header read; every layout-2 flow).
pub const PROXY_NONE: u8 = 0;
/// A trusted sender's header named `real_client`: the request is judged and charged to it.
pub const PROXY_CLIENT: u8 = 1;
/// A trusted sender's LOCAL/UNKNOWN header, or one naming a trusted sender: never judged.
pub const PROXY_LOCAL: u8 = 2;
/// A trusted sender's malformed, truncated or over-long header: never judged.
pub const PROXY_MALFORMED: u8 = 3;
/// A trusted sender's first payload without a header: never judged.
pub const PROXY_MISSING: u8 = 4;
/// A header from a sender outside `proxy_protocol_from`: not believed, the request after it is
/// judged and charged to the sender (the flow key's client).
pub const PROXY_UNTRUSTED: u8 = 5;
/// A header while `proxy_protocol_from` is not configured: never judged.
pub const PROXY_UNCONFIGURED: u8 = 6;
/// Cut: `real_client` was banned when its header arrived (or the agent marked it). The
/// segment became a RST towards the server; later packets are answered with a RST (at most
/// [`RST_BURST`] at once, then one per [`RST_INTERVAL_NS`]) or dropped.
pub const PROXY_CUT: u8 = 7;
/// Marked by the agent (`cut_flows`, a hard ban of `real_client`): cut at its next packet.
pub const PROXY_CUT_PENDING: u8 = 8;
/// Or-ed into [`PROXY_CLIENT`] or [`PROXY_UNTRUSTED`]: the header came alone, the request is
/// the segment at `next_seq`.
pub const PROXY_AWAITING: u8 = 0x80;

/// RSTs a cut flow gets at once, before the interval applies.
pub const RST_BURST: u16 = 4;
/// Then at most one per this interval; the packets in between are dropped.
pub const RST_INTERVAL_NS: u64 = 200_000_000;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    pub first_seen_ns: u64,
    /// A [`crate::Verdict`] as `u8`.
    pub verdict: u8,
    /// A [`crate::BadReason`] as `u8`, meaningful when `verdict` is bad.
    pub reason: u8,
    pub state: u8,
    /// A `PROXY_*` state (layout 3).
    pub proxy: u8,
    /// While [`PROXY_AWAITING`]: the sequence number at which the request starts.
    pub next_seq: u32,
    /// The client the PROXY header named, IPv4-mapped for IPv4; zero for other flows.
    pub real_client: [u8; 16],
    /// Its port (host order).
    pub real_port: u16,
    /// RSTs the data plane sent back for this cut flow.
    pub rsts: u16,
    pub _pad: u32,
    /// When it sent the last one (`CLOCK_BOOTTIME` ns).
    pub rst_ns: u64,
}

impl FlowValue {
    /// The `PROXY_*` state without the [`PROXY_AWAITING`] bit.
    pub const fn proxy_state(&self) -> u8 {
        self.proxy & !PROXY_AWAITING
    }

    /// The real client behind a trusted proxy, for flows whose header named one.
    pub const fn real_client(&self) -> Option<[u8; 16]> {
        match self.proxy_state() {
            PROXY_CLIENT | PROXY_CUT | PROXY_CUT_PENDING => Some(self.real_client),
            _ => None,
        }
    }
}

/// `ProxySenderValue::flags`: a v1 / v2 header was seen from this sender.
pub const SENDER_V1: u32 = 1 << 0;
pub const SENDER_V2: u32 = 1 << 1;
/// ... while `proxy_protocol_from` was not configured (never judged).
pub const SENDER_UNCONFIGURED: u32 = 1 << 2;
/// ... while it was, the sender outside it (not believed).
pub const SENDER_UNTRUSTED: u32 = 1 << 3;

/// Value of `PROXY_SENDERS`, keyed by the sender address (IPv4-mapped for IPv4): a sender of
/// valid PROXY headers that were not believed, so `status` can name it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProxySenderValue {
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// Headers seen (one per flow); atomically incremented.
    pub headers: u64,
    /// `SENDER_*` bits.
    pub flags: u32,
    pub _pad: u32,
}

/// Value of `RATES`, keyed by the client address (IPv4-mapped for IPv4).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RateValue {
    pub window_start_ns: u64,
    pub count: u32,
    pub reasons: [u32; crate::http::BAD_REASONS],
    /// Watched port (host order) of the latest bad handshake.
    pub port: u16,
    pub _pad: u16,
}

/// Ring-buffer record: a source reached the threshold in a window. One per source per window.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BurstEvent {
    /// IPv4-mapped for IPv4.
    pub addr: [u8; 16],
    pub window_start_ns: u64,
    pub count: u32,
    pub reasons: [u32; crate::http::BAD_REASONS],
    /// Watched port (host order).
    pub port: u16,
    pub _pad: u16,
}

/// `[0; 10] ++ [0xff; 2] ++ v4`: how IPv4 addresses are keyed in the 16-byte maps.
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]`, `Copy`, no padding (gaps are explicit `_pad` fields), no pointers:
    // every bit pattern is a valid value. The same holds for each impl below.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BanValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RateValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BurstEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProxySenderValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::table::BanBucket {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(
            size_of::<Config>(),
            8 + 4 * 6 + MAX_PATHS + MAX_PATHS * PATH_LEN
        );
        assert_eq!(size_of::<BanValue>(), 32);
        assert_eq!(size_of::<FlowKey>(), 36);
        assert_eq!(size_of::<FlowValue>(), 48);
        assert_eq!(size_of::<ProxySenderValue>(), 32);
        assert_eq!(size_of::<RateValue>(), 8 + 4 + 24 + 4);
        assert_eq!(size_of::<BurstEvent>(), 16 + 8 + 4 + 24 + 4);
    }

    #[test]
    fn counters_are_contiguous() {
        assert_eq!(Counter::BadReason0 as u32, 12);
        // Layout 2 ended here: the PROXY counters are appended after it.
        assert_eq!(Counter::EventsLost as u32, 18);
        assert_eq!(Counter::ProxyV1Client as u32, 19);
        assert_eq!(Counter::ProxyV2Client as u32, 23);
        assert_eq!(Counter::ProxyMissing as u32, 27);
        assert_eq!(COUNTERS_LEN, 29);
    }

    #[test]
    fn path_scope() {
        let mut c = Config::new();
        assert!(c.path_in_scope(b"/anything"));
        c.flags |= CFG_PATH_SCOPE;
        assert!(!c.path_in_scope(b"/ws"));
        c.paths[0][..3].copy_from_slice(b"/ws");
        c.path_lens[0] = 3;
        c.n_paths = 1;
        assert!(c.path_in_scope(b"/ws/chat"));
        assert!(!c.path_in_scope(b"/api"));
        assert!(!c.path_in_scope(b"/w"));
    }

    #[test]
    fn ban_expiry() {
        let b = BanValue {
            expires_ns: 100,
            ..Default::default()
        };
        assert!(!b.is_expired(99));
        assert!(b.is_expired(100));
        assert!(!BanValue::default().is_expired(u64::MAX));
    }
}
