//! Every map of the data plane. Sizes here are defaults; the agent overrides them at load time
//! (`--max-bans`) and pins the maps so bans and flows survive agent restarts.

use core::cell::UnsafeCell;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use wsguard_common::{
    Classifier,
    filter::{FILTER_WORDS, HOST_FILTER_WORDS},
    maps::{
        AllowValue, BanValue, COUNTERS_LEN, Config, FlowKey, FlowValue, MAX_INSPECT,
        ProxySenderValue, RateValue,
    },
    proxy::{Client, V1Parser},
    table::{BanBucket, bucket_bits},
};

/// Default capacity of each ban map; the agent sets the real one from `--max-bans`.
const DEFAULT_MAX_BANS: u32 = 1_000_000;
const MAX_ALLOW: u32 = 4096;
const MAX_FLOWS: u32 = 262_144;
const MAX_RATES: u32 = 65_536;
const MAX_PROXY_FROM: u32 = 1024;
const MAX_PROXY_SENDERS: u32 = 1024;

/// The settings, in a data section of their own: the loader makes the section a one-entry
/// array, which the agent pins as `CONFIG` (the same map an older build declares as
/// `Array<Config>`), and patches its value's address into every read, so the program reads the
/// settings with no map lookup. The loader writes the section's bytes into the map: zeros in a
/// fresh map, as a fresh array has, and over a pinned one the agent passes the pinned value
/// back in (`override_global`), so a load never resets what the running program reads.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".data.config")]
static CONFIG: Settings = Settings(UnsafeCell::new(
    // SAFETY: `Config` is integers and arrays of them; all zeros is a valid value.
    unsafe { core::mem::zeroed() },
));

/// The settings' cell: written behind the program's back, so never constant to the compiler.
#[repr(transparent)]
pub struct Settings(UnsafeCell<Config>);

// SAFETY: the program only reads it; the agent's writes are whole-value map updates.
unsafe impl Sync for Settings {}

/// The settings. Only the agent writes them, while the program runs.
#[inline(always)]
pub fn config() -> &'static Config {
    // SAFETY: the static lives as long as the program, which never writes it.
    unsafe { &*CONFIG.0.get() }
}

/// Indexed by TCP port (host order); non-zero = watched.
#[map]
pub static PORTS: Array<u8> = Array::with_max_entries(65_536, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

// Ban maps are plain hashes and tries, never LRU: a full map refuses new bans (the agent counts
// them) instead of silently evicting an old one. No prealloc: memory follows the live ban count.
#[map]
pub static BANS_V4: HashMap<[u8; 4], BanValue> =
    HashMap::with_max_entries(DEFAULT_MAX_BANS, BPF_F_NO_PREALLOC);

/// Bucket bits of `BAN_TABLE_V4`: the agent sets both from `--max-bans` at load time
/// (`EbpfLoader::set_global`); read-only data, so the verifier turns each read into a constant.
#[unsafe(no_mangle)]
static TABLE_BITS_V4: u32 = bucket_bits(DEFAULT_MAX_BANS);

#[inline(always)]
pub fn table_bits_v4() -> u32 {
    // SAFETY: a plain read of a static; volatile so that the value patched in at load time is
    // read, not the default folded in at compile time.
    unsafe { core::ptr::read_volatile(&TABLE_BITS_V4) }
}

/// The exact IPv4 bans again, probed inline (see `wsguard_common::table`). Mappable: the agent
/// writes its slots in place, value first and key last.
#[map]
pub static BAN_TABLE_V4: Array<BanBucket> =
    Array::with_max_entries(1 << bucket_bits(DEFAULT_MAX_BANS), BPF_F_MMAPABLE);

#[map]
pub static BANS_V6: HashMap<[u8; 16], BanValue> =
    HashMap::with_max_entries(DEFAULT_MAX_BANS, BPF_F_NO_PREALLOC);

#[map]
pub static BAN_CIDRS_V4: LpmTrie<[u8; 4], BanValue> =
    LpmTrie::with_max_entries(DEFAULT_MAX_BANS, BPF_F_NO_PREALLOC);

#[map]
pub static BAN_CIDRS_V6: LpmTrie<[u8; 16], BanValue> =
    LpmTrie::with_max_entries(DEFAULT_MAX_BANS, BPF_F_NO_PREALLOC);

#[map]
pub static ALLOW_V4: LpmTrie<[u8; 4], AllowValue> =
    LpmTrie::with_max_entries(MAX_ALLOW, BPF_F_NO_PREALLOC);

#[map]
pub static ALLOW_V6: LpmTrie<[u8; 16], AllowValue> =
    LpmTrie::with_max_entries(MAX_ALLOW, BPF_F_NO_PREALLOC);

/// Trusted PROXY-protocol senders (`proxy_protocol_from`); only presence matters. Read only on
/// the first payload of a flow, and only while `CFG_PROXY_TRUST` says the list is configured.
#[map]
pub static PROXY_FROM_V4: LpmTrie<[u8; 4], AllowValue> =
    LpmTrie::with_max_entries(MAX_PROXY_FROM, BPF_F_NO_PREALLOC);

#[map]
pub static PROXY_FROM_V6: LpmTrie<[u8; 16], AllowValue> =
    LpmTrie::with_max_entries(MAX_PROXY_FROM, BPF_F_NO_PREALLOC);

/// Senders of PROXY headers that were not believed (unconfigured, or outside the list), keyed
/// by address (IPv4-mapped), for the agent's status warning. LRU: a flood of forged senders
/// only evicts older entries.
#[map]
pub static PROXY_SENDERS: LruHashMap<[u8; 16], ProxySenderValue> =
    LruHashMap::with_max_entries(MAX_PROXY_SENDERS, 0);

/// Flows on watched ports, inserted at the first request (after the TCP handshake, so spoofed
/// floods cannot churn it). LRU: losing an old flow only loses its preservation.
#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// Bad-handshake rate per client address. LRU: losing a counter only delays a ban.
#[map]
pub static RATES: LruHashMap<[u8; 16], RateValue> = LruHashMap::with_max_entries(MAX_RATES, 0);

/// Burst events for the agent.
#[map]
pub static BURSTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Per-CPU working memory of the classifier: the payload copy is too large for the 512-byte BPF
/// stack, and the classifier's state lives in map memory, where the verifier allows the bounded
/// variable-offset writes it makes (the stack does not).
#[repr(C)]
pub struct Scratch {
    pub buf: [u8; MAX_INSPECT],
    pub clf: Classifier,
    /// The PROXY v1 line parser, fed like the classifier.
    pub v1: V1Parser,
    /// The flow path's working values, here rather than on the stack: LLVM keeps a 16-byte
    /// address read from the packet as sixteen scalars and spills each to its own 8-byte stack
    /// slot across a helper call, which alone would overflow the 512-byte stack. Written here,
    /// they go from the packet to memory and stay there.
    /// The key of the packet's flow.
    pub key: FlowKey,
    pub _pad: [u8; 4],
    /// The flow value being recorded.
    pub flow: FlowValue,
    /// The client a PROXY header named.
    pub client: Client,
    /// The packet's source and destination address, for the RST rewrite.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The address a bad request is charged to (`inspect::charge`).
    pub charged: [u8; 16],
}

#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// The ban pre-filter: "proven clean" bits per IPv4 /24 and hashed IPv6 /64 (see
/// `wsguard_common::filter`). Zeroed at creation, which only disables the shortcut.
#[map]
pub static BAN_FILTER: Array<u64> = Array::with_max_entries(FILTER_WORDS, 0);

/// The host filter: "no exact IPv4 ban has these low 24 bits" bits, for the clean neighbours
/// of exact bans (see `wsguard_common::filter`). Zeroed at creation, which only disables it.
#[map]
pub static HOST_FILTER: Array<u64> = Array::with_max_entries(HOST_FILTER_WORDS, 0);

/// Per-CPU state of the drop path (see ban.rs): the hot banned source this CPU dropped last,
/// its drops not yet added to its ban's shared counter and, for the rest of one jiffy, the
/// ban's verdict, so a flood from one banned source skips the ban lookup; and the coarse clock.
#[repr(C)]
pub struct HotBan {
    /// The source: `[V4_TAG, address]` for IPv4, the two address words for IPv6.
    pub src: [u64; 2],
    /// Drops held back, not yet added to the ban's `drops`.
    pub count: u64,
    /// The jiffy in which the verdict below was read from the ban map.
    pub jiffies: u64,
    /// The ban's `created_ns` and `flags` at that moment.
    pub created_ns: u64,
    pub flags: u32,
    /// 1: `jiffies`, `created_ns` and `flags` hold an enforced drop verdict for `src`.
    pub held: u32,
    /// `Config::flags` when the verdict was read: any change (observe, the agent's generation
    /// counter) ends it.
    pub cfg_flags: u32,
    pub _pad: u32,
    /// This CPU's cached boot time (see clock.rs); here so the drop path reads one slot.
    pub clock: CoarseClock,
}

/// `CLOCK_BOOTTIME` as read in jiffy `jiffies`.
#[repr(C)]
pub struct CoarseClock {
    pub jiffies: u64,
    pub boot_ns: u64,
}

/// First word of an IPv4 source in `HotBan::src`: no IPv6 source starts with it (it would be
/// multicast).
pub const V4_TAG: u64 = u64::MAX;

#[map]
pub static HOT_BAN: PerCpuArray<HotBan> = PerCpuArray::with_max_entries(1, 0);
