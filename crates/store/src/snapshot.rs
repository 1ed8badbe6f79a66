//! Snapshots of a whole store that move between backends: `vmesh backup`
//! takes one from a running server (redb or etcd), `vmesh restore` puts one
//! into an empty store of either kind, which is also how a mesh moves from
//! the embedded store to etcd.
//!
//! A snapshot is JSON lines: a header with the revision it was taken at,
//! then every object (resourceVersion included) and every server record
//! (token revocations, join records, token keys: the file is as sensitive
//! as the store and is written 0600). It is read at one point in time: one
//! redb read transaction, or one etcd revision. This module owns the format;
//! the backends own reading and writing their keys.

use std::io::{BufRead, Write};

use base64::Engine;
use serde::{Deserialize, Serialize};
use vmesh_api::Object;

use crate::{StoreError, StoreLocation};

/// The header's format tag.
const FORMAT: &str = "vmesh-store-snapshot/v1";

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    format: String,
    revision: u64,
}

/// One line after the header.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum Line {
    Object(Box<Object>),
    Record { name: String, value: String },
}

/// What a snapshot holds, read whole.
pub(crate) struct Contents {
    pub revision: u64,
    pub objects: Vec<Object>,
    pub records: Vec<(String, Vec<u8>)>,
}

fn io(context: &str) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Backend {
        context: context.into(),
        source: Box::new(e),
    }
}

/// Writes a snapshot of `revision` with `objects` and `records`.
pub(crate) fn write(
    out: &mut dyn Write,
    revision: u64,
    objects: impl IntoIterator<Item = Object>,
    records: impl IntoIterator<Item = (String, Vec<u8>)>,
) -> Result<(), StoreError> {
    fn line(out: &mut dyn Write, value: &impl Serialize) -> Result<(), StoreError> {
        serde_json::to_writer(&mut *out, value)?;
        out.write_all(b"\n").map_err(io("writing a snapshot"))
    }
    let header = Header {
        format: FORMAT.into(),
        revision,
    };
    line(out, &header)?;
    for object in objects {
        line(out, &Line::Object(Box::new(object)))?;
    }
    for (name, value) in records {
        let value = base64::engine::general_purpose::STANDARD.encode(value);
        line(out, &Line::Record { name, value })?;
    }
    Ok(())
}

/// Reads a whole snapshot; a line that is not one says which.
pub(crate) fn read(input: &mut dyn BufRead) -> Result<Contents, StoreError> {
    let bad = |number: usize, why: String| StoreError::Backend {
        context: format!("reading the snapshot, line {number}"),
        source: why.into(),
    };
    let mut lines = input.lines().enumerate();
    let header: Header = match lines.next() {
        Some((_, line)) => {
            let line = line.map_err(io("reading a snapshot"))?;
            serde_json::from_str(&line)
                .map_err(|e| bad(1, format!("not a snapshot header: {e}")))?
        }
        None => return Err(bad(1, "the file is empty".into())),
    };
    if header.format != FORMAT {
        return Err(bad(
            1,
            format!("format {:?}, expected {FORMAT:?}", header.format),
        ));
    }
    let mut contents = Contents {
        revision: header.revision,
        objects: Vec::new(),
        records: Vec::new(),
    };
    for (index, line) in lines {
        let line = line.map_err(io("reading a snapshot"))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(&line).map_err(|e| bad(index + 1, e.to_string()))? {
            Line::Object(object) => {
                if object.key().is_none() {
                    return Err(bad(
                        index + 1,
                        format!(
                            "{} {} is no kind vmesh knows",
                            object.api_version, object.kind
                        ),
                    ));
                }
                contents.objects.push(*object);
            }
            Line::Record { name, value } => {
                let value = base64::engine::general_purpose::STANDARD
                    .decode(value)
                    .map_err(|e| bad(index + 1, format!("record {name:?}: {e}")))?;
                contents.records.push((name, value));
            }
        }
    }
    Ok(contents)
}

/// Puts the snapshot in `input` into the empty store at `location`; the
/// revision it holds. A store that holds anything is refused: a restore
/// never merges.
pub fn restore(location: &StoreLocation, input: &mut dyn BufRead) -> Result<u64, StoreError> {
    let contents = read(input)?;
    match location {
        StoreLocation::Embedded(dir) => crate::embedded::Embedded::import(dir, &contents)?,
        StoreLocation::Etcd(config) => crate::etcd::Etcd::import(config, &contents)?,
    }
    Ok(contents.revision)
}
