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
    /// Consume records and print them (alone, or as a member of a group).
    Consume(cli::ConsumeArgs),
    /// Write stdin's TOPIC<TAB>VALUE lines in one transaction; `txn list`.
    Txn(cli::TxnArgs),
    /// List, describe, reset and delete consumer groups.
    Groups {
        #[command(subcommand)]
        command: cli::GroupsCommand,
    },
    /// List, describe and delete share groups (queues).
    ShareGroups {
        #[command(subcommand)]
        command: cli::ShareGroupsCommand,
    },
    /// Dead-letter topics of share groups: list, replay.
    Dlq {
        #[command(subcommand)]
        command: cli::DlqCommand,
    },
    /// Check a config file and print the effective config and memory budget.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Check what the [acl] rules of a config allow.
    Acl {
        #[command(subcommand)]
        command: cli::AclCommand,
    },
    /// The store-and-forward mirror to Kafka: status, pause, resume.
    Mirror {
        #[command(subcommand)]
        command: cli::MirrorCommand,
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
    /// Overrides `server.listen` (IP:PORT; port 0 takes a free port, which
    /// the start-up line and --ready-file name).
    #[arg(long, env = "SKIFF_LISTEN", value_name = "IP:PORT")]
    listen: Option<String>,
    /// Once serving, write the addresses really bound (JSON: pid, tcp,
    /// unix, metrics) to this file; it is removed at a clean stop.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
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
        Command::Serve(a) => cli::serve(a.config, a.profile, a.data_dir, a.listen, a.ready_file),
        Command::Topics { command } => cli::topics(command),
        Command::Produce(a) => cli::produce(a),
        Command::Consume(a) => cli::consume(a),
        Command::Txn(a) => cli::txn(a),
        Command::Groups { command } => cli::groups(command),
        Command::ShareGroups { command } => cli::share_groups(command),
        Command::Dlq { command } => cli::dlq(command),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => cli::config_check(file),
        Command::Acl { command } => cli::acl(command),
        Command::Mirror { command } => cli::mirror(command),
        Command::Bench { command } => cli::bench(command),
    }
}
