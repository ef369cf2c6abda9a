//! Durations as operators write them: `500ms`, `30s`, `10m`, `1h`, `1d` (PRODUCT.md), and the
//! compound forms the CLI tables print (`9m41s`, `1h30m`, `3d4h`), so a TTL read off a table
//! can be pasted back.

use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid duration {0:?}: use whole numbers with units, largest first, e.g. 500ms, 30s, 10m, \
     1h30m, 1d"
)]
pub struct DurationError(pub String);

/// Units from largest to smallest, in milliseconds.
const UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

/// Parse one or more `N<unit>` parts with unit `d`, `h`, `m`, `s` or `ms`, each unit at most
/// once and largest first (`1h30m`, not `30m1h`: a misordered paste is more likely a typo than
/// intent). Zero is allowed; callers that need a positive duration check that themselves.
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(s.to_owned());
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(err());
    }
    let mut total: u64 = 0;
    // Index into UNITS of the next unit allowed: each part must be smaller than the last.
    let mut next = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
        let (num, tail) = rest.split_at(digits);
        let letters = tail
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(letters);
        let n: u64 = num.parse().map_err(|_| err())?;
        let i = UNITS[next..]
            .iter()
            .position(|(u, _)| *u == unit)
            .ok_or_else(err)?
            + next;
        let part = n.checked_mul(UNITS[i].1).ok_or_else(err)?;
        total = total.checked_add(part).ok_or_else(err)?;
        next = i + 1;
        rest = tail;
    }
    Ok(Duration::from_millis(total))
}

/// Human form for tables: `9m41s`, `2h5m`, `3d4h`, `450ms`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..60 => format!("{s}s"),
        60..3600 => two(s / 60, "m", s % 60, "s"),
        3600..86400 => two(s / 3600, "h", s % 3600 / 60, "m"),
        _ => two(s / 86400, "d", s % 86400 / 3600, "h"),
    }
}

fn two(a: u64, ua: &str, b: u64, ub: &str) -> String {
    if b == 0 {
        format!("{a}{ua}")
    } else {
        format!("{a}{ua}{b}{ub}")
    }
}

/// Serde helpers for durations written as strings in the config file.
pub mod serde_str {
    use serde::{Deserialize, Deserializer, de::Error};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse(&s).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("1d"), Ok(Duration::from_secs(86400)));
    }

    #[test]
    fn parses_compound_forms() {
        assert_eq!(parse("9m41s"), Ok(Duration::from_secs(581)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("3d4h"), Ok(Duration::from_secs(86400 * 3 + 3600 * 4)));
        assert_eq!(parse("1d2h3m4s5ms"), Ok(Duration::from_millis(93_784_005)));
        assert_eq!(parse("1s500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse(" 2h5m "), Ok(Duration::from_secs(7500)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn human_forms_parse_back() {
        for secs in [
            1,
            59,
            60,
            581,
            600,
            3599,
            3600,
            5400,
            7500,
            86399,
            86400,
            3 * 86400 + 4 * 3600,
        ] {
            let d = Duration::from_secs(secs);
            let h = human(d);
            let back = parse(&h).unwrap();
            // human() drops the smallest part beyond two units; it never rounds up.
            assert!(back <= d && d - back < Duration::from_secs(3600), "{h}");
        }
        assert_eq!(
            parse(&human(Duration::from_millis(450))),
            Ok(Duration::from_millis(450))
        );
    }

    #[test]
    fn rejects_bad_input_naming_it() {
        for bad in [
            "",
            "10",
            "m",
            "1.5h",
            "-1s",
            "10 minutes",
            "1w",
            "99999999999999999999d",
            "213503982334601d",
            "30m1h",
            "1m1m",
            "1ms30s",
            "1h30",
            "1h 30m",
            "h30m",
            "1h-30m",
            "1hm",
            "1x2s",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.0, bad);
            assert!(e.to_string().contains(&format!("{bad:?}")));
        }
    }

    #[test]
    fn human_forms() {
        assert_eq!(human(Duration::from_millis(450)), "450ms");
        assert_eq!(human(Duration::from_secs(581)), "9m41s");
        assert_eq!(human(Duration::from_secs(600)), "10m");
        assert_eq!(human(Duration::from_secs(7500)), "2h5m");
        assert_eq!(human(Duration::from_secs(86400 * 3 + 3600 * 4)), "3d4h");
    }
}
