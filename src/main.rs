//! The `skiff` command: parses the command line, sets up logging, and calls
//! into the library. Exit status: 0 success, 1 runtime error, 2 usage or
//! configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use skiff::cli;

// See Cargo.toml: musl's own allocator unmaps on nearly every free.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

#[derive(Parser)]
#[command(
    name = "skiff",
    version,
    about = "A lean message broker for ARM gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Create, list, describe and delete topics.
    Topics {
        #[command(subcommand)]
        command: cli::TopicsCommand,
    },
    /// Produce records: the VALUEs, or one record per stdin line.
    Produce(cli::ProduceArgs),
    /// Consume records and print them.
    Consume(cli::ConsumeArgs),
    /// Check a config file and print the effective config and memory budget.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Benchmarks against a running broker.
    Bench {
        #[command(subcommand)]
        command: cli::BenchCommand,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Config file (TOML); without it the embedded default is used.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Device profile to start from (see firmware-config/).
    #[arg(long)]
    profile: Option<String>,
    /// Overrides `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides `server.listen` (host:port).
    #[arg(long)]
    listen: Option<String>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate FILE and print the effective config with its memory budget.
    Check { file: Option<PathBuf> },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help/version to stdout with exit 0, errors with 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match cli.command {
        Command::Serve(a) => cli::serve(a.config, a.profile, a.data_dir, a.listen),
        Command::Topics { command } => cli::topics(command),
        Command::Produce(a) => cli::produce(a),
        Command::Consume(a) => cli::consume(a),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => cli::config_check(file),
        Command::Bench { command } => cli::bench(command),
    }
}
