//! The PROXY header parser against the shared corpus (`corpus/proxy/`, also replayed through the
//! kernel program by `tests/tests/datapath_proxy.rs`) and, differentially, against the fuzz
//! crate's slice-based reference on deterministic mutations of that corpus.

#[path = "../fuzz/src/proxy_reference.rs"]
mod proxy_reference;

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};
use wsguard_common::{
    BadReason, Classification, Verdict,
    http::classify,
    maps::{Config, MAX_INSPECT, v4_mapped},
    proxy::{self, Header, ProxyResult, V1_MAX, V1Parser, V2_SIG, Version},
};

/// One corpus case as EXPECTED describes it.
struct Case {
    name: String,
    bytes: Vec<u8>,
    header: Header,
    /// The verdict of the bytes after a valid header (of the whole payload otherwise); `None`
    /// when a valid header fills the payload.
    request: Option<Classification>,
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/proxy")
}

fn verdict(words: &mut std::str::SplitWhitespace<'_>, name: &str) -> Option<Classification> {
    let v = words.next().unwrap_or_else(|| panic!("{name}: no request"));
    if v == "-" {
        return None;
    }
    let verdict = (0..=4)
        .filter_map(Verdict::from_u8)
        .find(|x| x.as_str() == v)
        .unwrap_or_else(|| panic!("{name}: unknown verdict {v}"));
    let reason = (verdict == Verdict::Bad).then(|| {
        let r = words.next().expect("a reason after bad");
        *BadReason::ALL
            .iter()
            .find(|b| b.as_str() == r)
            .unwrap_or_else(|| panic!("{name}: unknown reason {r}"))
    });
    Some(Classification { verdict, reason })
}

fn expected(line: &str, bytes: &[u8]) -> Case {
    let mut w = line.split_whitespace();
    let name = w.next().expect("a name").to_owned();
    let version = match w.next() {
        Some("v1") => Some(Version::V1),
        Some("v2") => Some(Version::V2),
        Some("-") => None,
        v => panic!("{name}: version {v:?}"),
    };
    let result = w.next().unwrap_or_else(|| panic!("{name}: no result"));
    let client = w
        .next()
        .unwrap_or_else(|| panic!("{name}: no client column"));
    let request = verdict(&mut w, &name);
    assert_eq!(w.next(), None, "{name}: trailing words");
    let header = match (result, version) {
        ("absent", None) => Header::Absent,
        ("malformed", Some(version)) => Header::Malformed { version },
        ("local", Some(version)) => Header::Local {
            version,
            len: header_len(bytes, version, &name),
        },
        ("client", Some(version)) => {
            let sa: SocketAddr = client
                .parse()
                .unwrap_or_else(|e| panic!("{name}: client {client}: {e}"));
            let (addr, v6) = match sa.ip() {
                IpAddr::V4(a) => (v4_mapped(a.octets()), false),
                IpAddr::V6(a) => (a.octets(), true),
            };
            Header::Client(proxy::Client {
                version,
                len: header_len(bytes, version, &name),
                addr,
                v6,
                port: sa.port(),
            })
        }
        r => panic!("{name}: result {r:?}"),
    };
    Case {
        name,
        bytes: bytes.to_vec(),
        header,
        request,
    }
}

/// The length of a valid header, found the obvious way (CRLF or the v2 length field).
fn header_len(b: &[u8], v: Version, name: &str) -> u16 {
    match v {
        Version::V1 => {
            b.windows(2)
                .position(|w| w == b"\r\n")
                .unwrap_or_else(|| panic!("{name}: no CRLF"))
                + 2
        }
        Version::V2 => 16 + usize::from(u16::from_be_bytes([b[14], b[15]])),
    }
    .try_into()
    .expect("short header")
}

fn corpus() -> Vec<Case> {
    let dir = corpus_dir();
    let text = fs::read_to_string(dir.join("EXPECTED")).expect("corpus EXPECTED");
    let cases: Vec<Case> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|line| {
            let name = line.split_whitespace().next().expect("a name");
            let bytes = fs::read(dir.join(name))
                .unwrap_or_else(|e| panic!("EXPECTED names {name}, which can't be read: {e}"));
            assert!(bytes.len() <= 1400, "{name}: must fit one Ethernet frame");
            expected(line, &bytes)
        })
        .collect();
    for entry in fs::read_dir(&dir).expect("corpus dir") {
        let file = entry
            .expect("entry")
            .file_name()
            .into_string()
            .expect("UTF-8");
        assert!(
            file == "EXPECTED" || cases.iter().any(|c| c.name == file),
            "corpus file {file} is not listed in EXPECTED"
        );
    }
    cases
}

#[test]
fn corpus_matches_expected() {
    let cases = corpus();
    assert!(cases.len() >= 50, "corpus too small: {}", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let got = proxy::parse(&c.bytes);
        if got != c.header {
            failures.push(format!("{}: got {got:?}, want {:?}", c.name, c.header));
        }
        let reference = proxy_reference::parse(&c.bytes);
        if reference != c.header {
            failures.push(format!("{}: reference {reference:?}", c.name));
        }
        let rest = match got.header_len() {
            Some(n) => &c.bytes[usize::from(n)..],
            None => &c.bytes[..],
        };
        let request = (!rest.is_empty()).then(|| classify(rest, &Config::new()));
        if request != c.request {
            failures.push(format!(
                "{}: request {request:?}, want {:?}",
                c.name, c.request
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every outcome is covered, for both versions.
    for v in [Version::V1, Version::V2] {
        for want in ["client", "local", "malformed"] {
            assert!(
                cases
                    .iter()
                    .any(|c| c.header.version() == Some(v)
                        && c.header.trusted_result().as_str() == want),
                "no {v:?} {want} case"
            );
        }
    }
    assert!(cases.iter().any(|c| c.header == Header::Absent));
}

/// A valid header cut anywhere is malformed (truncated), never a different valid header.
#[test]
fn every_cut_of_a_valid_header_is_malformed() {
    for c in corpus() {
        let Some(len) = c.header.header_len() else {
            continue;
        };
        for n in 1..usize::from(len) {
            let got = proxy::parse(&c.bytes[..n]);
            assert_eq!(
                got,
                Header::Malformed {
                    version: c.header.version().unwrap()
                },
                "{} cut at {n}",
                c.name
            );
        }
    }
    assert_eq!(proxy::parse(b""), Header::Absent);
}

/// Only the first MAX_INSPECT bytes count: a v2 length that reaches past them fails open.
#[test]
fn v2_length_is_bounded_by_the_inspected_bytes() {
    let mut h = V2_SIG.to_vec();
    h.extend_from_slice(&[0x21, 0x11]);
    let len = (MAX_INSPECT - 16) as u16;
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[198, 19, 0, 1, 198, 18, 0, 1, 0, 1, 0, 80]);
    h.resize(MAX_INSPECT, 0);
    assert!(matches!(proxy::parse(&h), Header::Client(c) if usize::from(c.len) == MAX_INSPECT));
    h[15] += 1;
    h.push(0);
    assert_eq!(
        proxy::parse(&h),
        Header::Malformed {
            version: Version::V2
        }
    );
}

/// The v1 machine never reads past V1_MAX bytes, and past its decision nothing changes.
#[test]
fn v1_machine_is_bounded_and_final() {
    for c in corpus() {
        if c.header.version() != Some(Version::V1) {
            continue;
        }
        let mut p = V1Parser::new();
        match c.bytes.iter().position(|&b| p.step(b)) {
            Some(d) => {
                assert!(d <= V1_MAX, "{}: decided after {d} bytes", c.name);
                for &b in c.bytes.iter().chain(b"PROXY TCP4 \r\n") {
                    assert!(p.step(b), "{}: undone", c.name);
                }
            }
            // Only a truncated line is still open when the input ends.
            None => assert!(
                c.bytes.len() < V1_MAX && matches!(c.header, Header::Malformed { .. }),
                "{}: never decided",
                c.name
            ),
        }
        assert_eq!(p.finish(), c.header, "{}", c.name);
        // `reset` is a fresh parser.
        p.reset();
        c.bytes.iter().take(V1_MAX).any(|&b| p.step(b));
        assert_eq!(p.finish(), c.header, "{} after reset", c.name);
    }
}

#[test]
fn result_names() {
    let names: Vec<&str> = ProxyResult::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        names,
        ["client", "local", "malformed", "missing", "untrusted"]
    );
    assert_eq!((Version::V1.as_str(), Version::V2.as_str()), ("v1", "v2"));
}

/// xorshift64*: deterministic, so a failure reproduces from the printed input alone.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const DICT: &[&[u8]] = &[
    b"PROXY ",
    b"TCP4 ",
    b"TCP6 ",
    b"UNKNOWN",
    b"\r\n",
    b"\r",
    b"\n",
    b" ",
    b".",
    b":",
    b"::",
    b"::ffff:",
    b"0",
    b"00",
    b"255",
    b"256",
    b"65535",
    b"65536",
    b"ffff",
    b"0:0",
    b"198.19.7.7",
    b"fd00::1",
    b"\x00",
    b"\x20",
    b"\x21",
    b"\x11",
    b"\x21",
];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed[..seed.len().min(160)].to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(v.len() + 1);
        match rng.below(6) {
            0 => v.truncate(at),
            1 if at < v.len() => v[at] = rng.next() as u8,
            2 if at < v.len() => {
                let len = rng.below(6).min(v.len() - at);
                v.drain(at..at + len);
            }
            3 | 4 => {
                let frag = DICT[rng.below(DICT.len())];
                v.splice(at..at, frag.iter().copied());
            }
            _ if at < v.len() => v[at] ^= 1 << rng.below(8),
            _ => {}
        }
    }
    v
}

#[test]
fn differential_against_reference() {
    let seeds: Vec<Vec<u8>> = corpus().into_iter().map(|c| c.bytes).collect();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut seen = [0usize; 4];
    for i in 0..60_000 {
        let input = if i % 8 == 0 {
            let mut v = b"PROXY TCP6 ".to_vec();
            (0..rng.below(10)).for_each(|_| v.extend_from_slice(DICT[rng.below(DICT.len())]));
            v
        } else {
            let seed = rng.below(seeds.len());
            mutate(&mut rng, &seeds[seed])
        };
        let got = proxy::parse(&input);
        let want = proxy_reference::parse(&input);
        assert_eq!(got, want, "input {:?}", input.escape_ascii().to_string());
        seen[match got {
            Header::Absent => 0,
            Header::Client(_) => 1,
            Header::Local { .. } => 2,
            Header::Malformed { .. } => 3,
        }] += 1;
    }
    assert!(
        seen.iter().all(|n| *n > 100),
        "mutations reach every outcome: {seen:?}"
    );
}
