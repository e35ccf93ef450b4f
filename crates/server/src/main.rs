//! `internvl`: serve InternVL-Chat V1.1, or run it once from the command line.

mod bench;
mod device;
mod generate;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "internvl", version, about = "InternVL-Chat V1.1 inference")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one prompt about one image and print timings.
    Generate(generate::GenerateArgs),
    /// Measure throughput and time to first token of concurrent image chats.
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
    }
}
