//! Go's `time.Duration` text, as LAPI writes a decision's `duration` (`until.Sub(now).String()`):
//! `3h59m57.641708614s`, `850ms`, `1.5µs`, `-18897h25m52.8s`, `0s`. Parsed exactly like Go's
//! `time.ParseDuration` (decimal fractions on any unit, units `ns us µs μs ms s m h`, an
//! optional sign, `0` alone) into signed nanoseconds, refusing what Go refuses (overflow past
//! ±2^63 ns, no unit, empty). Nothing is rounded through floating point.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Go duration {0:?}")]
pub struct GoDurationError(pub String);

const UNITS: [(&str, u128); 9] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
    ("", 0),
];

/// Signed nanoseconds; negative means already past.
pub fn parse(s: &str) -> Result<i64, GoDurationError> {
    let err = || GoDurationError(s.to_owned());
    let (neg, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(err());
    }
    // Magnitude in nanoseconds; i64::MIN's magnitude is one more than i64::MAX.
    let limit: u128 = if neg { 1 << 63 } else { (1 << 63) - 1 };
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int, tail) = rest.split_at(int_len);
        let (frac, tail) = match tail.strip_prefix('.') {
            Some(t) => {
                let n = t.bytes().take_while(u8::is_ascii_digit).count();
                t.split_at(n)
            }
            None => ("", tail),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(err());
        }
        let unit_len = tail
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(tail.len(), |(i, _)| i);
        let (unit, tail) = tail.split_at(unit_len);
        let scale = UNITS
            .iter()
            .find(|(u, _)| *u == unit && !u.is_empty())
            .map(|(_, n)| *n)
            .ok_or_else(err)?;
        // Whole part: any number of digits, but past the limit it is an overflow.
        let mut whole: u128 = 0;
        for d in int.bytes() {
            whole = whole * 10 + u128::from(d - b'0');
            if whole > limit {
                return Err(err());
            }
        }
        let mut part = whole.checked_mul(scale).ok_or_else(err)?;
        // Fraction: Go keeps digits while they can matter and truncates the rest.
        let mut num: u128 = 0;
        let mut den: u128 = 1;
        for d in frac.bytes() {
            if den > 1_000_000_000_000_000_000 {
                break;
            }
            num = num * 10 + u128::from(d - b'0');
            den *= 10;
        }
        part += num * scale / den;
        total = total.checked_add(part).ok_or_else(err)?;
        if total > limit {
            return Err(err());
        }
        rest = tail;
    }
    let mag = total as i128;
    Ok(if neg { -mag } else { mag } as i64)
}

#[cfg(test)]
mod tests {
    use super::parse;

    const S: i64 = 1_000_000_000;

    #[test]
    fn what_lapi_sends() {
        assert_eq!(
            parse("3h59m57.641708614s"),
            Ok(3 * 3600 * S + 59 * 60 * S + 57 * S + 641_708_614)
        );
        assert_eq!(parse("850ms"), Ok(850_000_000));
        assert_eq!(parse("1.5µs"), Ok(1_500));
        assert_eq!(parse("1.5μs"), Ok(1_500));
        assert_eq!(parse("2us"), Ok(2_000));
        assert_eq!(parse("7ns"), Ok(7));
        assert_eq!(parse("0s"), Ok(0));
        assert_eq!(parse("0"), Ok(0));
        assert_eq!(parse("-0"), Ok(0));
        assert_eq!(
            parse("-18897h25m52.8s"),
            Ok(-(18897 * 3600 * S + 25 * 60 * S + 52 * S + 800_000_000))
        );
        assert_eq!(parse("+1h"), Ok(3600 * S));
        assert_eq!(parse("1h1h"), Ok(7200 * S), "Go allows repeated units");
        assert_eq!(parse(".5s"), Ok(S / 2));
        assert_eq!(parse("5.s"), Ok(5 * S));
        assert_eq!(parse("1.0000000001s"), Ok(S));
        assert_eq!(parse("2562047h47m16.854775807s"), Ok(i64::MAX));
        assert_eq!(parse("-2562047h47m16.854775808s"), Ok(i64::MIN));
    }

    #[test]
    fn what_go_refuses() {
        for bad in [
            "",
            "-",
            "1",
            "s",
            ".s",
            "1d",
            "1 h",
            "1h ",
            "4h0",
            "1.2.3s",
            "--1s",
            "1e3s",
            "2562047h47m16.854775808s",
            "9999999999999999999999h",
            "١s",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted: {:?}", parse(bad));
        }
    }
}
