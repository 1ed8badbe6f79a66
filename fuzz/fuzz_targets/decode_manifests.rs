//! Any text as a manifest file: YAML or JSON decoding with positions, then
//! validation of every object found. Nothing may panic, and every problem
//! must point inside the text (or just past its end).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let decoded = vmesh_api::decode_manifests("fuzz.yaml", &text);
    // Line breaks as YAML counts them: `\n`, `\r\n`, and a lone `\r`.
    let lone_returns = text.match_indices('\r').filter(|(i, _)| !text[i + 1..].starts_with('\n')).count();
    let lines = text.matches('\n').count() + lone_returns + 1;
    for problem in &decoded.problems {
        // The end of the input may count as the start of one more line.
        assert!(
            problem.line <= lines + 1,
            "{problem} is past the end ({lines} lines)"
        );
        let _ = problem.to_string();
    }
});
