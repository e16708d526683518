//! The behaviour every [`IoBackend`] must show, as one function to run
//! against each implementation (io_uring, pwrite, fault-injecting with no
//! faults armed), so they cannot drift apart.

use std::io;
use std::path::{Path, PathBuf};

use super::aligned::AlignedBuf;
use super::{FileHandle, IoBackend, WriteOp, BLOCK_BYTES, READ_AHEAD_SLOTS, SECTOR_BYTES};

/// A scratch directory for backend tests on a filesystem that supports
/// O_DIRECT: `SKIFF_TEST_DIR` if set, else `/var/tmp` (usually disk-backed;
/// `/tmp` is often tmpfs, which refuses O_DIRECT), else the system temp dir.
pub fn scratch_dir() -> tempfile::TempDir {
    let base = std::env::var_os("SKIFF_TEST_DIR")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/var/tmp")).filter(|p| p.is_dir()))
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix("skiff-io-")
        .tempdir_in(base)
        .expect("create scratch dir")
}

/// Fills `buf` with bytes that differ per file, block and position, so a
/// write landing at the wrong offset or file is caught.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        let block = (i / BLOCK_BYTES) as u64;
        *b = (seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(block * 131 + i as u64 * 7)
            >> 3) as u8;
    }
}

fn block_buf(blocks: usize, seed: u64) -> AlignedBuf {
    let mut buf = AlignedBuf::new(blocks * BLOCK_BYTES).expect("aligned length");
    fill_pattern(&mut buf, seed);
    buf
}

fn read_back(backend: &mut impl IoBackend, file: FileHandle, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = AlignedBuf::new(len).expect("aligned length");
    let n = backend.read_at(file, offset, &mut buf).expect("read back");
    buf[..n].to_vec()
}

/// One write (and the fdatasyncs in `sync`) through `write_batch`.
fn write_one(
    backend: &mut impl IoBackend,
    file: FileHandle,
    offset: u64,
    data: &[u8],
    sync: &[FileHandle],
) -> io::Result<()> {
    backend.write_batch(&[WriteOp { file, offset, data }], sync)
}

fn assert_io_error<T: std::fmt::Debug>(what: &str, result: io::Result<T>) {
    assert!(
        result.is_err(),
        "{what}: expected an io error, got {result:?}"
    );
}

/// Runs every check against `backend`, using files under `dir`.
/// Panics (test failure) on the first deviation.
pub fn run_all(backend: &mut impl IoBackend, dir: &Path) {
    batch_across_two_files_reads_back(backend, dir);
    short_read_at_end_of_file(backend, dir);
    allocated_space_reads_as_zeros(backend, dir);
    overwrite_in_place(backend, dir);
    unit_writes_rewrite_part_of_a_block(backend, dir);
    batch_larger_than_a_queue(backend, dir);
    open_and_close(backend, dir);
    errors_are_io_errors(backend, dir);
    sync_group_start_then_wait(backend, dir);
    writes_while_a_sync_group_is_outstanding(backend, dir);
    second_sync_start_waits_for_the_first(backend, dir);
    read_ahead_reads_what_read_at_reads(backend, dir);
    // Last: opening a FIFO makes pwrite fall back to buffered I/O for
    // every later open of the same backend.
    sync_group_error_surfaces_once(backend, dir);
}

/// Several aligned writes over two files and an fdatasync of both in one
/// batch; then reads of everything, through a reopened handle too.
pub fn batch_across_two_files_reads_back(backend: &mut impl IoBackend, dir: &Path) {
    let (path_a, path_b) = (dir.join("a.seg"), dir.join("b.seg"));
    let a = backend.open(&path_a, true).expect("open a");
    let b = backend.open(&path_b, true).expect("open b");
    let bufs: Vec<AlignedBuf> = (0..5).map(|i| block_buf(1 + i % 3, i as u64)).collect();
    let writes = [
        WriteOp {
            file: a,
            offset: 0,
            data: &bufs[0],
        },
        WriteOp {
            file: b,
            offset: 0,
            data: &bufs[1],
        },
        WriteOp {
            file: a,
            offset: BLOCK_BYTES as u64,
            data: &bufs[2],
        },
        WriteOp {
            file: b,
            offset: 8 * BLOCK_BYTES as u64,
            data: &bufs[3],
        },
        WriteOp {
            file: a,
            offset: 4 * BLOCK_BYTES as u64,
            data: &bufs[4],
        },
    ];
    backend.write_batch(&writes, &[a, b]).expect("write batch");
    for w in &writes {
        assert_eq!(read_back(backend, w.file, w.offset, w.data.len()), w.data);
    }
    backend.sync_dir(dir).expect("sync dir");
    backend.close(a);
    let a = backend.open(&path_a, false).expect("reopen a");
    assert_eq!(read_back(backend, a, 0, bufs[0].len()), &bufs[0][..]);
    backend.close(a);
    backend.close(b);
}

/// A read past the end returns only what exists; at the end it returns 0.
pub fn short_read_at_end_of_file(backend: &mut impl IoBackend, dir: &Path) {
    let f = backend.open(&dir.join("short.seg"), true).expect("open");
    let data = block_buf(3, 7);
    write_one(backend, f, 0, &data, &[f]).expect("write");
    let mut buf = AlignedBuf::new(8 * BLOCK_BYTES).expect("aligned");
    let n = backend
        .read_at(f, BLOCK_BYTES as u64, &mut buf)
        .expect("read");
    assert_eq!(n, 2 * BLOCK_BYTES);
    assert_eq!(&buf[..n], &data[BLOCK_BYTES..]);
    let n = backend
        .read_at(f, 3 * BLOCK_BYTES as u64, &mut buf)
        .expect("read at end");
    assert_eq!(n, 0);
    let n = backend
        .read_at(f, 100 * BLOCK_BYTES as u64, &mut buf)
        .expect("read past end");
    assert_eq!(n, 0);
    backend.close(f);
}

/// `allocate` extends the file; the new space reads as zeros; writes into
/// it read back.
pub fn allocated_space_reads_as_zeros(backend: &mut impl IoBackend, dir: &Path) {
    let f = backend.open(&dir.join("alloc.seg"), true).expect("open");
    let len = 16 * BLOCK_BYTES;
    backend.allocate(f, len as u64).expect("allocate");
    let mut buf = block_buf(16, 99);
    let n = backend.read_at(f, 0, &mut buf).expect("read allocated");
    assert_eq!(n, len, "allocate must extend the file size");
    assert!(
        buf.iter().all(|&b| b == 0),
        "allocated space must read as zeros"
    );
    let data = block_buf(2, 5);
    write_one(backend, f, 6 * BLOCK_BYTES as u64, &data, &[f]).expect("write into allocated");
    assert_eq!(
        read_back(backend, f, 6 * BLOCK_BYTES as u64, data.len()),
        &data[..]
    );
    assert!(read_back(backend, f, 8 * BLOCK_BYTES as u64, BLOCK_BYTES)
        .iter()
        .all(|&b| b == 0));
    // Allocating less than the size never shrinks the file.
    backend
        .allocate(f, BLOCK_BYTES as u64)
        .expect("allocate less");
    let n = backend.read_at(f, 0, &mut buf).expect("read");
    assert_eq!(n, len);
    backend.close(f);
}

/// Rewriting a partial tail block in place: the later batch wins.
pub fn overwrite_in_place(backend: &mut impl IoBackend, dir: &Path) {
    let f = backend.open(&dir.join("tail.seg"), true).expect("open");
    let first = block_buf(2, 1);
    let second = block_buf(1, 2);
    write_one(backend, f, 0, &first, &[f]).expect("write first");
    write_one(backend, f, BLOCK_BYTES as u64, &second, &[f]).expect("rewrite tail");
    let back = read_back(backend, f, 0, 2 * BLOCK_BYTES);
    assert_eq!(&back[..BLOCK_BYTES], &first[..BLOCK_BYTES]);
    assert_eq!(&back[BLOCK_BYTES..], &second[..]);
    backend.sync(f).expect("sync");
    backend.close(f);
}

/// A write of one write unit inside a block (how a small append rewrites
/// only its partial sector) changes those bytes and no others.
pub fn unit_writes_rewrite_part_of_a_block(backend: &mut impl IoBackend, dir: &Path) {
    let f = backend.open(&dir.join("unit.seg"), true).expect("open");
    let unit = backend.write_unit(f);
    let first = block_buf(1, 5);
    let second = block_buf(1, 6);
    write_one(backend, f, 0, &first, &[]).expect("write block");
    // The block's second unit (its only one when the unit is a block).
    let at = if unit < BLOCK_BYTES { unit } else { 0 };
    write_one(backend, f, at as u64, &second[at..at + unit], &[f]).expect("write one unit");
    let back = read_back(backend, f, 0, BLOCK_BYTES);
    assert_eq!(&back[..at], &first[..at]);
    assert_eq!(&back[at..at + unit], &second[at..at + unit]);
    assert_eq!(&back[at + unit..], &first[at + unit..]);
    backend.close(f);
}

/// More writes and syncs than a small submission queue holds: the backend
/// must split the batch and still write and sync everything.
pub fn batch_larger_than_a_queue(backend: &mut impl IoBackend, dir: &Path) {
    const FILES: usize = 12;
    const WRITES_PER_FILE: usize = 24;
    let files: Vec<FileHandle> = (0..FILES)
        .map(|i| {
            backend
                .open(&dir.join(format!("many-{i}.seg")), true)
                .expect("open")
        })
        .collect();
    let bufs: Vec<AlignedBuf> = (0..FILES * WRITES_PER_FILE)
        .map(|i| block_buf(1, 1000 + i as u64))
        .collect();
    let writes: Vec<WriteOp<'_>> = bufs
        .iter()
        .enumerate()
        .map(|(i, data)| WriteOp {
            file: files[i % FILES],
            offset: ((i / FILES) * BLOCK_BYTES) as u64,
            data,
        })
        .collect();
    backend.write_batch(&writes, &files).expect("large batch");
    // Only syncs, more than a small queue holds.
    backend.write_batch(&[], &files).expect("sync-only batch");
    for w in &writes {
        assert_eq!(read_back(backend, w.file, w.offset, BLOCK_BYTES), w.data);
    }
    for f in files {
        backend.close(f);
    }
}

/// Opening a missing file without `create` fails; closed handles are
/// rejected; a handle number may be reused by a later open.
pub fn open_and_close(backend: &mut impl IoBackend, dir: &Path) {
    let missing = backend.open(&dir.join("missing.seg"), false);
    assert_eq!(
        missing.expect_err("open missing").kind(),
        io::ErrorKind::NotFound
    );
    let f = backend.open(&dir.join("closed.seg"), true).expect("open");
    backend.close(f);
    backend.close(f); // closing twice is harmless
    let mut buf = AlignedBuf::new(BLOCK_BYTES).expect("aligned");
    assert_io_error("read closed handle", backend.read_at(f, 0, &mut buf));
    assert_io_error("sync closed handle", backend.sync(f));
}

/// Bad handles and unaligned writes are io errors, not panics, and the
/// backend keeps working afterwards.
pub fn errors_are_io_errors(backend: &mut impl IoBackend, dir: &Path) {
    let bad = FileHandle(u32::MAX - 1);
    let data = block_buf(1, 3);
    let mut buf = AlignedBuf::new(BLOCK_BYTES).expect("aligned");
    assert_io_error(
        "write to bad handle",
        backend.write_batch(
            &[WriteOp {
                file: bad,
                offset: 0,
                data: &data,
            }],
            &[],
        ),
    );
    assert_io_error("sync bad handle in batch", backend.write_batch(&[], &[bad]));
    assert_io_error("sync bad handle", backend.sync(bad));
    assert_io_error("read bad handle", backend.read_at(bad, 0, &mut buf));
    assert_io_error(
        "allocate bad handle",
        backend.allocate(bad, BLOCK_BYTES as u64),
    );

    let f = backend.open(&dir.join("errors.seg"), true).expect("open");
    let unit = backend.write_unit(f);
    assert!(
        unit.is_power_of_two() && (SECTOR_BYTES..=BLOCK_BYTES).contains(&unit),
        "write unit {unit}"
    );
    // Off by half the file's write unit: below it, O_DIRECT refuses.
    let half = unit / 2;
    let big = block_buf(2, 4);
    let unaligned = [
        WriteOp {
            file: f,
            offset: half as u64,
            data: &data,
        },
        WriteOp {
            file: f,
            offset: 0,
            data: &data[..BLOCK_BYTES - half],
        },
        WriteOp {
            file: f,
            offset: 0,
            data: &big[half..half + BLOCK_BYTES],
        },
    ];
    for w in unaligned {
        let what = format!("unaligned write {w:?}");
        assert_io_error(&what, backend.write_batch(&[w], &[f]));
    }
    assert_io_error(
        "sync of a missing dir",
        backend.sync_dir(&dir.join("no-such-dir")),
    );

    // Still usable.
    write_one(backend, f, 0, &data, &[f]).expect("write after errors");
    assert_eq!(read_back(backend, f, 0, BLOCK_BYTES), &data[..]);
    backend.close(f);
}

/// Opens `count` files under `dir` named `<stem>-<i>.seg`.
fn open_files(
    backend: &mut impl IoBackend,
    dir: &Path,
    stem: &str,
    count: usize,
) -> Vec<FileHandle> {
    (0..count)
        .map(|i| {
            backend
                .open(&dir.join(format!("{stem}-{i}.seg")), true)
                .expect("open")
        })
        .collect()
}

/// One block per file at block `block`, without fdatasync.
fn write_one_block_each(
    backend: &mut impl IoBackend,
    files: &[FileHandle],
    block: usize,
    bufs: &[AlignedBuf],
) {
    let writes: Vec<WriteOp<'_>> = files
        .iter()
        .zip(bufs)
        .map(|(&file, data)| WriteOp {
            file,
            offset: (block * BLOCK_BYTES) as u64,
            data,
        })
        .collect();
    backend.write_batch(&writes, &[]).expect("write group");
}

/// A sync group started after its writes completed, then waited for: more
/// files than a small submission queue holds. Waiting with nothing
/// outstanding and a group of no files are both fine.
pub fn sync_group_start_then_wait(backend: &mut impl IoBackend, dir: &Path) {
    const FILES: usize = 12;
    let files = open_files(backend, dir, "group", FILES);
    let bufs: Vec<AlignedBuf> = (0..FILES).map(|i| block_buf(1, 2000 + i as u64)).collect();
    write_one_block_each(backend, &files, 0, &bufs);
    backend.sync_start(&files).expect("sync_start");
    backend.sync_wait().expect("sync_wait");
    backend
        .sync_wait()
        .expect("sync_wait with nothing outstanding");
    backend.sync_start(&[]).expect("sync_start of no files");
    backend.sync_wait().expect("sync_wait of no files");
    for (&f, data) in files.iter().zip(&bufs) {
        assert_eq!(read_back(backend, f, 0, BLOCK_BYTES), &data[..]);
        backend.close(f);
    }
}

/// The engine's pipeline: group k's fdatasyncs are outstanding while group
/// k+1 is written (with and without a batch fdatasync of its own), read
/// and synced singly; then group k is waited for and k+1 started. Every
/// call succeeds and every write reads back.
pub fn writes_while_a_sync_group_is_outstanding(backend: &mut impl IoBackend, dir: &Path) {
    const FILES: usize = 3;
    const GROUPS: usize = 8;
    let files = open_files(backend, dir, "pipe", FILES);
    let solo = backend
        .open(&dir.join("pipe-solo.seg"), true)
        .expect("open");
    let bufs: Vec<Vec<AlignedBuf>> = (0..GROUPS)
        .map(|g| {
            (0..FILES)
                .map(|i| block_buf(1, 3000 + (g * FILES + i) as u64))
                .collect()
        })
        .collect();
    write_one_block_each(backend, &files, 0, &bufs[0]);
    backend.sync_start(&files).expect("sync_start");
    for (g, group) in bufs.iter().enumerate().skip(1) {
        write_one_block_each(backend, &files, g, group);
        // A batch with its own fdatasync, as a partition committing alone.
        let solo_data = &bufs[g - 1][0];
        write_one(backend, solo, (g * BLOCK_BYTES) as u64, solo_data, &[solo])
            .expect("write_batch with fdatasync while a group is outstanding");
        assert_eq!(
            read_back(
                backend,
                files[0],
                ((g - 1) * BLOCK_BYTES) as u64,
                BLOCK_BYTES
            ),
            &bufs[g - 1][0][..]
        );
        backend
            .sync(solo)
            .expect("sync while a group is outstanding");
        backend.sync_wait().expect("sync_wait");
        backend.sync_start(&files).expect("sync_start");
    }
    backend.sync_wait().expect("last sync_wait");
    for (g, group) in bufs.iter().enumerate() {
        for (&f, data) in files.iter().zip(group) {
            assert_eq!(
                read_back(backend, f, (g * BLOCK_BYTES) as u64, BLOCK_BYTES),
                &data[..]
            );
        }
    }
    for f in files {
        backend.close(f);
    }
    backend.close(solo);
}

/// A second `sync_start` first completes the first group: both succeed and
/// one wait finishes the second.
pub fn second_sync_start_waits_for_the_first(backend: &mut impl IoBackend, dir: &Path) {
    let files = open_files(backend, dir, "twice", 2);
    let bufs = [block_buf(1, 41), block_buf(1, 42)];
    write_one_block_each(backend, &files, 0, &bufs);
    backend.sync_start(&files[..1]).expect("first sync_start");
    backend.sync_start(&files[1..]).expect("second sync_start");
    backend.sync_wait().expect("sync_wait");
    backend.sync_wait().expect("nothing outstanding");
    for f in files {
        backend.close(f);
    }
}

/// fdatasync of a FIFO fails with EINVAL in the kernel. In a sync group the
/// error comes from `sync_wait`, exactly once, and not from a `write_batch`
/// that ran meanwhile; a second `sync_start` reports the first group's
/// error and starts nothing.
pub fn sync_group_error_surfaces_once(backend: &mut impl IoBackend, dir: &Path) {
    let path = dir.join("fifo");
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
    // SAFETY: mkfifo only reads the NUL-terminated path for the call.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
    // O_RDWR on a FIFO does not block on Linux.
    let fifo = backend.open(&path, false).expect("open fifo");
    let good = backend
        .open(&dir.join("fifo-good.seg"), true)
        .expect("open");
    let data = block_buf(1, 77);
    let write = || WriteOp {
        file: good,
        offset: 0,
        data: &data,
    };
    backend.write_batch(&[write()], &[]).expect("write");

    backend.sync_start(&[good, fifo]).expect("sync_start");
    let err = backend.sync_wait().expect_err("fdatasync of a FIFO");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err:?}");
    backend.sync_wait().expect("the error is reported once");

    backend.sync_start(&[fifo]).expect("sync_start");
    backend
        .write_batch(&[write()], &[good])
        .expect("the group's error is not the batch's");
    let err = backend.sync_wait().expect_err("fdatasync of a FIFO");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err:?}");

    backend.sync_start(&[fifo]).expect("sync_start");
    let err = backend
        .sync_start(&[good])
        .expect_err("second sync_start reports the first group's error");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err:?}");
    backend.sync_wait().expect("nothing was started");

    // Still usable.
    backend
        .sync_start(&[good])
        .expect("sync_start after errors");
    backend.sync_wait().expect("sync_wait after errors");
    backend.close(fifo);
    backend.close(good);
}

/// A background read (`read_start` .. `read_finish`) returns the bytes a
/// `read_at` of the same range does, short at the end of the file, and
/// hands its buffer back; reads in two slots are kept apart, finished in
/// either order; while they run, writes, syncs and ordinary reads go on.
/// A backend without background reads gives the buffer back at once,
/// untouched, and `read_finish` then has nothing.
pub fn read_ahead_reads_what_read_at_reads(backend: &mut impl IoBackend, dir: &Path) {
    let f = backend.open(&dir.join("ahead.seg"), true).expect("open");
    let g = backend.open(&dir.join("ahead2.seg"), true).expect("open");
    let data = block_buf(6, 21);
    write_one(backend, f, 0, &data, &[f]).expect("write");
    let other = block_buf(2, 22);
    write_one(backend, g, 0, &other, &[g]).expect("write");
    let fresh = || {
        let mut buf = AlignedBuf::new(8 * BLOCK_BYTES).expect("aligned");
        buf.fill(0xAA);
        buf
    };
    let started = match backend.read_start(0, f, BLOCK_BYTES as u64, fresh(), 4 * BLOCK_BYTES) {
        Ok(()) => true,
        Err(back) => {
            assert_eq!(back.len(), 8 * BLOCK_BYTES);
            assert!(back.iter().all(|&b| b == 0xAA), "given back untouched");
            false
        }
    };
    assert_eq!(started, backend.reads_ahead(), "says what it does");
    if started {
        assert!(
            backend.read_start(0, f, 0, fresh(), BLOCK_BYTES).is_err(),
            "one read per slot"
        );
        backend
            .read_start(1, g, 0, fresh(), 2 * BLOCK_BYTES)
            .expect("a second slot");
        assert!(
            backend
                .read_start(READ_AHEAD_SLOTS, f, 0, fresh(), BLOCK_BYTES)
                .is_err(),
            "no slot past the last"
        );
    }
    // Other work meanwhile.
    write_one(backend, g, 2 * BLOCK_BYTES as u64, &other, &[]).expect("write during read-ahead");
    backend
        .sync_start(&[g])
        .expect("sync_start during read-ahead");
    backend.sync_wait().expect("sync_wait during read-ahead");
    assert_eq!(read_back(backend, f, 0, BLOCK_BYTES), &data[..BLOCK_BYTES]);
    if started {
        // Slot 1 first: its completion may come after slot 0's.
        let (buf, res) = backend.read_finish(1).expect("slot 1 was started");
        assert_eq!(res.expect("read-ahead"), 2 * BLOCK_BYTES);
        assert_eq!(&buf[..2 * BLOCK_BYTES], &other[..]);
        let (buf, res) = backend.read_finish(0).expect("slot 0 was started");
        let n = res.expect("read-ahead");
        assert_eq!(n, 4 * BLOCK_BYTES);
        assert_eq!(buf.len(), 8 * BLOCK_BYTES);
        assert_eq!(&buf[..n], &data[BLOCK_BYTES..5 * BLOCK_BYTES]);
        assert!(buf[n..].iter().all(|&b| b == 0xAA), "only `len` bytes read");
        // Short at the end of the file.
        backend
            .read_start(0, f, 4 * BLOCK_BYTES as u64, buf, 4 * BLOCK_BYTES)
            .expect("started again");
        let (_, res) = backend.read_finish(0).expect("started");
        assert_eq!(res.expect("short read-ahead"), 2 * BLOCK_BYTES);
    }
    for slot in 0..READ_AHEAD_SLOTS {
        assert!(backend.read_finish(slot).is_none(), "nothing outstanding");
    }
    backend.close(f);
    backend.close(g);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::io::pwrite::PwriteBackend;

    /// The reference behaviour: pwrite runs the same suite as io_uring.
    #[test]
    fn pwrite_conforms() {
        let dir = scratch_dir();
        run_all(&mut PwriteBackend::new(), dir.path());
    }
}
