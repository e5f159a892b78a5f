//! The start-up error for a bad catalog or route file: file, line, problem.

/// A catalog or route file that cannot be used. Names the file, the 1-based
/// line and the problem, so an operator can fix it without reading code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {problem}")]
pub struct LoadError {
    /// The file as the operator named it (or `<bundled ...>`).
    pub file: String,
    /// 1-based line number; 0 when the problem concerns the whole file.
    pub line: usize,
    /// What is wrong.
    pub problem: String,
}

impl LoadError {
    pub(crate) fn new(file: &str, line: usize, problem: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            line,
            problem: problem.into(),
        }
    }
}

/// The meaningful lines of a config file: comments and blank lines removed,
/// each with its 1-based line number.
pub(crate) fn directives(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().filter_map(|(i, line)| {
        let line = line.split('#').next().unwrap_or_default().trim();
        (!line.is_empty()).then_some((i + 1, line))
    })
}
