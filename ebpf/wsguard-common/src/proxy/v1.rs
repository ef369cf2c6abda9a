//! The v1 text line, one byte at a time (see the rules at the top of `proxy.rs`).

use super::{Client, Header, V1_MAX, Version, is_v4_mapped};
use crate::maps::v4_mapped;

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
