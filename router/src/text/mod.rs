//! Text in the router (DESIGN.md, decision 1): detokenizing streamed ids, stop strings and tool
//! calls in the model's output.

pub mod detokenize;
pub mod stop;
pub mod tools;

pub use detokenize::{DetokenizeError, Detokenizer};
pub use stop::{StopMatcher, StopOutcome};
pub use tools::{ParsedToolCall, ToolCallParse, ToolCallStreamer, ToolCallStyle, ToolSpec, parse_tool_calls};
