//! PROXY-protocol headers on the XDP path: whether a sender is trusted, the header at the start
//! of the inspected payload (the shared parser, v1 through `bpf_loop`), and the senders whose
//! headers were not believed.

use aya_ebpf::{cty::c_void, helpers::generated::bpf_loop, maps::lpm_trie::Key};
use wsguard_common::{
    maps::{
        MAX_INSPECT, ProxySenderValue, SENDER_UNCONFIGURED, SENDER_UNTRUSTED, SENDER_V1, SENDER_V2,
    },
    proxy::{Header, V1_MAX, V2_PREFIX, Version, detect, parse_v2},
};

use crate::{
    atomic::{add_u64, or_u32},
    maps::{PROXY_FROM_V4, PROXY_FROM_V6, PROXY_SENDERS, Scratch},
};

/// Whether `addr` (16 bytes, IPv4-mapped for IPv4) is in `proxy_protocol_from`.
#[inline(always)]
pub fn trusted(addr: &[u8; 16], v6: bool) -> bool {
    if v6 {
        PROXY_FROM_V6.get(Key::new(128, *addr)).is_some()
    } else {
        let mut a4 = [0u8; 4];
        a4.copy_from_slice(&addr[12..16]);
        PROXY_FROM_V4.get(Key::new(32, a4)).is_some()
    }
}

/// What [`header`] found; a client is left in `Scratch::client`.
pub enum Parsed {
    Absent,
    Client,
    /// The version and length of a LOCAL/UNKNOWN header.
    Local(Version, u16),
    Malformed(Version),
}

const KIND_ABSENT: u64 = 0;
const KIND_CLIENT: u64 = 1;
const KIND_LOCAL: u64 = 2;
const KIND_MALFORMED: u64 = 3;

/// The header at the start of the `len` payload bytes in the scratch buffer.
#[inline(always)]
pub fn header(len: usize) -> Parsed {
    let v = wsguard_proxy_header(len as u64);
    let version = if (v >> 8) as u8 == Version::V2 as u8 {
        Version::V2
    } else {
        Version::V1
    };
    match v & 0xff {
        KIND_CLIENT => Parsed::Client,
        KIND_LOCAL => Parsed::Local(version, (v >> 16) as u16),
        KIND_MALFORMED => Parsed::Malformed(version),
        _ => Parsed::Absent,
    }
}

/// [`header`] as a global function (see `inspect::wsguard_classify`): the kind, the version in
/// bits 8..16, a LOCAL header's length in bits 16..32; a client is left in `Scratch::client`.
#[unsafe(no_mangle)]
pub extern "C" fn wsguard_proxy_header(len: u64) -> u64 {
    let Some(scratch) = crate::inspect::scratch() else {
        return KIND_ABSENT;
    };
    let len = if len > MAX_INSPECT as u64 {
        MAX_INSPECT
    } else {
        len as usize
    };
    let (kind, version, hlen) = match parse(scratch, len) {
        Header::Absent => (KIND_ABSENT, Version::V1, 0),
        Header::Client(c) => {
            scratch.client = c;
            (KIND_CLIENT, c.version, c.len)
        }
        Header::Local { version, len } => (KIND_LOCAL, version, len),
        Header::Malformed { version } => (KIND_MALFORMED, version, 0),
    };
    kind | (version as u64) << 8 | u64::from(hlen) << 16
}

#[inline(always)]
fn parse(scratch: &mut Scratch, len: usize) -> Header {
    // SAFETY: `buf` is MAX_INSPECT >= V2_PREFIX bytes; a view of its start.
    let head = unsafe { &*(scratch.buf.as_ptr() as *const [u8; V2_PREFIX]) };
    match detect(head, len) {
        None => Header::Absent,
        Some(Version::V2) => parse_v2(head, len),
        Some(Version::V1) => {
            scratch.v1.reset();
            let n = if len < V1_MAX { len } else { V1_MAX };
            // SAFETY: a read of a live local, volatile so that the verifier sees the bound.
            let n = unsafe { core::ptr::read_volatile(&n) };
            if n == 0 || n > V1_MAX {
                return Header::Absent;
            }
            let mut lctx = scratch as *mut Scratch;
            // SAFETY: `feed_v1` matches bpf_loop's callback ABI and `lctx` outlives the call.
            unsafe {
                bpf_loop(
                    n as u32,
                    feed_v1 as *const () as *mut c_void,
                    &mut lctx as *mut *mut Scratch as *mut c_void,
                    0,
                )
            };
            scratch.v1.finish()
        }
    }
}

/// One v1 parser step per bpf_loop iteration (verified once, like the classifier's).
extern "C" fn feed_v1(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `*mut Scratch` that `header` passed to bpf_loop.
    let scratch = unsafe { &mut **(ctx as *mut *mut Scratch) };
    let Some(b) = scratch.buf.get(index as usize).copied() else {
        return 1;
    };
    i64::from(scratch.v1.step(b))
}

/// Remember the sender of this flow (`Scratch::key`) whose valid header was not believed
/// (`configured`: the list exists and it is outside it), for the agent's status warning.
#[inline(always)]
pub fn note_sender(version: Version, configured: bool, now: u64) {
    wsguard_note_sender(version as u64, u64::from(configured), now);
}

/// [`note_sender`] as a global function (see `inspect::wsguard_classify`).
#[unsafe(no_mangle)]
pub extern "C" fn wsguard_note_sender(version: u64, configured: u64, now: u64) -> u64 {
    let Some(s) = crate::inspect::scratch() else {
        return 0;
    };
    let version = if version == Version::V2 as u64 {
        Version::V2
    } else {
        Version::V1
    };
    noted(&s.key.client, version, configured != 0, now);
    0
}

#[inline(always)]
fn noted(sender: &[u8; 16], version: Version, configured: bool, now: u64) {
    let flags = match version {
        Version::V1 => SENDER_V1,
        Version::V2 => SENDER_V2,
    } | if configured {
        SENDER_UNTRUSTED
    } else {
        SENDER_UNCONFIGURED
    };
    match PROXY_SENDERS.get_ptr_mut(sender) {
        Some(v) => {
            // SAFETY: a live map value; the counter and flags are changed atomically, the
            // time is a racy store of a monotonic value.
            unsafe {
                (*v).last_seen_ns = now;
                add_u64(&mut (*v).headers, 1);
                if (*v).flags & flags != flags {
                    or_u32(&mut (*v).flags, flags);
                }
            }
        }
        None => {
            let fresh = ProxySenderValue {
                first_seen_ns: now,
                last_seen_ns: now,
                headers: 1,
                flags,
                _pad: 0,
            };
            let _ = PROXY_SENDERS.insert(sender, fresh, 0);
        }
    }
}
