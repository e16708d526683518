//! The command implementations behind `main.rs`. Each returns the process
//! exit status: 0 success, 1 runtime error, 2 usage or configuration error.
//! Errors go to stderr as one line that names the problem.

mod args;
mod bench;
mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

pub use args::*;
pub use commands::{bench, consume, produce, topics};

use crate::config::Config;

pub const EXIT_RUNTIME: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

pub(crate) fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("skiff: {msg}");
    ExitCode::from(code)
}

/// Logging for every command: `RUST_LOG` wins over `level`; no timestamps
/// under systemd, where journald adds its own.
pub fn init_logging(level: &str) {
    let under_systemd =
        std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some();
    let mut b = env_logger::Builder::new();
    b.parse_filters(level);
    if let Ok(filters) = std::env::var("RUST_LOG") {
        b.parse_filters(&filters);
    }
    if under_systemd {
        b.format_timestamp(None);
    }
    b.target(env_logger::Target::Stderr);
    let _ = b.try_init();
}

pub fn serve(
    config: Option<PathBuf>,
    profile: Option<String>,
    data_dir: Option<PathBuf>,
    listen: Option<String>,
) -> ExitCode {
    let mut cfg = match Config::load_layers(config.as_deref(), profile.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    if let Err(e) = cfg.apply_overrides(data_dir, listen) {
        return fail(EXIT_USAGE, e);
    }
    init_logging(&cfg.log.level);
    match crate::server::serve(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(EXIT_RUNTIME, e),
    }
}

pub fn config_check(file: Option<PathBuf>) -> ExitCode {
    match Config::load(file.as_deref()) {
        Ok(cfg) => {
            print!("{}", crate::config::check_report(&cfg));
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_USAGE, e),
    }
}
