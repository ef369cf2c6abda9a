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

// v1 machine states. From L_DONE on, the outcome is final.
const L_PROXY: u8 = 0;
const L_PROTO: u8 = 1;
const L_ADDR4: u8 = 2;
const L_ADDR6: u8 = 3;
const L_PORT: u8 = 4;
const L_LF: u8 = 5;
const L_UNKNOWN: u8 = 6;
const L_UNKNOWN_REST: u8 = 7;
const L_DONE: u8 = 8;
const L_BAD: u8 = 9;

/// Literals, zero-padded so a masked index stays in bounds.
const LIT_PROXY: [u8; 8] = *b"PROXY \0\0";
const LIT_TCP: [u8; 4] = *b"TCP\0";
const LIT_UNKNOWN: [u8; 8] = *b"UNKNOWN\0";
/// `V1Parser::fam` while the `UNKNOWN` literal is read.
const FAM_UNKNOWN: u8 = 0xff;

// IPv6 token states (`V1Parser::tok` while in L_ADDR6).
/// At the start of an address: a hex digit or the `::` that opens it.
const T6_START: u8 = 0;
/// Read one `:` at the start: only the second may follow.
const T6_LEAD_COLON: u8 = 1;
/// In a group of hex digits.
const T6_GROUP: u8 = 2;
/// Read the `:` after a group: a digit or the second `:` of `::`.
const T6_COLON: u8 = 3;
/// Read a `::`: a digit, or the end of the address.
const T6_DCOLON: u8 = 4;
/// In the dotted IPv4 tail of `::ffff:a.b.c.d`.
const T6_QUAD: u8 = 5;
/// No `::` (yet).
const NO_DC: u8 = 0xff;

/// The v1 line, one byte at a time. Copy it, feed it, ask it; nothing else.
///
/// 8-byte aligned so that `reset` compiles to a few word stores (see `Classifier`).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug)]
pub struct V1Parser {
    /// IPv6 groups of the source address as written (the `::` is expanded by `finish`).
    groups: [u16; 8],
    /// Number value of the current token (octet, group, port).
    val: u32,
    /// Decimal value of the current IPv6 token, in case it is the first octet of a dotted tail.
    dec: u32,
    /// IPv4 octets of the source address (also of the dotted tail of an IPv6 one).
    v4: [u8; 4],
    sport: u16,
    /// The first group of the current IPv6 address (for the IPv4-mapped forms).
    first: u16,
    state: u8,
    /// Bytes consumed.
    n: u8,
    /// Position in a literal; in an address, the IPv4 octets or IPv6 groups completed.
    pos: u8,
    /// Digits in the current token.
    digits: u8,
    /// 4 or 6 once the protocol is read, 0 for UNKNOWN.
    fam: u8,
    /// 0 source address, 1 destination address, 2 source port, 3 destination port.
    field: u8,
    /// IPv6 token state (`T6_*`).
    tok: u8,
    /// Groups before the `::`, or `NO_DC`.
    dc: u8,
    /// Length of the current run of explicit zero groups.
    zrun: u8,
    /// Longest explicit zero run before the `::` (in the whole address without one).
    zmax_before: u8,
    /// Longest explicit zero run after the `::`.
    zmax_after: u8,
    /// The current token's first digit is `0`.
    lead0: u8,
    /// The current token holds a digit `a`..`f`.
    hexdig: u8,
    /// The source address's `dc` and group count, and whether it ended in a dotted tail.
    src_dc: u8,
    src_groups: u8,
    src_quad: u8,
}

impl Default for V1Parser {
    fn default() -> Self {
        Self::new()
    }
}

#[inline(always)]
const fn hex_lower(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

impl V1Parser {
    pub const fn new() -> Self {
        Self {
            groups: [0; 8],
            val: 0,
            dec: 0,
            v4: [0; 4],
            sport: 0,
            first: 0,
            state: L_PROXY,
            n: 0,
            pos: 0,
            digits: 0,
            fam: 0,
            field: 0,
            tok: T6_START,
            dc: NO_DC,
            zrun: 0,
            zmax_before: 0,
            zmax_after: 0,
            lead0: 0,
            hexdig: 0,
            src_dc: NO_DC,
            src_groups: 0,
            src_quad: 0,
        }
    }

    /// Start over, as [`V1Parser::new`], without the `memset` (see the module docs). The
    /// groups are not cleared: `finish` reads only those written.
    #[inline(always)]
    pub fn reset(&mut self) {
        self.val = 0;
        self.dec = 0;
        self.v4 = [0; 4];
        self.sport = 0;
        self.first = 0;
        self.state = L_PROXY;
        self.n = 0;
        self.pos = 0;
        self.digits = 0;
        self.fam = 0;
        self.field = 0;
        self.tok = T6_START;
        self.dc = NO_DC;
        self.zrun = 0;
        self.zmax_before = 0;
        self.zmax_after = 0;
        self.lead0 = 0;
        self.hexdig = 0;
        self.src_dc = NO_DC;
        self.src_groups = 0;
        self.src_quad = 0;
    }

    /// Feed one byte. Returns true once the outcome is final (the line ended, or broke a
    /// rule); the caller stops feeding then.
    #[inline(always)]
    pub fn step(&mut self, b: u8) -> bool {
        if self.state >= L_DONE {
            return true;
        }
        if self.n as usize >= V1_MAX {
            self.state = L_BAD;
            return true;
        }
        self.n += 1;
        match self.state {
            L_PROXY => {
                let p = self.pos;
                if p < 6 && b == LIT_PROXY[p as usize & 7] {
                    self.pos = p + 1;
                    if self.pos == 6 {
                        self.state = L_PROTO;
                        self.pos = 0;
                    }
                } else {
                    self.state = L_BAD;
                }
            }
            L_PROTO => self.proto_byte(b),
            L_ADDR4 => self.addr4_byte(b),
            L_ADDR6 => self.addr6_byte(b),
            L_PORT => self.port_byte(b),
            L_LF => self.state = if b == b'\n' { L_DONE } else { L_BAD },
            L_UNKNOWN => {
                self.state = match b {
                    b'\r' => L_LF,
                    b' ' => L_UNKNOWN_REST,
                    _ => L_BAD,
                }
            }
            L_UNKNOWN_REST => {
                if b == b'\r' {
                    self.state = L_LF;
                } else if b == b'\n' {
                    self.state = L_BAD;
                }
            }
            _ => self.state = L_BAD,
        }
        self.state >= L_DONE
    }

    /// `TCP4 `, `TCP6 ` or `UNKNOWN`, after `PROXY `.
    #[inline(always)]
    fn proto_byte(&mut self, b: u8) {
        let p = self.pos;
        if p == 0 && b == b'U' {
            self.pos = 1;
            self.fam = FAM_UNKNOWN;
        } else if self.fam == FAM_UNKNOWN {
            if p < 7 && b == LIT_UNKNOWN[p as usize & 7] {
                self.pos = p + 1;
                if self.pos == 7 {
                    self.state = L_UNKNOWN;
                    self.fam = 0;
                }
            } else {
                self.state = L_BAD;
            }
        } else if p < 3 {
            if b == LIT_TCP[p as usize & 3] {
                self.pos = p + 1;
            } else {
                self.state = L_BAD;
            }
        } else if p == 3 {
            match b {
                b'4' => self.fam = 4,
                b'6' => self.fam = 6,
                _ => self.state = L_BAD,
            }
            self.pos = 4;
        } else if b == b' ' {
            self.start_addr();
        } else {
            self.state = L_BAD;
        }
    }

    #[inline(always)]
    fn start_addr(&mut self) {
        self.state = if self.fam == 4 { L_ADDR4 } else { L_ADDR6 };
        self.pos = 0;
        self.digits = 0;
        self.val = 0;
        self.dec = 0;
        self.lead0 = 0;
        self.hexdig = 0;
        self.first = 0;
        self.tok = T6_START;
        self.dc = NO_DC;
        self.zrun = 0;
        self.zmax_before = 0;
        self.zmax_after = 0;
    }

    /// An address ended (the space after it was read): the other address, or the ports.
    #[inline(always)]
    fn end_addr(&mut self) {
        if self.field == 0 {
            self.src_dc = self.dc;
            self.src_groups = self.pos;
            self.src_quad = u8::from(self.tok == T6_QUAD);
        }
        self.field += 1;
        if self.field == 1 {
            self.start_addr();
        } else {
            self.state = L_PORT;
            self.digits = 0;
            self.val = 0;
        }
    }

    /// One digit of a decimal number without leading zeros that stays `<= max`.
    #[inline(always)]
    fn decimal(&mut self, b: u8, max: u32, max_digits: u8) {
        if !b.is_ascii_digit() || self.digits >= max_digits || (self.digits > 0 && self.val == 0) {
            self.state = L_BAD;
            return;
        }
        self.val = self.val * 10 + (b - b'0') as u32;
        self.digits += 1;
        if self.val > max {
            self.state = L_BAD;
        }
    }

    /// Dotted-quad IPv4; also the tail of `::ffff:a.b.c.d`, entered with one octet read.
    #[inline(always)]
    fn addr4_byte(&mut self, b: u8) {
        if b == b'.' || b == b' ' {
            let last = b == b' ';
            if self.digits == 0 || (self.pos == 3) != last {
                self.state = L_BAD;
                return;
            }
            if self.field == 0 {
                self.v4[self.pos as usize & 3] = self.val as u8;
            }
            self.pos += 1;
            self.digits = 0;
            self.val = 0;
            if last {
                self.end_addr();
            }
        } else {
            self.decimal(b, 255, 3);
        }
    }

    /// A group ended (at `:` or at the end of the address): record it and its zero run.
    #[inline(always)]
    fn end_group(&mut self) -> bool {
        if self.digits == 0 || self.pos >= 8 {
            self.state = L_BAD;
            return false;
        }
        if self.field == 0 {
            self.groups[self.pos as usize & 7] = self.val as u16;
        }
        if self.pos == 0 {
            self.first = self.val as u16;
        }
        if self.val == 0 {
            // A zero group right after `::` belongs in it.
            if self.pos == self.dc {
                self.state = L_BAD;
                return false;
            }
            self.zrun += 1;
            if self.dc == NO_DC {
                if self.zrun > self.zmax_before {
                    self.zmax_before = self.zrun;
                }
            } else if self.zrun > self.zmax_after {
                self.zmax_after = self.zrun;
            }
        } else {
            self.zrun = 0;
        }
        self.pos += 1;
        self.digits = 0;
        self.val = 0;
        self.dec = 0;
        self.lead0 = 0;
        self.hexdig = 0;
        true
    }

    #[inline(always)]
    fn addr6_byte(&mut self, b: u8) {
        if self.tok == T6_QUAD {
            self.addr4_byte(b);
            return;
        }
        if let Some(d) = hex_lower(b) {
            if self.tok == T6_LEAD_COLON || self.digits >= 4 || (self.digits > 0 && self.lead0 != 0)
            {
                self.state = L_BAD;
                return;
            }
            if self.digits == 0 && d == 0 {
                self.lead0 = 1;
            }
            if d > 9 {
                self.hexdig = 1;
            }
            self.val = (self.val << 4) | d as u32;
            self.dec = self.dec * 10 + d as u32;
            self.digits += 1;
            self.tok = T6_GROUP;
            return;
        }
        match (b, self.tok) {
            (b':', T6_START) => self.tok = T6_LEAD_COLON,
            (b':', T6_LEAD_COLON) => {
                self.dc = 0;
                self.tok = T6_DCOLON;
            }
            (b':', T6_GROUP) => {
                if self.end_group() {
                    self.tok = T6_COLON;
                }
            }
            (b':', T6_COLON) => {
                // A second `::`, or a zero group just before this one (it belongs in it).
                if self.dc != NO_DC || self.zrun != 0 {
                    self.state = L_BAD;
                } else {
                    self.dc = self.pos;
                    self.tok = T6_DCOLON;
                }
            }
            (b'.', T6_GROUP) => {
                // Only `::ffff:a.b.c.d`, the form RFC 5952 gives IPv4-mapped addresses.
                if self.dc != 0
                    || self.pos != 1
                    || self.first != 0xffff
                    || self.hexdig != 0
                    || self.digits > 3
                    || (self.digits > 1 && self.lead0 != 0)
                    || self.dec > 255
                {
                    self.state = L_BAD;
                    return;
                }
                if self.field == 0 {
                    self.v4[0] = self.dec as u8;
                }
                self.tok = T6_QUAD;
                // From here `pos` counts the octets of the tail.
                self.pos = 1;
                self.digits = 0;
                self.val = 0;
            }
            (b' ', T6_GROUP) => {
                if self.end_group() {
                    self.finish_addr6();
                }
            }
            (b' ', T6_DCOLON) => self.finish_addr6(),
            _ => self.state = L_BAD,
        }
    }

    /// The canonical-form checks on a whole IPv6 address, at the space after it.
    #[inline(always)]
    fn finish_addr6(&mut self) {
        let groups = self.pos;
        let ok = if self.dc == NO_DC {
            groups == 8 && self.zmax_before < 2
        } else {
            let run = 8u8.saturating_sub(groups);
            // `::` stands for two groups or more, the longest run (the first on a tie).
            groups <= 6 && self.zmax_before < run && self.zmax_after <= run
        };
        // An IPv4-mapped address written in hex (`::ffff:c000:201`): canonical is dotted.
        let mapped_hex = self.dc == 0 && groups == 3 && self.first == 0xffff;
        if !ok || mapped_hex {
            self.state = L_BAD;
            return;
        }
        self.end_addr();
    }

    #[inline(always)]
    fn port_byte(&mut self, b: u8) {
        if b == b' ' && self.field == 2 && self.digits > 0 {
            self.sport = self.val as u16;
            self.field = 3;
            self.digits = 0;
            self.val = 0;
        } else if b == b'\r' && self.field == 3 && self.digits > 0 {
            self.state = L_LF;
        } else {
            self.decimal(b, 65_535, 5);
        }
    }

    /// The outcome for the bytes fed so far: a line that has not ended is malformed (truncated,
    /// or longer than [`V1_MAX`]).
    #[inline(always)]
    pub fn finish(&self) -> Header {
        if self.state != L_DONE {
            return Header::Malformed {
                version: Version::V1,
            };
        }
        let len = self.n as u16;
        if self.fam == 0 {
            return Header::Local {
                version: Version::V1,
                len,
            };
        }
        let addr = if self.fam == 4 || self.src_quad != 0 {
            v4_mapped(self.v4)
        } else {
            self.expand_src()
        };
        Header::Client(Client {
            version: Version::V1,
            len,
            addr,
            v6: !is_v4_mapped(&addr),
            port: self.sport,
        })
    }

    /// The source address's 16 bytes, its `::` expanded.
    #[inline(always)]
    fn expand_src(&self) -> [u8; 16] {
        let dc = self.src_dc;
        let shift = if dc == NO_DC {
            0
        } else {
            8u8.saturating_sub(self.src_groups)
        };
        let mut out = [0u8; 16];
        let mut i = 0u8;
        while i < 8 {
            let g = if dc == NO_DC || i < dc {
                self.groups[i as usize & 7]
            } else if i < dc.saturating_add(shift) {
                0
            } else {
                self.groups[(i - shift) as usize & 7]
            };
            out[(2 * i) as usize & 15] = (g >> 8) as u8;
            out[(2 * i + 1) as usize & 15] = g as u8;
            i += 1;
        }
        out
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
