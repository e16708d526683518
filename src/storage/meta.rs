//! Small metadata files (partition configs, checkpoints): postcard with a
//! CRC, replaced atomically.
//!
//! # Layout (little-endian)
//!
//! | offset | size | field    | notes                                  |
//! |-------:|-----:|----------|----------------------------------------|
//! |      0 |    4 | magic    | `b"SKM1"`                              |
//! |      4 |    2 | version  | [`META_VERSION`]                       |
//! |      6 |    2 | reserved | zero                                   |
//! |      8 |    4 | len      | payload bytes                          |
//! |     12 |    4 | crc32c   | over the payload                       |
//! |     16 |  len | payload  | postcard encoding of the value         |
//!
//! A write goes to `<name>.tmp`, is fsynced, renamed over `<name>`, and
//! the directory is fsynced: a reader sees the old file or the new one,
//! never a mix, also after power loss.

use crate::batch::CRC32C;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub const META_MAGIC: [u8; 4] = *b"SKM1";
pub const META_VERSION: u16 = 1;
pub const META_HEADER_BYTES: usize = 16;
/// Metadata files are small; a larger length field is corruption.
pub const META_BYTES_MAX: usize = 1024 * 1024;

/// Why a metadata file could not be written or read.
#[derive(Debug)]
#[non_exhaustive]
pub enum MetaError {
    /// The file system refused: permissions, full disk, I/O error.
    Io(io::Error),
    /// A [`write_atomic`] whose rename was done but whose directory sync
    /// failed: the new content is in place (readers and a restart see
    /// it), but a power loss may bring back the old file. Not an `Io`:
    /// a caller that took it for "not written" would go on from the old
    /// content while the file holds the new.
    Unsynced(io::Error),
    /// The file exists but is not a valid metadata file: bit rot, a
    /// foreign file, or a write that bypassed the atomic rename.
    Corrupt(&'static str),
    /// Written by a newer skiff.
    UnsupportedVersion(u16),
    /// The payload did not decode as the expected type.
    Decode(postcard::Error),
    /// The value could not be encoded (should not happen for our types).
    Encode(postcard::Error),
    /// One of the above, in this file (see [`read_file`]).
    File {
        path: PathBuf,
        error: Box<MetaError>,
    },
}

impl std::fmt::Display for MetaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetaError::Io(e) => write!(f, "metadata I/O: {e}"),
            MetaError::Unsynced(e) => write!(
                f,
                "metadata replaced, but its directory could not be synced (a power loss may \
                 bring back the old content): {e}"
            ),
            MetaError::Corrupt(what) => write!(f, "corrupt metadata file: {what}"),
            MetaError::UnsupportedVersion(v) => write!(f, "unsupported metadata version {v}"),
            MetaError::Decode(e) => write!(f, "metadata does not decode: {e}"),
            MetaError::Encode(e) => write!(f, "metadata does not encode: {e}"),
            MetaError::File { path, error } => write!(f, "{}: {error}", path.display()),
        }
    }
}

impl std::error::Error for MetaError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MetaError::Io(e) | MetaError::Unsynced(e) => Some(e),
            MetaError::Decode(e) | MetaError::Encode(e) => Some(e),
            MetaError::File { error, .. } => Some(&**error),
            _ => None,
        }
    }
}

/// What was wrong with a metadata file, without the error's payload: for
/// reports that must be cloned and compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetaFault {
    Io(io::ErrorKind),
    Unsynced(io::ErrorKind),
    Corrupt(&'static str),
    UnsupportedVersion(u16),
    Decode,
    Encode,
}

impl MetaError {
    pub fn fault(&self) -> MetaFault {
        match self {
            MetaError::Io(e) => MetaFault::Io(e.kind()),
            MetaError::Unsynced(e) => MetaFault::Unsynced(e.kind()),
            MetaError::Corrupt(what) => MetaFault::Corrupt(what),
            MetaError::UnsupportedVersion(v) => MetaFault::UnsupportedVersion(*v),
            MetaError::Decode(_) => MetaFault::Decode,
            MetaError::Encode(_) => MetaFault::Encode,
            MetaError::File { error, .. } => error.fault(),
        }
    }
}

impl From<io::Error> for MetaError {
    fn from(e: io::Error) -> Self {
        MetaError::Io(e)
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Paths whose next [`write_atomic`] fails its directory sync, after the
/// rename: a test's stand-in for a device that fails that flush.
#[cfg(test)]
pub(crate) static FAIL_DIR_SYNC: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Encodes `value`, writes it to a temp file, fsyncs, renames it over
/// `path` and fsyncs the directory. A failure after the rename is
/// [`MetaError::Unsynced`]: the new content is in place. The directory
/// sync is not retried: after a failed fsync Linux may have dropped what
/// it could not write and report the next one clean, so a retry that
/// succeeds proves nothing.
pub fn write_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), MetaError> {
    let out = envelope(value)?;
    let tmp = tmp_path(path);
    let written = File::create(&tmp).and_then(|mut f| {
        f.write_all(&out)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        // On a full disk a half-written temp file would keep the space the
        // disk is short of, until the next write of the same file.
        let _ = fs::remove_file(&tmp);
        return Err(e.into());
    }
    #[cfg(test)]
    {
        let mut failing = FAIL_DIR_SYNC.lock().expect("fail dir sync lock");
        if let Some(i) = failing.iter().position(|p| p == path) {
            failing.remove(i);
            return Err(MetaError::Unsynced(io::Error::from_raw_os_error(libc::EIO)));
        }
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    File::open(dir.unwrap_or(Path::new(".")))
        .and_then(|d| d.sync_all())
        .map_err(MetaError::Unsynced)
}

/// The file [`write_atomic_reserved`] keeps beside `path`: the room its
/// next write goes into.
pub fn spare_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".spare");
    path.with_file_name(name)
}

/// Room kept in a spare for a file of `len` bytes: twice its size (it
/// may grow between writes), in whole 4 KiB blocks.
fn spare_room(len: usize) -> u64 {
    (len as u64 * 2).max(1).div_ceil(4096) * 4096
}

/// [`write_atomic`] that needs no new room on the disk once the file has
/// been written: for a file that must be writable on a full disk (the
/// producers' snapshot a compaction writes before it frees segments).
///
/// The new content goes into the spare file [`spare_path`] (rewritten in
/// place, so into blocks it already has), is fsynced, and the spare is
/// exchanged with `path` (renameat2 `RENAME_EXCHANGE`, atomic as a rename)
/// before the directory is fsynced. `path` then holds the new content and
/// the spare the old, whose blocks are the next write's room; topped up
/// (fallocate, beyond its end) to twice the file's size while the disk has
/// room. A power cut at any point leaves `path` whole, old or new, as
/// with [`write_atomic`]; the spare's content is never read. Where the
/// file system cannot exchange (vfat, some FUSE), a plain rename: the old
/// content's blocks are freed, and the spare is made anew after the write.
pub fn write_atomic_reserved<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), MetaError> {
    use std::os::unix::fs::FileExt;
    let out = envelope(value)?;
    let spare = spare_path(path);
    let written = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&spare)
        .and_then(|f| {
            f.write_all_at(&out, 0)?;
            if f.metadata()?.len() > out.len() as u64 {
                f.set_len(out.len() as u64)?;
            }
            f.sync_all()
        });
    // A failed write keeps the spare: its blocks are still the room the
    // next write needs.
    written?;
    // Only a file is exchanged: a directory at `path` would become the
    // spare, and the write would look done with no room kept.
    if fs::symlink_metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(MetaError::Io(io::Error::from_raw_os_error(libc::EISDIR)));
    }
    match super::io::exchange(&spare, path) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::Unsupported
            ) =>
        {
            // The first write (no `path` yet), or no exchange here.
            fs::rename(&spare, path)?;
        }
        Err(e) => return Err(e.into()),
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let synced = File::open(dir.unwrap_or(Path::new("."))).and_then(|d| d.sync_all());
    #[cfg(test)]
    let synced = synced.and_then(|()| {
        let mut failing = FAIL_DIR_SYNC.lock().expect("fail dir sync lock");
        match failing.iter().position(|p| p == path) {
            Some(i) => {
                failing.remove(i);
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
            None => Ok(()),
        }
    });
    if let Err(e) = synced {
        // A power cut may yet undo the exchange and make the spare `path`
        // again: never write it in place. The next write makes a new one.
        let _ = fs::remove_file(&spare);
        return Err(MetaError::Unsynced(e));
    }
    // Best effort: without room on the disk the next write has what the
    // spare has ([`reserve_room`] tells).
    if let Err(e) = reserve_spare(&spare, spare_room(out.len())) {
        log::debug!("{}: cannot keep its room: {e}", spare.display());
    }
    Ok(())
}

/// Makes sure the spare beside `path` holds the room the next
/// [`write_atomic_reserved`] of `path` writes into, which that write's own
/// top-up does only while the disk has room: for a caller that must know
/// (a compacted partition's create). An error if it cannot: a full disk,
/// or something other than files at the two paths. Where the file system
/// has no fallocate, what the spare has.
pub fn reserve_room(path: &Path) -> io::Result<()> {
    let m = fs::metadata(path)?;
    if !m.is_file() {
        return Err(io::Error::from_raw_os_error(libc::EISDIR));
    }
    match reserve_spare(&spare_path(path), spare_room(m.len() as usize)) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        r => r,
    }
}

/// Makes sure the spare has `room` bytes of blocks, without changing its
/// size (its content does not matter).
fn reserve_spare(spare: &Path, room: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(spare)?;
    // Already there: no call, so no journal work on an SD card.
    if f.metadata()?.blocks() * 512 >= room {
        return Ok(());
    }
    // SAFETY: the descriptor is open for writing for the whole call.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            0,
            room as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A [`write_atomic`] of `path` done but for its directory sync
/// ([`MetaError::Unsynced`]) counts as written: the file holds the new
/// content, which a restart loads, so its writer goes on with it (rolling
/// memory back would have it run what the disk no longer says, and a
/// retried sync proves nothing). Only a power loss before the directory's
/// next sync (any later write there) can bring back the old content; the
/// log says so.
pub fn unsynced_is_written(path: &Path, written: Result<(), MetaError>) -> Result<(), MetaError> {
    match written {
        Err(MetaError::Unsynced(e)) => {
            log::error!(
                "{}: written, but its directory could not be synced ({e}); skiff goes on with \
                 the new content, which a restart loads too, but a power loss before the next \
                 write here may bring back the old",
                path.display()
            );
            Ok(())
        }
        r => r,
    }
}

/// Rewrites `path` in place and fdatasyncs it: no new file and no rename,
/// so on a journaling file system no journal commit, where
/// [`write_atomic`] costs two (the new file's, the directory's). Only for
/// a file a crash may lose or tear without harm: it then reads as the old
/// version, the new one, or one that fails its check. Recovery's
/// checkpoint is one (recovery is correct without it); rewritten about
/// once a second per partition, it took 0.45 to 2.5 ms of the storage
/// thread each time on this VM with `write_atomic`, and on an SD card each
/// journal commit is a 2 to 20 ms flush.
pub fn overwrite<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), MetaError> {
    use std::os::unix::fs::FileExt;
    let out = envelope(value)?;
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    f.write_all_at(&out, 0)?;
    // Shorter than before (a varint shrank): the size changes, which
    // costs the journal commit this time only.
    if f.metadata()?.len() > out.len() as u64 {
        f.set_len(out.len() as u64)?;
    }
    f.sync_data()?;
    Ok(())
}

fn envelope<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, MetaError> {
    let payload = postcard::to_allocvec(value).map_err(MetaError::Encode)?;
    let mut out = Vec::with_capacity(META_HEADER_BYTES + payload.len());
    out.extend_from_slice(&META_MAGIC);
    out.extend_from_slice(&META_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&CRC32C.checksum(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Reads and checks a metadata file; `Ok(None)` when it does not exist.
pub fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, MetaError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    decode(&bytes).map(Some)
}

/// [`read`], its errors naming the file: for a file whose damage stops
/// start-up, where the operator must know which of the data directory's
/// metadata files to look at.
pub fn read_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, MetaError> {
    read(path).map_err(|error| MetaError::File {
        path: path.to_path_buf(),
        error: Box::new(error),
    })
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, MetaError> {
    if bytes.len() < META_HEADER_BYTES {
        return Err(MetaError::Corrupt("shorter than its header"));
    }
    if bytes[..4] != META_MAGIC {
        return Err(MetaError::Corrupt("bad magic"));
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != META_VERSION {
        return Err(MetaError::UnsupportedVersion(version));
    }
    if bytes[6..8] != [0, 0] {
        return Err(MetaError::Corrupt("reserved field is not zero"));
    }
    let len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    if len > META_BYTES_MAX || bytes.len() != META_HEADER_BYTES + len {
        return Err(MetaError::Corrupt("length does not match the file"));
    }
    let crc = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    let payload = &bytes[META_HEADER_BYTES..];
    if CRC32C.checksum(payload) != crc {
        return Err(MetaError::Corrupt("CRC mismatch"));
    }
    postcard::from_bytes(payload).map_err(MetaError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        a: u64,
        b: String,
    }

    #[test]
    fn round_trip_and_replace() {
        let dir = crate::storage::test_dir();
        let p = dir.path().join("x.meta");
        assert!(read::<Sample>(&p).unwrap().is_none());
        let v = Sample {
            a: 7,
            b: "seven".into(),
        };
        write_atomic(&p, &v).unwrap();
        assert_eq!(read::<Sample>(&p).unwrap(), Some(v));
        let w = Sample {
            a: 8,
            b: "eight".into(),
        };
        write_atomic(&p, &w).unwrap();
        assert_eq!(read::<Sample>(&p).unwrap(), Some(w));
        assert!(!tmp_path(&p).exists());
    }

    /// Each write replaces the file whole and keeps the old one's blocks
    /// as the spare the next goes into; a failed directory sync drops the
    /// spare (a power cut could make it the file again).
    #[test]
    fn a_reserved_write_replaces_the_file_and_keeps_a_spare() {
        let dir = crate::storage::test_dir();
        let p = dir.path().join("x.meta");
        for a in 0..3 {
            let v = Sample {
                a,
                b: "x".repeat(a as usize * 100),
            };
            write_atomic_reserved(&p, &v).unwrap();
            assert_eq!(read::<Sample>(&p).unwrap(), Some(v));
            assert!(spare_path(&p).exists(), "write {a}");
        }
        FAIL_DIR_SYNC.lock().unwrap().push(p.clone());
        let v = Sample {
            a: 9,
            b: "n".into(),
        };
        assert!(matches!(
            write_atomic_reserved(&p, &v),
            Err(MetaError::Unsynced(_))
        ));
        assert_eq!(read::<Sample>(&p).unwrap(), Some(v));
        assert!(!spare_path(&p).exists());
    }

    /// Writes an old value to `p`; gives it back with a new one to write.
    fn old_and_new(p: &Path) -> (Sample, Sample) {
        let old = Sample {
            a: 1,
            b: "old".into(),
        };
        write_atomic(p, &old).unwrap();
        let new = Sample {
            a: 2,
            b: "new".into(),
        };
        (old, new)
    }

    /// A write that fails before its rename leaves the old file as it was
    /// and no temp file behind (here the temp file is /dev/full, which
    /// takes the open and fails the write with ENOSPC).
    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temp_file() {
        let dir = crate::storage::test_dir();
        let p = dir.path().join("x.meta");
        let (old, new) = old_and_new(&p);
        std::os::unix::fs::symlink("/dev/full", tmp_path(&p)).unwrap();
        let e = write_atomic(&p, &new).unwrap_err();
        assert!(
            matches!(&e, MetaError::Io(io) if io.raw_os_error() == Some(libc::ENOSPC)),
            "{e:?}"
        );
        assert_eq!(read::<Sample>(&p).unwrap(), Some(old));
        assert!(
            fs::symlink_metadata(tmp_path(&p)).is_err(),
            "the temp file was left behind"
        );
    }

    /// A write whose directory sync fails comes after its rename: the
    /// new file is in place, and the error says so rather than passing
    /// for a write that left the old file.
    #[test]
    fn a_failed_directory_sync_is_told_apart_from_a_write_not_made() {
        let dir = crate::storage::test_dir();
        let p = dir.path().join("x.meta");
        let (_, new) = old_and_new(&p);
        FAIL_DIR_SYNC.lock().unwrap().push(p.clone());
        let e = write_atomic(&p, &new).unwrap_err();
        assert!(
            matches!(&e, MetaError::Unsynced(io) if io.raw_os_error() == Some(libc::EIO)),
            "{e:?}"
        );
        assert_eq!(read::<Sample>(&p).unwrap(), Some(new));
        assert!(!tmp_path(&p).exists());
    }

    /// An overwrite in place reads back whole whether the new value is
    /// longer or shorter than the old, and creates a missing file.
    #[test]
    fn overwrite_in_place_grows_shrinks_and_creates() {
        use std::os::unix::fs::MetadataExt;
        let dir = crate::storage::test_dir();
        let p = dir.path().join("x.meta");
        for (a, b) in [(1, "a"), (2, "a much longer string"), (3, "")] {
            let v = Sample { a, b: b.into() };
            overwrite(&p, &v).unwrap();
            assert_eq!(read::<Sample>(&p).unwrap(), Some(v));
        }
        let before = fs::metadata(&p).unwrap().ino();
        overwrite(
            &p,
            &Sample {
                a: 4,
                b: "x".into(),
            },
        )
        .unwrap();
        assert_eq!(fs::metadata(&p).unwrap().ino(), before, "the same file");
        assert!(!tmp_path(&p).exists());
    }

    #[test]
    fn read_file_errors_name_the_file() {
        let dir = crate::storage::test_dir();
        let p = dir.path().join("topics.meta");
        fs::write(&p, b"SKM1").unwrap();
        let e = read_file::<Sample>(&p).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: corrupt metadata file: shorter than its header",
                p.display()
            )
        );
        assert_eq!(e.fault(), MetaFault::Corrupt("shorter than its header"));
    }

    #[test]
    fn every_bit_flip_is_an_error() {
        let dir = crate::storage::test_dir();
        let p = dir.path().join("x.meta");
        write_atomic(
            &p,
            &Sample {
                a: 1,
                b: "one".into(),
            },
        )
        .unwrap();
        let good = fs::read(&p).unwrap();
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x10;
            assert!(decode::<Sample>(&b).is_err(), "flip in byte {i} unnoticed");
        }
    }
}
