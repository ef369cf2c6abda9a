//! Differential fuzzing: the byte-at-a-time kernel classifier against the line-based reference,
//! with and without path scoping.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsguard_common::{
    http::{self, BadReason, Classifier, Verdict},
    maps::{CFG_PATH_SCOPE, Config},
};
use wsguard_common_fuzz::reference;

fn scoped() -> Config {
    let mut cfg = Config::new();
    cfg.flags |= CFG_PATH_SCOPE;
    cfg.paths[0][..3].copy_from_slice(b"/ws");
    cfg.path_lens[0] = 3;
    cfg.paths[1][..4].copy_from_slice(b"/api");
    cfg.path_lens[1] = 4;
    cfg.n_paths = 2;
    cfg
}

fuzz_target!(|data: &[u8]| {
    for cfg in [Config::new(), scoped()] {
        let got = http::classify(data, &cfg);
        let want = reference::classify(data, &cfg);
        assert_eq!(got, want, "input {:?}", data.escape_ascii().to_string());
        assert_eq!(got.reason.is_some(), got.verdict == Verdict::Bad);
        assert_ne!(got.reason, Some(BadReason::ServerRejected));

        // Feeding past the decision must not change it.
        let mut c = Classifier::new();
        data.iter()
            .take(wsguard_common::maps::MAX_INSPECT)
            .for_each(|&b| {
                c.step(b);
            });
        assert_eq!(c.finish(cfg.path_in_scope(c.path())), got);
    }
    let _ = http::response_status(data);
});
