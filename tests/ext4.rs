//! The data directory on an ext4 file system the test makes in a file and
//! mounts through a loop device (skipped, with a note, where it cannot:
//! without root, loop devices or mkfs.ext4), whatever file system the
//! build is on: fallocate there leaves unwritten extents, which tmpfs
//! does not have. Unmounted after each step, so what a restart reads
//! comes from the disk, not the page cache.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// An ext4 image file mounted on a temp directory of its own; unmounted
/// (which detaches its loop device) when dropped.
struct Ext4 {
    image: PathBuf,
    at: PathBuf,
    mounted: bool,
    /// Dropped after `drop` has unmounted.
    _dir: tempfile::TempDir,
}

fn run(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

impl Ext4 {
    fn make(bytes: u64) -> Option<Ext4> {
        let dir = temp_dir();
        let image = dir.path().join("ext4.img");
        let at = dir.path().join("data");
        std::fs::create_dir_all(&at).ok()?;
        std::fs::File::create(&image).ok()?.set_len(bytes).ok()?;
        let made = run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096"])
            .arg(&image));
        let mut fs = Ext4 {
            image,
            at,
            mounted: false,
            _dir: dir,
        };
        (made && fs.mount()).then_some(fs)
    }

    fn mount(&mut self) -> bool {
        self.mounted = run(Command::new("mount")
            .args(["-t", "ext4", "-o", "loop"])
            .arg(&self.image)
            .arg(&self.at));
        self.mounted
    }

    fn unmount(&mut self) {
        if self.mounted {
            assert!(
                run(Command::new("umount").arg(&self.at)),
                "umount {}",
                self.at.display()
            );
            self.mounted = false;
        }
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        // Lazily where it is still busy (a panic with the broker going).
        if self.mounted && !run(Command::new("umount").arg(&self.at)) {
            let _ = Command::new("umount").arg("-l").arg(&self.at).status();
        }
    }
}

/// The first file named `name` under `dir`.
fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

/// (size, bytes of blocks allocated) of a file.
fn size_and_blocks(path: &Path) -> (u64, u64) {
    let m = std::fs::metadata(path).expect("metadata");
    (m.len(), m.blocks() * 512)
}

const SEGMENT_BYTES: u64 = 256 << 10;

/// The latest value of each key of the compacted topic, read from the
/// start, and how many records that read.
fn latest(b: &Broker) -> (std::collections::BTreeMap<String, String>, usize) {
    let o = b.cli(&[
        "consume",
        "state",
        "--from",
        "earliest",
        "--format",
        "json",
        "--timeout-ms",
        "2000",
    ]);
    assert_ok(&o);
    let lines = json_lines(&o);
    let latest = lines
        .iter()
        .map(|v| {
            (
                v["key"].as_str().expect("a key").to_owned(),
                v["value"].as_str().expect("a value").to_owned(),
            )
        })
        .collect();
    (latest, lines.len())
}

/// A compaction spare a crash left short of its segment (its fallocate
/// cut short) is topped up at the next start on ext4: its whole size,
/// every block allocated. The records survive that start, a compaction
/// into the topped-up spare and another start from the disk.
#[test]
fn a_spare_cut_short_is_topped_up_on_ext4_and_the_data_survives_restarts() {
    let Some(mut fs) = Ext4::make(64 << 20) else {
        eprintln!(
            "cannot make and mount an ext4 image here (needs root and loop devices); skipped"
        );
        return;
    };
    let config = "[compaction]\nmax_bytes_per_sec = 0\n";
    let mut b = Broker::start_on(fs.at.clone(), config);
    let create = format!(
        "topics create state --cleanup compact --segment-bytes {SEGMENT_BYTES} --segments 8"
    );
    assert_ok(&b.cli(&create.split(' ').collect::<Vec<_>>()));
    // Ten keys, each written 300 times: about 1 MB, four segments.
    let value = |i: usize| format!("{i:06}-{}", "x".repeat(300));
    let produce = |b: &Broker, from: usize| {
        for k in 0..10 {
            let lines: String = (0..300).map(|i| value(from + k * 300 + i) + "\n").collect();
            let key = format!("k{k}");
            let o = b.cli_stdin(&["produce", "state", "--key", &key], Some(lines.as_bytes()));
            assert_ok(&o);
        }
    };
    produce(&b, 0);
    // The cleaner may be merging: done, the spare is back in place.
    assert_ok(&b.cli(&["topics", "compact", "state", "--wait"]));
    let (want, before) = latest(&b);
    assert_eq!(want.len(), 10, "{want:?}");
    assert_eq!(want["k9"], value(2999));
    assert_eq!(b.stop(), Some(0), "{}", b.log());

    let spare = find(&fs.at, "compact.spare").expect("the topic's compaction spare");
    let (size, blocks) = size_and_blocks(&spare);
    assert!(
        size == SEGMENT_BYTES && blocks >= SEGMENT_BYTES,
        "{size} {blocks}"
    );
    // Its allocation cut short by a crash: a quarter of it there.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&spare)
        .unwrap()
        .set_len(SEGMENT_BYTES / 4)
        .unwrap();
    let (size, blocks) = size_and_blocks(&spare);
    assert!(
        size == SEGMENT_BYTES / 4 && blocks < SEGMENT_BYTES,
        "{size} {blocks}"
    );
    fs.unmount();
    assert!(fs.mount(), "mounting the image again");

    b.restart();
    let (size, blocks) = size_and_blocks(&spare);
    assert!(
        size == SEGMENT_BYTES && blocks >= SEGMENT_BYTES,
        "the spare not topped up at start-up: {size} bytes, {blocks} allocated"
    );
    assert_eq!(latest(&b), (want, before), "after the top-up");
    // As much again, and compacted: into the topped-up spare.
    produce(&b, 3000);
    assert_ok(&b.cli(&["topics", "compact", "state", "--wait"]));
    let (want, read) = latest(&b);
    assert_eq!(want["k9"], value(5999));
    assert!(read < before + 3000, "nothing compacted: {read} records");
    assert_eq!(b.stop(), Some(0), "{}", b.log());
    fs.unmount();
    assert!(fs.mount(), "mounting the image again");

    b.restart();
    assert_eq!(
        latest(&b),
        (want, read),
        "after the compaction and a restart"
    );
    assert_eq!(b.stop(), Some(0), "{}", b.log());
    drop(b);
    fs.unmount();
}
