//! Fault injection for tests of group failure handling: one rank panics, hangs or fails at a
//! chosen forward step.
//!
//! Parsing refuses unless `TESSERA_ALLOW_FAULT_INJECTION=1` is set, so a production worker can
//! never be started with a fault by a stray flag. Steps count a rank's forward passes from 1.

use std::time::Duration;

use crate::error::EngineError;

/// The environment variable that must be `1` for `--fault-inject` to be accepted.
pub const ALLOW_ENV: &str = "TESSERA_ALLOW_FAULT_INJECTION";

/// What the faulty rank does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Panics.
    Panic,
    /// Stops forever without joining the next collective.
    Hang,
    /// Returns an error from its forward pass.
    Error,
}

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultInjection {
    /// The rank that fails.
    pub rank: usize,
    /// The forward pass (from 1) at which it fails.
    pub step: u64,
    /// How.
    pub kind: FaultKind,
}

impl FaultInjection {
    /// Parses `rank=R,step=S,kind=panic|hang|error`, refusing unless [`ALLOW_ENV`] is `1`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if std::env::var(ALLOW_ENV).as_deref() != Ok("1") {
            return Err(format!("fault injection is for tests only; set {ALLOW_ENV}=1 to allow it"));
        }
        Self::parse_fields(s)
    }

    fn parse_fields(s: &str) -> Result<Self, String> {
        let (mut rank, mut step, mut kind) = (None, None, None);
        for field in s.split(',') {
            let (key, value) = field.split_once('=').ok_or_else(|| format!("{field:?}: expected key=value"))?;
            let number = || value.trim().parse::<u64>().map_err(|e| format!("{key}={value}: {e}"));
            match key.trim() {
                "rank" => rank = Some(number()? as usize),
                "step" => step = Some(number()?.max(1)),
                "kind" => {
                    kind = Some(match value.trim() {
                        "panic" => FaultKind::Panic,
                        "hang" => FaultKind::Hang,
                        "error" => FaultKind::Error,
                        other => return Err(format!("kind={other}: expected panic, hang or error")),
                    })
                }
                other => return Err(format!("unknown key {other:?} (expected rank, step, kind)")),
            }
        }
        match (rank, step, kind) {
            (Some(rank), Some(step), Some(kind)) => Ok(FaultInjection { rank, step, kind }),
            _ => Err("expected rank=R,step=S,kind=panic|hang|error".into()),
        }
    }

    /// Fires if this is the fault's rank and step: panics, hangs forever, or returns an error.
    pub fn maybe_fire(&self, rank: usize, step: u64) -> Result<(), EngineError> {
        if rank != self.rank || step != self.step {
            return Ok(());
        }
        match self.kind {
            FaultKind::Panic => panic!("injected fault: rank {rank} panics at step {step}"),
            FaultKind::Hang => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            FaultKind::Error => Err(EngineError::Device(format!("injected fault: rank {rank} fails at step {step}"))),
        }
    }
}

impl std::fmt::Display for FaultInjection {
    /// The form [`FaultInjection::parse`] reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            FaultKind::Panic => "panic",
            FaultKind::Hang => "hang",
            FaultKind::Error => "error",
        };
        write!(f, "rank={},step={},kind={kind}", self.rank, self.step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_fires_at_its_rank_and_step() {
        assert_eq!(
            FaultInjection::parse_fields("rank=1, step=3, kind=hang").unwrap(),
            FaultInjection { rank: 1, step: 3, kind: FaultKind::Hang }
        );
        assert!(FaultInjection::parse_fields("rank=1,step=3").is_err());
        assert!(FaultInjection::parse_fields("rank=1,step=3,kind=explode").is_err());
        assert!(FaultInjection::parse_fields("rank=x,step=3,kind=error").is_err());
        let f = FaultInjection::parse_fields("rank=1,step=2,kind=error").unwrap();
        assert_eq!(FaultInjection::parse_fields(&f.to_string()).unwrap(), f);
        assert!(f.maybe_fire(0, 2).is_ok() && f.maybe_fire(1, 1).is_ok());
        assert!(f.maybe_fire(1, 2).is_err());
    }
}
