//! `internvl`: serve InternVL-Chat V1.1, or run it once from the command line.

mod bench;
mod check_kernels;
mod generate;
mod model_args;

use internvl_server::device;
use internvl_server::serve;
use internvl_server::settings::{ServeArgs, Settings};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "internvl",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("INTERNVL_GIT_COMMIT"), ")"),
    about = "InternVL-Chat V1.1 inference: an OpenAI-compatible server and a command line"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one prompt about one image and print timings.
    Generate(generate::GenerateArgs),
    /// Serve the OpenAI-compatible API.
    Serve(Box<ServeArgs>),
    /// Measure throughput and time to first token of concurrent image chats.
    Bench(bench::BenchArgs),
    /// Check the CUDA kernels against CPU references on this GPU, and time them.
    CheckKernels(check_kernels::CheckKernelsArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Generate(args) => {
            init_logging(false, "warn");
            generate::run(args)
        }
        Command::Bench(args) => {
            init_logging(false, "warn");
            bench::run(args)
        }
        Command::CheckKernels(args) => {
            init_logging(false, "warn");
            check_kernels::run(args)
        }
        Command::Serve(args) => {
            let settings = Settings::resolve(*args, device::demo_model_dir())?;
            init_logging(settings.json_logs, "info");
            serve::run(settings)
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `default_level`).
fn init_logging(json: bool, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_level.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    log_panics();
}

/// Panics go to the log at ERROR, inside the span of the request that panicked (so with its
/// id), instead of as bare text on stderr; the backtrace too, when `RUST_BACKTRACE` asks.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let backtrace = std::backtrace::Backtrace::capture();
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("a non-text panic payload");
        match backtrace.status() {
            std::backtrace::BacktraceStatus::Captured => {
                tracing::error!(%location, %backtrace, "panicked: {message}")
            }
            _ => tracing::error!(%location, "panicked: {message}"),
        }
    }));
}
