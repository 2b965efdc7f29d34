//! One module per subcommand, plus the model-loading options they share.

pub mod batch;
pub mod bench;
pub mod bench_concurrency;
pub mod bench_route_sim;
pub mod bench_router;
pub mod bench_serve;
pub mod check;
pub mod generate;
pub mod local_cluster;
pub mod model_args;
pub mod plan;
pub mod pull;
pub mod router;
pub mod signals;
pub mod telemetry;
pub mod units;
pub mod up;
pub mod worker;
