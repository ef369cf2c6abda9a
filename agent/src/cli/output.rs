//! Tables and human forms: aligned columns, TTLs like `9m41s left`, counts with thousands
//! separators. A `Table` prints page by page, so 1M bans stream instead of sitting in memory.

use std::{io::Write, time::Duration};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::duration;

/// Column widths come from the header and the first page, and only grow: a later page with a
/// longer value widens its column from there on rather than holding every row back.
pub struct Table<'a> {
    headers: &'a [&'a str],
    /// Right-aligned (numeric) columns.
    right: &'a [usize],
    widths: Vec<usize>,
    started: bool,
}

impl<'a> Table<'a> {
    pub fn new(headers: &'a [&'a str], right: &'a [usize]) -> Self {
        Self {
            headers,
            right,
            widths: headers.iter().map(|h| h.len()).collect(),
            started: false,
        }
    }

    pub fn page(&mut self, out: &mut impl Write, rows: &[Vec<String>]) -> std::io::Result<()> {
        for r in rows {
            for (w, cell) in self.widths.iter_mut().zip(r) {
                *w = (*w).max(cell.chars().count());
            }
        }
        if !self.started {
            self.started = true;
            let h: Vec<String> = self.headers.iter().map(|s| (*s).to_owned()).collect();
            self.line(out, &h)?;
        }
        for r in rows {
            self.line(out, r)?;
        }
        Ok(())
    }

    /// The header alone, for an empty list.
    pub fn finish(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        if !self.started {
            self.page(out, &[])?;
        }
        Ok(())
    }

    fn line(&self, out: &mut impl Write, cells: &[String]) -> std::io::Result<()> {
        let mut s = String::new();
        let last = cells.len().saturating_sub(1);
        for (i, (c, w)) in cells.iter().zip(&self.widths).enumerate() {
            let pad = w.saturating_sub(c.chars().count());
            if self.right.contains(&i) {
                s.extend(std::iter::repeat_n(' ', pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                if i != last {
                    s.extend(std::iter::repeat_n(' ', pad));
                }
            }
            if i != last {
                s.push_str("  ");
            }
        }
        writeln!(out, "{}", s.trim_end())
    }
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

pub fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

/// Whole seconds until `expires_at` (RFC 3339), rounded up; `None` for permanent (`null`).
pub fn secs_left(expires_at: Option<&str>, now: OffsetDateTime) -> Option<i64> {
    let t = parse_time(expires_at?)?;
    let d = t - now;
    let whole = d.whole_seconds();
    Some(if d.subsec_nanoseconds() > 0 {
        whole + 1
    } else {
        whole
    })
}

/// `9m41s left`, `permanent`, `expired`.
pub fn ttl_left(expires_at: Option<&str>, now: OffsetDateTime) -> String {
    match (expires_at, secs_left(expires_at, now)) {
        (None, _) => "permanent".into(),
        (Some(raw), None) => raw.to_owned(),
        (Some(_), Some(s)) if s <= 0 => "expired".into(),
        (Some(_), Some(s)) => format!("{} left", duration::human(Duration::from_secs(s as u64))),
    }
}

/// `3m12s ago`-style age of an RFC 3339 time, for wide tables.
pub fn age(at: &str, now: OffsetDateTime) -> String {
    match parse_time(at) {
        Some(t) if t <= now => match (now - t).whole_seconds().max(0) as u64 {
            0 => "just now".into(),
            s => format!("{} ago", duration::human(Duration::from_secs(s))),
        },
        _ => at.to_owned(),
    }
}

pub fn cidr_text(addr: &str, prefix: u8) -> String {
    let host = if addr.contains(':') { 128 } else { 32 };
    if prefix == host {
        addr.to_owned()
    } else {
        format!("{addr}/{prefix}")
    }
}

/// A JSON array written element by element.
pub struct JsonArray {
    n: usize,
}

impl JsonArray {
    pub fn start(out: &mut impl Write) -> std::io::Result<Self> {
        out.write_all(b"[")?;
        Ok(Self { n: 0 })
    }

    pub fn push<T: serde::Serialize>(
        &mut self,
        out: &mut impl Write,
        v: &T,
    ) -> std::io::Result<()> {
        out.write_all(if self.n == 0 { b"\n  " } else { b",\n  " })?;
        serde_json::to_writer(&mut *out, v)?;
        self.n += 1;
        Ok(())
    }

    /// An element already in JSON.
    pub fn push_raw(&mut self, out: &mut impl Write, json: &str) -> std::io::Result<()> {
        out.write_all(if self.n == 0 { b"\n  " } else { b",\n  " })?;
        out.write_all(json.as_bytes())?;
        self.n += 1;
        Ok(())
    }

    pub fn end(self, out: &mut impl Write) -> std::io::Result<()> {
        out.write_all(if self.n == 0 { b"]\n" } else { b"\n]\n" })
    }
}

/// One JSON document, pretty, with a trailing newline.
pub fn json(out: &mut impl Write, v: &impl serde::Serialize) -> std::io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, v)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn human_ttls() {
        let now = datetime!(2026-01-01 00:00:00 UTC);
        assert_eq!(ttl_left(Some("2026-01-01T00:09:41Z"), now), "9m41s left");
        assert_eq!(ttl_left(Some("2026-01-01T00:09:40.5Z"), now), "9m41s left");
        assert_eq!(ttl_left(None, now), "permanent");
        assert_eq!(ttl_left(Some("2025-12-31T23:59:00Z"), now), "expired");
        assert_eq!(age("2025-12-31T23:57:00Z", now), "3m ago");
    }

    #[test]
    fn tables_align_and_right_align_numbers() {
        let mut t = Table::new(&["ADDR", "DROPPED", "REASON"], &[1]);
        let mut out = Vec::new();
        t.page(
            &mut out,
            &[
                vec!["198.51.100.7".into(), "1,234".into(), "flood".into()],
                vec!["::1".into(), "5".into(), "x".into()],
            ],
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "ADDR          DROPPED  REASON\n198.51.100.7    1,234  flood\n::1                 5  x\n"
        );
    }

    #[test]
    fn json_arrays_stream() {
        let mut out = Vec::new();
        let mut a = JsonArray::start(&mut out).unwrap();
        a.push(&mut out, &1).unwrap();
        a.push(&mut out, &2).unwrap();
        a.end(&mut out).unwrap();
        let v: Vec<u32> = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, [1, 2]);
        let mut out = Vec::new();
        JsonArray::start(&mut out).unwrap().end(&mut out).unwrap();
        assert_eq!(out, b"[]\n");
    }
}
