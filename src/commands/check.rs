//! `tessera check …`: on-device self-checks (kernels against the CPU reference, NCCL).

use clap::{Args, Subcommand};

use super::model_args::{ModelArgs, ParallelArgs};

/// Device self-checks.
#[derive(Debug, Subcommand)]
pub enum CheckCommand {
    /// Runs every CUDA kernel against the CPU reference on random data; prints one JSON line per
    /// case and fails if any exceeds the tolerance.
    Kernels(CheckArgs),
    /// Initialises a one-rank NCCL communicator and checks an all-reduce.
    Nccl(CheckArgs),
}

/// Arguments shared by the checks (device selection and library folders).
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    parallel: ParallelArgs,
}

/// Runs a check.
pub fn run(cmd: CheckCommand) -> anyhow::Result<()> {
    match cmd {
        CheckCommand::Kernels(a) => imp::kernels(&a.model),
        CheckCommand::Nccl(a) => imp::nccl(&a.model, &a.parallel),
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use tessera_kernels::comm::Communicator;
    use tessera_kernels::cuda::nccl::{NcclComm, unique_id};
    use tessera_kernels::cuda::{GpuDevice, GpuOptions, selftest};
    use tessera_worker::loader::fetch;

    use super::{ModelArgs, ParallelArgs};

    fn open(m: &ModelArgs) -> anyhow::Result<GpuDevice> {
        anyhow::ensure!(m.device == super::super::model_args::Device::Cuda, "checks run on --device cuda");
        Ok(GpuDevice::open(&GpuOptions {
            device: m.cuda_device,
            lib_dirs: m.cuda_lib_dir.clone(),
            cache_dir: m.cache_dir.clone().unwrap_or_else(fetch::default_cache_dir),
        })?)
    }

    pub fn kernels(m: &ModelArgs) -> anyhow::Result<()> {
        let dev = open(m)?;
        let results = selftest::run(&dev)?;
        for r in &results {
            println!(
                "{}",
                serde_json::json!({ "kernel": r.kernel, "rel_err": r.rel_err, "ok": r.ok, "device": dev.describe() })
            );
        }
        let failed: Vec<&str> = results.iter().filter(|r| !r.ok).map(|r| r.kernel.as_str()).collect();
        anyhow::ensure!(failed.is_empty(), "kernels over tolerance: {}", failed.join(", "));
        Ok(())
    }

    pub fn nccl(m: &ModelArgs, parallel: &ParallelArgs) -> anyhow::Result<()> {
        let dev = open(m)?;
        let path = dev
            .libraries()
            .nccl_path()
            .ok_or_else(|| anyhow::anyhow!("NCCL (libnccl.so.2) not found; pass --cuda-lib-dir"))?
            .to_path_buf();
        let stream = dev.stream().clone();
        let id = unique_id(&path)?;
        let comm = NcclComm::init(&path, id, 0, 1, stream.clone(), parallel.collective_timeout)?;
        let values: Vec<f32> = (0..4096).map(|i| i as f32 * 0.5 - 7.0).collect();
        // One rank: every collective over the group gives the buffer itself back.
        let mut buf = stream.clone_htod(&values)?;
        comm.all_reduce_sum(&mut buf)?;
        let reduced = stream.clone_dtoh(&buf)?;
        let mut gathered = stream.alloc_zeros::<f32>(values.len())?;
        comm.all_gather(&buf, &mut gathered)?;
        comm.broadcast(&mut gathered, 0)?;
        comm.barrier()?;
        comm.synchronize()?;
        let gathered = stream.clone_dtoh(&gathered)?;
        let ok = reduced == values && gathered == values;
        // After an abort nothing runs, and nothing hangs.
        comm.abort("check: abort test");
        let refused = matches!(comm.all_reduce_sum(&mut buf), Err(tessera_kernels::comm::CommError::Aborted(_)));
        println!(
            "{}",
            serde_json::json!({ "ok": ok && refused, "ranks": comm.size(), "elements": values.len(), "abort_refuses": refused, "nccl": path.display().to_string(), "device": dev.describe() })
        );
        anyhow::ensure!(ok, "NCCL collectives returned wrong values");
        anyhow::ensure!(refused, "an aborted NCCL communicator still accepted a collective");
        Ok(())
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::{ModelArgs, ParallelArgs};

    const NO_CUDA: &str =
        "this tessera was built without CUDA support; rebuild with `cargo build --release --features cuda`";

    pub fn kernels(_m: &ModelArgs) -> anyhow::Result<()> {
        anyhow::bail!(NO_CUDA)
    }

    pub fn nccl(_m: &ModelArgs, _parallel: &ParallelArgs) -> anyhow::Result<()> {
        anyhow::bail!(NO_CUDA)
    }
}
