//! The classifier against the shared handshake corpus (`corpus/handshakes/`, also replayed
//! through the kernel program) and, differentially, against the fuzz crate's line-based
//! reference on deterministic mutations of that corpus.

#[path = "../fuzz/src/reference.rs"]
mod reference;

use std::{fs, path::PathBuf};
use wsguard_common::{
    http::{
        BAD_REASONS, BadReason, Classification, Classifier, Verdict, classify, response_status,
    },
    maps::{CFG_PATH_SCOPE, Config, MAX_INSPECT, PATH_LEN},
};

struct Case {
    name: String,
    bytes: Vec<u8>,
    want: Classification,
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/handshakes")
}

fn parse_expected(line: &str) -> (String, Classification) {
    let mut words = line.split_whitespace();
    let name = words.next().expect("a case name").to_owned();
    let verdict = words.next().unwrap_or_else(|| panic!("{name}: no verdict"));
    let verdict = (0..=4)
        .filter_map(Verdict::from_u8)
        .find(|v| v.as_str() == verdict)
        .unwrap_or_else(|| panic!("{name}: unknown verdict {verdict}"));
    let reason = words.next().map(|r| {
        *BadReason::ALL
            .iter()
            .find(|b| b.as_str() == r)
            .unwrap_or_else(|| panic!("{name}: unknown reason {r}"))
    });
    assert_eq!(words.next(), None, "{name}: trailing words");
    assert_eq!(
        reason.is_some(),
        verdict == Verdict::Bad,
        "{name}: reason iff bad"
    );
    (name, Classification { verdict, reason })
}

fn corpus() -> Vec<Case> {
    let dir = corpus_dir();
    let expected = fs::read_to_string(dir.join("EXPECTED")).expect("corpus EXPECTED");
    let cases: Vec<Case> = expected
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (name, want) = parse_expected(line);
            let bytes = fs::read(dir.join(&name))
                .unwrap_or_else(|e| panic!("EXPECTED names {name}, which can't be read: {e}"));
            assert!(
                bytes.len() <= 1400,
                "{name}: must fit in one Ethernet frame"
            );
            Case { name, bytes, want }
        })
        .collect();
    for entry in fs::read_dir(&dir).expect("corpus dir") {
        let file = entry
            .expect("dir entry")
            .file_name()
            .into_string()
            .expect("UTF-8 name");
        assert!(
            file == "EXPECTED" || cases.iter().any(|c| c.name == file),
            "corpus file {file} is not listed in EXPECTED"
        );
    }
    let mut names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "duplicate names in EXPECTED");
    cases
}

fn scoped() -> Config {
    let mut cfg = Config::new();
    cfg.flags |= CFG_PATH_SCOPE;
    cfg.paths[0][..5].copy_from_slice(b"/chat");
    cfg.path_lens[0] = 5;
    cfg.paths[1][..3].copy_from_slice(b"/ws");
    cfg.path_lens[1] = 3;
    cfg.n_paths = 2;
    cfg
}

#[test]
fn corpus_matches_expected() {
    let cases = corpus();
    assert!(cases.len() >= 40, "corpus too small: {}", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let got = classify(&c.bytes, &Config::new());
        if got != c.want {
            failures.push(format!("{}: got {got:?}, want {:?}", c.name, c.want));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for v in ["valid", "bad", "incomplete", "tls", "ignored"] {
        assert!(
            cases.iter().any(|c| c.want.verdict.as_str() == v),
            "no {v} case"
        );
    }
    for r in &BadReason::ALL[..5] {
        assert!(
            cases.iter().any(|c| c.want.reason == Some(*r)),
            "no {r:?} case"
        );
    }
}

/// Bytes fed one at a time, ignoring `step`'s "done", give what `classify` gives.
fn stepped(bytes: &[u8], cfg: &Config) -> Classification {
    let mut c = Classifier::new();
    for &b in bytes.iter().take(MAX_INSPECT) {
        c.step(b);
    }
    c.finish(cfg.path_in_scope(c.path()))
}

#[test]
fn byte_by_byte_agrees_and_prefixes_never_judge_early() {
    for cfg in [Config::new(), scoped()] {
        for c in corpus() {
            let full = classify(&c.bytes, &cfg);
            assert_eq!(stepped(&c.bytes, &cfg), full, "{}", c.name);
            assert_eq!(
                reference::classify(&c.bytes, &cfg),
                full,
                "{} (reference)",
                c.name
            );
            // Where the classifier says it is done, no later byte may change the outcome.
            let mut clf = Classifier::new();
            let done = c.bytes.iter().take(MAX_INSPECT).position(|&b| clf.step(b));
            for n in 0..c.bytes.len() {
                let got = classify(&c.bytes[..n], &cfg);
                if done.is_some_and(|d| n > d) {
                    assert_eq!(got, full, "{} cut at {n}", c.name);
                } else if full.verdict == Verdict::Valid || full.verdict == Verdict::Bad {
                    // A judged request is in scope, so every cut of it is merely unfinished.
                    assert_eq!(got.verdict, Verdict::Incomplete, "{} cut at {n}", c.name);
                }
            }
        }
    }
}

#[test]
fn out_of_scope_bad_request_is_ignored() {
    let cfg = scoped();
    let out = b"GET /api HTTP/1.1\r\nUpgrade: null\r\n\r\n";
    assert_eq!(classify(out, &cfg).verdict, Verdict::Ignored);
    assert_eq!(
        classify(out, &Config::new()).reason,
        Some(BadReason::NoUpgrade)
    );
    let valid = fs::read(corpus_dir().join("valid_basic")).expect("valid_basic");
    assert_eq!(classify(&valid, &cfg).verdict, Verdict::Valid);
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

/// Fragments that steer mutations toward the parser's decision points.
const DICT: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b",",
    b":",
    b"\r\n\r\n",
    b"\n\n",
    b"GET ",
    b"POST ",
    b" HTTP/1.1",
    b"HTTP/1.",
    b"HTTP/2.0",
    b"Upgrade",
    b"upgrade",
    b"websocket",
    b"WebSocket",
    b"Connection",
    b"keep-alive",
    b"Sec-WebSocket-Key",
    b"Sec-WebSocket-Version",
    b"13",
    b"8",
    b"\x16\x03",
    b"\x00",
    b"\x7f",
    b"\xff",
    b"/ws",
    b"/chat",
    b"?",
    b"null",
];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(7) {
            0 => v.truncate(at),
            1 if at < v.len() => v[at] = rng.next() as u8,
            2 if at < v.len() => {
                let len = rng.below(8).min(v.len() - at);
                v.drain(at..at + len);
            }
            3 | 4 => {
                let frag = DICT[rng.below(DICT.len())];
                v.splice(at..at, frag.iter().copied());
            }
            5 if at < v.len() => v[at] ^= 0x20,
            _ => {
                let from = rng.below(v.len());
                let len = rng.below(24).min(v.len() - from);
                let chunk: Vec<u8> = v[from..from + len].to_vec();
                v.splice(at..at, chunk);
            }
        }
    }
    v
}

#[test]
fn differential_against_reference() {
    let seeds: Vec<Vec<u8>> = corpus().into_iter().map(|c| c.bytes).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let configs = [Config::new(), scoped()];
    let mut verdicts = [0usize; 5];
    for i in 0..20_000 {
        let input = if i % 10 == 0 {
            // Short random strings over the dictionary alone reach odd corners quickly.
            (0..rng.below(12))
                .flat_map(|_| DICT[rng.below(DICT.len())].iter().copied())
                .collect()
        } else {
            let seed = &seeds[rng.below(seeds.len())];
            mutate(&mut rng, seed)
        };
        for cfg in &configs {
            let got = classify(&input, cfg);
            let want = reference::classify(&input, cfg);
            assert_eq!(got, want, "input {:?}", input.escape_ascii().to_string());
            assert_eq!(
                stepped(&input, cfg),
                got,
                "input {:?}",
                input.escape_ascii().to_string()
            );
            verdicts[got.verdict as usize] += 1;
        }
    }
    // The mutations must keep reaching every verdict, or this test checks little.
    assert!(
        verdicts.iter().all(|&n| n > 100),
        "verdict spread {verdicts:?}"
    );
}

// Direct checks of the public API, beside the corpus.

const VALID: &[u8] = b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

fn verdict_of(p: &[u8]) -> (Verdict, Option<BadReason>) {
    let c = classify(p, &Config::new());
    (c.verdict, c.reason)
}

#[test]
fn size_and_layout() {
    assert!(core::mem::size_of::<Classifier>() <= 128);
    assert_eq!(core::mem::size_of::<Classifier>(), PATH_LEN + 8);
}

#[test]
fn enums_round_trip() {
    for (i, r) in BadReason::ALL.iter().enumerate() {
        assert_eq!(*r as usize, i);
        assert_eq!(BadReason::from_u8(i as u8), Some(*r));
    }
    assert_eq!(BadReason::from_u8(BAD_REASONS as u8), None);
    for v in 0..5 {
        assert_eq!(Verdict::from_u8(v).map(|v| v as u8), Some(v));
    }
    assert_eq!(Verdict::from_u8(5), None);
    assert_eq!(Verdict::Incomplete.as_str(), "incomplete");
    assert_eq!(
        BadReason::NoConnectionUpgrade.as_str(),
        "no_connection_upgrade"
    );
}

#[test]
fn basics() {
    assert_eq!(verdict_of(VALID), (Verdict::Valid, None));
    assert_eq!(
        verdict_of(b"get / HTTP/1.1\r\n\r\n"),
        (Verdict::Bad, Some(BadReason::BadMethod))
    );
    assert_eq!(
        verdict_of(b"GETX / HTTP/1.1\n\n"),
        (Verdict::Bad, Some(BadReason::BadMethod))
    );
    assert_eq!(
        verdict_of(b"GE / HTTP/1.1\n\n"),
        (Verdict::Bad, Some(BadReason::BadMethod))
    );
    assert_eq!(
        verdict_of(b"GET / HTTP/1.1\n\n"),
        (Verdict::Bad, Some(BadReason::NoUpgrade))
    );
    assert_eq!(verdict_of(b""), (Verdict::Incomplete, None));
    assert_eq!(verdict_of(b"\x16"), (Verdict::Incomplete, None));
    assert_eq!(verdict_of(b"\x16\x03"), (Verdict::Tls, None));
    assert_eq!(verdict_of(b"\x16\x01"), (Verdict::Ignored, None));
    assert_eq!(
        verdict_of(b"ABCDEFGHIJKLMNOP / HTTP/1.1\n\n").0,
        Verdict::Bad
    );
    assert_eq!(
        verdict_of(b"ABCDEFGHIJKLMNOPQ / HTTP/1.1\n\n").0,
        Verdict::Ignored
    );
    assert_eq!(verdict_of(b"GET / HTTP/1.1\rX"), (Verdict::Ignored, None));
}

#[test]
fn stops_as_soon_as_decided() {
    let mut c = Classifier::new();
    assert!(!c.step(b'P'));
    assert!(!c.step(b'R'));
    assert!(!c.step(b'I'));
    for &b in b" * HTTP/" {
        assert!(!c.step(b));
    }
    assert!(c.step(b'2'));
    let mut c = Classifier::new();
    let n = VALID.iter().position(|&b| c.step(b)).map(|i| i + 1);
    assert_eq!(n, Some(VALID.len()));
}

#[test]
fn path_capture_and_scope() {
    let mut cfg = Config::new();
    cfg.flags |= CFG_PATH_SCOPE;
    cfg.paths[0][..3].copy_from_slice(b"/ws");
    cfg.path_lens[0] = 3;
    cfg.n_paths = 1;
    assert_eq!(classify(VALID, &cfg).verdict, Verdict::Valid);
    let bad_out = b"GET /api HTTP/1.1\r\nUpgrade: null\r\n\r\n";
    assert_eq!(
        classify(bad_out, &cfg),
        Classification {
            verdict: Verdict::Ignored,
            reason: None
        }
    );
    let bad_in = b"GET /ws/x HTTP/1.1\r\nUpgrade: null\r\n\r\n";
    assert_eq!(
        classify(bad_in, &cfg),
        Classification {
            verdict: Verdict::Bad,
            reason: Some(BadReason::NoUpgrade)
        }
    );
    // The target is known to be out of scope before the header block ends...
    assert_eq!(
        classify(b"GET /api HTTP/1.1\r\nHost", &cfg).verdict,
        Verdict::Ignored
    );
    // ...but not while it may still grow into scope.
    assert_eq!(classify(b"GET /w", &cfg).verdict, Verdict::Incomplete);

    let mut long = [b'a'; 200];
    long[..4].copy_from_slice(b"GET ");
    long[4] = b'/';
    let mut c = Classifier::new();
    long.iter().for_each(|&b| {
        c.step(b);
    });
    assert_eq!(c.path().len(), PATH_LEN);
    assert_eq!(&c.path()[..2], b"/a");
}

#[test]
fn response_status_lines() {
    assert_eq!(
        response_status(b"HTTP/1.1 101 Switching Protocols\r\n"),
        Some(101)
    );
    assert_eq!(response_status(b"HTTP/1.1 400 Bad Request\r\n"), Some(400));
    assert_eq!(response_status(b"HTTP/1.0 426\r\n"), Some(426));
    assert_eq!(response_status(b"HTTP/1.1 502\n"), Some(502));
    assert_eq!(response_status(b"HTTP/1.1 503"), Some(503));
    assert_eq!(response_status(b"HTTP/1.1 5030"), None);
    assert_eq!(response_status(b"HTTP/1.1  101 x"), None);
    assert_eq!(response_status(b"HTTP/1.1 1x1 x"), None);
    assert_eq!(response_status(b"HTTP/1.2 101 x"), None);
    assert_eq!(response_status(b"HTTP/2 101 Switching"), None);
    assert_eq!(response_status(b"HTTP/2.0 200 OK\r\n"), None);
    assert_eq!(response_status(b"http/1.1 200 OK\r\n"), None);
    assert_eq!(response_status(b"\x17\x03\x03\x00\x20junkjunkjunk"), None);
    assert_eq!(response_status(b"HTTP/1.1 10"), None);
    assert_eq!(response_status(b"H"), None);
    assert_eq!(response_status(b""), None);
}

#[test]
fn reset_and_zeroed_are_fresh() {
    let mut c = Classifier::new();
    VALID.iter().for_each(|&b| {
        c.step(b);
    });
    assert_eq!(c.finish(true).verdict, Verdict::Valid);
    c.reset();
    assert!(c.path().is_empty());
    assert_eq!(c.finish(true).verdict, Verdict::Incomplete);
    for &b in b"POST /x HTTP/1.1\r\n\r\n" {
        c.step(b);
    }
    assert_eq!(c.finish(true).reason, Some(BadReason::BadMethod));
    assert_eq!(c.path(), b"/x");
    // A zero-filled map slot is a fresh classifier without any reset.
    // SAFETY: every field is an integer or an integer array; all-zero is a valid value.
    let zeroed: Classifier = unsafe { core::mem::zeroed() };
    assert_eq!(format!("{zeroed:?}"), format!("{:?}", Classifier::new()));
}
