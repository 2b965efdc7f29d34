//! One module per subcommand, plus the model-loading options they share.

pub mod bench;
pub mod generate;
pub mod model_args;
pub mod plan;
pub mod pull;
