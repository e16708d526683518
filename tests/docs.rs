//! The documentation against the binary: the figures and messages that
//! docs/configuration.md shows are what `skiff` prints, its key tables are
//! the schema's keys and defaults, the commands and options the docs show
//! are the binary's, protocol.md's hello answer is what a broker sends,
//! and docs/, README.md
//! and scripts/ stand alone in a clone (no paths outside the repository).

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The lines of the first fenced block after `marker` in `text`.
fn block_after<'a>(text: &'a str, marker: &str) -> Vec<&'a str> {
    let at = text
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker:?} in the document"));
    let rest = &text[at..];
    let open = rest.find("```").expect("a fenced block after the marker");
    let body = &rest[open..];
    let body = &body[body.find('\n').expect("fence line") + 1..];
    let close = body.find("```").expect("a closing fence");
    body[..close].lines().collect()
}

/// `skiff config check FILE` after writing `text` to `file`.
fn run_check(file: &Path, text: &str) -> std::process::Output {
    std::fs::write(file, text).expect("writing a config");
    skiff_command()
        .args(["config", "check"])
        .arg(file)
        .output()
        .expect("running skiff")
}

/// `skiff config check` on a file holding `text`; its stdout.
fn config_check(dir: &Path, text: &str) -> String {
    let o = run_check(&dir.join("check.toml"), text);
    assert_ok(&o);
    stdout(&o)
}

/// The figure on the budget's total line: `#   31.0 MiB  total` gives
/// `31.0 MiB`.
fn total(report: &str) -> String {
    let line = report
        .lines()
        .find(|l| l.ends_with("  total"))
        .unwrap_or_else(|| panic!("no total line:\n{report}"));
    line.trim_start_matches('#')
        .trim()
        .trim_end_matches("total")
        .trim()
        .to_owned()
}

/// The table's figures and the budget's lines depend on the sizes of the
/// engine's structures, which differ on 32-bit targets; the docs show a
/// 64-bit build.
fn sizes_as_documented() -> bool {
    cfg!(target_pointer_width = "64")
}

#[test]
fn the_profile_table_is_what_config_check_prints() {
    if !sizes_as_documented() {
        return;
    }
    let doc = read("docs/configuration.md");
    let dir = temp_dir();
    let rows: Vec<&str> = doc
        .lines()
        .skip_while(|l| !l.starts_with("## Device profiles"))
        .skip_while(|l| !l.starts_with("| profile"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    let mut named = Vec::new();
    for row in &rows {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (name, figure) = (cells[1], cells[3]);
        let documented = figure.split(" (").next().expect("a figure");
        let text = match name.trim_matches('`') {
            "(none)" => String::new(),
            p => {
                named.push(p.to_owned());
                format!("profile = {p:?}\n")
            }
        };
        let printed = total(&config_check(dir.path(), &text));
        assert_eq!(
            documented, printed,
            "docs/configuration.md's row for {name} says {documented}, config check prints {printed}"
        );
    }
    let mut profiles: Vec<String> = skiff::config::profile_names()
        .into_iter()
        .map(str::to_owned)
        .collect();
    named.sort();
    profiles.sort();
    assert_eq!(named, profiles, "every profile has a row, and only they");
}

#[test]
fn the_budget_example_is_what_config_check_prints() {
    if !sizes_as_documented() {
        return;
    }
    let doc = read("docs/configuration.md");
    let shown = block_after(&doc, "For `gateway-256m`:");
    let dir = temp_dir();
    let report = config_check(dir.path(), "profile = \"gateway-256m\"\n");
    let printed = |heading: &str| -> Vec<&str> {
        report
            .lines()
            .skip_while(|l| !l.starts_with(heading))
            .take_while(|l| !l.is_empty())
            .collect()
    };
    assert_eq!(shown, printed("# memory budget"));
    let shown = block_after(&doc, "## The disk budget");
    assert_eq!(shown, printed("# disk budget"));
    // The prose quotes the embedded default's total.
    let default_total = total(&config_check(dir.path(), ""));
    assert!(
        doc.contains(&format!("worst-case memory {default_total} (")),
        "docs/configuration.md should quote the default's {default_total}"
    );
    assert!(
        read("README.md").contains(&format!("its config allows ({default_total})")),
        "README.md should quote the default's {default_total}"
    );
}

#[test]
fn the_documented_errors_are_what_skiff_prints() {
    let doc = read("docs/configuration.md");
    let shown = block_after(&doc, "## Errors");
    let dir = temp_dir();
    let file = dir.path().join("skiff.toml");
    let documented_path = "/etc/skiff/skiff.toml";
    let cases = [
        "data_dir = \"/var/lib/skiff\"\n[server]\nmax_conections = 3\n".to_owned(),
        "[storage]\nbakend = \"pwrite\"\n\n[server]\nmax_conections = 3\n".to_owned(),
        format!(
            "data_dir = \"/var/lib/skiff\"\n{}[topic_defaults]\nfsync = \"sometimes\"\n",
            "# a comment line\n".repeat(9)
        ),
        "[server]\nmax_connections = 8\nmax_topics = 8\nmax_frame_bytes = 65536\n".to_owned(),
    ];
    assert_eq!(shown.len(), cases.len(), "{shown:#?}");
    for (text, want) in cases.iter().zip(&shown) {
        let o = run_check(&file, text);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        let got = stderr(&o)
            .trim_end()
            .trim_start_matches("skiff: ")
            .replace(file.to_str().expect("utf-8 path"), documented_path);
        assert_eq!(&got, want);
    }
}

/// protocol.md's hello answer shows the server_version a broker sends.
#[test]
fn the_documented_hello_answer_is_what_a_broker_sends() {
    let b = Broker::start("");
    let info = skiff::client::blocking::Client::connect(&b.unix_addr())
        .expect("connect")
        .server_info()
        .expect("hello answer");
    let doc = read("docs/protocol.md");
    let version = format!("\"{}\"", info.server_version);
    assert!(
        doc.contains(&format!("e.g. `{version}`")),
        "protocol.md's hello table should show {version}"
    );
    assert!(
        doc.contains(&format!("[1, [1, [1, {version}, ")),
        "protocol.md's hello example should show {version}"
    );
}

/// Every file a user's clone has: docs/, README.md, scripts/, and the
/// sources and benches whose comments point readers somewhere.
fn shipped_files() -> Vec<PathBuf> {
    let mut out = vec![repo().join("README.md")];
    let mut dirs: Vec<PathBuf> = ["docs", "scripts", "src", "benches", "tests", "systemd"]
        .iter()
        .map(|d| repo().join(d))
        .collect();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("a directory of the repository") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[test]
fn nothing_points_outside_the_repository() {
    // Assembled, so that this file does not match itself.
    let outside = [format!("../{}/", "shared"), format!("/work/{}", "shared")];
    let private = format!("{}.md", "BENCHMARKING");
    let design = format!("{} card", "design");
    for path in shipped_files() {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let rel = path.strip_prefix(repo()).unwrap_or(&path);
        for (n, line) in text.lines().enumerate() {
            for bad in &outside {
                assert!(
                    !line.contains(bad.as_str()),
                    "{}:{}: points outside the repository: {line}",
                    rel.display(),
                    n + 1
                );
            }
        }
        // The user-facing documents also name no guide they cannot read.
        let user_facing =
            rel.starts_with("docs") || rel.starts_with("scripts") || rel == Path::new("README.md");
        if user_facing {
            for bad in [&private, &design] {
                assert!(
                    !text.contains(bad.as_str()),
                    "{} mentions {bad}, which a clone does not have",
                    rel.display()
                );
            }
        }
    }
}

/// The benchmark scripts explain themselves, and refuse what they do not
/// know with a pointer to --help.
#[test]
fn the_scripts_answer_help() {
    for script in [
        "scripts/bench-broker",
        "scripts/ab-broker",
        "scripts/bench-tls",
        "scripts/bench-mirror",
        "scripts/soak-mirror",
        "scripts/bench-recovery",
        "scripts/bench-fanin",
        "scripts/bench-instructions",
    ] {
        let o = std::process::Command::new(repo().join(script))
            .arg("--help")
            .output()
            .expect("running the script");
        assert_ok(&o);
        let help = stdout(&o);
        assert!(
            help.contains(&format!("  {script} ")),
            "usage line: {script}: {help}"
        );
        assert!(!help.contains("#!"), "{script}: {help}");
    }
    let o = std::process::Command::new(repo().join("scripts/bench-broker"))
        .arg("--no-such-flag")
        .output()
        .expect("running the script");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--help"), "{}", stderr(&o));
}

/// A config that sets one element of every list of tables, each with
/// only the keys it needs: the effective config then shows every key an
/// element has (those left out at their defaults).
const EVERY_LIST_OF_TABLES: &str = r#"
[[server.unix_identities]]
uid = 1000
identity = "collector"

[[acl.rules]]
identity = "dev-*"
topics = ["sensors.*"]
operations = ["produce"]

[[quotas.overrides]]
identity = "dev-*"
produce_bytes_per_s = 1000
consume_bytes_per_s = 1000

[[share.overrides]]
topic = "orders"
group = "billing"
max_deliveries = 3
lock_ms = 5000
dead_letter_topic = "orders-failed"

[mirror]
upstream = "127.0.0.1:9092"

[[mirror.rules]]
name = "temps"
source = "sensors.*"
target = "plant1.{topic}"
aggregate = { window_ms = 60000, fields = ["value"] }
"#;

/// The keys of an effective config by section (`mirror.rules` for a
/// rule's keys), with their values: a table or a list of tables is a key
/// of its section, and its (first element's) keys are those of its own.
fn config_keys(
    section: &str,
    table: &toml::Table,
    out: &mut std::collections::BTreeMap<(String, String), toml::Value>,
) {
    let path = |k: &str| match section {
        "" => k.to_owned(),
        s => format!("{s}.{k}"),
    };
    for (key, value) in table {
        match value {
            toml::Value::Table(inner) => {
                config_keys(&path(key), inner, out);
                out.insert((section.to_owned(), key.clone()), value.clone());
            }
            toml::Value::Array(items) => {
                if let Some(toml::Value::Table(first)) = items.first() {
                    config_keys(&path(key), first, out);
                }
                out.insert((section.to_owned(), key.clone()), value.clone());
            }
            _ => {
                out.insert((section.to_owned(), key.clone()), value.clone());
            }
        }
    }
}

/// Every key the schema takes, by section, as [`config_keys`] gives them.
fn schema_keys(dir: &Path) -> std::collections::BTreeMap<(String, String), toml::Value> {
    let mut keys = std::collections::BTreeMap::new();
    config_keys("", &effective_config(dir, EVERY_LIST_OF_TABLES), &mut keys);
    // Left out of the effective config while unset.
    keys.insert(("".into(), "profile".into()), toml::Value::from(""));
    keys
}

/// A field no config struct has.
const UNKNOWN_FIELD: &str = "no_such_field";

/// Every field an element of a list of tables takes, and a table inside
/// one (`mirror.rules.aggregate`), as `(section, field)`: the schema names
/// them all when it refuses an unknown field. Unlike the effective config,
/// this has the optional fields an element leaves out while unset.
fn list_element_fields(dir: &Path) -> std::collections::BTreeSet<(String, String)> {
    let every: toml::Table = toml::from_str(EVERY_LIST_OF_TABLES).expect("EVERY_LIST_OF_TABLES");
    let mut sections = Vec::new();
    element_tables(&every, &mut Vec::new(), false, &mut sections);
    let mut out = std::collections::BTreeSet::new();
    for path in sections {
        let section = path.join(".");
        let mut config = every.clone();
        element_at(&mut config, &path).insert(UNKNOWN_FIELD.into(), toml::Value::from(0));
        let text = toml::to_string(&config).expect("a config as TOML");
        let said = stderr(&run_check(&dir.join("unknown.toml"), &text));
        let expected = said
            .split_once(&format!("unknown field `{UNKNOWN_FIELD}`, expected "))
            .unwrap_or_else(|| panic!("[{section}] refuses an unknown field: {said}"))
            .1;
        let expected = expected.lines().next().unwrap_or_default();
        let expected = expected.split(" (line").next().unwrap_or_default();
        for field in expected.split('`').skip(1).step_by(2) {
            out.insert((section.clone(), field.to_owned()));
        }
    }
    assert!(!out.is_empty(), "no list of tables in EVERY_LIST_OF_TABLES");
    out
}

/// The lists of tables the default config has (empty) that
/// EVERY_LIST_OF_TABLES gives no element: their elements' fields would go
/// unchecked. A list takes tables where the schema refuses an unknown
/// field in one.
fn lists_of_tables_left_out(
    dir: &Path,
    defaults: &std::collections::BTreeMap<(String, String), toml::Value>,
) -> Vec<String> {
    let every: toml::Table = toml::from_str(EVERY_LIST_OF_TABLES).expect("EVERY_LIST_OF_TABLES");
    let mut out = Vec::new();
    for ((section, key), value) in defaults {
        if value.as_array().is_none_or(|a| !a.is_empty()) {
            continue;
        }
        let list = format!("{key} = [{{ {UNKNOWN_FIELD} = 0 }}]\n");
        let text = match section.as_str() {
            "" => list,
            s => format!("[{s}]\n{list}"),
        };
        let said = stderr(&run_check(&dir.join("list.toml"), &text));
        let takes_tables = said.contains(&format!("unknown field `{UNKNOWN_FIELD}`"));
        let path: Vec<&str> = section.split('.').filter(|s| !s.is_empty()).collect();
        let given = path
            .iter()
            .try_fold(&every, |t, p| t.get(*p)?.as_table())
            .and_then(|t| t.get(key)?.as_array())
            .is_some_and(|a| !a.is_empty());
        if takes_tables && !given {
            out.push(
                format!("{section}.{key}")
                    .trim_start_matches('.')
                    .to_owned(),
            );
        }
    }
    out
}

/// The paths of the elements of the lists of tables in `table` (of the
/// first element of each) and of the tables inside them.
fn element_tables(
    table: &toml::Table,
    path: &mut Vec<String>,
    in_element: bool,
    out: &mut Vec<Vec<String>>,
) {
    for (key, value) in table {
        path.push(key.clone());
        match value {
            toml::Value::Array(items) => {
                if let Some(toml::Value::Table(first)) = items.first() {
                    out.push(path.clone());
                    element_tables(first, path, true, out);
                }
            }
            toml::Value::Table(inner) => {
                if in_element {
                    out.push(path.clone());
                }
                element_tables(inner, path, in_element, out);
            }
            _ => {}
        }
        path.pop();
    }
}

/// The table at `path` (a list's first element where it names a list).
fn element_at<'a>(table: &'a mut toml::Table, path: &[String]) -> &'a mut toml::Table {
    let Some((first, rest)) = path.split_first() else {
        return table;
    };
    let inner = match table.get_mut(first) {
        Some(toml::Value::Array(items)) => items.first_mut(),
        other => other,
    };
    match inner {
        Some(toml::Value::Table(t)) => element_at(t, rest),
        _ => panic!("no table at {first}"),
    }
}

/// What `skiff config check` prints for `text`, as TOML (the budgets are
/// comments).
fn effective_config(dir: &Path, text: &str) -> toml::Table {
    toml::from_str(&config_check(dir, text)).expect("config check prints TOML")
}

/// docs/configuration.md's key tables: `(section, key)` to the row's
/// default and meaning cells. A section starts at a heading, or a line,
/// that opens with its name (`` `[server.tls]` ``, `` `[[mirror.rules]]` ``);
/// "Top level" is the keys outside any section. A row may name several
/// keys (`` `cert`, `key` ``).
fn documented_keys(doc: &str) -> std::collections::BTreeMap<(String, String), (String, String)> {
    let mut out = std::collections::BTreeMap::new();
    let mut section: Option<String> = None;
    let name_in = |line: &str| -> Option<String> {
        let inner = line.split('`').nth(1)?;
        let name = inner.trim_start_matches('[').trim_end_matches(']');
        (inner.starts_with('[') && !name.is_empty()).then(|| name.to_owned())
    };
    for line in doc.lines() {
        if line.starts_with('#') {
            section = if line.trim_start_matches('#').trim() == "Top level" {
                Some(String::new())
            } else {
                name_in(line.trim_start_matches('#').trim())
            };
        } else if line.starts_with("`[") {
            section = name_in(line);
        } else if let (Some(s), true) = (&section, line.starts_with("| `")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            for key in cells[1].split('`').skip(1).step_by(2) {
                out.insert(
                    (s.clone(), key.to_owned()),
                    (cells[2].to_owned(), cells[3].to_owned()),
                );
            }
        }
    }
    out
}

/// Every key the schema takes is in docs/configuration.md with the
/// default the embedded default really has, and every key documented
/// there is one the schema takes. The keys come from the effective
/// config `skiff config check` prints (the config structs, serialized),
/// and the fields of list elements from the schema's refusal of an unknown
/// one (an optional field is left out of the effective config while
/// unset), so a new key fails this until it is documented.
#[test]
fn every_config_key_is_documented_with_its_default() {
    let doc = read("docs/configuration.md");
    let documented = documented_keys(&doc);
    let dir = temp_dir();
    let mut defaults = std::collections::BTreeMap::new();
    config_keys("", &effective_config(dir.path(), ""), &mut defaults);
    let keys = schema_keys(dir.path());
    // A list's element may also be documented in the list's own row.
    let in_list_row = |section: &str, key: &str| {
        let (parent, list) = section.rsplit_once('.').unwrap_or(("", section));
        documented
            .get(&(parent.to_owned(), list.to_owned()))
            .is_some_and(|(_, meaning)| {
                meaning.contains(&format!("`{key}`")) || meaning.contains(&format!("`{key} ="))
            })
    };
    let mut problems = Vec::new();
    for ((section, key), value) in &keys {
        let dotted = if section.is_empty() {
            key.clone()
        } else {
            format!("{section}.{key}")
        };
        let Some((default, _)) = documented.get(&(section.clone(), key.clone())) else {
            // A section has its own heading, not a row.
            if !in_list_row(section, key) && !value.is_table() {
                problems.push(format!("{dotted} is not documented"));
            }
            continue;
        };
        // A default is a TOML value in backticks ("unset", "required" and
        // "none" are words); an element's keys are at their defaults
        // unless EVERY_LIST_OF_TABLES sets them, and are then "required".
        let Some(literal) = default.strip_prefix('`').and_then(|d| d.strip_suffix('`')) else {
            continue;
        };
        let shown: toml::Table = toml::from_str(&format!("v = {literal}"))
            .unwrap_or_else(|e| panic!("{dotted}'s default `{literal}`: {e}"));
        let actual = defaults
            .get(&(section.clone(), key.clone()))
            .unwrap_or(value);
        if &shown["v"] != actual {
            problems.push(format!(
                "{dotted}: documented default {literal}, the code's is {actual}"
            ));
        }
    }
    // The fields of list elements the effective config leaves out while
    // unset (optional ones EVERY_LIST_OF_TABLES does not set), of every
    // list of tables there is.
    let fields = list_element_fields(dir.path());
    for list in lists_of_tables_left_out(dir.path(), &defaults) {
        problems.push(format!("EVERY_LIST_OF_TABLES has no element of {list}"));
    }
    for (section, key) in &fields {
        let at = (section.clone(), key.clone());
        if !keys.contains_key(&at) && !documented.contains_key(&at) && !in_list_row(section, key) {
            problems.push(format!("{section}.{key} is not documented"));
        }
    }
    for (section, key) in documented.keys() {
        let at = (section.clone(), key.clone());
        if !keys.contains_key(&at) && !fields.contains(&at) {
            problems.push(format!(
                "docs/configuration.md documents [{section}] {key}, which the schema does not take"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// What `skiff PATH --help` prints.
fn help_text(path: &[&str]) -> String {
    let o = skiff_command()
        .args(path)
        .arg("--help")
        .output()
        .expect("running skiff");
    assert_ok(&o);
    stdout(&o)
}

/// `skiff PATH --help`'s subcommands and long options.
fn help_of(path: &[&str]) -> (Vec<String>, Vec<String>) {
    let help = help_text(path);
    let section = |name: &str| -> Vec<String> {
        help.lines()
            .skip_while(|l| *l != name)
            .skip(1)
            .take_while(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let commands = section("Commands:")
        .iter()
        .filter(|l| l.starts_with("  ") && !l[2..].starts_with(' '))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect();
    let options = section("Options:")
        .iter()
        .filter(|l| l.trim_start().starts_with('-') && l.len() - l.trim_start().len() <= 6)
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("--")))
        .map(|w| w.trim_end_matches(',').to_owned())
        .collect();
    (commands, options)
}

/// The long options of `skiff PATH --help` that have no text of their own
/// (only a `[default: ...]`, or nothing).
fn options_without_help(path: &[&str]) -> Vec<String> {
    let help = help_text(path);
    let mut texts: Vec<(String, String)> = Vec::new();
    let section = help.lines().skip_while(|l| *l != "Options:").skip(1);
    for line in section.take_while(|l| !l.is_empty()) {
        let line = line.trim_start();
        // clap puts the text after two spaces, or on the lines below.
        let (flags, text) = line.split_once("  ").unwrap_or((line, ""));
        match flags.split_whitespace().find(|w| w.starts_with("--")) {
            Some(option) if line.starts_with('-') => texts.push((option.into(), text.into())),
            _ => texts.last_mut().expect("option first").1 += line,
        }
    }
    texts
        .into_iter()
        .filter(|(_, text)| text.trim().is_empty() || text.trim().starts_with('['))
        .map(|(option, _)| option.trim_end_matches(',').to_owned())
        .collect()
}

/// Each option of every command says what it does in `--help`.
#[test]
fn every_commands_options_have_help() {
    let missing: Vec<_> = cli_commands()
        .into_keys()
        .map(|path| {
            let words: Vec<&str> = path.split_whitespace().collect();
            let options = options_without_help(&words);
            (path, options)
        })
        .filter(|(_, options)| !options.is_empty())
        .collect();
    assert!(missing.is_empty(), "options without help: {missing:?}");
}

/// Every command path `skiff --help` leads to, with its long options.
fn cli_commands() -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![Vec::<String>::new()];
    while let Some(path) = todo.pop() {
        let words: Vec<&str> = path.iter().map(String::as_str).collect();
        let (commands, options) = help_of(&words);
        for c in commands {
            let mut sub = path.clone();
            sub.push(c);
            todo.push(sub);
        }
        out.insert(path.join(" "), options);
    }
    out
}

/// The code in a markdown text: each line of a fenced block (without a
/// trailing `# comment`), and each inline span (joined across lines).
fn code_spans(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, part) in text.split("```").enumerate() {
        if i % 2 == 1 {
            let body = part.split_once('\n').map_or("", |(_, b)| b);
            out.extend(
                body.lines()
                    .map(|l| l.split(" #").next().unwrap_or(l).to_owned()),
            );
        } else {
            out.extend(
                part.split('`')
                    .skip(1)
                    .step_by(2)
                    .map(|s| s.replace('\n', " ")),
            );
        }
    }
    out
}

/// Every `skiff` command a user's docs show is one the binary has, with
/// options it takes, and every command the binary has is shown at least
/// once (README.md and docs/; `skiff CMD --help` has the rest).
#[test]
fn the_documented_commands_and_options_are_the_binarys() {
    let commands = cli_commands();
    let mut docs = vec![("README.md".to_owned(), read("README.md"))];
    for entry in std::fs::read_dir(repo().join("docs")).expect("docs/") {
        let path = entry.expect("an entry of docs/").path();
        if path.extension().is_some_and(|e| e == "md") {
            let rel = format!("docs/{}", path.file_name().unwrap().to_string_lossy());
            docs.push((rel.clone(), read(&rel)));
        }
    }
    let mut shown = std::collections::BTreeSet::new();
    let mut problems = Vec::new();
    for (file, text) in &docs {
        for span in code_spans(text) {
            let words: Vec<&str> = span.split_whitespace().collect();
            for (at, _) in words.iter().enumerate().filter(|(_, w)| **w == "skiff") {
                let rest = &words[at + 1..];
                // The longest command path the words name.
                let mut path = String::new();
                let mut used = 0;
                for (n, w) in rest.iter().enumerate() {
                    let longer = if path.is_empty() {
                        (*w).to_owned()
                    } else {
                        format!("{path} {w}")
                    };
                    if !commands.contains_key(&longer) {
                        break;
                    }
                    (path, used) = (longer, n + 1);
                }
                match rest.first() {
                    Some(w) if used == 0 && w.starts_with(|c: char| c.is_ascii_lowercase()) => {
                        problems.push(format!("{file}: `{span}`: no command skiff {w}"));
                        continue;
                    }
                    _ => {}
                }
                shown.insert(path.clone());
                let options = &commands[&path];
                for w in &rest[used..] {
                    if ["|", "&&", ";", "--", "skiff"].contains(w) || w.starts_with('#') {
                        break;
                    }
                    let Some(flag) = w.strip_prefix("--") else {
                        continue;
                    };
                    let flag = format!(
                        "--{}",
                        flag.split(['=', ',', ')', ']', '`']).next().unwrap_or(flag)
                    );
                    if !options.contains(&flag) {
                        problems.push(format!("{file}: `{span}`: skiff {path} has no {flag}"));
                    }
                }
            }
        }
    }
    for (path, _) in commands.iter().filter(|(p, _)| !p.is_empty()) {
        let leaf = !commands.keys().any(|k| k.starts_with(&format!("{path} ")));
        if leaf && !shown.contains(path) {
            problems.push(format!("skiff {path} is in no document"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A dotted key the docs name in code (`` `server.max_connections` ``)
/// is one the schema takes, wherever it is named.
#[test]
fn every_dotted_config_key_the_docs_name_is_the_schemas() {
    let dir = temp_dir();
    let keys: std::collections::BTreeSet<String> = schema_keys(dir.path())
        .into_keys()
        .map(|(section, key)| match section.as_str() {
            "" => key,
            s => format!("{s}.{key}"),
        })
        .collect();
    let sections: std::collections::BTreeSet<&str> = keys
        .iter()
        .filter_map(|k| k.split_once('.'))
        .map(|(s, _)| s)
        .collect();
    // Files, not keys: `server.pem`, `acl.rs`.
    let files = [
        "pem", "key", "csr", "crt", "der", "toml", "md", "rs", "meta", "snap",
    ];
    // Kafka's, named beside skiff's.
    let kafka = ["share.auto.offset.reset"];
    let mut problems = Vec::new();
    for file in ["README.md".to_owned()].into_iter().chain(
        std::fs::read_dir(repo().join("docs"))
            .expect("docs/")
            .map(|e| {
                format!(
                    "docs/{}",
                    e.expect("an entry").file_name().to_string_lossy()
                )
            })
            .filter(|f| f.ends_with(".md")),
    ) {
        for span in code_spans(&read(&file)) {
            let Some((section, rest)) = span.split_once('.') else {
                continue;
            };
            let dotted = span
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.');
            let last = rest.rsplit('.').next().unwrap_or(rest);
            if dotted
                && sections.contains(section)
                && !files.contains(&last)
                && !kafka.contains(&span.as_str())
                && !keys.contains(&span)
            {
                problems.push(format!("{file}: `{span}` is no config key"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
