//! The README's examples, run as a new user runs them: the Quickstart,
//! Benchmarks and Exactly-once blocks, parsed from README.md itself (so
//! this fails when the README drifts from the binary), against `skiff
//! serve` started with no arguments in a fresh directory.
//!
//! What differs from a terminal, and why:
//! - the broker listens on a free port, and the commands find it through
//!   `SKIFF_BROKER` (9471 may be taken on this machine);
//! - `alias skiff=target/release/skiff` becomes the binary under test;
//! - `consume` runs with `--follow`, which is what it does at a terminal,
//!   so an example that would wait forever there fails here;
//! - benchmark sizes shrink (`--messages 2000`, 1 MiB of disk and loopback
//!   traffic) to keep a debug build quick; their flags are all kept.
//!
//! Every command gets two minutes; one that hangs fails the test, named by
//! the shell's trace.

mod common;

use std::process::{Command, Stdio};

use common::*;

/// The lines of the first ```sh block after the heading `## title`.
fn sh_block(readme: &str, title: &str) -> Vec<String> {
    let heading = format!("## {title}\n");
    let at = readme
        .find(&heading)
        .unwrap_or_else(|| panic!("README.md has no {heading:?}"));
    let rest = &readme[at..];
    let open = rest.find("```sh\n").expect("a ```sh block") + "```sh\n".len();
    let close = rest[open..].find("```").expect("a closing fence");
    rest[open..open + close]
        .lines()
        .map(str::to_owned)
        .collect()
}

/// One README line as the test runs it (see the module docs).
fn adapt(line: &str) -> Option<String> {
    if line.starts_with("alias skiff=") {
        return None;
    }
    let mut line = line.replace("skiff consume ", "skiff consume --follow ");
    for sub in ["skiff bench disk ", "skiff bench loopback"] {
        line = line.replace(sub, &format!("{} --bytes 1048576 ", sub.trim_end()));
    }
    if let Some(at) = line.find("--messages ") {
        let from = at + "--messages ".len();
        let digits = line[from..]
            .chars()
            .take_while(char::is_ascii_digit)
            .count();
        line.replace_range(from..from + digits, "2000");
    }
    Some(line)
}

#[test]
fn the_readme_examples_run_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let mut lines = Vec::new();
    for title in ["Quickstart", "Benchmarks", "Exactly-once produce"] {
        let block = sh_block(&readme, title);
        assert!(!block.is_empty(), "README.md's {title} block is empty");
        lines.extend(block.iter().filter_map(|l| adapt(l)));
    }
    assert!(
        lines.iter().any(|l| l.contains("skiff consume")),
        "the quickstart consumes"
    );

    let dir = temp_dir();
    let serve = DefaultServe::start(dir.path());
    let runner = std::env::var("SKIFF_TEST_RUNNER").unwrap_or_default();
    let script = format!(
        "set -euo pipefail\n\
         skiff() {{ timeout 120 {runner} {bin:?} \"$@\"; }}\n\
         set -x\n\
         {body}\n",
        bin = BIN,
        body = lines.join("\n"),
    );
    let o = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env("SKIFF_BROKER", &serve.addr)
        .stdin(Stdio::null())
        .output()
        .expect("running bash");
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(
        o.status.success(),
        "a README example failed ({}):\n--- script\n{script}\n--- stdout\n{out}\n--- stderr (the last + line is the command)\n{err}\n--- broker\n{}",
        o.status,
        serve.log()
    );
    // What the examples' comments promise.
    assert!(out.contains("disk_reserved: 64 MiB"), "{out}");
    assert!(err.contains("1 record dropped as duplicate"), "{err}");
    let keyed: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| l.starts_with('{') && l.contains("\"key\":\"dev-17\""))
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect();
    assert_eq!(keyed.len(), 2, "{out}");
    assert!(keyed.iter().all(|r| r["partition"] == 2), "{keyed:?}");
    assert!(
        !dir.path().join("skiff-data/skiff-bench").exists(),
        "the benches left their topic behind"
    );
}
