//! A full disk, for real: the data directory on a small tmpfs the test
//! mounts (skipped, with a note, where it cannot: without root, or in a
//! container that forbids mounts). The rings are reserved up front, so a
//! full file system must not stop a topic that exists; what needs new room
//! (a topic, metadata) fails with a typed error; and the broker starts
//! again on the full disk: no restart loop for systemd to spin in.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A tmpfs mounted for the test on a temp directory of its own, unmounted
/// when dropped and only then the directory removed: removed first, the
/// removal stopped at the busy mount point and left the directory behind
/// (`e2e-*` under the target's tmp, one a run).
struct Tmpfs {
    at: PathBuf,
    /// Dropped after `drop` has unmounted.
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(bytes: u64) -> Option<Tmpfs> {
        let dir = temp_dir();
        let at = dir.path().join("data");
        std::fs::create_dir_all(&at).ok()?;
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&at)
            .output()
            .ok()?;
        o.status.success().then_some(Tmpfs { at, dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// Writes a file until the file system is full; returns its path.
fn fill_up(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0xa5u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    path
}

/// Runs `test` on a broker whose data directory is an 8 MiB tmpfs
/// (skipped, with a note, where it cannot be mounted); unmounts it after.
fn on_small_disk(config: &str, test: impl FnOnce(&mut Broker, &Path)) {
    let Some(fs) = Tmpfs::mount(8 << 20) else {
        eprintln!("cannot mount a tmpfs here (needs root); skipped");
        return;
    };
    // Dropped before `fs`, a panic's unwinding too: the broker is killed
    // before the file system goes.
    let mut b = Broker::start_on(fs.at.clone(), config);
    test(&mut b, &fs.at);
    drop(b);
    let dir = fs.dir.path().to_path_buf();
    drop(fs);
    assert!(!dir.exists(), "{} is left behind", dir.display());
}

const SMALL_RING: [&str; 4] = ["--segment-bytes", "65536", "--segments", "2"];

#[test]
fn a_full_disk_gives_typed_errors_and_no_restart_loop() {
    on_small_disk("", typed_errors_and_no_restart_loop);
}

fn typed_errors_and_no_restart_loop(b: &mut Broker, data: &Path) {
    let create = |b: &Broker, topic: &str, ring: &[&str]| {
        let mut args = vec!["topics", "create", topic];
        args.extend_from_slice(ring);
        b.cli(&args)
    };
    assert_ok(&create(b, "a", &SMALL_RING));
    assert_ok(&b.cli(&["produce", "a", "before"]));

    // A ring larger than the disk: refused, saying why; nothing left half
    // made.
    let o = create(
        b,
        "huge",
        &["--segment-bytes", "4194304", "--segments", "4"],
    );
    assert!(!o.status.success(), "a 16 MiB ring on an 8 MiB disk");
    let err = stderr(&o);
    assert!(err.contains("storage_full"), "{err}");
    // Said as a topic not created, naming the partition, not as bare I/O.
    assert!(
        err.contains("topic 'huge' was not created: its partition 0 could not be created")
            && err.contains("nothing of the topic was kept")
            && err.contains("the disk is full"),
        "{err}"
    );
    assert!(!data.join("topics/huge/0/partition.meta").exists());

    let filler = fill_up(data);
    // A new topic needs room for its ring and metadata: the same typed
    // error.
    let o = create(b, "b", &SMALL_RING);
    assert!(!o.status.success(), "created a topic on a full disk");
    let err = stderr(&o);
    assert!(err.contains("storage_full"), "{err}");
    // The ring reserved at creation still takes records.
    assert_ok(&b.cli(&["produce", "a", "while-full"]));
    // An alter needs room for new segments or its metadata: refused the
    // same way, and the topic keeps its old settings, also after the
    // restart below.
    let ring_of_a = |b: &Broker| {
        let o = b.cli(&["topics", "describe", "a", "--format", "json"]);
        assert_ok(&o);
        let j: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
        (j["segments"].clone(), j["retention_ms"].clone())
    };
    let ring_before = ring_of_a(b);
    for alter in [["--segments", "4"], ["--retention-ms", "60000"]] {
        let o = b.cli(&["topics", "alter", "a", alter[0], alter[1]]);
        assert!(!o.status.success(), "altered on a full disk: {alter:?}");
        let err = stderr(&o);
        assert!(
            err.contains("storage_full")
                && err.contains("topic 'a' was not altered")
                && err.contains("the disk is full"),
            "{err}"
        );
        assert_eq!(ring_of_a(b), ring_before, "{alter:?}");
    }

    // A stop and a start on the full disk (its checkpoints and snapshots
    // cannot be written): it stops cleanly, comes up and serves what it had.
    assert_eq!(b.stop(), Some(0), "{}", b.log());
    b.restart();
    let o = b.cli(&["consume", "a", "--count", "2", "--timeout-ms", "10000"]);
    assert_ok(&o);
    assert_eq!(stdout(&o), "before\nwhile-full\n");
    assert_eq!(ring_of_a(b), ring_before, "after the restart");
    // A new idempotent producer needs its id reserved durably first: on
    // the full disk it is refused as such.
    let o = b.cli(&["produce", "a", "after-restart", "--retry-timeout-ms", "500"]);
    assert!(!o.status.success(), "an id handed out without its registry");
    assert!(stderr(&o).contains("storage_full"), "{}", stderr(&o));

    // Room again: what was refused now works.
    std::fs::remove_file(&filler).expect("remove filler");
    assert_ok(&create(b, "b", &SMALL_RING));
    assert_ok(&b.cli(&["produce", "a", "after-restart"]));
    assert_ok(&b.cli(&["produce", "b", "room"]));
    b.stop();
}

/// A compacted topic whose ring fills while the disk is full: the cleaner
/// must still merge (its scratch segment and the producers' snapshot it
/// writes first live in room reserved before the disk filled), so the
/// producer is held back (`storage_full`, retried) and then goes on, and
/// the key's latest value is the last one written.
#[test]
fn a_full_compacted_ring_on_a_full_disk_is_compacted_and_takes_writes_again() {
    on_small_disk("[compaction]\nmax_bytes_per_sec = 0\n", |b, data| {
        full_compacted_ring_is_compacted(b, data, true)
    });
}

/// The same with the disk full before the topic's first compaction: the
/// room that one writes into was reserved with the ring.
#[test]
fn a_compacted_topics_first_compaction_on_a_full_disk_takes_no_new_room() {
    on_small_disk("[compaction]\nmax_bytes_per_sec = 0\n", |b, data| {
        full_compacted_ring_is_compacted(b, data, false)
    });
}

fn full_compacted_ring_is_compacted(b: &mut Broker, data: &Path, compact_first: bool) {
    let ring = ["--segment-bytes", "65536", "--segments", "4"];
    let create = [
        &["topics", "create", "state", "--cleanup", "compact"][..],
        &ring,
    ]
    .concat();
    assert_ok(&b.cli(&create));
    let values = |from: usize, n: usize| -> String {
        (from..from + n)
            .map(|i| format!("{i:06}-{}\n", "x".repeat(200)))
            .collect()
    };
    let filler = if compact_first {
        // One compaction while there is room: what it keeps for the next
        // ones is in place before the disk fills.
        let o = b.cli_stdin(
            &["produce", "state", "--key", "only"],
            Some(values(0, 500).as_bytes()),
        );
        assert_ok(&o);
        assert_ok(&b.cli(&["topics", "compact", "state", "--wait"]));
        fill_up(data)
    } else {
        // One record (the producer's id is reserved with room), then full
        // before a segment closes, so before any compaction.
        let o = b.cli_stdin(
            &["produce", "state", "--key", "only"],
            Some(values(0, 1).as_bytes()),
        );
        assert_ok(&o);
        fill_up(data)
    };
    // About 420 KB of one key: the 256 KiB ring fills several times over,
    // and only the cleaner makes room.
    let o = b.cli_stdin(
        &[
            "produce",
            "state",
            "--key",
            "only",
            "--retry-timeout-ms",
            "20000",
        ],
        Some(values(500, 2000).as_bytes()),
    );
    let cleaner_log: Vec<String> = b
        .log()
        .lines()
        .filter(|l| l.contains("compact") || l.contains("space"))
        .map(str::to_owned)
        .collect();
    assert!(
        o.status.success(),
        "{}\nbroker log: {cleaner_log:#?}",
        stderr(&o).lines().last().unwrap_or_default()
    );
    let last = |b: &Broker| {
        let o = b.cli(&[
            "consume",
            "state",
            "--from",
            "earliest",
            "--timeout-ms",
            "2000",
        ]);
        assert_ok(&o);
        stdout(&o).lines().last().map(str::to_owned)
    };
    let want = values(2499, 1);
    assert_eq!(
        last(b).as_deref(),
        Some(want.trim_end()),
        "the latest value"
    );
    // What the cleaner keeps between compactions does not disturb a
    // restart on the full disk.
    assert_eq!(b.stop(), Some(0), "{}", b.log());
    b.restart();
    assert_eq!(last(b).as_deref(), Some(want.trim_end()), "after a restart");
    std::fs::remove_file(&filler).expect("remove filler");
    b.stop();
}

/// Bytes free on the file system holding `dir`.
fn free_bytes(dir: &Path) -> u64 {
    let o = Command::new("stat")
        .args(["-f", "-c", "%a %S"])
        .arg(dir)
        .output()
        .expect("stat -f");
    let out = String::from_utf8_lossy(&o.stdout);
    let mut n = out
        .split_whitespace()
        .map(|w| w.parse::<u64>().expect("a number"));
    n.next().expect("blocks free") * n.next().expect("block size")
}

/// A compacted topic's create reserves the room its first compaction
/// writes the producers' snapshot into (a page beside the snapshot), or
/// is refused: on a disk with room for all of the create but that page
/// it succeeded without it, and that compaction then failed on the full
/// disk. Freed a page at a time from full, the first create that
/// succeeds has the room, and each one refused before it left the disk's
/// free space as it found it.
#[test]
fn a_compacted_create_has_its_snapshot_room_or_is_refused() {
    on_small_disk("", |b, data| {
        let create = [
            &["topics", "create", "c", "--cleanup", "compact"][..],
            &SMALL_RING,
        ]
        .concat();
        // The broker's own files a first create makes (the topic table,
        // the settings files) are there before the disk is full.
        assert_ok(&b.cli(&create));
        assert_ok(&b.cli(&["topics", "delete", "c"]));
        let filler = fill_up(data);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&filler)
            .expect("filler");
        let page = 4096;
        // Short of the ring and the compaction's segment by a few pages.
        let ring = 3 * 65536;
        let mut len = f.metadata().expect("filler").len() / page * page - (ring - 4 * page);
        let mut refused = 0;
        let mut last = String::new();
        loop {
            f.set_len(len).expect("truncate");
            let before = free_bytes(data);
            let o = b.cli(&create);
            if o.status.success() {
                break;
            }
            last = stderr(&o);
            assert!(last.contains("storage_full"), "{last}");
            assert_eq!(free_bytes(data), before, "a refused create kept room");
            refused += 1;
            assert!(refused < 64, "not created with 256 KiB more free");
            len -= page;
        }
        assert!(refused >= 4, "created without the ring's room");
        // The page short: said as the create's other failures are.
        assert!(
            last.contains("topic 'c' was not created: its partition 0's room for compaction could not be reserved (")
                && last.contains("nothing of the topic was kept")
                && last.contains("the disk is full"),
            "{last}"
        );
        let spare = data.join("producer-state/c-0.snap.spare");
        let blocks = std::os::unix::fs::MetadataExt::blocks(
            &std::fs::metadata(&spare).expect("the snapshot's spare"),
        );
        assert!(
            blocks * 512 >= page,
            "{}: {blocks} blocks after {refused} refused",
            spare.display()
        );
    });
}
