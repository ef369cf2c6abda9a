//! The PROXY protocol header (HAProxy's `proxy-protocol.txt`, v1 text and v2 binary) at the start
//! of a flow's first payload, parsed by the very same code in the kernel and on the host.
//!
//! How the kernel must drive it (as for the classifier in `http.rs`): [`detect`] and [`parse_v2`]
//! read constant offsets of a zero-padded prefix; v1 is a byte-at-a-time machine,
//! [`V1Parser::step`], fed from a `bpf_loop` callback with the parser in a map value and started
//! with [`V1Parser::reset`] (never `= V1Parser::new()`, which becomes a `memset` the verifier
//! rejects). Nothing here allocates, loops unboundedly or panics.
//!
//! The rules, made precise (where the spec allows a choice, the strict one):
//! - Only the first [`crate::maps::MAX_INSPECT`] payload bytes are looked at ("inspected").
//! - A payload that begins with `PROXY` (or the part of it the inspected bytes hold) is v1; one
//!   that begins with the 12-byte v2 signature (or a part of it) is v2; anything else has no
//!   header ([`Header::Absent`]). A detected header that does not parse is
//!   [`Header::Malformed`]; so is a truncated one.
//! - v1: `PROXY SP (TCP4|TCP6) SP src SP dst SP sport SP dport CRLF`, or `PROXY SP UNKNOWN`
//!   followed by CRLF or by SP and any bytes but CR and LF up to CRLF. At most [`V1_MAX`] bytes,
//!   CRLF included. Single spaces; IPv4 addresses as four decimal octets 0..=255 without leading
//!   zeros; IPv6 addresses in their canonical text form (RFC 5952: lower-case hex, no leading
//!   zeros in a group, `::` for the longest run of two or more zero groups, the first such run
//!   on a tie, and `::ffff:a.b.c.d` for IPv4-mapped addresses); ports decimal 0..=65535 without
//!   leading zeros. A lone CR or LF is malformed. `UNKNOWN` is the proxy's own connection.
//! - v2: signature, version nibble 2, command LOCAL (0) or PROXY (1), family/transport byte one
//!   of `0x00 0x11 0x12 0x21 0x22 0x31 0x32`, big-endian length; the header is `16 + length`
//!   bytes, TLVs included and skipped. A header longer than the inspected bytes is malformed
//!   (fails open). LOCAL, and PROXY over UNSPEC or UNIX, name no IP client: the proxy's own
//!   connection. PROXY over TCP/IPv4 (`0x11`, length >= 12) or TCP/IPv6 (`0x21`, length >= 36)
//!   names the client; over UDP it is malformed (a TCP service has no UDP client).

use crate::maps::{MAX_INSPECT, v4_mapped};

mod v1;

pub use v1::V1Parser;

/// The longest v1 line, CRLF included (`UNKNOWN` with two full IPv6 addresses and ports).
pub const V1_MAX: usize = 107;
/// The v2 signature.
pub const V2_SIG: [u8; 12] = [
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
];
/// The v2 header's fixed part.
pub const V2_FIXED: usize = 16;
/// Bytes of a v2 header [`parse_v2`] reads: the fixed part and the TCP/IPv6 address block.
pub const V2_PREFIX: usize = V2_FIXED + 36;
const V1_SIG: [u8; 5] = *b"PROXY";

/// The protocol version of a header, as the counters and `wsguard explain` name it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1 = 1,
    V2 = 2,
}

impl Version {
    pub const fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// How a flow's PROXY header counts (`wsguard_proxy_headers_total{result}`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyResult {
    /// A trusted sender's header named a client.
    Client = 0,
    /// A trusted sender's own connection (v2 LOCAL, v1 UNKNOWN, or naming a trusted sender).
    Local = 1,
    /// A trusted sender's header broke a rule, was truncated or longer than the inspected bytes.
    Malformed = 2,
    /// A trusted sender's flow began without a header.
    Missing = 3,
    /// A valid header from a sender that is not trusted (none configured, or outside the list).
    Untrusted = 4,
}

impl ProxyResult {
    pub const ALL: [ProxyResult; 5] = [
        ProxyResult::Client,
        ProxyResult::Local,
        ProxyResult::Malformed,
        ProxyResult::Missing,
        ProxyResult::Untrusted,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ProxyResult::Client => "client",
            ProxyResult::Local => "local",
            ProxyResult::Malformed => "malformed",
            ProxyResult::Missing => "missing",
            ProxyResult::Untrusted => "untrusted",
        }
    }
}

/// The client a valid PROXY header names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Client {
    pub version: Version,
    /// Header length in bytes: the request starts right after it.
    pub len: u16,
    /// The source address, IPv4-mapped for IPv4 (as the maps key addresses).
    pub addr: [u8; 16],
    pub v6: bool,
    /// The source port.
    pub port: u16,
}

/// What the start of a payload says about a PROXY header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// No header: the payload begins with something else.
    Absent,
    /// A valid header naming the client.
    Client(Client),
    /// A valid header for the proxy's own connection (v2 LOCAL, v1 UNKNOWN): no client.
    Local { version: Version, len: u16 },
    /// A header that begins as one but breaks a rule, is truncated, or is longer than the
    /// inspected bytes.
    Malformed { version: Version },
}

impl Header {
    /// The header's version, `None` when absent.
    pub const fn version(&self) -> Option<Version> {
        match self {
            Header::Absent => None,
            Header::Client(c) => Some(c.version),
            Header::Local { version, .. } | Header::Malformed { version } => Some(*version),
        }
    }

    /// How this header counts on a flow from a trusted sender.
    pub const fn trusted_result(&self) -> ProxyResult {
        match self {
            Header::Absent => ProxyResult::Missing,
            Header::Client(_) => ProxyResult::Client,
            Header::Local { .. } => ProxyResult::Local,
            Header::Malformed { .. } => ProxyResult::Malformed,
        }
    }

    /// Length of a valid header (client or local).
    pub const fn header_len(&self) -> Option<u16> {
        match self {
            Header::Client(c) => Some(c.len),
            Header::Local { len, .. } => Some(*len),
            _ => None,
        }
    }
}

/// Which header the first `avail` bytes of `head` (zero-padded past them) begin with.
#[inline(always)]
pub fn detect<const N: usize>(head: &[u8; N], avail: usize) -> Option<Version> {
    if avail == 0 {
        return None;
    }
    if prefix_matches(head, avail, &V1_SIG) {
        Some(Version::V1)
    } else if prefix_matches(head, avail, &V2_SIG) {
        Some(Version::V2)
    } else {
        None
    }
}

/// Whether the first `min(avail, M)` bytes of `head` are those of `sig`.
#[inline(always)]
fn prefix_matches<const N: usize, const M: usize>(
    head: &[u8; N],
    avail: usize,
    sig: &[u8; M],
) -> bool {
    let mut i = 0;
    while i < M && i < avail {
        if head.get(i).copied() != Some(sig[i]) {
            return false;
        }
        i += 1;
    }
    true
}

#[inline(always)]
fn at<const N: usize>(head: &[u8; N], i: usize) -> u8 {
    head.get(i).copied().unwrap_or(0)
}

/// Parse a v2 header from the first `avail` payload bytes, given as `head`: the first
/// [`V2_PREFIX`] (or more) of them, zero-padded past `avail`. Call it once [`detect`] said v2.
#[inline(always)]
pub fn parse_v2<const N: usize>(head: &[u8; N], avail: usize) -> Header {
    let bad = Header::Malformed {
        version: Version::V2,
    };
    if avail < V2_FIXED || !prefix_matches(head, V2_FIXED, &V2_SIG) {
        return bad;
    }
    let ver_cmd = at(head, 12);
    let fam = at(head, 13);
    let len = u16::from_be_bytes([at(head, 14), at(head, 15)]) as usize;
    let total = V2_FIXED + len;
    if ver_cmd >> 4 != 2 || total > avail || total > MAX_INSPECT {
        return bad;
    }
    let local = Header::Local {
        version: Version::V2,
        len: total as u16,
    };
    let known_fam = matches!(fam, 0x00 | 0x11 | 0x12 | 0x21 | 0x22 | 0x31 | 0x32);
    match ver_cmd & 0x0f {
        _ if !known_fam => bad,
        // LOCAL: the address block, whatever it holds, is skipped by the length.
        0 => local,
        1 => match fam {
            0x11 if len >= 12 => {
                let a = [at(head, 16), at(head, 17), at(head, 18), at(head, 19)];
                Header::Client(Client {
                    version: Version::V2,
                    len: total as u16,
                    addr: v4_mapped(a),
                    v6: false,
                    port: u16::from_be_bytes([at(head, 24), at(head, 25)]),
                })
            }
            0x21 if len >= 36 => {
                let mut addr = [0u8; 16];
                let mut i = 0;
                while i < 16 {
                    addr[i] = at(head, 16 + i);
                    i += 1;
                }
                Header::Client(Client {
                    version: Version::V2,
                    len: total as u16,
                    addr,
                    // An IPv4 client of a dual-stack proxy is an IPv4 client.
                    v6: !is_v4_mapped(&addr),
                    port: u16::from_be_bytes([at(head, 48), at(head, 49)]),
                })
            }
            // UNSPEC and UNIX carry no IP client.
            0x00 | 0x31 | 0x32 => local,
            // UDP, or an address block too short for its family.
            _ => bad,
        },
        _ => bad,
    }
}

/// Whether a 16-byte address is IPv4-mapped (`::ffff:a.b.c.d`).
#[inline(always)]
pub const fn is_v4_mapped(a: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 10 {
        if a[i] != 0 {
            return false;
        }
        i += 1;
    }
    a[10] == 0xff && a[11] == 0xff
}

/// Host convenience (and the model the kernel follows): the header at the start of `payload`,
/// looking at its first [`MAX_INSPECT`] bytes only.
pub fn parse(payload: &[u8]) -> Header {
    let avail = if payload.len() < MAX_INSPECT {
        payload.len()
    } else {
        MAX_INSPECT
    };
    let mut head = [0u8; V2_PREFIX];
    let mut i = 0;
    while i < V2_PREFIX && i < avail {
        head[i] = payload[i];
        i += 1;
    }
    match detect(&head, avail) {
        None => Header::Absent,
        Some(Version::V2) => parse_v2(&head, avail),
        Some(Version::V1) => {
            let mut p = V1Parser::new();
            let mut i = 0;
            while i < avail && i < V1_MAX {
                if p.step(payload[i]) {
                    break;
                }
                i += 1;
            }
            p.finish()
        }
    }
}
