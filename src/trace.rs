//! A decision trace: the steps one pull went through, in words.
//!
//! The pipeline, the verify step and the base check write a line at each
//! step when a request carries a trace; `pullgate verify` prints them. A
//! request without one (every client pull) pays only an `Option` check.
//! Depends on nothing else in the crate.

use std::sync::Mutex;

/// The lines of one decision, in order.
#[derive(Debug, Default)]
pub struct Trace {
    lines: Mutex<Vec<String>>,
}

impl Trace {
    pub fn new() -> Trace {
        Trace::default()
    }

    /// Adds a line.
    pub fn line(&self, text: impl Into<String>) {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(text.into());
    }

    /// The lines written so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Writes a line to a trace, if there is one; the text is only formatted
/// when there is.
#[macro_export]
macro_rules! trace_line {
    ($trace:expr, $($fmt:tt)+) => {
        if let Some(t) = $trace {
            t.line(format!($($fmt)+));
        }
    };
}
