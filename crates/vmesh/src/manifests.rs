//! Reading manifest sources named by `-f`: files, directories (their
//! `*.yaml`, `*.yml`, `*.json`, sorted) and `-` for standard input.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// `(name, text)` for every manifest source under `paths`.
pub fn read_sources(paths: &[String]) -> Result<Vec<(String, String)>> {
    let mut sources = Vec::new();
    for path in paths {
        if path == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading standard input")?;
            sources.push(("<stdin>".to_string(), text));
            continue;
        }
        let p = Path::new(path);
        if p.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(p)
                .with_context(|| format!("reading directory {path}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    matches!(
                        f.extension().and_then(|e| e.to_str()),
                        Some("yaml" | "yml" | "json")
                    )
                })
                .collect();
            files.sort();
            for file in files {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                sources.push((file.display().to_string(), text));
            }
        } else if p.exists() {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {path}"))?;
            sources.push((path.clone(), text));
        } else {
            bail!("{path}: no such file or directory");
        }
    }
    Ok(sources)
}
