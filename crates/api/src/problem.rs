//! A problem found in a manifest, located by file, line, column, object and field.
//!
//! The `Display` form is the contract `vmesh validate` prints:
//! `file:line:column: Kind namespace/name: field.path: message`.

use std::fmt;

/// How bad a problem is. Errors refuse the object; warnings are printed only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One finding, with everything needed to point the user at it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub severity: Severity,
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// `Kind namespace/name`, `Kind name` or empty when the document has no identity yet.
    pub object: String,
    /// Dotted field path (`spec.ports[0].number`), empty for whole-document problems.
    pub field: String,
    pub message: String,
}

impl Problem {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if self.severity == Severity::Warning {
            f.write_str("warning: ")?;
        }
        if !self.object.is_empty() {
            write!(f, "{}: ", self.object)?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}
