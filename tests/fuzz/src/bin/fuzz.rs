//! The libFuzzer entry point: `FUZZ_TARGET=<name>` picks one of [`fuzz_targets::TARGETS`].
//! Built and run by `tests/fuzz/run`, which sets up coverage instrumentation and corpora.
#![no_main]

use std::sync::OnceLock;

static TARGET: OnceLock<fuzz_targets::Target> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let target = TARGET.get_or_init(|| {
        let name = std::env::var("FUZZ_TARGET").unwrap_or_default();
        fuzz_targets::target(&name).unwrap_or_else(|| {
            let names: Vec<&str> = fuzz_targets::TARGETS.iter().map(|(n, _)| *n).collect();
            panic!("set FUZZ_TARGET to one of {}", names.join(", "))
        })
    });
    target(data);
});
