//! A resumable, string-aware bracket scan that finds where one JSON value (an object or an
//! array) ends in streamed text, without parsing it.
//!
//! Invariants: brackets inside strings (escapes included) never count; a scan resumed on a longer
//! buffer with the same start continues from where it stopped, so scanning a value that arrives
//! in many chunks is linear in its length; once the value has closed (or a closing bracket did
//! not match) the result is fixed.

/// How far a bracket scan of one JSON value got.
#[derive(Debug, Clone, Copy)]
pub(super) enum ScanEnd {
    /// The value closes just before this offset.
    Balanced(usize),
    /// A closing bracket that does not match, just before this offset.
    Mismatched(usize),
}

/// A resumable, string-aware bracket scan of one JSON value starting with `{` or `[`.
#[derive(Debug, Clone)]
pub(super) struct JsonScan {
    start: usize,
    pos: usize,
    closers: Vec<u8>,
    in_string: bool,
    escaped: bool,
    end: Option<ScanEnd>,
}

impl JsonScan {
    fn advance(&mut self, bytes: &[u8]) -> Option<ScanEnd> {
        while self.end.is_none() && self.pos < bytes.len() {
            let b = bytes[self.pos];
            self.pos += 1;
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' => self.closers.push(b'}'),
                b'[' => self.closers.push(b']'),
                b'}' | b']' => {
                    if self.closers.pop() != Some(b) {
                        self.end = Some(ScanEnd::Mismatched(self.pos));
                    } else if self.closers.is_empty() {
                        self.end = Some(ScanEnd::Balanced(self.pos));
                    }
                }
                _ => {}
            }
        }
        self.end
    }
}

/// Scans the JSON value at `start` in `buf`, resuming `cache` when it is the same scan.
pub(super) fn scan_json(cache: &mut Option<JsonScan>, buf: &str, start: usize) -> Option<ScanEnd> {
    let scan = match cache {
        Some(scan) if scan.start == start => scan,
        _ => cache.insert(JsonScan {
            start,
            pos: start,
            closers: Vec::new(),
            in_string: false,
            escaped: false,
            end: None,
        }),
    };
    scan.advance(buf.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_do_not_count_and_a_scan_resumes() {
        let text = r#"x {"a": "}]\"{", "b": [1, {"c": 2}]} tail"#;
        let mut cache = None;
        // Fed in growing prefixes, the scan ends exactly once the value closes.
        for end in 2..text.len() {
            let got = scan_json(&mut cache, &text[..end], 2);
            let closes = text.find(" tail").unwrap();
            match got {
                None => assert!(end < closes, "open at {end}"),
                Some(ScanEnd::Balanced(at)) => assert_eq!(at, closes),
                Some(other) => panic!("{other:?} at {end}"),
            }
        }
        assert!(matches!(scan_json(&mut None, "[1, 2}", 0), Some(ScanEnd::Mismatched(6))));
    }
}
