//! `internvl check-kernels`: the CUDA kernels against CPU references on this machine's GPU,
//! then their timings against the paths they replace. Fails (exit 1) if any check fails.

#[derive(clap::Args)]
pub struct CheckKernelsArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// Skip the timings.
    #[arg(long)]
    no_timing: bool,
}

#[cfg(feature = "cuda")]
pub fn run(args: CheckKernelsArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use internvl_model::kernel_check::check_kernels;
    use internvl_model::kernel_timing::time_kernels;

    let device = candle_core::Device::new_cuda(args.gpu).context("opening the CUDA device")?;
    let checks = check_kernels(&device).context("running the kernel checks")?;
    let mut failed = 0;
    for check in &checks {
        let verdict = if check.passed() { "PASS" } else { "FAIL" };
        failed += usize::from(!check.passed());
        let mut notes = String::new();
        if check.nan {
            notes.push_str(" NaN in output");
        }
        if check.wrote_outside {
            notes.push_str(" wrote outside its rows");
        }
        println!(
            "{verdict} {}: max error {:.2e} (tolerance {:.0e}){notes}",
            check.name, check.max_error, check.tolerance
        );
    }
    if !args.no_timing {
        for (what, ms) in time_kernels(&device).context("timing the kernels")? {
            println!("TIME {what}: {ms:.3} ms");
        }
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} kernel checks failed",
        checks.len()
    );
    Ok(())
}

#[cfg(not(feature = "cuda"))]
pub fn run(_: CheckKernelsArgs) -> anyhow::Result<()> {
    anyhow::bail!(
        "this binary was built without CUDA: build it with scripts/build-cuda.sh \
         (cargo build --release --features cuda)"
    )
}
