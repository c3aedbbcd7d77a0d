//! Logging that does not spam: one line per distinct problem.
//!
//! Background workers meet the same failure over and over (agent down).
//! [`ProblemLog`] prints a problem when it first appears or changes, and a
//! single line when things recover; every occurrence is still counted by
//! the caller's stats.

use std::sync::Mutex;

/// Remembers the last problem printed.
#[derive(Debug)]
pub struct ProblemLog {
    what: &'static str,
    last: Mutex<Option<String>>,
}

impl ProblemLog {
    pub const fn new(what: &'static str) -> ProblemLog {
        ProblemLog {
            what,
            last: Mutex::new(None),
        }
    }

    /// Records an outcome; returns the line printed, if any.
    pub fn outcome(&self, problem: Option<&str>) -> Option<String> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let line = match (problem, last.as_deref()) {
            (Some(p), Some(l)) if p == l => None,
            (Some(p), _) => Some(format!("exporter: {}: {p}", self.what)),
            (None, Some(_)) => Some(format!("exporter: {}: recovered", self.what)),
            (None, None) => None,
        };
        *last = problem.map(str::to_owned);
        drop(last);
        if let Some(l) = &line {
            eprintln!("{l}");
        }
        line
    }

    /// The problem currently in effect.
    pub fn current(&self) -> Option<String> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forgets state (a forked child starts silent).
    pub fn reset(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// The message a panic carried, for reports and logs.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_once_per_distinct_problem_and_once_on_recovery() {
        let log = ProblemLog::new("trace writer");
        assert!(log.outcome(None).is_none());
        assert!(log.outcome(Some("agent down")).is_some());
        assert!(log.outcome(Some("agent down")).is_none());
        assert!(log.outcome(Some("agent down")).is_none());
        assert!(log.outcome(Some("413")).is_some());
        assert_eq!(log.current().as_deref(), Some("413"));
        assert_eq!(
            log.outcome(None).as_deref(),
            Some("exporter: trace writer: recovered")
        );
        assert!(log.outcome(None).is_none());
    }
}
