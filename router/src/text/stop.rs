//! Stop strings over streamed text.
//!
//! [`StopMatcher::push`] takes each text delta and returns what may be shown now: text that
//! could still turn out to be the start of a stop string is held back until it either completes
//! one (generation stops; the stop string and anything after it are dropped) or stops matching
//! (then it is released). Invariant: the released text never contains a stop string, and
//! released + held-back text is exactly the input up to the first stop string.

/// Matches stop strings across delta boundaries.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    stopped: Option<String>,
}

/// Result of feeding one delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text safe to emit.
    pub text: String,
    /// The stop string that matched, if generation must stop now.
    pub stopped: Option<String>,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
            stopped: None,
        }
    }

    /// Whether there is anything to match.
    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Feeds a delta. After a stop matched, further input is ignored.
    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stopped.is_some() {
            return StopOutcome { text: String::new(), stopped: None };
        }
        self.pending.push_str(delta);
        // The earliest complete stop string wins.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, s)| (*at, std::cmp::Reverse(s.len())));
        if let Some((at, s)) = hit {
            let text = self.pending[..at].to_string();
            self.stopped = Some(s.clone());
            self.pending.clear();
            return StopOutcome { text, stopped: self.stopped.clone() };
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let keep = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.pending[i..])))
            .unwrap_or(self.pending.len());
        let text = self.pending[..keep].to_string();
        self.pending.drain(..keep);
        StopOutcome { text, stopped: None }
    }

    /// Releases held-back text at the end of generation (it did not complete a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stops: &[&str], deltas: &[&str]) -> (String, Option<String>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for d in deltas {
            let o = m.push(d);
            out.push_str(&o.text);
            if o.stopped.is_some() {
                return (out, o.stopped);
            }
        }
        out.push_str(&m.finish());
        (out, None)
    }

    #[test]
    fn stop_strings_split_across_deltas_are_found_and_dropped() {
        assert_eq!(feed(&["END"], &["hello E", "N", "D and more"]), ("hello ".into(), Some("END".into())));
        assert_eq!(feed(&["\n\n"], &["a\n", "\nb"]), ("a".into(), Some("\n\n".into())));
    }

    #[test]
    fn near_misses_are_released() {
        assert_eq!(feed(&["END"], &["hello E", "N", "x"]), ("hello ENx".into(), None));
        assert_eq!(feed(&["END"], &["tail E"]), ("tail E".into(), None));
        assert_eq!(feed(&[], &["a", "b"]), ("ab".into(), None));
    }

    #[test]
    fn earliest_stop_wins_and_text_is_never_split_inside_a_character() {
        assert_eq!(feed(&["b", "ab"], &["xab"]), ("x".into(), Some("ab".into())));
        assert_eq!(feed(&["é!"], &["café", "!"]), ("caf".into(), Some("é!".into())));
    }
}
