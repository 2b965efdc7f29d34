//! `tessera pull`: fetch the default model into the cache and print where it is.

use std::path::PathBuf;

use clap::Args;
use tessera_worker::loader::fetch;

/// Arguments of `tessera pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// Where fetched models are cached [default: $XDG_CACHE_HOME/tessera or ~/.cache/tessera].
    #[arg(long, env = "TESSERA_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

/// Runs the subcommand.
pub fn run(args: PullArgs) -> anyhow::Result<()> {
    let dir = args.cache_dir.unwrap_or_else(fetch::default_cache_dir);
    println!("{}", fetch::ensure_default_model(&dir)?.display());
    Ok(())
}
