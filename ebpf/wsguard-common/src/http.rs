//! The WebSocket handshake classifier: one byte at a time, so the XDP program and the host run
//! the very same code.
//!
//! [`Classifier::step`] is loop-free and O(1): the state is a few small integers, header names
//! and tokens are matched with a position counter against zero-padded constant tables (indexes
//! are masked, so no bounds checks and no panics), and the outcome is decided as early as the
//! bytes allow. Everything the kernel calls is `#[inline(always)]`: the BPF backend cannot
//! return an aggregate (`Classification`, `Option<u16>`, a slice) from a real call.
//!
//! How the kernel must drive it (checked against the 6.18 verifier): call `step` from a
//! `bpf_loop` callback with the classifier in a map value, and start it with
//! [`Classifier::reset`]. Then it verifies in about 1,200 instructions. An open-coded
//! 1024-iteration loop over a classifier on the stack does not verify: every field is a known
//! constant there, so no two paths merge and the walk passes the 8192 pending-jump and the
//! 1M-instruction limits. `= Classifier::new()` on a map value or the stack becomes a `memset`
//! call, which the verifier rejects.
//!
//! The rules are PRODUCT.md's "What a bad handshake is", made precise:
//! - `0x16 0x03` (a TLS handshake record) is `tls`.
//! - Anything that is not `METHOD SP request-target SP HTTP/1.<digit>` followed by CRLF or LF
//!   is `ignored`: METHOD is 1..=16 tchars, the target is non-empty and free of spaces and
//!   controls. A CR anywhere must be followed by LF; a bare CR makes the input `ignored`
//!   (RFC 9112 lets a recipient reject it, and we never judge what servers may reject).
//! - Header lines end at LF (optionally CRLF); the block ends at an empty line. A line whose name
//!   is not all tchars (e.g. `Upgrade : x`, or an obs-fold continuation) or that has no colon is
//!   skipped. Values are trimmed of SP/HTAB; `Upgrade` and `Connection` are comma-separated
//!   lists of elements compared whole and case-insensitively.
//! - Until the header block ends the verdict is `incomplete`, except that once the target is
//!   complete an out-of-scope path makes it `ignored`.

use crate::maps::{Config, MAX_INSPECT, PATH_LEN};

/// Number of [`BadReason`]s, the length of the per-reason counter arrays.
pub const BAD_REASONS: usize = 6;

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Valid = 0,
    Bad = 1,
    Incomplete = 2,
    Tls = 3,
    Ignored = 4,
}

impl Verdict {
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Valid => "valid",
            Verdict::Bad => "bad",
            Verdict::Incomplete => "incomplete",
            Verdict::Tls => "tls",
            Verdict::Ignored => "ignored",
        }
    }

    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Verdict::Valid),
            1 => Some(Verdict::Bad),
            2 => Some(Verdict::Incomplete),
            3 => Some(Verdict::Tls),
            4 => Some(Verdict::Ignored),
            _ => None,
        }
    }
}

/// Why a handshake is bad. The numbering indexes the per-reason counters: append only.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadReason {
    NoUpgrade = 0,
    NoConnectionUpgrade = 1,
    NoKey = 2,
    BadVersion = 3,
    BadMethod = 4,
    /// The server answered with a 4xx; only the TC egress program sets it.
    ServerRejected = 5,
}

impl BadReason {
    pub const ALL: [BadReason; BAD_REASONS] = [
        BadReason::NoUpgrade,
        BadReason::NoConnectionUpgrade,
        BadReason::NoKey,
        BadReason::BadVersion,
        BadReason::BadMethod,
        BadReason::ServerRejected,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            BadReason::NoUpgrade => "no_upgrade",
            BadReason::NoConnectionUpgrade => "no_connection_upgrade",
            BadReason::NoKey => "no_key",
            BadReason::BadVersion => "bad_version",
            BadReason::BadMethod => "bad_method",
            BadReason::ServerRejected => "server_rejected",
        }
    }

    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(BadReason::NoUpgrade),
            1 => Some(BadReason::NoConnectionUpgrade),
            2 => Some(BadReason::NoKey),
            3 => Some(BadReason::BadVersion),
            4 => Some(BadReason::BadMethod),
            5 => Some(BadReason::ServerRejected),
            _ => None,
        }
    }
}

/// A verdict and, exactly when the verdict is [`Verdict::Bad`], its reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Classification {
    pub verdict: Verdict,
    pub reason: Option<BadReason>,
}

impl Classification {
    const fn of(verdict: Verdict) -> Self {
        Self {
            verdict,
            reason: None,
        }
    }

    const fn bad(reason: BadReason) -> Self {
        Self {
            verdict: Verdict::Bad,
            reason: Some(reason),
        }
    }
}

const TLS_HANDSHAKE: u8 = 0x16;
const TLS_MAJOR: u8 = 0x03;
const CR: u8 = b'\r';
const LF: u8 = b'\n';
const MAX_METHOD: u8 = 16;

// Parser states. The order matters: every state from S_VERSION on has a complete request-target
// (so scope can be decided), and every state from S_DONE on is final.
const S_START: u8 = 0;
const S_TLS1: u8 = 1;
const S_METHOD: u8 = 2;
const S_TARGET: u8 = 3;
const S_VERSION: u8 = 4;
/// A CR ended a line: only LF may follow.
const S_LF: u8 = 5;
const S_LINE: u8 = 6;
const S_NAME: u8 = 7;
const S_VALUE: u8 = 8;
const S_SKIP: u8 = 9;
/// A CR started the empty line that ends the block.
const S_END_LF: u8 = 10;
const S_DONE: u8 = 11;
const S_TLS: u8 = 12;
const S_IGNORED: u8 = 13;

// Header indexes; `1 << index` is both the name-candidate bit and the "satisfied" flag.
const H_UPGRADE: u8 = 0;
const H_CONNECTION: u8 = 1;
const H_KEY: u8 = 2;
const H_VERSION: u8 = 3;
const ALL_NAMES: u8 = 0b1111;
/// The method is not `GET`. Negative, so that the all-zero value is a fresh classifier.
const F_NOT_GET: u8 = 1 << 4;

/// Zero-padded so that `pos & 31` is always in bounds and a byte past the end never matches
/// (a name byte is a tchar, never 0).
const NAMES: [[u8; 32]; 4] = [
    pad(b"upgrade"),
    pad(b"connection"),
    pad(b"sec-websocket-key"),
    pad(b"sec-websocket-version"),
];
/// The element each header's value must hold (the key only needs to be non-empty).
const TOKENS: [[u8; 32]; 4] = [pad(b"websocket"), pad(b"upgrade"), pad(b""), pad(b"13")];
const TOKEN_LEN: [u8; 4] = [9, 7, 0, 2];
const HTTP1: [u8; 8] = *b"HTTP/1.\0";

// Value matcher states: V_MATCH counts matched token bytes in `val_pos` (0 = leading OWS).
const V_MATCH: u8 = 0;
/// The whole token matched; only OWS may follow before the element ends.
const V_TRAIL: u8 = 1;
const V_FAIL: u8 = 2;

const fn pad(s: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < s.len() && i < 32 {
        out[i] = s[i];
        i += 1;
    }
    out
}

/// RFC 9110 tchar as a 128-bit set, split into two words so the test is shifts, not a table.
const TCHAR: [u64; 2] = {
    let s = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut set = [0u64; 2];
    let mut i = 0;
    while i < s.len() {
        set[(s[i] >> 6) as usize & 1] |= 1 << (s[i] & 63);
        i += 1;
    }
    set
};

#[inline(always)]
const fn is_tchar(b: u8) -> bool {
    let bit = 1u64 << (b & 63);
    if b < 64 {
        TCHAR[0] & bit != 0
    } else if b < 128 {
        TCHAR[1] & bit != 0
    } else {
        false
    }
}

#[inline(always)]
const fn lower(b: u8) -> u8 {
    if b.is_ascii_uppercase() { b | 0x20 } else { b }
}

#[inline(always)]
const fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Candidate bit of the header name that is exactly `len` bytes long, if any.
#[inline(always)]
const fn name_len_bit(len: u8) -> u8 {
    match len {
        7 => 1 << H_UPGRADE,
        10 => 1 << H_CONNECTION,
        17 => 1 << H_KEY,
        21 => 1 << H_VERSION,
        _ => 0,
    }
}

/// Incremental state of one request's classification. Copy it, feed it, ask it; nothing else.
///
/// 8-byte aligned so that `new()` zeroes it with a few 8-byte stores: with byte alignment LLVM
/// calls `memset`, whose misaligned word loop the verifier rejects.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug)]
pub struct Classifier {
    path: [u8; PATH_LEN],
    /// Bytes captured in `path` (the target may be longer).
    path_len: u8,
    state: u8,
    /// Position in the current method, version literal or header name (saturating).
    pos: u8,
    /// `F_NOT_GET` and one "satisfied" bit per header.
    flags: u8,
    /// While reading a name: candidate bits still matching. While reading a value: the header.
    hdr: u8,
    /// Value matcher state (`V_*`) of the current list element.
    val: u8,
    val_pos: u8,
    _pad: u8,
}

impl Default for Classifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Classifier {
    pub const fn new() -> Self {
        Self {
            path: [0; PATH_LEN],
            path_len: 0,
            state: S_START,
            pos: 0,
            flags: 0,
            hdr: 0,
            val: V_MATCH,
            val_pos: 0,
            _pad: 0,
        }
    }

    /// Start over, as [`Classifier::new`] but without rewriting the path buffer: a few byte
    /// stores instead of the `memset` that `= Classifier::new()` compiles to, which bpf-linker
    /// turns into a call the verifier rejects (on the stack and on a map value alike). The
    /// all-zero value is a fresh classifier too.
    #[inline(always)]
    pub fn reset(&mut self) {
        self.path_len = 0;
        self.state = S_START;
        self.pos = 0;
        self.flags = 0;
        self.hdr = 0;
        self.val = V_MATCH;
        self.val_pos = 0;
        self._pad = 0;
    }

    /// Feed one payload byte. Returns true once the outcome can no longer change (TLS/not-HTTP
    /// detected, or the header block ended); the caller stops feeding then.
    #[inline(always)]
    pub fn step(&mut self, b: u8) -> bool {
        match self.state {
            S_START => {
                if b == TLS_HANDSHAKE {
                    self.state = S_TLS1;
                } else {
                    self.state = S_METHOD;
                    self.method_byte(b);
                }
            }
            S_TLS1 => self.state = if b == TLS_MAJOR { S_TLS } else { S_IGNORED },
            S_METHOD => self.method_byte(b),
            S_TARGET => {
                if b == b' ' {
                    self.state = if self.path_len == 0 {
                        S_IGNORED
                    } else {
                        S_VERSION
                    };
                    self.pos = 0;
                } else if b > b' ' && b != 0x7f {
                    if (self.path_len as usize) < PATH_LEN {
                        self.path[self.path_len as usize & (PATH_LEN - 1)] = b;
                        self.path_len += 1;
                    }
                } else {
                    self.state = S_IGNORED;
                }
            }
            S_VERSION => {
                let p = self.pos;
                let ok = if p < 7 {
                    b == HTTP1[p as usize & 7]
                } else if p == 7 {
                    b.is_ascii_digit()
                } else {
                    false
                };
                if ok {
                    self.pos = p + 1;
                } else if p == 8 && b == CR {
                    self.state = S_LF;
                } else if p == 8 && b == LF {
                    self.state = S_LINE;
                } else {
                    self.state = S_IGNORED;
                }
            }
            S_LF | S_END_LF => {
                self.state = if b != LF {
                    S_IGNORED
                } else if self.state == S_LF {
                    S_LINE
                } else {
                    S_DONE
                };
            }
            S_LINE => {
                if b == CR {
                    self.state = S_END_LF;
                } else if b == LF {
                    self.state = S_DONE;
                } else {
                    self.state = S_NAME;
                    self.pos = 0;
                    self.hdr = ALL_NAMES;
                    self.name_byte(b);
                }
            }
            S_NAME => self.name_byte(b),
            S_VALUE => self.value_byte(b),
            S_SKIP => self.line_end(b),
            _ => {}
        }
        self.state >= S_DONE
    }

    #[inline(always)]
    fn method_byte(&mut self, b: u8) {
        let p = self.pos;
        if b == b' ' && p > 0 {
            if p != 3 {
                self.flags |= F_NOT_GET;
            }
            self.state = S_TARGET;
        } else if is_tchar(b) && p < MAX_METHOD {
            let want = match p {
                0 => b'G',
                1 => b'E',
                2 => b'T',
                _ => 0,
            };
            if b != want {
                self.flags |= F_NOT_GET;
            }
            self.pos = p + 1;
        } else {
            self.state = S_IGNORED;
        }
    }

    /// CR or LF ends the current line; anything else is part of it.
    #[inline(always)]
    fn line_end(&mut self, b: u8) {
        if b == CR {
            self.state = S_LF;
        } else if b == LF {
            self.state = S_LINE;
        }
    }

    #[inline(always)]
    fn name_byte(&mut self, b: u8) {
        if b == b':' {
            let m = self.hdr & name_len_bit(self.pos);
            let h = match m {
                0b0001 => H_UPGRADE,
                0b0010 => H_CONNECTION,
                0b0100 => H_KEY,
                0b1000 => H_VERSION,
                _ => {
                    self.state = S_SKIP;
                    return;
                }
            };
            self.state = S_VALUE;
            self.hdr = h;
            self.val = V_MATCH;
            self.val_pos = 0;
        } else if is_tchar(b) {
            // No `pos < 32` guard: LLVM would drop the mask after it, and the verifier may not
            // carry the guard's bound over to the index register. Past the longest name every
            // table byte is 0, which no tchar equals, so the candidate bits are all clear by
            // then and stay clear when `pos & 31` wraps.
            let i = self.pos as usize & 31;
            let lb = lower(b);
            self.hdr &= (NAMES[0][i] == lb) as u8
                | ((NAMES[1][i] == lb) as u8) << 1
                | ((NAMES[2][i] == lb) as u8) << 2
                | ((NAMES[3][i] == lb) as u8) << 3;
            self.pos = self.pos.saturating_add(1);
        } else if b == CR || b == LF {
            self.line_end(b);
        } else {
            self.state = S_SKIP;
        }
    }

    #[inline(always)]
    fn value_byte(&mut self, b: u8) {
        let h = self.hdr & 3;
        if b == CR || b == LF {
            self.end_element();
            self.line_end(b);
        } else if h == H_KEY {
            if !is_ows(b) {
                self.flags |= 1 << H_KEY;
            }
        } else if b == b',' && h != H_VERSION {
            self.end_element();
            self.val = V_MATCH;
            self.val_pos = 0;
        } else if is_ows(b) {
            if self.val == V_MATCH && self.val_pos != 0 {
                self.val = if self.val_pos == TOKEN_LEN[h as usize] {
                    V_TRAIL
                } else {
                    V_FAIL
                };
            }
        } else if self.val == V_MATCH
            && b != 0
            && lower(b) == TOKENS[h as usize][self.val_pos as usize & 31]
        {
            // The zero padding ends each token, so `val_pos` never passes its length.
            self.val_pos += 1;
        } else {
            self.val = V_FAIL;
        }
    }

    /// A list element (or the whole value) ended: did it hold the header's token?
    #[inline(always)]
    fn end_element(&mut self) {
        let h = self.hdr & 3;
        let len = TOKEN_LEN[h as usize];
        if len != 0 && (self.val == V_TRAIL || (self.val == V_MATCH && self.val_pos == len)) {
            self.flags |= 1 << h;
        }
    }

    /// The request-target bytes captured so far (first PATH_LEN bytes of it), for path-scope
    /// checks.
    #[inline(always)]
    pub fn path(&self) -> &[u8] {
        let n = self.path_len as usize;
        &self.path[..if n < PATH_LEN { n } else { PATH_LEN }]
    }

    /// The verdict for the bytes fed so far. `path_in_scope` is the caller's answer for
    /// `self.path()`, used only once the request-target is complete.
    #[inline(always)]
    pub fn finish(&self, path_in_scope: bool) -> Classification {
        let f = self.flags;
        match self.state {
            S_TLS => Classification::of(Verdict::Tls),
            S_IGNORED => Classification::of(Verdict::Ignored),
            s if s >= S_VERSION && !path_in_scope => Classification::of(Verdict::Ignored),
            S_DONE => {
                if f & F_NOT_GET != 0 {
                    Classification::bad(BadReason::BadMethod)
                } else if f & (1 << H_UPGRADE) == 0 {
                    Classification::bad(BadReason::NoUpgrade)
                } else if f & (1 << H_CONNECTION) == 0 {
                    Classification::bad(BadReason::NoConnectionUpgrade)
                } else if f & (1 << H_KEY) == 0 {
                    Classification::bad(BadReason::NoKey)
                } else if f & (1 << H_VERSION) == 0 {
                    Classification::bad(BadReason::BadVersion)
                } else {
                    Classification::of(Verdict::Valid)
                }
            }
            _ => Classification::of(Verdict::Incomplete),
        }
    }
}

/// Host/kernel convenience: feed up to [`MAX_INSPECT`] bytes of `payload`, scope from
/// `cfg.path_in_scope(path)`.
#[inline(always)]
pub fn classify(payload: &[u8], cfg: &Config) -> Classification {
    let mut c = Classifier::new();
    for &b in payload.iter().take(MAX_INSPECT) {
        if c.step(b) {
            break;
        }
    }
    c.finish(cfg.path_in_scope(c.path()))
}

/// Server response: parse the status line start `HTTP/1.0 NNN` or `HTTP/1.1 NNN` (exactly one
/// space, three digits, then SP, CR or LF, or end of the given bytes if the slice is exactly
/// 12 bytes long). Returns the status code, None for anything else.
#[inline(always)]
pub fn response_status(head: &[u8]) -> Option<u16> {
    if head.len() < 12 {
        return None;
    }
    let prefix = b"HTTP/1.";
    let mut i = 0;
    while i < prefix.len() {
        if head[i] != prefix[i] {
            return None;
        }
        i += 1;
    }
    if !(head[7] == b'0' || head[7] == b'1') || head[8] != b' ' {
        return None;
    }
    if head.len() > 12 && !(head[12] == b' ' || head[12] == CR || head[12] == LF) {
        return None;
    }
    let (d0, d1, d2) = (head[9], head[10], head[11]);
    if !(d0.is_ascii_digit() && d1.is_ascii_digit() && d2.is_ascii_digit()) {
        return None;
    }
    Some((d0 - b'0') as u16 * 100 + (d1 - b'0') as u16 * 10 + (d2 - b'0') as u16)
}
