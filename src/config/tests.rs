use std::path::{Path, PathBuf};

use super::*;

const MIB: u64 = 1024 * 1024;

/// Writes `text` to a file named `name` in a fresh temp dir.
fn write_config(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

fn load_text(name: &str, text: &str) -> Result<Config, ConfigError> {
    let (_dir, path) = write_config(name, text);
    Config::load(Some(&path))
}

#[test]
fn embedded_default_is_valid_and_matches_the_documented_values() {
    let cfg = Config::embedded_default();
    assert_eq!(cfg.data_dir, PathBuf::from("./skiff-data"));
    assert_eq!(cfg.profile, None);
    assert_eq!(cfg.server.listen, format!("127.0.0.1:{DEFAULT_PORT}"));
    assert_eq!(cfg.server.unix_socket, "./skiff.sock");
    assert_eq!(cfg.server.max_connections, 64);
    assert_eq!(cfg.server.max_frame_bytes, 135_168);
    assert_eq!(cfg.server.max_inflight_bytes_per_connection, 272 * 1024);
    assert_eq!(cfg.server.max_topics, 32);
    assert_eq!(cfg.server.max_partitions, 64);
    assert_eq!(cfg.storage.disk_budget_bytes, 2048 * MIB);
    assert_eq!(cfg.storage.backend, StorageBackend::Auto);
    assert_eq!(cfg.storage.append_queue_depth, 64);
    assert_eq!(cfg.storage.tail_buffer_bytes, 128 * 1024);
    assert_eq!(cfg.storage.max_batch_bytes, 128 * 1024);
    assert!(cfg.storage.prewrite_segments);
    assert_eq!(cfg.topic_defaults.partitions, 1);
    assert_eq!(cfg.topic_defaults.segment_bytes, 16 * MIB);
    assert_eq!(cfg.topic_defaults.segments, 4);
    assert_eq!(cfg.default_retention(), None);
    assert_eq!(cfg.topic_defaults.fsync, FsyncPolicy::Always);
    assert_eq!(cfg.topic_defaults.overflow, OverflowPolicy::Overwrite);
    assert_eq!(cfg.producers.max_producers, 1024);
    assert_eq!(cfg.producers.idle_expiry_ms, 604_800_000);
    assert_eq!(cfg.producers.name_expiry_ms, 604_800_000);
    assert_eq!(cfg.groups.max_groups, 8);
    assert_eq!(cfg.groups.max_members, 24);
    assert_eq!(cfg.groups.max_members_per_group, 24);
    assert_eq!(cfg.groups.max_offset_metadata_bytes, 256);
    assert_eq!(cfg.transactions.max_transactional_ids, 64);
    assert_eq!(cfg.transactions.max_open, 8);
    assert_eq!(cfg.transactions.id_expiration_ms, 86_400_000);
    assert_eq!(cfg.metrics.listen, "");
    assert_eq!(cfg.metrics_listen(), None);
    assert_eq!(cfg.log.level, "info");
    assert_eq!(Config::load(None).expect("load None"), cfg);
}

#[test]
fn a_file_overrides_only_the_keys_it_sets() {
    let cfg = load_text(
        "skiff.toml",
        "data_dir = \"/var/lib/skiff\"\n[server]\nmax_connections = 8\n[topic_defaults]\nfsync = \"interval:250\"\n",
    )
    .expect("valid");
    assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/skiff"));
    assert_eq!(cfg.server.max_connections, 8);
    assert_eq!(cfg.topic_defaults.fsync, FsyncPolicy::IntervalMs(250));
    // Untouched keys keep the embedded default.
    assert_eq!(cfg.server.max_topics, 32);
    assert_eq!(cfg.storage.append_queue_depth, 64);
}

#[test]
fn unknown_key_names_file_dotted_key_and_line() {
    let err = load_text(
        "skiff-bad.toml",
        "data_dir = \"x\"\n[server]\nmax_conections = 3\n",
    )
    .expect_err("typo must be rejected");
    assert!(matches!(err.kind, ConfigErrorKind::UnknownKey(ref k) if k == "server.max_conections"));
    assert_eq!(err.line, Some(3));
    let shown = err.to_string();
    assert!(
        shown.ends_with(
            "skiff-bad.toml: unknown key 'server.max_conections' (line 3); \
             did you mean 'server.max_connections'?"
        ),
        "{shown}"
    );
}

/// Only the first unknown key used to be reported, so a file with three
/// typos took three runs of `skiff config check`. Every one is, in file
/// order, each with its line and hint.
#[test]
fn every_unknown_key_is_reported_at_once() {
    let err = load_text(
        "skiff-bad.toml",
        "data_dir = \"x\"\nqqqq = 1\n[storage]\nbakend = \"pwrite\"\n\
         [server]\nmax_conections = 3\nmax_topics = 8\n[sever]\nlisten = \"\"\n",
    )
    .expect_err("typos must be rejected");
    let all: Vec<_> = std::iter::once(&err).chain(&err.more).collect();
    let got: Vec<_> = all
        .iter()
        .map(|e| (e.key(), e.line, e.did_you_mean.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            (Some("qqqq"), Some(2), None),
            (Some("storage.bakend"), Some(4), Some("storage.backend")),
            (
                Some("server.max_conections"),
                Some(6),
                Some("server.max_connections")
            ),
            (Some("sever"), Some(8), Some("server")),
        ]
    );
    assert!(all
        .iter()
        .all(|e| matches!(e.kind, ConfigErrorKind::UnknownKey(_))));
    let shown = err.to_string();
    assert!(
        shown.ends_with(
            "skiff-bad.toml: unknown key 'qqqq' (line 2); also unknown key 'storage.bakend' \
         (line 4); did you mean 'storage.backend'?; also unknown key 'server.max_conections' \
         (line 6); did you mean 'server.max_connections'?; also unknown key 'sever' (line 8); \
         did you mean 'server'?"
        ),
        "{shown}"
    );
}

#[test]
fn an_unknown_key_names_the_key_probably_meant_if_any() {
    let meant = |text: &str| load_text("a.toml", text).expect_err(text).did_you_mean;
    // The same name in another section.
    assert_eq!(
        meant("[server]\nfsync = \"always\"\n").as_deref(),
        Some("topic_defaults.fsync")
    );
    // A near spelling, section or key.
    assert_eq!(meant("[sever]\n").as_deref(), Some("server"));
    assert_eq!(
        meant("[storage]\nbakend = \"pwrite\"\n").as_deref(),
        Some("storage.backend")
    );
    // Nothing close.
    assert_eq!(meant("[server]\nzzzzzzzzzzzz = 1\n"), None);
    assert_eq!(meant("qqqq = 1\n"), None);
}

#[test]
fn unknown_section_and_dotted_keys_are_found() {
    let err = load_text("a.toml", "[sever]\nlisten = \"\"\n").expect_err("unknown table");
    assert_eq!(err.key(), Some("sever"));
    assert_eq!(err.line, Some(1));

    let err = load_text("b.toml", "\n\nstorage.bakend = \"pwrite\"\n").expect_err("dotted typo");
    assert_eq!(err.key(), Some("storage.bakend"));
    assert_eq!(err.line, Some(3));

    let err = load_text("c.toml", "server = { listen = \"\", nope = 1 }\n").expect_err("inline");
    assert_eq!(err.key(), Some("server.nope"));
}

#[test]
fn bad_values_name_the_key_and_line() {
    let err =
        load_text("f.toml", "[topic_defaults]\n\nfsync = \"sometimes\"\n").expect_err("bad fsync");
    assert!(
        matches!(err.kind, ConfigErrorKind::BadValue { .. }),
        "{err}"
    );
    assert_eq!(err.key(), Some("topic_defaults.fsync"));
    assert_eq!(err.line, Some(3));
    assert!(err.to_string().contains("interval:<ms>"), "{err}");

    let err = load_text("g.toml", "[server]\nmax_connections = \"many\"\n").expect_err("type");
    assert_eq!(err.key(), Some("server.max_connections"));
    assert_eq!(err.line, Some(2));

    let err = load_text("h.toml", "[server]\nmax_connections = -1\n").expect_err("negative");
    assert_eq!(err.key(), Some("server.max_connections"));

    let err = load_text("i.toml", "[storage]\nbackend = \"uring\"\n").expect_err("backend");
    assert_eq!(err.key(), Some("storage.backend"));
}

#[test]
fn syntax_errors_give_a_line() {
    let err = load_text("s.toml", "[server]\nlisten = \"127.0.0.1:1\n").expect_err("syntax");
    assert!(matches!(err.kind, ConfigErrorKind::Syntax(_)), "{err}");
    assert_eq!(err.line, Some(2));
    assert!(err.to_string().contains("s.toml: not valid TOML"), "{err}");
}

#[test]
fn missing_file_is_an_io_error() {
    let err = Config::load(Some(Path::new("/nonexistent/skiff.toml"))).expect_err("missing");
    assert!(matches!(err.kind, ConfigErrorKind::Io(_)));
    assert!(err
        .to_string()
        .starts_with("/nonexistent/skiff.toml: cannot read"));
}

/// Each case: (TOML, key the error must name).
const INVALID: &[(&str, &str)] = &[
    ("data_dir = \"\"", "data_dir"),
    ("[server]\nlisten = \"localhost:9471\"", "server.listen"),
    (
        "[server]\nlisten = \"\"\nunix_socket = \"\"",
        "server.listen",
    ),
    ("[server]\nmax_connections = 0", "server.max_connections"),
    (
        "[server]\nmax_frame_bytes = 131072",
        "server.max_frame_bytes",
    ),
    (
        "[server]\nmax_inflight_bytes_per_connection = 4096",
        "server.max_inflight_bytes_per_connection",
    ),
    (
        "[server]\nmax_inflight_bytes_shared = 2147483648",
        "server.max_inflight_bytes_shared",
    ),
    ("[server]\nmax_topics = 0", "server.max_topics"),
    (
        "[groups]\nmax_offset_metadata_bytes = 4097",
        "groups.max_offset_metadata_bytes",
    ),
    ("[groups]\nmax_members = 0", "groups.max_members"),
    (
        "[transactions]\nmax_transactional_ids = 4\nmax_open = 5",
        "transactions.max_open",
    ),
    (
        "[transactions]\nid_expiration_ms = 999",
        "transactions.id_expiration_ms",
    ),
    ("[server]\nmax_partitions = 8", "server.max_partitions"),
    (
        "[storage]\ndisk_budget_bytes = 1048576",
        "storage.disk_budget_bytes",
    ),
    (
        "[storage]\ntail_buffer_bytes = 65536",
        "storage.tail_buffer_bytes",
    ),
    (
        "[storage]\nappend_queue_depth = 0",
        "storage.append_queue_depth",
    ),
    (
        "[storage]\ntail_buffer_bytes = 5000",
        "storage.tail_buffer_bytes",
    ),
    // Allocated whole: a value past memory aborted the broker at its first
    // topic create and every start after (QA report, finding 6).
    (
        "[storage]\ntail_buffer_bytes = 4096000000000",
        "storage.tail_buffer_bytes",
    ),
    (
        "[compaction]\nkey_map_bytes = 4096000000000",
        "compaction.key_map_bytes",
    ),
    (
        "[server]\nmax_inflight_bytes_per_connection = 4096000000000",
        "server.max_inflight_bytes_per_connection",
    ),
    ("[storage]\nmax_batch_bytes = 10", "storage.max_batch_bytes"),
    (
        "[topic_defaults]\npartitions = 0",
        "topic_defaults.partitions",
    ),
    (
        "[topic_defaults]\npartitions = 1000",
        "topic_defaults.partitions",
    ),
    (
        "[topic_defaults]\nsegment_bytes = 100000",
        "topic_defaults.segment_bytes",
    ),
    (
        "[topic_defaults]\nsegment_bytes = 32768",
        "topic_defaults.segment_bytes",
    ),
    (
        "[topic_defaults]\nsegment_bytes = 131072",
        "topic_defaults.segment_bytes",
    ),
    (
        "[topic_defaults]\nsegment_bytes = 2147483648",
        "topic_defaults.segment_bytes",
    ),
    ("[topic_defaults]\nsegments = 1", "topic_defaults.segments"),
    (
        "[topic_defaults]\nfsync = \"interval:0\"",
        "topic_defaults.fsync",
    ),
    (
        "[topic_defaults]\nfsync = \"interval:x\"",
        "topic_defaults.fsync",
    ),
    (
        "[topic_defaults]\noverflow = \"drop\"",
        "topic_defaults.overflow",
    ),
    ("[producers]\nmax_producers = 0", "producers.max_producers"),
    (
        "[producers]\nidle_expiry_ms = 0",
        "producers.idle_expiry_ms",
    ),
    (
        "[producers]\nname_expiry_ms = 999",
        "producers.name_expiry_ms",
    ),
    ("[metrics]\nlisten = \"9472\"", "metrics.listen"),
    ("[metrics]\nlisten = \"127.0.0.1:9471\"", "metrics.listen"),
    ("[log]\nlevel = \"verbose\"", "log.level"),
    ("[log]\nlevel = \"warn,skiff=loud\"", "log.level"),
];

#[test]
fn every_rule_names_its_key() {
    for (text, key) in INVALID {
        let err = load_text("bad.toml", text)
            .err()
            .unwrap_or_else(|| panic!("accepted invalid config:\n{text}"));
        assert_eq!(err.key(), Some(*key), "for:\n{text}\ngot: {err}");
        assert!(err.to_string().contains(key), "{err}");
        // The file sets the key, so the error points into the file.
        assert!(err.to_string().contains("bad.toml"), "{err}");
    }
}

#[test]
fn valid_edge_values_are_accepted() {
    for text in [
        "[server]\nlisten = \"[::1]:9471\"",
        "[server]\nlisten = \"\"\nunix_socket = \"/run/skiff/skiff.sock\"",
        "[topic_defaults]\nfsync = \"never\"\nretention_ms = 3600000\noverflow = \"reject\"",
        "[topic_defaults]\nsegment_bytes = 135168\nsegments = 2",
        "[storage]\nbackend = \"io_uring\"",
        "[storage]\nbackend = \"pwrite\"",
        "[log]\nlevel = \"warn, skiff::storage=debug\"",
        "[log]\nlevel = \"TRACE\"",
    ] {
        if let Err(e) = load_text("ok.toml", text) {
            panic!("rejected valid config:\n{text}\n{e}");
        }
    }
}

#[test]
fn effective_config_round_trips() {
    let cfg = load_text(
        "r.toml",
        "profile = \"pi4-sd\"\n[topic_defaults]\nfsync = \"interval:100\"\n[server]\nlisten = \"[::1]:1\"\n",
    )
    .expect("valid");
    let text = cfg.to_toml_string();
    assert!(text.contains("fsync = \"interval:100\""), "{text}");
    assert!(text.contains("profile = \"pi4-sd\""), "{text}");
    let again = load_text("again.toml", &text).expect("effective config reloads");
    assert_eq!(again, cfg);
    let default_text = Config::embedded_default().to_toml_string();
    assert_eq!(
        load_text("d.toml", &default_text).expect("reload"),
        Config::embedded_default()
    );
}

#[test]
fn profile_from_file_is_layered_under_the_file() {
    let cfg = load_text(
        "p.toml",
        "profile = \"gateway-256m\"\ndata_dir = \"/var/lib/skiff\"\n[server]\nmax_connections = 4\n",
    )
    .expect("valid");
    let profile = Config::with_profile("gateway-256m").expect("profile");
    assert_eq!(cfg.profile.as_deref(), Some("gateway-256m"));
    // From the file:
    assert_eq!(cfg.server.max_connections, 4);
    assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/skiff"));
    // From the profile:
    assert_eq!(cfg.server.max_topics, profile.server.max_topics);
    assert_eq!(
        cfg.metrics.listen,
        format!("127.0.0.1:{DEFAULT_METRICS_PORT}")
    );
    // From the embedded default (profiles have no data_dir):
    assert_eq!(profile.data_dir, Config::embedded_default().data_dir);
}

#[test]
fn profile_argument_wins_over_the_file_key() {
    let (_dir, path) = write_config("q.toml", "profile = \"pi5-nvme\"\n");
    let cfg = Config::load_layers(Some(&path), Some("pi-zero-2w")).expect("valid");
    assert_eq!(cfg.profile.as_deref(), Some("pi-zero-2w"));
    assert_eq!(
        cfg.server.max_partitions,
        Config::with_profile("pi-zero-2w")
            .expect("p")
            .server
            .max_partitions
    );
}

#[test]
fn unknown_profile_is_named() {
    let err = load_text("u.toml", "\nprofile = \"pi3\"\n").expect_err("unknown");
    assert!(matches!(err.kind, ConfigErrorKind::UnknownProfile(ref n) if n == "pi3"));
    assert_eq!(err.line, Some(2));
    assert!(
        err.to_string().contains("pi4-sd"),
        "lists the available ones: {err}"
    );
    assert!(Config::with_profile("nope").is_err());
}

#[test]
fn errors_from_a_profile_value_are_attributed_to_the_file_that_set_it() {
    // The file sets a value that conflicts with the profile's batch size:
    // the error points at the file's key.
    let err = load_text(
        "conflict.toml",
        "profile = \"gateway-256m\"\n[server]\nmax_frame_bytes = 65536\n",
    )
    .expect_err("frame smaller than the profile's batch");
    assert_eq!(err.key(), Some("server.max_frame_bytes"));
    assert_eq!(err.line, Some(3));
    assert!(err.to_string().contains("conflict.toml: invalid"), "{err}");
}

/// Worst-case memory each profile must fit, in bytes: an eighth of the
/// smallest RAM the profile targets (the 256 MiB gateway: 32 MiB; the
/// development profile: a 16 GiB workstation). A new profile must add its
/// limit here; the test below fails until it does.
const PROFILE_BUDGET_BYTES_MAX: &[(&str, u64)] = &[
    ("dev", 2048 * MIB),
    ("gateway-256m", 32 * MIB),
    ("pi-zero-2w", 64 * MIB),
    ("pi4-sd", 128 * MIB),
    ("pi5-nvme", 256 * MIB),
];

#[test]
fn every_profile_file_is_embedded_valid_and_fits_its_device() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware-config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("firmware-config/ exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        seen += 1;
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("utf-8 name");
        let on_disk = std::fs::read_to_string(&path).expect("read profile");
        assert_eq!(
            profile_text(name),
            Some(on_disk.as_str()),
            "firmware-config/{name}.toml is not in config::PROFILES (or differs from it)"
        );
        let cfg = Config::with_profile(name).unwrap_or_else(|e| panic!("{e}"));
        // A service on a board is watched; the development profile leaves
        // metrics off so brokers can run side by side.
        assert_eq!(
            cfg.metrics_listen().is_some(),
            name != "dev",
            "profile {name} must turn metrics on (dev: off)"
        );
        let max = PROFILE_BUDGET_BYTES_MAX
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, b)| *b)
            .unwrap_or_else(|| panic!("add profile {name} to PROFILE_BUDGET_BYTES_MAX"));
        // What passes here, storage accepts: `skiff serve --profile` starts.
        crate::broker::storage_config(&cfg)
            .validate()
            .unwrap_or_else(|e| panic!("profile {name}: storage refuses it: {e}"));
        crate::broker::partition_defaults(&cfg)
            .validate()
            .unwrap_or_else(|e| panic!("profile {name}: storage refuses its topics: {e}"));
        let budget = cfg.memory_budget();
        assert!(
            budget.total_bytes() <= max,
            "profile {name} needs {} worst case, more than {}:\n{budget}",
            budget::human(budget.total_bytes()),
            budget::human(max)
        );
    }
    assert_eq!(seen, PROFILES.len(), "every embedded profile has its file");
}

/// Profiles are embedded, so their layer check is exercised directly.
fn profile_error(text: &str) -> ConfigError {
    Layer::parse(Origin::Profile("x".into()), text.to_string())
        .err()
        .expect("rejected")
}

#[test]
fn a_profile_may_not_set_data_dir() {
    let err = profile_error("\ndata_dir = \"/tmp\"\n");
    assert!(matches!(err.kind, ConfigErrorKind::NotAllowedInProfile(ref k) if k == "data_dir"));
    assert_eq!(err.line, Some(2));
}

/// A key a profile may not set used to end the key walk, hiding the
/// unknown keys after it (and, as sections are walked last, any in a
/// section): the fix of one met the next on the following build.
#[test]
fn a_key_not_allowed_in_a_profile_does_not_hide_unknown_keys() {
    let err = profile_error("data_dir = \"/tmp\"\ncolour = 1\n[server]\nmax_conections = 3\n");
    let all: Vec<_> = std::iter::once(&err).chain(&err.more).collect();
    let got: Vec<_> = all.iter().map(|e| (e.key(), e.line)).collect();
    assert_eq!(
        got,
        [
            (Some("data_dir"), Some(1)),
            (Some("colour"), Some(2)),
            (Some("server.max_conections"), Some(4)),
        ]
    );
    assert!(matches!(err.kind, ConfigErrorKind::NotAllowedInProfile(_)));
    let shown = err.to_string();
    assert!(
        shown.ends_with(
            "'data_dir' is not allowed in a device profile (set it in the config file) \
             (line 1); also unknown key 'colour' (line 2); also unknown key \
             'server.max_conections' (line 4); did you mean 'server.max_connections'?"
        ),
        "{shown}"
    );
}

/// A section given as a value stopped the walk the same way.
#[test]
fn a_section_that_is_not_a_table_does_not_hide_unknown_keys() {
    let err = load_text("a.toml", "server = 3\ncolour = 1\n").expect_err("rejected");
    let all: Vec<_> = std::iter::once(&err).chain(&err.more).collect();
    let got: Vec<_> = all.iter().map(|e| (e.key(), e.line)).collect();
    assert_eq!(got, [(Some("server"), Some(1)), (Some("colour"), Some(2))]);
    assert!(matches!(err.kind, ConfigErrorKind::BadValue { .. }));
}

/// The embedded default is for a small board: its worst case fits 64 MiB.
const DEFAULT_BUDGET_BYTES_MAX: u64 = 64 * MIB;

#[test]
fn the_embedded_default_fits_a_small_board_and_storage_accepts_it() {
    let cfg = Config::embedded_default();
    let budget = cfg.memory_budget();
    assert!(
        budget.total_bytes() <= DEFAULT_BUDGET_BYTES_MAX,
        "the embedded default needs {}:\n{budget}",
        budget::human(budget.total_bytes())
    );
    crate::broker::storage_config(&cfg)
        .validate()
        .expect("storage accepts the embedded default");
    crate::broker::partition_defaults(&cfg)
        .validate()
        .expect("storage accepts the default topic");
}

fn line<'a>(budget: &'a MemoryBudget, user: &str) -> &'a BudgetLine {
    budget
        .lines
        .iter()
        .find(|l| l.user == user)
        .unwrap_or_else(|| panic!("no budget line {user:?}"))
}

/// A fan-in config (more connections than queue slots) gets a job per
/// connection, and the budget counts it.
#[test]
fn the_append_queue_holds_a_job_per_connection() {
    let mut cfg = Config::embedded_default();
    assert_eq!(cfg.append_queue_jobs(), cfg.storage.append_queue_depth);
    cfg.server.max_connections = 1100;
    assert_eq!(cfg.append_queue_jobs(), 1100);
    assert_eq!(crate::broker::storage_config(&cfg).append_queue_depth, 1100);
    let budget = cfg.memory_budget();
    let queue = line(&budget, "append queue");
    assert_eq!(queue.bytes, crate::storage::append_queue_bytes(1100));
    assert!(
        queue.formula.contains("server.max_connections 1100"),
        "{}",
        queue.formula
    );
}

/// The fetches waiting for the storage thread have a queue of their own,
/// beside the appends', and the budget counts its slots.
#[test]
fn the_fetch_queue_is_counted() {
    let budget = Config::embedded_default().memory_budget();
    let queue = line(&budget, "fetch queue");
    assert_eq!(queue.bytes, crate::storage::read_queue_bytes());
    assert_eq!(
        queue.bytes,
        crate::storage::READ_QUEUE_DEPTH as u64 * crate::storage::append_queue_bytes(1)
    );
}

/// The shared in-flight pool is counted once, beside the connections'
/// shares, and named only where it is set.
#[test]
fn the_shared_in_flight_pool_is_counted_once() {
    let mut cfg = Config::embedded_default();
    let without = line(&cfg.memory_budget(), "in-flight requests and answers").clone();
    assert!(!without.formula.contains("shared"), "{}", without.formula);
    cfg.server.max_inflight_bytes_shared = 3 * MIB;
    let budget = cfg.memory_budget();
    let with = line(&budget, "in-flight requests and answers");
    assert_eq!(with.bytes, without.bytes + 3 * MIB);
    assert!(
        with.formula
            .contains("+ server.max_inflight_bytes_shared 3 MiB"),
        "{}",
        with.formula
    );
}

#[test]
fn memory_budget_sums_its_lines_and_prints_each() {
    let cfg = Config::embedded_default();
    let budget = cfg.memory_budget();
    let sum: u64 = budget.lines.iter().map(|l| l.bytes).sum();
    assert_eq!(budget.total_bytes(), sum);
    // 64 tails of 128 KiB, each with a carry-over block.
    assert_eq!(
        line(&budget, "partition tail buffers").bytes,
        64 * (128 * 1024 + 4096)
    );
    // 8 groups: each an offset (metadata of 256 B in a 272 B allocation)
    // and two held entries per partition; 24 members of 32 topics each
    // over all groups.
    assert_eq!(
        line(&budget, "consumer groups (estimate)").bytes,
        8 * (1024 + 64 * (768 + 272 + 2 * 384)) + 24 * (2048 + 32 * 384)
    );
    // 64 idle transactional ids, 8 transactions open over every partition.
    assert_eq!(
        line(&budget, "transactions (estimate)").bytes,
        64 * 1024 + 8 * 64 * (768 + 640)
    );
    // The aborted ranges at their cap, whatever the config.
    assert_eq!(
        line(&budget, "aborted transactions (estimate)").bytes,
        crate::broker::txn::ABORTED_RANGES_MAX as u64 * 24
    );
    // Requests and the answers reserved for them: 64 x 272 KiB.
    assert_eq!(
        line(&budget, "in-flight requests and answers").bytes,
        17 * MIB
    );
    // The storage thread's read window and 4 read-ahead spares (at least
    // 256 KiB and a block each) and its 256 KiB of zeros.
    assert_eq!(
        line(&budget, "storage I/O buffers").bytes,
        5 * (256 * 1024 + 4096) + 256 * 1024
    );
    // A fan-in's producers: a 32-bit hash and a bit each, for every
    // connection.
    assert_eq!(line(&budget, "fan-in producers").bytes, 64 * 4 + 8);
    let shown = budget.to_string();
    assert_eq!(shown.lines().count(), budget.lines.len() + 3);
    assert!(shown.lines().all(|l| l.starts_with('#')));
    assert!(shown.contains("8.2 MiB  partition tail buffers"), "{shown}");
    assert!(shown.contains("  total\n"), "{shown}");
    assert!(
        shown
            .lines()
            .last()
            .expect("note")
            .contains("message-id window"),
        "{shown}"
    );

    // Halving the partitions halves the tail line.
    let mut smaller = cfg.clone();
    smaller.server.max_partitions = 32;
    assert_eq!(
        line(&smaller.memory_budget(), "partition tail buffers").bytes,
        32 * (128 * 1024 + 4096)
    );
}

#[test]
fn the_rings_line_is_storages_worst_case_for_the_disk_limit() {
    let mut cfg = Config::embedded_default();
    let rings = |cfg: &Config| line(&cfg.memory_budget(), "partition rings").bytes;
    assert_eq!(
        rings(&cfg),
        crate::storage::rings_memory_bytes_max(
            cfg.storage.disk_budget_bytes,
            cfg.server.max_partitions
        )
    );
    // The worst case is at least any real layout of that disk: the
    // default topic's rings, as many as fit, or the smallest segments.
    let disk = cfg.storage.disk_budget_bytes;
    let t = &cfg.topic_defaults;
    let ring = u64::from(t.segments) * t.segment_bytes;
    let layouts = [
        (disk / ring) * crate::storage::ring_memory_bytes(t.segment_bytes, t.segments),
        (disk / (64 * 1024 * 4096))
            * crate::storage::ring_memory_bytes(64 * 1024, crate::storage::SEGMENTS_MAX),
        64 * crate::storage::ring_memory_bytes(64 * 1024, (disk / 64 / (64 * 1024)) as u32),
    ];
    for bytes in layouts {
        assert!(bytes <= rings(&cfg), "{bytes} > {}", rings(&cfg));
    }
    // More disk, more index.
    let before = rings(&cfg);
    cfg.storage.disk_budget_bytes *= 2;
    assert!(rings(&cfg) > before);
}

#[test]
fn the_recovery_buffer_counts_only_beyond_what_serving_allocates() {
    let cfg = Config::embedded_default();
    assert_eq!(
        line(&cfg.memory_budget(), "start-up recovery buffer").bytes,
        0,
        "serving allocates more than recovery's 4 MiB"
    );
    let tiny = load_text(
        "tiny.toml",
        "[server]\nmax_connections = 1\nmax_frame_bytes = 8192\nmax_inflight_bytes_per_connection = 8192\n[storage]\nmax_batch_bytes = 4096\ntail_buffer_bytes = 4096\n[topic_defaults]\nsegment_bytes = 65536\n",
    )
    .expect("valid");
    let b = tiny.memory_budget();
    let recovery = line(&b, "start-up recovery buffer").bytes;
    assert!(recovery > 3 * MIB, "{b}");
    assert!(
        b.total_bytes() >= crate::storage::recovery_buffer_bytes(4096),
        "{b}"
    );
}

#[test]
fn the_startup_summary_says_worst_case() {
    let s = Config::embedded_default().memory_budget().summary();
    assert!(s.starts_with("worst-case memory "), "{s}");
    assert!(s.contains("not current use"), "{s}");
}

#[test]
fn check_report_shows_config_and_budget() {
    let report = check_report(&Config::with_profile("pi4-sd").expect("profile"));
    assert!(report.contains("[topic_defaults]"));
    assert!(report.contains("profile = \"pi4-sd\""));
    assert!(report.contains("# memory budget"));
    assert!(report.contains("  total\n"), "{report}");
}

#[test]
fn apply_overrides_validates() {
    let mut cfg = Config::embedded_default();
    cfg.apply_overrides(Some(PathBuf::from("/tmp/d")), Some("0.0.0.0:1".into()))
        .expect("valid overrides");
    assert_eq!(cfg.data_dir, PathBuf::from("/tmp/d"));
    assert_eq!(cfg.tcp_listen(), Some("0.0.0.0:1".parse().expect("addr")));
    let err = cfg
        .apply_overrides(None, Some("nowhere".into()))
        .expect_err("bad listen");
    assert_eq!(err.key(), Some("server.listen"));
    assert!(err
        .to_string()
        .starts_with("command line: invalid 'server.listen'"));
}

#[test]
fn fsync_policy_round_trips_through_its_text() {
    for text in ["always", "never", "interval:1", "interval:4294967295"] {
        let p: FsyncPolicy = text.parse().expect("parses");
        assert_eq!(p.to_string(), text);
    }
    for bad in [
        "",
        "Always",
        "interval:",
        "interval:-1",
        "interval:4294967296",
        "interval",
    ] {
        assert!(bad.parse::<FsyncPolicy>().is_err(), "{bad}");
    }
}

#[test]
fn human_sizes() {
    assert_eq!(budget::human(0), "0 B");
    assert_eq!(budget::human(4096), "4 KiB");
    assert_eq!(budget::human(1_114_112), "1.1 MiB");
    assert_eq!(budget::human(3 * 1024 * MIB), "3 GiB");
}

#[test]
fn a_conflict_with_an_untouched_default_or_profile_value_names_the_users_file() {
    // The file raises the batch size; the frame size of the default (or of
    // the built-in profile under the file) no longer holds a batch. The key
    // at fault is the frame size, the file is the user's, and there is no
    // line to point at.
    for text in [
        "[storage]\nmax_batch_bytes = 2097152\n",
        "profile = \"pi4-sd\"\n[storage]\nmax_batch_bytes = 1048576\n",
    ] {
        let err = load_text("raise.toml", text).expect_err("frame too small for the batch");
        assert_eq!(err.key(), Some("server.max_frame_bytes"));
        assert_eq!(err.line, None);
        assert!(
            err.to_string()
                .contains("raise.toml: invalid 'server.max_frame_bytes'"),
            "{err}"
        );
    }
}

#[test]
fn prewrite_segments_reaches_the_storage_config() {
    let cfg = load_text("p.toml", "[storage]\nprewrite_segments = false\n").expect("valid");
    assert!(!cfg.storage.prewrite_segments);
    assert!(!crate::broker::storage_config(&cfg).prewrite_segments);
    let err = load_text("p.toml", "[storage]\nprewrite_segments = \"yes\"\n").expect_err("bool");
    assert_eq!(err.key(), Some("storage.prewrite_segments"));
}

#[test]
fn fanin_wait_reaches_the_storage_config() {
    let cfg = Config::embedded_default();
    let st = crate::broker::storage_config(&cfg);
    assert_eq!(st.fanin_wait, std::time::Duration::from_millis(5));
    assert_eq!(st.fanin_producers_max, cfg.server.max_connections as usize);
    let cfg = load_text("p.toml", "[storage]\nfanin_wait_ms = 0\n").expect("valid");
    assert!(crate::broker::storage_config(&cfg).fanin_wait.is_zero());
    let err = load_text("p.toml", "[storage]\nfanin_wait_ms = 1001\n").expect_err("range");
    assert_eq!(err.key(), Some("storage.fanin_wait_ms"));
    let err = load_text("p.toml", "[storage]\nfanin_wait_ms = \"5ms\"\n").expect_err("integer");
    assert_eq!(err.key(), Some("storage.fanin_wait_ms"));
}

#[test]
fn pipelined_fsync_reaches_the_storage_config() {
    let cfg = load_text("p.toml", "").expect("valid");
    assert!(!crate::broker::storage_config(&cfg).pipelined_fsync);
    let cfg = load_text("p.toml", "[storage]\npipelined_fsync = true\n").expect("valid");
    assert!(crate::broker::storage_config(&cfg).pipelined_fsync);
    let err = load_text("p.toml", "[storage]\npipelined_fsync = 1\n").expect_err("bool");
    assert_eq!(err.key(), Some("storage.pipelined_fsync"));
}

#[test]
fn tls_adds_its_buffers_to_the_budget_and_its_keys_are_checked() {
    let plain = Config::embedded_default();
    assert!(plain
        .memory_budget()
        .lines
        .iter()
        .all(|l| l.user != "TLS connection buffers"));
    let cfg = load_text(
        "tls.toml",
        "[server.tls]\nlisten = \"127.0.0.1:9473\"\ncert = \"s.pem\"\nkey = \"s.key\"\n",
    )
    .expect("valid");
    let budget = cfg.memory_budget();
    let tls = line(&budget, "TLS connection buffers");
    assert_eq!(
        tls.bytes,
        64 * TLS_CONNECTION_BYTES + 256 * budget::TLS_SESSION_BYTES
    );
    assert_eq!(
        budget.total_bytes(),
        plain.memory_budget().total_bytes() + tls.bytes
    );
    let err = load_text("t.toml", "[server.tls]\nlisten = \"127.0.0.1:9473\"\n")
        .expect_err("no certificate");
    assert_eq!(err.key(), Some("server.tls.cert"));
    let err = load_text("t.toml", "[server.tls]\nidentity_from = \"subject\"\n").expect_err("bad");
    assert_eq!(err.key(), Some("server.tls.identity_from"));
    assert_eq!(err.line, Some(2));
    let err = load_text(
        "t.toml",
        "[acl]\nenabled = true\n[[acl.rules]]\nidentity = \"d\"\ntopics = [\"t\"]\noperations = [\"write\"]\n",
    )
    .expect_err("unknown operation");
    assert_eq!(err.key(), Some("acl.rules"));
    assert!(err.to_string().contains("'write'"), "{err}");
    let err = load_text("t.toml", "[server]\nlisten = \"\"\nunix_socket = \"\"\n")
        .expect_err("no listener");
    assert_eq!(err.key(), Some("server.listen"));
}

#[test]
fn mirror_rules_are_checked_and_cost_memory_only_when_on() {
    let plain = Config::embedded_default();
    assert!(!plain.mirror.enabled());
    assert!(plain
        .memory_budget()
        .lines
        .iter()
        .all(|l| l.user != "mirror buffers"));
    let cfg = load_text(
        "m.toml",
        "[mirror]\nupstream = \"127.0.0.1:9092\"\ntransactional_id = \"gw-17\"\n\
         checkpoint_topic = \"skiff-mirror-checkpoints\"\n\
         [[mirror.rules]]\nname = \"temps\"\nsource = \"sensors.*\"\ntarget = \"plant1.{topic}\"\n",
    )
    .expect("the issue's example is valid");
    assert_eq!(cfg.mirror.rules[0].target, "plant1.{topic}");
    assert_eq!(cfg.mirror.rules[0].priority, 0);
    assert_eq!(cfg.mirror.max_bytes_per_s, 0, "no cap by default");
    assert_eq!(cfg.mirror.min_share_percent, 10);
    let budget = cfg.memory_budget();
    assert_eq!(
        line(&budget, "mirror buffers").bytes,
        3 * cfg.mirror.batch_bytes + budget::MIRROR_FIXED_BYTES
    );
    let agg = |inner: &str| {
        format!(
            "[mirror]\nupstream = \"a:1\"\n[[mirror.rules]]\nname = \"a\"\nsource = \"s\"\ntarget = \"t\"\naggregate = {{ {inner} }}\n"
        )
    };
    let cfg = load_text(
        "m.toml",
        agg("window_ms = 10000, lateness_ms = 5000, fields = [\"c\", \"rh\"]").as_str(),
    )
    .expect("the issue's example is valid");
    let a = cfg.mirror.rules[0].aggregate.as_ref().expect("aggregate");
    assert_eq!(
        (a.window_ms, a.lateness_ms, a.max_open_windows),
        (10_000, 5_000, 10_000)
    );
    assert_eq!(
        line(&cfg.memory_budget(), "mirror windows").bytes,
        10_000 * (budget::MIRROR_WINDOW_BYTES + 2 * budget::MIRROR_WINDOW_FIELD_BYTES)
    );
    for (text, key) in [
        ("[mirror]\nupstream = \"kafka\"\n", "mirror.upstream"),
        (
            "[[mirror.rules]]\nname = \"a\"\nsource = \"s\"\ntarget = \"t\"\n",
            "mirror.upstream",
        ),
        ("[mirror]\ncompression = \"gzip\"\n", "mirror.compression"),
        ("[mirror]\npartitioner = \"random\"\n", "mirror.partitioner"),
        ("[mirror]\ncheckpoint_topic = \"a b\"\n", "mirror.checkpoint_topic"),
        ("[mirror]\nbackoff_min_ms = 10\nbackoff_max_ms = 5\n", "mirror.backoff_max_ms"),
        ("[mirror.sasl]\nmechanism = \"GSSAPI\"\n", "mirror.sasl.mechanism"),
        ("[mirror.sasl]\nmechanism = \"PLAIN\"\n", "mirror.sasl.username"),
        ("[mirror.tls]\ncert = \"c.pem\"\n", "mirror.tls.key"),
        ("[mirror]\nmax_bytes_per_s = 1000\n", "mirror.max_bytes_per_s"),
        ("[mirror]\nmin_share_percent = 0\n", "mirror.min_share_percent"),
        ("[mirror]\nmin_share_percent = 51\n", "mirror.min_share_percent"),
        (
            "[mirror]\nupstream = \"a:1\"\n[[mirror.rules]]\nname = \"a\"\nsource = \"s\"\ntarget = \"t\"\npriority = -1\n",
            "mirror.rules",
        ),
        (
            "[mirror]\nupstream = \"a:1\"\n[[mirror.rules]]\nname = \"a\"\nsource = \"s\"\ntarget = \"t\"\npriority = 101\n",
            "mirror.rules",
        ),
        (
            "[mirror]\nupstream = \"a:1\"\n[[mirror.rules]]\nname = \"a\"\nsource = \"s\"\ntarget = \"{source}\"\n",
            "mirror.rules",
        ),
        (
            agg("window_ms = 0, fields = [\"c\"]").as_str(),
            "mirror.rules.aggregate.window_ms",
        ),
        (
            agg("window_ms = 1000, lateness_ms = 700000000, fields = [\"c\"]").as_str(),
            "mirror.rules.aggregate.lateness_ms",
        ),
        (
            agg("window_ms = 1000, fields = []").as_str(),
            "mirror.rules.aggregate.fields",
        ),
        (
            agg("window_ms = 1000, fields = [\"c\", \"c\"]").as_str(),
            "mirror.rules.aggregate.fields",
        ),
        (
            agg("window_ms = 1000, fields = [\"c\"], max_open_windows = 0").as_str(),
            "mirror.rules.aggregate.max_open_windows",
        ),
        (
            agg("window_ms = 1000, fields = [\"c\"], window = 3").as_str(),
            "mirror.rules[0].aggregate.window",
        ),
        (
            "[mirror]\nupstream = \"a:1\"\n[[mirror.rules]]\nname = \"a\"\nsource = \"s\"\ntarget = \"t\"\n\
             [[mirror.rules]]\nname = \"a\"\nsource = \"u\"\ntarget = \"t\"\n",
            "mirror.rules",
        ),
    ] {
        let err = load_text("m.toml", text).expect_err(text);
        assert_eq!(err.key(), Some(key), "{text}: {err}");
    }
    let err = load_text(
        "m.toml",
        "[mirror]\nupstream = \"a:1\"\n[[mirror.rules]]\nname = \"alarms\"\nsource = \"s\"\ntarget = \"t\"\npriority = 1000\n",
    )
    .expect_err("priority");
    assert!(
        err.to_string()
            .contains("rule 'alarms': priority 1000 is out of range 0..=100"),
        "{err}"
    );
    let err = load_text("m.toml", "[mirror]\nmax_bytes_per_s = 10\n").expect_err("cap");
    assert!(err.to_string().contains("(or 0 for no cap)"), "{err}");
    // The edges are accepted.
    load_text(
        "m.toml",
        "[mirror]\nmax_bytes_per_s = 1024\nmin_share_percent = 50\nupstream = \"a:1\"\n\
         [[mirror.rules]]\nname = \"a\"\nsource = \"s\"\ntarget = \"t\"\npriority = 100\n",
    )
    .expect("edge values");
    let err = load_text("m.toml", "[mirror]\nupstrem = \"a:1\"\n").expect_err("typo");
    assert_eq!(err.key(), Some("mirror.upstrem"));
    assert_eq!(err.line, Some(2));
}

#[test]
fn a_reload_names_the_changes_it_cannot_apply_and_none_it_does() {
    let start = load_text("a.toml", "[share]\nlock_ms = 30000\n").expect("config");
    let new = load_text(
        "a.toml",
        "[server]\nmax_connections = 32\nunix_identities = [{ uid = 1000, identity = \"c\" }]\n\
         [share]\nlock_ms = 5000\n[quotas]\nproduce_bytes_per_s = 1000\n",
    )
    .expect("config");
    assert_eq!(
        restart_only_changes(&start, &new),
        ["server.max_connections", "share.lock_ms"]
    );
    assert!(restart_only_changes(&start, &start).is_empty());
}

#[test]
fn mirror_rule_errors_name_the_line_of_their_rule() {
    let two_rules = |second: &str| {
        format!(
            "[mirror]\nupstream = \"a:1\"\n\
             [[mirror.rules]]\nname = \"a\"\nsource = \"s\"\ntarget = \"t\"\n\
             aggregate = {{ window_ms = 1000, fields = [\"c\"] }}\n\
             [[mirror.rules]]\nname = \"b\"\nsource = \"s\"\ntarget = \"u\"\n{second}"
        )
    };
    for (text, key, line) in [
        // The second rule's own key, not the first rule's of the same name.
        (
            two_rules("aggregate = { window_ms = 0, fields = [\"c\"] }\n"),
            "mirror.rules.aggregate.window_ms",
            12,
        ),
        // A key left to its default names its rule's table.
        (
            two_rules("aggregate = { window_ms = 1000, fields = [\"c\"], lateness_ms = 700000000 }\n"),
            "mirror.rules.aggregate.lateness_ms",
            12,
        ),
        // An error about a whole rule names its [[mirror.rules]] header.
        (two_rules("priority = 101\n"), "mirror.rules", 8),
        (two_rules("").replace("name = \"b\"", "name = \"a\""), "mirror.rules", 8),
        // serde's errors index the rule.
        (two_rules("priority = \"high\"\n"), "mirror.rules[1].priority", 12),
        (
            two_rules("aggregate = { window_ms = 1000, fields = [\"c\"], window = 3 }\n"),
            "mirror.rules[1].aggregate.window",
            12,
        ),
        // Rules without an upstream: the first rule is where it is needed.
        (
            "[mirror]\nlinger_ms = 5\n\n[[mirror.rules]]\nname = \"a\"\nsource = \"s\"\ntarget = \"t\"\n"
                .to_owned(),
            "mirror.upstream",
            4,
        ),
        (
            "[mirror]\nupstream = \"\"\n[[mirror.rules]]\nname = \"a\"\nsource = \"s\"\ntarget = \"t\"\n"
                .to_owned(),
            "mirror.upstream",
            2,
        ),
    ] {
        let err = load_text("m.toml", &text).expect_err(&text);
        assert_eq!(err.key(), Some(key), "{text}: {err}");
        assert_eq!(err.line, Some(line), "{text}: {err}");
        assert!(err.to_string().ends_with(&format!("(line {line})")), "{err}");
    }
}

#[test]
fn max_partitions_says_which_bound_it_broke() {
    for (server, want) in [
        (
            "max_topics = 65536\nmax_partitions = 70000",
            "invalid 'server.max_partitions': 70000 is more than 65536, the most partitions a broker holds (line 3)",
        ),
        (
            "max_partitions = 70000",
            "invalid 'server.max_partitions': 70000 is more than 65536, the most partitions a broker holds (line 2)",
        ),
        (
            "max_partitions = 8",
            "invalid 'server.max_partitions': 8 is less than server.max_topics (32): every topic has at least one partition (line 2)",
        ),
    ] {
        let err = load_text("p.toml", &format!("[server]\n{server}\n")).expect_err(server);
        assert!(err.to_string().ends_with(want), "{err}");
    }
    load_text(
        "p.toml",
        "[server]\nmax_topics = 65536\nmax_partitions = 65536\n",
    )
    .expect("both at their limit");
}

#[test]
fn errors_in_every_list_of_tables_name_the_line_of_their_element() {
    for (text, key, line) in [
        (
            "[[server.unix_identities]]\nuid = 1\nidentity = \"a\"\n\
             [[server.unix_identities]]\nuid = 2\nidentity = \"\"\n",
            "server.unix_identities",
            4,
        ),
        (
            "[[acl.rules]]\nidentity = \"a\"\ntopics = [\"t\"]\noperations = [\"produce\"]\n\
             [[acl.rules]]\nidentity = \"b\"\ntopics = [\"t\"]\noperations = [\"fly\"]\n",
            "acl.rules",
            5,
        ),
        // An inline array names the element's own line.
        (
            "[acl]\nrules = [\n\
             { identity = \"a\", topics = [\"t\"], operations = [\"produce\"] },\n\
             { identity = \"b\", topics = [], operations = [\"produce\"] },\n]\n",
            "acl.rules",
            4,
        ),
        (
            "[[quotas.overrides]]\nidentity = \"a\"\nproduce_bytes_per_s = 1\nconsume_bytes_per_s = 1\n\
             [[quotas.overrides]]\nidentity = \"\"\nproduce_bytes_per_s = 1\nconsume_bytes_per_s = 1\n",
            "quotas.overrides",
            5,
        ),
        (
            "[[share.overrides]]\ntopic = \"t\"\nmax_deliveries = 3\n\
             [[share.overrides]]\ngroup = \"g\"\nmax_deliveries = 0\n",
            "share.overrides.max_deliveries",
            6,
        ),
        (
            "[[share.overrides]]\ntopic = \"t\"\n\n[[share.overrides]]\nlock_ms = 10\n",
            "share.overrides",
            4,
        ),
    ] {
        let err = load_text("l.toml", text).expect_err(text);
        assert_eq!(err.key(), Some(key), "{text}: {err}");
        assert_eq!(err.line, Some(line), "{text}: {err}");
    }
}

/// A key map without room for one key is refused, naming the key and the
/// least it takes (one key's entry); before, 0 was accepted, and the
/// cleaner quietly used a one-key map.
#[test]
fn a_key_map_without_room_for_one_key_is_refused() {
    let least = crate::broker::cleaner::KEY_MAP_ENTRY_BYTES;
    for bytes in [0, least - 1] {
        let err = load_text(
            "k.toml",
            &format!("[compaction]\nkey_map_bytes = {bytes}\n"),
        )
        .expect_err("a key map without room for a key");
        assert!(
            matches!(
                &err.kind,
                ConfigErrorKind::Invalid { key: "compaction.key_map_bytes", reason }
                    if reason.contains(&format!("{bytes} is out of range {least}..="))
            ),
            "{err}"
        );
    }
    load_text(
        "k.toml",
        &format!("[compaction]\nkey_map_bytes = {least}\n"),
    )
    .expect("room for one key");
}
