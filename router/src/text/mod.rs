//! Text in the router (DESIGN.md, decision 1): detokenizing streamed ids and stop strings.

pub mod detokenize;
pub mod stop;

pub use detokenize::{DetokenizeError, Detokenizer};
pub use stop::{StopMatcher, StopOutcome};
