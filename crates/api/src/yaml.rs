//! YAML (and therefore JSON) documents parsed into `serde_json::Value`s, with a
//! table from field path to source position.
//!
//! Typed decoding works on plain values; the position table is how an error
//! found at `spec.ports[0].number` is turned back into a line and column.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};
use serde_json::{Map, Number, Value};

/// 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    fn of(span: Span) -> Pos {
        Pos {
            line: span.start.line(),
            column: span.start.col() + 1,
        }
    }
}

/// One YAML document: its value and where each field path starts.
#[derive(Debug)]
pub struct Document {
    pub value: Value,
    pub start: Pos,
    positions: HashMap<String, Pos>,
}

impl Document {
    /// The documents made of the elements of the list at `field` (such as
    /// `items`), in one pass over the positions, which stay those of the
    /// whole text: errors in them point into what was written. Empty when
    /// `field` is not a list.
    pub fn list_elements(&self, field: &str) -> Vec<Document> {
        let Some(items) = self.value.get(field).and_then(Value::as_array) else {
            return Vec::new();
        };
        let mut positions: Vec<HashMap<String, Pos>> = vec![HashMap::new(); items.len()];
        let prefix = format!("{field}[");
        for (key, pos) in &self.positions {
            let Some(rest) = key.strip_prefix(&prefix) else {
                continue;
            };
            let Some((index, rest)) = rest.split_once(']') else {
                continue;
            };
            if let Some(element) = index
                .parse::<usize>()
                .ok()
                .and_then(|i| positions.get_mut(i))
            {
                element.insert(rest.trim_start_matches('.').to_string(), *pos);
            }
        }
        items
            .iter()
            .zip(positions)
            .enumerate()
            .map(|(index, (value, positions))| Document {
                value: value.clone(),
                start: self.position(&format!("{field}[{index}]")),
                positions,
            })
            .collect()
    }

    /// The position of `path`, or of its nearest ancestor that has one.
    pub fn position(&self, path: &str) -> Pos {
        let mut path = path;
        loop {
            if let Some(pos) = self.positions.get(path) {
                return *pos;
            }
            match path.rfind(['.', '[']) {
                Some(cut) => path = &path[..cut],
                None => return self.positions.get("").copied().unwrap_or(self.start),
            }
        }
    }
}

/// A syntax error: the text is not YAML at all.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// The most values (scalars and collections, aliases counted at their
/// full size) one document may hold: far above any real object (the
/// store's limit is 1.5 MiB), far below what a "billion laughs" of aliases
/// would expand to in a few hundred bytes.
pub const MAX_DOCUMENT_VALUES: usize = 1_000_000;

enum Frame {
    Seq {
        path: String,
        items: Vec<Value>,
        anchor: usize,
        /// [`Builder::values`] when it opened.
        opened_at: usize,
    },
    Map {
        path: String,
        entries: Map<String, Value>,
        pending_key: Option<String>,
        anchor: usize,
        opened_at: usize,
    },
}

struct Builder {
    docs: Vec<Document>,
    stack: Vec<Frame>,
    positions: HashMap<String, Pos>,
    /// Anchored values and how many values each holds.
    anchors: HashMap<usize, (Value, usize)>,
    /// Values in the document so far, aliases at their full size.
    values: usize,
    doc_start: Pos,
    root: Option<Value>,
}

/// Path of a child of the innermost open collection.
fn child_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

impl Builder {
    /// Counts `more` values into the document, refusing what would pass
    /// [`MAX_DOCUMENT_VALUES`].
    fn count(&mut self, more: usize, pos: Pos) -> Result<(), SyntaxError> {
        self.values = self.values.saturating_add(more);
        if self.values > MAX_DOCUMENT_VALUES {
            return Err(SyntaxError {
                pos,
                message: format!(
                    "the document holds more than {MAX_DOCUMENT_VALUES} values once its \
                     aliases are expanded"
                ),
            });
        }
        Ok(())
    }

    /// The path the next value will take, or `None` when that value is a map key.
    fn next_path(&self) -> Option<String> {
        match self.stack.last() {
            None => Some(String::new()),
            Some(Frame::Seq { path, items, .. }) => Some(format!("{path}[{}]", items.len())),
            Some(Frame::Map {
                path, pending_key, ..
            }) => pending_key.as_ref().map(|k| child_path(path, k)),
        }
    }

    fn push_value(&mut self, value: Value, pos: Pos) -> Result<(), SyntaxError> {
        match self.stack.last_mut() {
            None => {
                self.root = Some(value);
                Ok(())
            }
            Some(Frame::Seq { items, .. }) => {
                items.push(value);
                Ok(())
            }
            Some(Frame::Map {
                path,
                entries,
                pending_key,
                ..
            }) => match pending_key.take() {
                Some(key) => {
                    entries.insert(key, value);
                    Ok(())
                }
                None => {
                    let key = match value {
                        Value::String(s) => s,
                        Value::Null => "null".to_string(),
                        Value::Bool(b) => b.to_string(),
                        Value::Number(n) => n.to_string(),
                        _ => {
                            return Err(SyntaxError {
                                pos,
                                message: "a mapping key must be a scalar".into(),
                            });
                        }
                    };
                    if entries.contains_key(&key) {
                        return Err(SyntaxError {
                            pos,
                            message: format!("duplicate key {key:?} in the same mapping"),
                        });
                    }
                    self.positions.insert(child_path(path, &key), pos);
                    *pending_key = Some(key);
                    Ok(())
                }
            },
        }
    }

    fn on_event(&mut self, event: Event<'_>, span: Span) -> Result<(), SyntaxError> {
        let pos = Pos::of(span);
        match event {
            Event::DocumentStart(_) => {
                self.doc_start = pos;
                self.positions.clear();
                self.anchors.clear();
                self.values = 0;
                self.root = None;
            }
            Event::DocumentEnd => {
                let value = self.root.take().unwrap_or(Value::Null);
                self.docs.push(Document {
                    value,
                    start: self.doc_start,
                    positions: std::mem::take(&mut self.positions),
                });
            }
            Event::Scalar(text, style, anchor, tag) => {
                if let Some(path) = self.next_path() {
                    self.positions.entry(path).or_insert(pos);
                }
                let as_string =
                    style != ScalarStyle::Plain || tag.as_ref().is_some_and(|t| t.suffix == "str");
                let value = if as_string {
                    Value::String(text.into_owned())
                } else {
                    resolve_plain(&text)
                };
                self.count(1, pos)?;
                if anchor > 0 {
                    self.anchors.insert(anchor, (value.clone(), 1));
                }
                self.push_value(value, pos)?;
            }
            Event::Alias(anchor) => {
                let size = self
                    .anchors
                    .get(&anchor)
                    .map(|(_, size)| *size)
                    .ok_or(SyntaxError {
                        pos,
                        message: "alias to an unknown anchor".into(),
                    })?;
                // Counted before it is copied: a bomb is refused, not built.
                self.count(size, pos)?;
                let value = self.anchors[&anchor].0.clone();
                self.push_value(value, pos)?;
            }
            Event::SequenceStart(anchor, _) => {
                let path = self.open_collection(pos)?;
                self.stack.push(Frame::Seq {
                    path,
                    items: Vec::new(),
                    anchor,
                    opened_at: self.values,
                });
            }
            Event::MappingStart(anchor, _) => {
                let path = self.open_collection(pos)?;
                self.stack.push(Frame::Map {
                    path,
                    entries: Map::new(),
                    pending_key: None,
                    anchor,
                    opened_at: self.values,
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (value, anchor, opened_at) = match self.stack.pop() {
                    Some(Frame::Seq {
                        items,
                        anchor,
                        opened_at,
                        ..
                    }) => (Value::Array(items), anchor, opened_at),
                    Some(Frame::Map {
                        entries,
                        anchor,
                        opened_at,
                        ..
                    }) => (Value::Object(entries), anchor, opened_at),
                    None => return Ok(()),
                };
                self.count(1, pos)?;
                if anchor > 0 {
                    self.anchors
                        .insert(anchor, (value.clone(), self.values - opened_at));
                }
                self.push_value(value, pos)?;
            }
            Event::StreamStart | Event::StreamEnd | Event::Nothing => {}
        }
        Ok(())
    }

    /// Records the position of a collection about to open, and refuses one used as a key.
    fn open_collection(&mut self, pos: Pos) -> Result<String, SyntaxError> {
        match self.next_path() {
            Some(path) => {
                self.positions.entry(path.clone()).or_insert(pos);
                Ok(path)
            }
            None => Err(SyntaxError {
                pos,
                message: "a mapping key must be a scalar".into(),
            }),
        }
    }
}

/// YAML 1.2 core schema resolution of a plain scalar.
fn resolve_plain(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = text.parse::<i64>() {
            return Value::Number(i.into());
        }
        if let Ok(u) = text.parse::<u64>() {
            return Value::Number(u.into());
        }
    }
    if let Some(hex) = text.strip_prefix("0x")
        && let Ok(i) = i64::from_str_radix(hex, 16)
    {
        return Value::Number(i.into());
    }
    if let Some(oct) = text.strip_prefix("0o")
        && let Ok(i) = i64::from_str_radix(oct, 8)
    {
        return Value::Number(i.into());
    }
    let looks_float = digits.starts_with(|c: char| c.is_ascii_digit() || c == '.')
        && digits
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
        && digits.bytes().any(|b| b.is_ascii_digit());
    if looks_float
        && let Ok(f) = text.parse::<f64>()
        && let Some(n) = Number::from_f64(f)
    {
        return Value::Number(n);
    }
    Value::String(text.to_string())
}

/// Parses every document of a YAML stream. JSON is YAML, so it goes through here too.
pub fn parse_documents(text: &str) -> Result<Vec<Document>, SyntaxError> {
    let mut builder = Builder {
        docs: Vec::new(),
        stack: Vec::new(),
        positions: HashMap::new(),
        anchors: HashMap::new(),
        values: 0,
        doc_start: Pos { line: 1, column: 1 },
        root: None,
    };
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| {
            let pos = Pos {
                line: e.marker().line(),
                column: e.marker().col() + 1,
            };
            explain(text, pos, e.info().to_string())
        })?;
        builder
            .on_event(event, span)
            .map_err(|e| explain(text, e.pos, e.message))?;
    }
    Ok(builder.docs)
}

/// Makes a syntax error point where the user must look: at the tab itself
/// (the parser points past it), and says so when the line is an unrendered template.
fn explain(text: &str, mut pos: Pos, mut message: String) -> SyntaxError {
    let line = text
        .lines()
        .nth(pos.line.saturating_sub(1))
        .unwrap_or_default();
    if message.contains("tabs")
        && let Some(tab) = line.chars().position(|c| c == '\t')
        && tab < pos.column
    {
        pos.column = tab + 1;
    }
    if message.contains("did not find expected key") {
        message.push_str(" (is this line indented like the keys above it?)");
    }
    if line.contains("{{") {
        message.push_str(
            " (this looks like an unrendered template: render it first, e.g. with helm template)",
        );
    }
    SyntaxError { pos, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_point_at_keys_and_items() {
        let docs =
            parse_documents("a:\n  b: 1\n  c:\n    - x\n    - y: 2\n---\nz: true\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].value["a"]["c"][1]["y"], 2);
        assert_eq!(docs[0].position("a.b"), Pos { line: 2, column: 3 });
        assert_eq!(docs[0].position("a.c[1]"), Pos { line: 5, column: 7 });
        assert_eq!(docs[0].position("a.c[1].y"), Pos { line: 5, column: 7 });
        assert_eq!(
            docs[0].position("a.c[1].y.missing"),
            Pos { line: 5, column: 7 }
        );
        assert_eq!(docs[1].value["z"], true);
        assert_eq!(docs[1].position("z"), Pos { line: 7, column: 1 });
    }

    #[test]
    fn scalars_resolve_like_yaml_1_2() {
        assert_eq!(resolve_plain("8080"), Value::from(8080));
        assert_eq!(resolve_plain("10.5"), Value::from(10.5));
        assert_eq!(resolve_plain("10s"), Value::from("10s"));
        assert_eq!(resolve_plain("192.168.1.1"), Value::from("192.168.1.1"));
        assert_eq!(resolve_plain("yes"), Value::from("yes"));
        assert_eq!(resolve_plain("~"), Value::Null);
        let docs = parse_documents("p: \"9091\"\nq: '1'\n").unwrap();
        assert_eq!(docs[0].value["p"], "9091");
        assert_eq!(docs[0].value["q"], "1");
    }

    #[test]
    fn duplicate_keys_and_bad_indentation_are_syntax_errors() {
        let err = parse_documents("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(err.pos.line, 3);
        assert!(err.message.contains("duplicate key"), "{err}");
        let err = parse_documents("a:\n  b: 1\n c: 2\n").unwrap_err();
        assert_eq!(err.pos.line, 3, "{err}");
    }

    #[test]
    fn tab_errors_point_at_the_tab() {
        let err = parse_documents("a:\n  b: 1\nc:\n\td: 2\n").unwrap_err();
        assert_eq!(err.pos, Pos { line: 4, column: 1 }, "{err}");
        assert!(err.message.contains("tabs"), "{err}");
    }

    #[test]
    fn json_is_parsed_with_positions() {
        let docs = parse_documents("{\n  \"a\": {\"b\": [1, 2]}\n}").unwrap();
        assert_eq!(docs[0].value["a"]["b"][1], 2);
        assert_eq!(docs[0].position("a.b").line, 2);
    }

    #[test]
    fn an_alias_bomb_is_refused_before_it_is_built() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
        for level in 1..10 {
            let previous = format!("*a{}", level - 1);
            let items = [previous.as_str(); 9].join(", ");
            text.push_str(&format!("a{level}: &a{level} [{items}]\n"));
        }
        assert!(text.len() < 600, "a small file: {} bytes", text.len());
        let error = parse_documents(&text).unwrap_err();
        assert!(
            error.message.contains("aliases are expanded"),
            "{}",
            error.message
        );
        assert_eq!(error.pos.line, 7, "where the expansion passes the limit");
        // Aliases within reason are fine.
        let fine = "base: &b {app: web, version: v1}\nfirst: *b\nsecond: *b\n";
        let docs = parse_documents(fine).unwrap();
        assert_eq!(docs[0].value["second"]["app"], "web");
    }
}
