//! A standalone aggregator process with the same flags as `headroom aggregator`, for tests and
//! benchmarks that need one without the agent binary.

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: headroom_aggregator::AggregatorArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = match Cli::parse().args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    headroom_aggregator::run(cfg).await
}
