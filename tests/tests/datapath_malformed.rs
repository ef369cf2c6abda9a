//! The malformed-packet regression corpus (`tests/corpus/malformed/`, format in its README):
//! every frame passes (unless its validly parsed source is banned), moves exactly the counters
//! its file names, and never makes either program fail. That the programs load at all is the
//! verifier's half of the test.

use std::path::{Path, PathBuf};
use wsguard_common::maps::{BanValue, COUNTERS_LEN};
use wsguard_tests::{
    dataplane::{DataPlane, Delta, TC_ACT_OK, XDP_DROP, XDP_PASS, counter_name},
    packet::Pkt,
};

const BANNED: [&str; 2] = ["198.18.0.66", "fd00::66"];

struct Case {
    name: String,
    frame: Vec<u8>,
    expect: (u32, Delta),
    banned: (u32, Delta),
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/malformed")
}

fn parse_expectation(name: &str, line: &str) -> (u32, Delta) {
    let mut words = line.split_whitespace();
    let verdict = match words.next() {
        Some("PASS") => XDP_PASS,
        Some("DROP") => XDP_DROP,
        other => panic!("{name}: verdict {other:?}, want PASS or DROP"),
    };
    let mut delta = Delta::default();
    for w in words {
        let index = (0..COUNTERS_LEN)
            .find(|i| counter_name(*i) == w)
            .unwrap_or_else(|| panic!("{name}: unknown counter {w}"));
        delta = delta.and_at(index, 1);
    }
    (verdict, delta)
}

fn load_corpus() -> Vec<Case> {
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir())
        .expect("corpus directory")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "hex"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|path| {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(path).expect("read case");
            let header = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("# {key}:")))
                    .unwrap_or_else(|| panic!("{name}: no `# {key}:` line"))
                    .to_owned()
            };
            let mut frame = Vec::new();
            for line in text.lines() {
                let bytes = line.split('#').next().unwrap_or("");
                for tok in bytes.split_whitespace() {
                    let b = u8::from_str_radix(tok, 16)
                        .unwrap_or_else(|_| panic!("{name}: bad byte {tok:?}"));
                    frame.push(b);
                }
            }
            Case {
                expect: parse_expectation(&name, &header("expect")),
                banned: parse_expectation(&name, &header("banned")),
                name,
                frame,
            }
        })
        .collect()
}

#[test]
fn malformed_corpus_verdicts_and_counters() {
    let cases = load_corpus();
    assert!(cases.len() >= 40, "corpus has only {} cases", cases.len());
    let mut dp = DataPlane::load(&[80]).expect("load data plane");
    for c in &cases {
        assert!(
            (14..=1514).contains(&c.frame.len()),
            "{}: frame of {} bytes",
            c.name,
            c.frame.len()
        );
        assert_eq!(
            dp.xdp_counted(&c.frame).unwrap(),
            c.expect,
            "{} (not banned)",
            c.name
        );
        assert_eq!(
            tc(&mut dp, &c.frame),
            TC_ACT_OK,
            "{}: TC never drops",
            c.name
        );
    }
    for addr in BANNED {
        let prefix = if addr.contains(':') { 128 } else { 32 };
        dp.ban(addr, prefix, BanValue::default()).unwrap();
    }
    for c in &cases {
        assert_eq!(
            dp.xdp_counted(&c.frame).unwrap(),
            c.banned,
            "{} (source banned)",
            c.name
        );
        assert_eq!(
            tc(&mut dp, &c.frame),
            TC_ACT_OK,
            "{}: TC never drops",
            c.name
        );
    }
}

/// Every truncation of valid frames, at every length from 14 bytes: the source counts as parsed
/// exactly when its IP header is complete, and nothing but a banned source is ever dropped.
#[test]
fn every_truncation_of_a_valid_frame() {
    let mut dp = DataPlane::load(&[80]).expect("load data plane");
    for addr in BANNED {
        let prefix = if addr.contains(':') { 128 } else { 32 };
        dp.ban(addr, prefix, BanValue::default()).unwrap();
    }
    let frames = [
        (
            Pkt::tcp("198.18.0.66", 40000, "198.18.1.1", 80)
                .payload(b"GET / HTTP/1.1\r\n")
                .build(),
            14 + 20,
        ),
        (
            Pkt::tcp("198.18.0.67", 40000, "198.18.1.1", 80)
                .payload(b"GET / HTTP/1.1\r\n")
                .build(),
            usize::MAX,
        ),
        (
            Pkt::tcp("fd00::66", 40000, "fd00:1::1", 80)
                .ext_header(0, &[])
                .payload(b"GET /")
                .build(),
            14 + 40,
        ),
        (
            Pkt::tcp("fd00::67", 40000, "fd00:1::1", 80)
                .ext_header(0, &[])
                .payload(b"GET /")
                .build(),
            usize::MAX,
        ),
    ];
    for (frame, parsed_from) in &frames {
        for len in 14..frame.len() {
            let cut = &frame[..len];
            let want = if len >= *parsed_from {
                (XDP_DROP, "Dropped")
            } else {
                (XDP_PASS, "Unparsed")
            };
            let (verdict, delta) = dp.xdp_counted(cut).unwrap();
            let moved: Vec<String> = delta.0.keys().map(|i| counter_name(*i)).collect();
            assert_eq!(
                (verdict, moved),
                (want.0, vec![want.1.to_owned()]),
                "cut at {len} of {}",
                frame.len()
            );
            assert_eq!(tc(&mut dp, cut), TC_ACT_OK, "cut at {len}");
        }
    }
}

/// Run TC egress. BPF_PROG_TEST_RUN itself refuses some frames before the program runs (for
/// an skb it wants the whole IP header in a frame announcing IP); those are `TC_ACT_OK` too, as
/// nothing of ours ran. Anything else the kernel reports is a failure.
fn tc(dp: &mut DataPlane, frame: &[u8]) -> u32 {
    match dp.tc(frame) {
        Ok(rc) => rc,
        Err(e) if format!("{e:#}").contains("os error 22") && frame.len() < 14 + 40 => TC_ACT_OK,
        Err(e) => panic!(
            "{e:#} on {} bytes: {:02x?}",
            frame.len(),
            &frame[..frame.len().min(40)]
        ),
    }
}
