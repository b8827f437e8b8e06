//! The `headroom` binary: command-line parsing, logging set-up and exit codes, and the one place
//! that links the node agent (`headroom-agent`) with the cluster aggregator
//! (`headroom-aggregator`): `headroom agent`, `headroom aggregator`, and `headroom demo`, which
//! runs both in one process. Everything else lives in those libraries; neither depends on the
//! other.

mod demo;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use headroom_agent::config::{Config, LogFormat};

#[derive(Parser)]
#[command(
    name = "headroom",
    version,
    about = "Node agent for GPU clusters: sample, forecast, right-size, report"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: sample the node, its containers and GPUs; serve /metrics and /v1/status.
    Agent(AgentArgs),
    /// Run the cluster aggregator: merge the agents' scale hints; serve JSON, Prometheus and KEDA.
    Aggregator(headroom_aggregator::AggregatorArgs),
    /// Replay a recorded series through the forecasters and emit their capacities.
    Backtest(headroom_agent::backtest::BacktestArgs),
    /// Start an aggregator and three simulated nodes replaying real traces; print the URLs.
    Demo(demo::DemoArgs),
    /// Load and attach the eBPF probes, hand them to the agent that started this process (over
    /// the socket on stdin), and exit. The agent runs this itself; not for people.
    #[command(name = "ebpf-loader", hide = true)]
    EbpfLoader,
}

#[derive(Args)]
struct AgentArgs {
    /// TOML configuration file; without it the embedded defaults apply.
    #[arg(long, env = "HEADROOM_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Address of the HTTP server.
    #[arg(long, env = "HEADROOM_LISTEN", value_name = "HOST:PORT")]
    listen: Option<SocketAddr>,
    /// Directory for history and other state kept across restarts.
    #[arg(long, env = "HEADROOM_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Log as human-readable text or as JSON lines.
    #[arg(long, env = "HEADROOM_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Seconds between samples.
    #[arg(long, env = "HEADROOM_SAMPLE_INTERVAL_S", value_name = "SECONDS")]
    sample_interval: Option<f64>,
    /// Path to libnvidia-ml.so.1 (default: the system's).
    #[arg(long, env = "HEADROOM_NVML_LIBRARY", value_name = "PATH")]
    nvml_library: Option<PathBuf>,
    /// Value of the `Hostname` label (default: the kernel's host name); in a pod, the node's name.
    #[arg(long, env = "HEADROOM_HOSTNAME", value_name = "NAME")]
    hostname: Option<String>,
    /// Treat cgroups matching this glob (relative to the hierarchy root) as containers; repeatable.
    #[arg(long = "include-cgroup", value_name = "GLOB")]
    include_cgroup: Vec<String>,
    /// Send scale hints to this aggregator (`http://host:port` or `https://host:port`); repeatable.
    #[arg(long = "aggregator", value_name = "URL")]
    aggregator: Vec<String>,
    /// File holding the bearer token for the aggregators.
    #[arg(long, env = "HEADROOM_AGGREGATOR_TOKEN_FILE", value_name = "PATH")]
    aggregator_token_file: Option<PathBuf>,
    /// PEM bundle of the CAs trusted for https:// aggregators (instead of the built-in roots).
    #[arg(long, env = "HEADROOM_AGGREGATOR_CA_FILE", value_name = "PATH")]
    aggregator_ca_file: Option<PathBuf>,
    /// observe: decide and report only; enforce: write decisions to managed cgroups.
    #[arg(long, env = "HEADROOM_MODE", value_enum)]
    mode: Option<headroom_agent::config::PolicyMode>,
    /// Cgroups (glob relative to the hierarchy root) the policy may change; repeatable.
    #[arg(long = "manage", value_name = "GLOB")]
    manage: Vec<String>,
    /// Put back every cgroup value a previous run changed, then exit without running.
    #[arg(long)]
    restore: bool,
    /// Print the effective configuration, with every default, and exit.
    #[arg(long)]
    print_config: bool,
}

impl AgentArgs {
    fn config(&self) -> Result<Config, headroom_agent::config::ConfigError> {
        let mut c = match &self.config {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = &self.state_dir {
            c.state_dir = v.clone();
        }
        if let Some(v) = self.log_format {
            c.log_format = v;
        }
        if let Some(v) = self.sample_interval {
            c.sample_interval_s = v;
        }
        if let Some(v) = &self.nvml_library {
            c.gpu.nvml_library = Some(v.clone());
        }
        if let Some(v) = &self.hostname {
            c.hostname = v.clone();
        }
        c.cgroup.include.extend(self.include_cgroup.iter().cloned());
        c.aggregator
            .endpoints
            .extend(self.aggregator.iter().cloned());
        if let Some(v) = &self.aggregator_token_file {
            c.aggregator.token_file = Some(v.clone());
        }
        if let Some(v) = &self.aggregator_ca_file {
            c.aggregator.ca_file = Some(v.clone());
        }
        if let Some(m) = self.mode {
            c.policy.mode = m;
        }
        c.policy.manage.extend(self.manage.iter().cloned());
        c.validate()?;
        Ok(c)
    }
}

fn init_logging(format: LogFormat) {
    init_logging_with(format, "info");
}

/// `default` applies unless `HEADROOM_LOG` says otherwise.
fn init_logging_with(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HEADROOM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Few malloc arenas: the agent's threads allocate little, and every extra arena holds on to
/// freed memory of its own (several MiB of RSS on a node whose containers churn).
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        // A fixed threshold (glibc otherwise raises it after each large free): big, short-lived
        // buffers (a scrape's exposition, the history image saved every minute) are mapped and
        // unmapped whole instead of lifting the heap's high-water mark for good.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

fn main() -> ExitCode {
    tune_malloc();
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => {
            // Three agents' routine lines would bury the URLs; warnings and the demo's own
            // lines still show.
            init_logging_with(LogFormat::Text, "warn,headroom::demo=info");
            match demo::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(demo::DemoError::Usage(e)) => {
                    eprintln!("headroom: {e}");
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!("headroom: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Backtest(args) => match headroom_agent::backtest::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("headroom: {e:#}");
                if e.is::<headroom_agent::backtest::InputError>() {
                    ExitCode::from(2)
                } else {
                    ExitCode::FAILURE
                }
            }
        },
        Command::EbpfLoader => match headroom_ebpf::loader::serve() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("headroom ebpf-loader: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Agent(args) => {
            let mut config = match args.config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("headroom: {e}");
                    return ExitCode::from(2);
                }
            };
            if args.print_config {
                print!("{}", config.to_toml());
                return ExitCode::SUCCESS;
            }
            if let Err(e) = headroom_agent::agent::preflight(&config) {
                eprintln!("headroom: {e}");
                return ExitCode::from(2);
            }
            init_logging(config.log_format);
            // The running binary itself, even if its file was replaced since it started.
            config.ebpf.loader = Some(PathBuf::from("/proc/self/exe"));
            if args.restore {
                return match headroom_agent::agent::restore_only(&config) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!("{e:#}");
                        ExitCode::FAILURE
                    }
                };
            }
            match headroom_agent::agent::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Aggregator(args) => {
            let config = match args.into_config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("headroom: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(LogFormat::Text);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("headroom: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(headroom_aggregator::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
