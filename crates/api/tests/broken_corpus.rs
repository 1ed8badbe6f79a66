//! A corpus of manifests with the mistakes users really make, each with the
//! exact problem lines `vmesh validate` must print for it.
//!
//! Every `tests/broken/NN-name.yaml` starts with `# expect: LINE:COL: …` lines:
//! the problem lines it must produce, without the `NN-name.yaml:` prefix. JSON
//! has no comments, so `NN-name.json` keeps its lines in `NN-name.json.expect`.
//! The reported lines must equal the expected ones exactly (nothing missing,
//! nothing extra), the file must have errors, and no object may be accepted
//! from a document that has an error.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use vmesh_api::decode_manifests;

const EXPECT: &str = "# expect: ";
const SIDECAR: &str = ".expect";

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/broken")
}

/// The `# expect:` lines of a manifest's leading comment block, or of its sidecar.
fn expectations(path: &Path, text: &str) -> Vec<String> {
    let sidecar = PathBuf::from(format!("{}{SIDECAR}", path.display()));
    let source = if sidecar.exists() {
        std::fs::read_to_string(&sidecar).unwrap()
    } else {
        text.to_string()
    };
    source
        .lines()
        .take_while(|line| line.starts_with('#'))
        .filter_map(|line| line.strip_prefix(EXPECT))
        .map(str::to_string)
        .collect()
}

/// Lines of the `---` document separators, so a line can be placed in its document.
fn separators(text: &str) -> Vec<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| *line == "---" || line.starts_with("--- "))
        .map(|(i, _)| i + 1)
        .collect()
}

/// The document a line belongs to: the number of separators before it.
fn document_of(separators: &[usize], line: usize) -> usize {
    separators.iter().filter(|&&s| s < line).count()
}

/// Checks one file; returns a description of everything wrong with it.
fn check(path: &Path) -> Option<String> {
    let name = path.file_name().unwrap().to_str().unwrap();
    let text = std::fs::read_to_string(path).unwrap();
    let expected_lines = expectations(path, &text);
    if expected_lines.is_empty() {
        let place = if name.ends_with(".json") {
            format!("in {name}{SIDECAR}")
        } else {
            "at the top of the file".to_string()
        };
        return Some(format!("{name}: no `{EXPECT}` lines {place}"));
    }
    let decoded = decode_manifests(name, &text);
    let expected: BTreeSet<String> = expected_lines
        .iter()
        .map(|e| format!("{name}:{e}"))
        .collect();
    let actual: BTreeSet<String> = decoded.problems.iter().map(ToString::to_string).collect();

    let mut failures = Vec::new();
    if expected.len() != expected_lines.len() {
        failures.push("  the same `# expect:` line is written twice".to_string());
    }
    if actual.len() != decoded.problems.len() {
        failures.push("  the same problem is reported twice".to_string());
    }
    if expected != actual {
        let mut diff = String::from(
            "  problems differ (- expected but not reported, + reported but not expected):",
        );
        for line in expected.difference(&actual) {
            diff.push_str(&format!("\n    - {line}"));
        }
        for line in actual.difference(&expected) {
            diff.push_str(&format!("\n    + {line}"));
        }
        failures.push(diff);
    }
    if !decoded.has_errors() {
        failures.push("  has_errors() is false: the broken manifest would be applied".to_string());
    }
    let separators = separators(&text);
    let broken_documents: BTreeSet<usize> = decoded
        .problems
        .iter()
        .filter(|p| p.is_error())
        .map(|p| document_of(&separators, p.line))
        .collect();
    for located in &decoded.objects {
        if broken_documents.contains(&document_of(&separators, located.line)) {
            failures.push(format!(
                "  {} (line {}) was accepted from a document with an error",
                located.object.display_name(),
                located.line
            ));
        }
    }
    (!failures.is_empty()).then(|| format!("{name}:\n{}", failures.join("\n")))
}

#[test]
fn every_broken_manifest_reports_exactly_its_problems() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.to_string_lossy().ends_with(SIDECAR))
        .collect();
    files.sort();
    assert!(
        files.len() >= 30,
        "the broken corpus should have at least 30 manifests, found {}",
        files.len()
    );
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy();
        let numbered = name.len() > 3
            && name.as_bytes()[..2].iter().all(u8::is_ascii_digit)
            && name.as_bytes()[2] == b'-';
        assert!(
            numbered,
            "{name}: corpus files are named NN-short-name.yaml"
        );
    }
    let failures: Vec<String> = files.iter().filter_map(|p| check(p)).collect();
    assert!(
        failures.is_empty(),
        "{} of {} broken manifests did not report what they expect:\n\n{}",
        failures.len(),
        files.len(),
        failures.join("\n\n")
    );
}

#[test]
fn every_sidecar_belongs_to_a_json_manifest() {
    for entry in std::fs::read_dir(corpus_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.to_string_lossy().to_string();
        if let Some(manifest) = name.strip_suffix(SIDECAR) {
            assert!(
                manifest.ends_with(".json") && Path::new(manifest).exists(),
                "{name} has no JSON manifest beside it"
            );
        }
    }
}
