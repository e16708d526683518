//! The command implementations behind `main.rs`. Each returns the process
//! exit status: 0 success, 1 runtime error, 2 usage or configuration error
//! (and [`EXIT_UNCOMMITTED`], [`EXIT_SIGNALLED`] where they apply).
//! Errors go to stderr as one line that names the problem.

// Command output through these, not `println!`: a closed pipe
// (`skiff txn list | head -1`) ends the command quietly, as it ends `cat`,
// where `println!` would panic. Defined before the modules that use them.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))
    };
}
macro_rules! outln {
    () => {
        $crate::cli::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod args;
mod bench;
mod bench_device;
mod bench_group;
mod bench_share;
mod commands;
mod groups;
mod share;
mod share_groups;
mod txn;

use std::path::PathBuf;
use std::process::ExitCode;

pub use args::*;
pub use commands::{acl, bench, consume, groups, mirror, produce, topics};
pub use share::dlq;
pub use share_groups::share_groups;
pub use txn::txn;

use crate::config::Config;

pub const EXIT_RUNTIME: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
/// `consume --group` stopped cleanly but could not commit what it printed
/// since its last commit (a broker that does not answer): the next member
/// prints those records again. EX_TEMPFAIL: running again is the remedy.
pub const EXIT_UNCOMMITTED: u8 = 75;

/// Writes command output to stdout; exits 0 when the reader has gone (a
/// broken pipe), 1 on any other write error.
pub(crate) fn write_out(args: std::fmt::Arguments) {
    use std::io::Write as _;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("skiff: writing to stdout: {e}");
        std::process::exit(i32::from(EXIT_RUNTIME));
    }
}

pub(crate) fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("skiff: {msg}");
    ExitCode::from(code)
}

/// Exit status of a command ended by a second stop signal, as a shell
/// reports one ended by SIGINT.
pub const EXIT_SIGNALLED: i32 = 130;

/// The process group of the command a queue worker runs now (0: none).
/// A second stop signal SIGKILLs it before the worker exits: the command
/// runs in a group of its own, which a terminal's Ctrl-C does not reach,
/// and would otherwise outlive the worker.
pub(crate) static COMMAND_GROUP: std::sync::atomic::AtomicI32 =
    std::sync::atomic::AtomicI32::new(0);

/// What the first stop signal prints (to stderr, from its handler): the
/// user learns the stop is under way and how to cut it short.
pub const STOPPING: &str = "skiff: stopping; a second SIGINT or SIGTERM quits at once\n";

/// A flag SIGINT and SIGTERM set, for a long-running command to stop
/// cleanly at: a group member leaves its group, a queue worker gives its
/// record back. A second signal ends the process at once
/// ([`EXIT_SIGNALLED`]): a clean stop may wait long on a broker that does
/// not answer (the client's timeouts), which the user then need not wait
/// out nor SIGKILL. [`COMMAND_GROUP`] goes first.
pub(crate) fn stop_flag_or_quit() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>, ExitCode>
{
    use std::sync::atomic::Ordering::SeqCst;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // One swap decides which signal is the first, even for two taken
        // at once by two threads: a load, then a separate set, let both
        // find the flag unset and neither quit.
        let set = stop.clone();
        let action = move || {
            if set.swap(true, SeqCst) {
                let group = COMMAND_GROUP.load(SeqCst);
                if group > 0 {
                    // SAFETY: kill(2) touches no memory of ours; the group
                    // is a command's whose leader is not yet reaped (the
                    // worker forgets it first), so its id is not reused.
                    unsafe { libc::kill(-group, libc::SIGKILL) };
                }
                signal_hook::low_level::exit(EXIT_SIGNALLED);
            }
            // SAFETY: write(2) of a static buffer to stderr; a short or
            // failed write loses only the notice.
            unsafe { libc::write(2, STOPPING.as_ptr().cast(), STOPPING.len()) };
        };
        // SAFETY: the action is async-signal-safe: atomics, write(2),
        // kill(2) and _exit(2); it neither allocates nor locks.
        if let Err(e) = unsafe { signal_hook::low_level::register(sig, action) } {
            return Err(fail(
                EXIT_RUNTIME,
                format!("cannot install signal handlers: {e}"),
            ));
        }
    }
    Ok(stop)
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
    ready_file: Option<PathBuf>,
) -> ExitCode {
    let mut cfg = match Config::load_layers(config.as_deref(), profile.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    if let Err(e) = cfg.apply_overrides(data_dir.clone(), listen.clone()) {
        return fail(EXIT_USAGE, e);
    }
    init_logging(&cfg.log.level);
    let reload = || {
        let mut cfg = Config::load_layers(config.as_deref(), profile.as_deref())?;
        cfg.apply_overrides(data_dir.clone(), listen.clone())?;
        Ok(cfg)
    };
    match crate::server::serve(&cfg, ready_file.as_deref(), &reload) {
        Ok(()) => ExitCode::SUCCESS,
        // A config error like any other: named by its key, status 2.
        Err(crate::server::ServeError::Tls(e)) => fail(
            EXIT_USAGE,
            format!("{}: {e}", source_name(config.as_deref())),
        ),
        Err(e @ crate::server::ServeError::Mirror(_)) => fail(
            EXIT_USAGE,
            format!("{}: {e}", source_name(config.as_deref())),
        ),
        Err(e) => fail(EXIT_RUNTIME, e),
    }
}

fn source_name(config: Option<&std::path::Path>) -> String {
    config.map_or_else(
        || "embedded default config".to_owned(),
        |p| p.display().to_string(),
    )
}

pub fn config_check(file: Option<PathBuf>) -> ExitCode {
    match Config::load(file.as_deref()) {
        Ok(cfg) => {
            // The TLS files are part of the config: read them as serve would.
            if let Err(e) = crate::server::tls::TlsSetup::load(&cfg.server.tls) {
                return fail(EXIT_USAGE, format!("{}: {e}", source_name(file.as_deref())));
            }
            out!("{}", crate::config::check_report(&cfg));
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_USAGE, e),
    }
}
