//! The `tessera` command line: parses arguments and calls the libraries.

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Tessera: a Rust-native serving cluster for large dense LLMs.
#[derive(Parser)]
#[command(name = "tessera", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model over the worker gRPC API (token ids in, token ids out).
    Worker(commands::worker::WorkerArgs),
    /// Serve the public gRPC API (tessera.v1.Generation) in front of workers, routing each
    /// request to the worker that caches most of its prompt.
    Router(commands::router::RouterArgs),
    /// Run a whole cluster here: N workers and a router (Ctrl-C stops everything).
    Up(commands::up::UpArgs),
    /// Generate text from a prompt with a local model.
    Generate(commands::generate::GenerateArgs),
    /// Fetch the default model into the cache (if needed) and print its local path.
    Pull(commands::pull::PullArgs),
    /// Print weight and KV-cache memory per rank for a model on a GPU group.
    Plan(commands::plan::PlanArgs),
    /// Offline greedy generation over token ids from a JSON file.
    Batch(commands::batch::BatchArgs),
    /// On-device self-checks.
    #[command(subcommand)]
    Check(commands::check::CheckCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Worker(args) => commands::worker::run(args),
        Command::Router(args) => commands::router::run(args),
        Command::Up(args) => commands::up::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Plan(args) => commands::plan::run(args),
        Command::Pull(args) => commands::pull::run(args),
        Command::Bench(cmd) => commands::bench::run(cmd),
        Command::Batch(args) => commands::batch::run(args),
        Command::Check(cmd) => commands::check::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the whole cause chain, no backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
