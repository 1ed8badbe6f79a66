//! Any text as a manifest file: YAML or JSON decoding with positions, then
//! validation of every object found. Nothing may panic, and every problem
//! must point inside the text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let decoded = vmesh_api::decode_manifests("fuzz.yaml", &text);
    let lines = text.lines().count().max(1) + 1;
    for problem in &decoded.problems {
        assert!(problem.line <= lines, "{problem} is past the end ({lines} lines)");
        let _ = problem.to_string();
    }
});
