//! Any text as the body of an apply request: the JSON list decoder with
//! positions, as the config API runs it, then validation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let decoded = vmesh_api::decode_list("request body", &text, "items", "default");
    for problem in &decoded.problems {
        let _ = problem.to_string();
    }
    for located in &decoded.objects {
        let _ = serde_json::to_vec(&located.object);
    }
});
