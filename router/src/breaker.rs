//! A per-worker circuit breaker over request outcomes.
//!
//! Health (is the worker reachable, does it stream its events) is the pool supervisor's job;
//! the breaker judges what requests experience. A failed request opens it: the worker gets no
//! requests for a cooldown that doubles with each consecutive failure (1 s up to 30 s). Once the
//! cooldown is over it is half-open: one request goes through as a probe; success closes it,
//! failure opens it again for longer. Invariants: closed ⇔ `open_until` is `None`; at most one
//! probe is outstanding, and a probe that never reports (its client went away) stops counting
//! after [`PROBE_TIMEOUT`], so a worker is never excluded forever by a lost outcome.

use std::time::{Duration, Instant};

/// The first cooldown.
pub const BASE_COOLDOWN: Duration = Duration::from_secs(1);
/// The longest cooldown.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(30);
/// How long a probe may go without an outcome before another is allowed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// One worker's breaker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Breaker {
    /// Consecutive failed requests.
    failures: u32,
    /// Closed when `None`; open until then, half-open after.
    open_until: Option<Instant>,
    /// When the outstanding half-open probe was routed.
    probe_since: Option<Instant>,
}

impl Breaker {
    /// Whether a request may be routed to the worker at `now`.
    pub fn allows(&self, now: Instant) -> bool {
        match self.open_until {
            None => true,
            Some(until) => now >= until && self.probe_since.is_none_or(|t| now.duration_since(t) >= PROBE_TIMEOUT),
        }
    }

    /// A request was routed to the worker at `now` (a half-open breaker makes it the probe).
    pub fn routed(&mut self, now: Instant) {
        if self.open_until.is_some_and(|until| now >= until) {
            self.probe_since = Some(now);
        }
    }

    /// A request failed on the worker at `now`: (re)opens the breaker; true when it was closed.
    pub fn failed(&mut self, now: Instant) -> bool {
        let was_closed = self.open_until.is_none();
        self.failures = self.failures.saturating_add(1);
        let doublings = (self.failures - 1).min(5);
        let cooldown = (BASE_COOLDOWN * 2u32.pow(doublings)).min(MAX_COOLDOWN);
        self.open_until = Some(now + cooldown);
        self.probe_since = None;
        was_closed
    }

    /// A request succeeded on the worker, or it is known fresh (reconnected): closes the breaker.
    pub fn reset(&mut self) {
        *self = Breaker::default();
    }

    /// Whether the breaker is open or half-open.
    pub fn is_open(&self) -> bool {
        self.open_until.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_opens_for_a_doubling_cooldown_then_one_probe_decides() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        assert!(b.allows(t0));
        assert!(b.failed(t0), "the first failure trips it");
        assert!(!b.allows(t0 + Duration::from_millis(999)));
        let half_open = t0 + BASE_COOLDOWN;
        assert!(b.allows(half_open));
        b.routed(half_open);
        assert!(!b.allows(half_open), "one probe at a time");
        // The probe fails: twice the cooldown.
        assert!(!b.failed(half_open));
        assert!(!b.allows(half_open + Duration::from_millis(1999)));
        assert!(b.allows(half_open + 2 * BASE_COOLDOWN));
        // The next probe succeeds: closed, and failures count from zero again.
        b.routed(half_open + 2 * BASE_COOLDOWN);
        b.reset();
        assert!(b.allows(half_open) && !b.is_open());
        b.failed(t0);
        assert!(b.allows(t0 + BASE_COOLDOWN));
    }

    #[test]
    fn the_cooldown_is_capped_and_a_lost_probe_does_not_exclude_forever() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..20 {
            b.failed(t0);
        }
        assert!(!b.allows(t0 + MAX_COOLDOWN - Duration::from_millis(1)));
        let open = t0 + MAX_COOLDOWN;
        assert!(b.allows(open));
        b.routed(open);
        assert!(!b.allows(open + PROBE_TIMEOUT - Duration::from_millis(1)));
        assert!(b.allows(open + PROBE_TIMEOUT), "a probe without an outcome stops counting");
    }
}
