//! Differential fuzzing: the kernel's PROXY header parser (constant-offset v2, byte-at-a-time
//! v1) against the slice-based reference, and the v1 machine's "done means done".
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsguard_common::proxy::{self, Header, V1Parser};
use wsguard_common_fuzz::proxy_reference;

fuzz_target!(|data: &[u8]| {
    let got = proxy::parse(data);
    let want = proxy_reference::parse(data);
    assert_eq!(got, want, "input {:?}", data.escape_ascii().to_string());
    if let Some(len) = got.header_len() {
        assert!(usize::from(len) <= data.len());
    }
    if let Header::Client(c) = got {
        assert_eq!(c.v6, !proxy::is_v4_mapped(&c.addr));
    }
    // Feeding every byte, past the point the machine said it was done, changes nothing.
    let mut p = V1Parser::new();
    data.iter().for_each(|&b| {
        p.step(b);
    });
    if matches!(got, Header::Absent) || got.version() == Some(proxy::Version::V2) {
        return;
    }
    assert_eq!(p.finish(), got);
});
