//! Content-addressed snapshots of the plugin file, one per generation.
//!
//! At each reload the master reads the configured plugin file, hashes it (sha256) and writes it,
//! read-only, to `state_dir/plugins/<sha256>.so` (via a temporary file and a rename, so a
//! snapshot is never seen half-written). Every worker of the generation loads that path. A file
//! being rewritten mid-rollout, or `cp` over the original, can therefore never crash a running
//! worker or split a generation, and `dlopen` never returns a stale cached handle (a new build is
//! a new path).
//!
//! [`take`] blocks (it reads, hashes and copies up to `max_plugin_bytes`): the master runs it on
//! a thread of its own at a lower priority, never on its event loop. Only regular files are read: a FIFO, device or
//! socket is refused from its metadata before it is opened, and again from `fstat` on the opened
//! descriptor (opened `O_NONBLOCK`, so opening a FIFO cannot hang either).
//!
//! One pass reads, hashes and copies the file into a temporary name, renamed to `<sha256>.so` at
//! the end (what is written is what is named). Bytes whose snapshot already exists are not kept
//! twice, and a failed write (a full disk) matters only when it does not exist: reloading bytes
//! already snapshotted needs no disk space. A file unchanged since its last snapshot (same
//! device, inode, size, mtime and ctime) is not read at all.
//!
//! A snapshot already on disk is never trusted by its name: before it is reused its bytes are
//! hashed again, and it must be this user's own file, writable by nobody else; one that does
//! not match (foreign code under the right name and size, say) is logged and replaced by a fresh
//! copy. The fast path above reuses the snapshot only if the file is the very one this master
//! wrote or checked (same device, inode, size, mtime and ctime), and a rollback re-hashes the
//! kept snapshot ([`verify`]). The snapshot directory is created 0700 and refused when others
//! can write it.
//! This module reads and writes files; it never loads them.

use std::io::{Read, Seek, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};

/// A generation's private copy of the plugin.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The snapshot file workers load.
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    /// How this snapshot was come by, for the log.
    pub taken: Taken,
}

impl Snapshot {
    /// What a gateway group's generations run instead of a plugin: the host binary itself, so
    /// no file (an empty path) and a sha256 of zeros.
    pub fn gateway() -> Snapshot {
        Snapshot {
            path: PathBuf::new(),
            sha256: "0".repeat(64),
            size: 0,
            taken: Taken::Unchanged,
        }
    }
}

/// How [`take`] came by a snapshot: the work it did, from none to all of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    /// The file was unchanged since its last snapshot (same [`Stamp`]): not read at all.
    Unchanged,
    /// Read and hashed; a snapshot of these bytes existed already, so nothing was written.
    Known,
    /// Read, hashed and copied into a new snapshot.
    Copied,
}

impl Taken {
    pub fn as_str(self) -> &'static str {
        match self {
            Taken::Unchanged => "unchanged file, not read",
            Taken::Known => "read, bytes known",
            Taken::Copied => "read and copied",
        }
    }
}

/// What [`take`] accepts.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Accept a file others can write (config `allow_writable_plugin`).
    pub allow_writable: bool,
    /// Largest plugin file snapshotted (config `max_plugin_bytes`).
    pub max_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("plugin file {path} does not exist")]
    Missing { path: PathBuf },
    #[error("plugin file {path} is {what}, not a regular file")]
    NotRegular { path: PathBuf, what: &'static str },
    #[error("plugin file {path} is larger than max_plugin_bytes ({max} bytes)")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("cannot read plugin file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("plugin file {path} is empty")]
    Empty { path: PathBuf },
    #[error("plugin file {path} is not an ELF shared library (starts with {head:?})")]
    NotElf { path: PathBuf, head: String },
    #[error(
        "refusing plugin file {path}: {what} {checked} is {problem}; whoever can write it chooses the code this host runs (fix the permissions, or set allow_writable_plugin = true)"
    )]
    Insecure {
        path: PathBuf,
        what: &'static str,
        checked: PathBuf,
        problem: String,
    },
    #[error("plugin file {path} is not a loadable shared library: {reason}")]
    BadElf { path: PathBuf, reason: String },
    #[error("cannot write snapshot {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot of plugin file {path} abandoned")]
    Cancelled { path: PathBuf },
    #[error("snapshot {path} does not match: {why}")]
    Mismatch { path: PathBuf, why: String },
    #[error(
        "refusing snapshot directory {path}: {problem}; whoever can write it chooses the code this host runs"
    )]
    InsecureDir { path: PathBuf, problem: String },
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Refuses a plugin file, or the directory holding it, that users other than this one (and
/// root) can write: through it they would choose the native code this host runs.
fn check_permissions(source: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(resolved) = std::fs::canonicalize(source) else {
        return Ok(());
    }; // missing: reported by the read
    let me = nix::unistd::geteuid().as_raw();
    let parent = resolved.parent().unwrap_or(Path::new("/")).to_path_buf();
    for (what, checked) in [("the file", resolved.clone()), ("its directory", parent)] {
        let Ok(meta) = std::fs::metadata(&checked) else {
            continue;
        };
        let mode = meta.mode() & 0o7777;
        let problem = if meta.uid() != me && meta.uid() != 0 {
            Some(format!("owned by uid {}", meta.uid()))
        } else if mode & 0o022 != 0 {
            Some(format!(
                "writable by {} (mode {mode:04o})",
                if mode & 0o002 != 0 {
                    "everyone"
                } else {
                    "its group"
                }
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(SnapshotError::Insecure {
                path: source.to_path_buf(),
                what,
                checked,
                problem,
            });
        }
    }
    Ok(())
}

/// Checks the ELF structure of the copy before any worker maps it: a 64-bit shared object whose
/// loadable segments and section table lie inside the file. A truncated file (or one still being
/// written by the linker) would otherwise be mapped past its end and kill the worker with SIGBUS.
/// Reads only the headers (`ReadCache` fetches the ranges it needs), never the whole file.
fn check_elf(source: &Path, copy: &Path, size: u64) -> Result<(), SnapshotError> {
    use object::read::elf::{FileHeader, ProgramHeader};
    let bad = |reason: String| SnapshotError::BadElf {
        path: source.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(copy).map_err(|e| bad(e.to_string()))?;
    let data = object::ReadCache::new(file);
    let header = object::elf::FileHeader64::<object::Endianness>::parse(&data)
        .map_err(|e| bad(format!("{e} (not a 64-bit ELF file, or truncated)")))?;
    let endian = header.endian().map_err(|e| bad(e.to_string()))?;
    if header.e_type(endian) != object::elf::ET_DYN {
        return Err(bad(format!(
            "ELF type {} is not a shared object",
            header.e_type(endian)
        )));
    }
    let segments = header
        .program_headers(endian, &data)
        .map_err(|e| bad(format!("{e} (truncated or corrupt)")))?;
    for segment in segments
        .iter()
        .filter(|p| p.p_type(endian) == object::elf::PT_LOAD)
    {
        let end = segment
            .p_offset(endian)
            .saturating_add(segment.p_filesz(endian));
        if end > size {
            return Err(bad(format!(
                "truncated: a loadable segment ends at byte {end}, the file has {size} bytes"
            )));
        }
    }
    header
        .section_headers(endian, &data)
        .map_err(|e| bad(format!("{e} (truncated or corrupt)")))?;
    Ok(())
}

/// What a file type is, in words, for anything but a regular file.
fn non_regular(t: std::fs::FileType) -> Option<&'static str> {
    if t.is_file() {
        None
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_dir() {
        Some("a directory")
    } else {
        Some("not a regular file")
    }
}

/// Opens `source` for reading if, and only if, it is a regular file of at most `max` bytes.
/// Checked before the open (a FIFO is never opened) and on the opened descriptor (the path may
/// have been swapped in between); `O_NONBLOCK` keeps even that open from waiting for a writer.
fn open_regular(source: &Path, max: u64) -> Result<std::fs::File, SnapshotError> {
    let path = || source.to_path_buf();
    let read_err = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => SnapshotError::Missing { path: path() },
        _ => SnapshotError::Read {
            path: path(),
            source: e,
        },
    };
    let check = |meta: std::fs::Metadata| {
        if let Some(what) = non_regular(meta.file_type()) {
            return Err(SnapshotError::NotRegular { path: path(), what });
        }
        if meta.len() > max {
            return Err(SnapshotError::TooLarge { path: path(), max });
        }
        Ok(())
    };
    check(std::fs::metadata(source).map_err(read_err)?)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(source)
        .map_err(read_err)?;
    check(file.metadata().map_err(read_err)?)?;
    Ok(file)
}

/// One pass over the file: its sha256, size and first bytes.
struct Scan {
    sha256: String,
    size: u64,
    head: Vec<u8>,
}

/// Reads `file` from the start through a small buffer, hashing as it goes and writing every
/// chunk to `out` if given (after a failed write, into `write_error`, it only hashes). Stops past `max` bytes and when `cancel` is set. (Reading a whole
/// multi-MiB plugin into memory would leave the master's heap that much larger for good: glibc
/// keeps it after the free.)
fn pass(
    source: &Path,
    file: &mut std::fs::File,
    mut out: Option<&mut std::fs::File>,
    max: u64,
    cancel: &AtomicBool,
    write_error: &mut Option<std::io::Error>,
) -> Result<Scan, SnapshotError> {
    let read_err = |e| SnapshotError::Read {
        path: source.to_path_buf(),
        source: e,
    };
    file.rewind().map_err(read_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let (mut size, mut head) = (0u64, Vec::new());
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(SnapshotError::Cancelled {
                path: source.to_path_buf(),
            });
        }
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        size += n as u64;
        if size > max {
            // The file grew past the limit after its size was checked.
            return Err(SnapshotError::TooLarge {
                path: source.to_path_buf(),
                max,
            });
        }
        if head.len() < 16 {
            head.extend_from_slice(&buf[..n.min(16 - head.len())]);
        }
        hasher.update(&buf[..n]);
        if write_error.is_none()
            && let Some(out) = out.as_deref_mut()
            && let Err(e) = out.write_all(&buf[..n])
        {
            // Keep hashing: the bytes may have a snapshot already, which needs no space.
            *write_error = Some(e);
        }
    }
    Ok(Scan {
        sha256: hex(&hasher.finalize()),
        size,
        head,
    })
}

/// Why the file at `path` is not a trustworthy snapshot of `sha256` (`size` bytes), if it is
/// not: not a regular file of this user's, writable by others, another size, or other bytes
/// (hashed again, never trusted by name).
fn mismatch(
    path: &Path,
    sha256: &str,
    size: u64,
    cancel: &AtomicBool,
) -> Result<Option<String>, SnapshotError> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) => return Ok(Some(e.to_string())),
    };
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_file() {
        return Ok(Some("not a regular file".into()));
    }
    if meta.uid() != me {
        return Ok(Some(format!(
            "owned by uid {}, not by this user",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Ok(Some(format!(
            "writable by others (mode {:04o})",
            meta.mode() & 0o7777
        )));
    }
    if meta.len() != size {
        return Ok(Some(format!("{} bytes, expected {size}", meta.len())));
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY | nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| SnapshotError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
    let scan = pass(path, &mut file, None, size, cancel, &mut None)?;
    Ok((scan.sha256 != sha256 || scan.size != size)
        .then(|| format!("its content has sha256 {}", scan.sha256)))
}

/// The snapshot of these bytes, if one was already taken and still holds them (hashed again:
/// see [`mismatch`]). One that does not is logged; the caller writes a fresh copy over it.
fn existing(
    dir: &Path,
    scan: &Scan,
    cancel: &AtomicBool,
) -> Result<Option<PathBuf>, SnapshotError> {
    let path = dir.join(format!("{}.so", scan.sha256));
    if std::fs::symlink_metadata(&path).is_err() {
        return Ok(None);
    }
    match mismatch(&path, &scan.sha256, scan.size, cancel)? {
        None => Ok(Some(path)),
        Some(why) => {
            tracing::warn!(
                path = %path.display(),
                "the snapshot on disk did not match its name ({why}); replacing it with a fresh copy"
            );
            Ok(None)
        }
    }
}

/// Checks, by hashing it again, that a kept snapshot (a rollback's) still holds the bytes it is
/// named after and is this user's own file, writable by nobody else.
pub fn verify(snapshot: &Snapshot, cancel: &AtomicBool) -> Result<(), SnapshotError> {
    match mismatch(&snapshot.path, &snapshot.sha256, snapshot.size, cancel)? {
        None => Ok(()),
        Some(why) => Err(SnapshotError::Mismatch {
            path: snapshot.path.clone(),
            why,
        }),
    }
}

/// Creates the snapshot directory (mode 0700) if needed, and refuses one that users other
/// than this one can write, or that is not this user's (or root's).
fn prepare_dir(dir: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let write_err = |e| SnapshotError::Write {
        path: dir.to_path_buf(),
        source: e,
    };
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(write_err)?;
    }
    let meta = std::fs::symlink_metadata(dir).map_err(write_err)?;
    let me = nix::unistd::geteuid().as_raw();
    let problem = if !meta.is_dir() {
        Some("not a directory".to_string())
    } else if meta.uid() != me && meta.uid() != 0 {
        Some(format!("owned by uid {}", meta.uid()))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "writable by others (mode {:04o})",
            meta.mode() & 0o7777
        ))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(SnapshotError::InsecureDir {
            path: dir.to_path_buf(),
            problem,
        }),
        None => Ok(()),
    }
}

/// What identifies an unchanged file without reading it: device, inode, size, and the
/// modification and change times (`ctime` moves on every write and cannot be set by users).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Each plugin file snapshotted, as it was then, its snapshot, and the snapshot file as it was
/// written or checked (in practice one entry: the configured plugin).
type Seen = std::collections::HashMap<PathBuf, (Stamp, Snapshot, Stamp)>;
static LAST: std::sync::Mutex<Option<Seen>> = std::sync::Mutex::new(None);

/// The snapshot taken last time of `source`, if the file has not changed since and the snapshot
/// is still the very file written or checked then (same [`Stamp`]: nothing replaced or
/// rewrote it).
fn unchanged(source: &Path, stamp: Stamp) -> Option<Snapshot> {
    let last = LAST.lock().ok()?;
    let (was, snapshot, written) = last.as_ref()?.get(source)?;
    let still_there = std::fs::symlink_metadata(&snapshot.path)
        .is_ok_and(|m| m.is_file() && Stamp::of(&m) == *written);
    (*was == stamp && still_there).then(|| Snapshot {
        taken: Taken::Unchanged,
        ..snapshot.clone()
    })
}

fn remember(source: &Path, stamp: Stamp, snapshot: &Snapshot) {
    let Ok(written) = std::fs::symlink_metadata(&snapshot.path).map(|m| Stamp::of(&m)) else {
        return;
    };
    if let Ok(mut last) = LAST.lock() {
        let seen = last.get_or_insert_with(Seen::new);
        if seen.len() >= 16 {
            seen.clear();
        }
        seen.insert(source.to_path_buf(), (stamp, snapshot.clone(), written));
    }
}

/// Snapshots `source` into `dir` in one pass: read, hash and copy into a temporary file, then
/// rename it to `<sha256>.so`. A file unchanged since the last snapshot (same [`Stamp`]) is not
/// read at all; bytes whose snapshot already exists are not kept twice, and need no disk space
/// (a write that fails is only reported if the snapshot did not exist). Refuses anything but a
/// regular file of at most `limits.max_bytes`, and unless `limits.allow_writable` a file others
/// can write (see [`check_permissions`]). Returns [`SnapshotError::Cancelled`] soon after
/// `cancel` is set. Blocks: call it off the event loop.
pub fn take(
    source: &Path,
    dir: &Path,
    limits: Limits,
    cancel: &AtomicBool,
) -> Result<Snapshot, SnapshotError> {
    if !limits.allow_writable {
        check_permissions(source)?;
    }
    let mut file = open_regular(source, limits.max_bytes)?;
    let stamp = file
        .metadata()
        .map(|m| Stamp::of(&m))
        .map_err(|e| SnapshotError::Read {
            path: source.to_path_buf(),
            source: e,
        })?;
    if let Some(snapshot) = unchanged(source, stamp) {
        return Ok(snapshot);
    }
    // The copy goes to a temporary name; `create_dir_all` and the create may fail on a full
    // disk, and then the pass only hashes (the bytes may have a snapshot already).
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".incoming.{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let mut write_error = None;
    prepare_dir(dir)?;
    let mut out = match std::fs::create_dir_all(dir).and_then(|()| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
    }) {
        Ok(out) => Some(out),
        Err(e) => {
            write_error = Some(e);
            None
        }
    };
    let result = (|| {
        let scan = pass(
            source,
            &mut file,
            out.as_mut(),
            limits.max_bytes,
            cancel,
            &mut write_error,
        )?;
        if scan.size == 0 {
            return Err(SnapshotError::Empty {
                path: source.to_path_buf(),
            });
        }
        if !scan.head.starts_with(b"\x7fELF") {
            let head = String::from_utf8_lossy(&scan.head).into_owned();
            return Err(SnapshotError::NotElf {
                path: source.to_path_buf(),
                head,
            });
        }
        if let Some(path) = existing(dir, &scan, cancel)? {
            check_elf(source, &path, scan.size)?;
            return Ok(Snapshot {
                path,
                sha256: scan.sha256,
                size: scan.size,
                taken: Taken::Known,
            });
        }
        let path = dir.join(format!("{}.so", scan.sha256));
        let write_err = |e| SnapshotError::Write {
            path: path.clone(),
            source: e,
        };
        if let Some(e) = write_error.take() {
            return Err(write_err(e));
        }
        let out = out.take().expect("no write error, so the copy is open");
        check_elf(source, &tmp, scan.size)?;
        out.sync_all().map_err(write_err)?;
        drop(out);
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o500))
            .map_err(write_err)?;
        std::fs::rename(&tmp, &path).map_err(write_err)?;
        Ok(Snapshot {
            path,
            sha256: scan.sha256,
            size: scan.size,
            taken: Taken::Copied,
        })
    })();
    drop(out);
    let _ = std::fs::remove_file(&tmp); // gone already when renamed
    if let Ok(snapshot) = &result {
        remember(source, stamp, snapshot);
    }
    result
}

/// Lowers the calling thread's scheduling priority (nice 10): it only copies and hashes files.
/// A raised nice value cannot be lowered again without privilege, so this is for threads of
/// their own.
#[allow(unsafe_code)]
pub fn lower_thread_priority() {
    // SAFETY: setpriority takes plain integers; with PRIO_PROCESS and who = 0 it changes the
    // calling thread only (Linux applies nice values per thread), and it touches no memory.
    let rc = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, 10) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the snapshot thread's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn take_(source: &Path, dir: &Path, allow_writable: bool) -> Result<Snapshot, SnapshotError> {
        let limits = Limits {
            allow_writable,
            max_bytes: 512 * MIB,
        };
        take(source, dir, limits, &AtomicBool::new(false))
    }

    #[test]
    fn refuses_missing_empty_and_non_elf_files_with_the_path() {
        let dir = std::env::temp_dir().join(format!("host-snapshot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.so");
        assert!(
            take_(&missing, &dir, false)
                .unwrap_err()
                .to_string()
                .contains("missing.so does not exist")
        );
        let empty = dir.join("empty.so");
        std::fs::write(&empty, b"").unwrap();
        assert!(
            take_(&empty, &dir, false)
                .unwrap_err()
                .to_string()
                .contains("empty.so is empty")
        );
        let truncated = dir.join("truncated.so");
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        std::fs::write(&truncated, &exe[..64 * 1024]).unwrap();
        let err = take_(&truncated, &dir, false).unwrap_err().to_string();
        assert!(
            err.contains("truncated.so is not a loadable shared library"),
            "{err}"
        );
        let text = dir.join("text.so");
        std::fs::write(&text, b"hello world").unwrap();
        assert!(
            take_(&text, &dir, false)
                .unwrap_err()
                .to_string()
                .contains("not an ELF")
        );

        let good = dir.join("good.so");
        std::fs::copy(std::env::current_exe().unwrap(), &good).unwrap();
        let a = take_(&good, &dir.join("snap"), false).unwrap();
        let b = take_(&good, &dir.join("snap"), false).unwrap();
        assert_eq!(a.path, b.path);
        assert_eq!(a.sha256.len(), 64);
        assert_eq!(
            std::fs::read(&a.path).unwrap(),
            std::fs::read(&good).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_existing_snapshot_is_reused_without_writing() {
        let dir = std::env::temp_dir().join(format!("host-snapshot-reuse-{}", std::process::id()));
        let snap = dir.join("snap");
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.so");
        std::fs::copy(std::env::current_exe().unwrap(), &good).unwrap();
        let first = take_(&good, &snap, false).unwrap();
        // Age the directory: creating (and removing) even a temporary file in it would set its
        // mtime to now.
        let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        std::fs::File::open(&snap)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let before = inode(&first.path);

        // The same file, unchanged: not read, nothing written (not even a temporary file).
        let again = take_(&good, &snap, false).unwrap();
        assert_eq!(first.taken, Taken::Copied);
        assert_eq!(
            again.taken,
            Taken::Unchanged,
            "the unchanged file was read again"
        );
        assert_eq!(again.path, first.path);
        assert_eq!(again.sha256, first.sha256);
        assert_eq!(inode(&again.path), before, "the snapshot was not replaced");
        assert_eq!(
            std::fs::metadata(&snap).unwrap().modified().unwrap(),
            old,
            "nothing was created in the snapshot directory"
        );

        // The same bytes in another file: read and hashed, the snapshot kept as it is.
        let copy = dir.join("copy.so");
        std::fs::copy(&good, &copy).unwrap();
        let third = take_(&copy, &snap, false).unwrap();
        assert_eq!(third.taken, Taken::Known);
        assert_eq!(third.path, first.path);
        assert_eq!(inode(&third.path), before, "the snapshot was not replaced");
        let files: Vec<_> = std::fs::read_dir(&snap).unwrap().flatten().collect();
        assert_eq!(files.len(), 1, "no temporary copy left: {files:?}");

        // A rewrite of the file (new ctime) is read again, whatever its mtime says.
        std::fs::copy(&copy, &good).unwrap();
        std::fs::File::open(&good)
            .unwrap()
            .set_modified(old)
            .unwrap();
        std::fs::File::open(&snap)
            .unwrap()
            .set_modified(old)
            .unwrap();
        take_(&good, &snap, false).unwrap();
        assert_ne!(
            std::fs::metadata(&snap).unwrap().modified().unwrap(),
            old,
            "a changed file is read and copied again"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_snapshot_on_disk_is_hashed_again_and_foreign_bytes_replaced() {
        let dir =
            std::env::temp_dir().join(format!("host-snapshot-foreign-{}", std::process::id()));
        let snap = dir.join("snap");
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.so");
        std::fs::copy(std::env::current_exe().unwrap(), &good).unwrap();
        let first = take_(&good, &snap, false).unwrap();
        let real = std::fs::read(&first.path).unwrap();
        // Other bytes of the same size under the same name.
        let mut foreign = real.clone();
        let last = foreign.len() - 1;
        foreign[last] ^= 0xff;
        let plant = |bytes: &[u8]| {
            std::fs::set_permissions(&first.path, std::fs::Permissions::from_mode(0o600)).unwrap();
            std::fs::write(&first.path, bytes).unwrap();
        };
        plant(&foreign);
        // A rollback's check refuses it.
        let err = verify(&first, &AtomicBool::new(false))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("does not match") && err.contains("sha256"),
            "{err}"
        );
        // The unchanged plugin file (not read again) does not vouch for a rewritten snapshot,
        // and the bytes known by name are checked: replaced by a fresh copy.
        let again = take_(&good, &snap, false).unwrap();
        assert_eq!(again.taken, Taken::Copied);
        assert_eq!(std::fs::read(&again.path).unwrap(), real);
        verify(&again, &AtomicBool::new(false)).unwrap();
        // The same with a copy of the plugin under another name (the `Known` path).
        plant(&foreign);
        let copy = dir.join("copy.so");
        std::fs::copy(&good, &copy).unwrap();
        let third = take_(&copy, &snap, false).unwrap();
        assert_eq!(third.taken, Taken::Copied);
        assert_eq!(std::fs::read(&third.path).unwrap(), real);
        // A snapshot directory others can write is refused.
        std::fs::set_permissions(&snap, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::copy(&good, dir.join("fresh.so")).unwrap();
        std::fs::write(dir.join("fresh.so"), b"\x7fELF other").unwrap();
        let err = take_(&dir.join("fresh.so"), &snap, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("refusing snapshot directory"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_fifos_devices_and_files_over_the_limit_before_reading() {
        let dir = std::env::temp_dir().join(format!("host-snapshot-kind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo.so");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Would block forever in open() if it were opened for reading without O_NONBLOCK.
        let err = take_(&fifo, &dir.join("snap"), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fifo.so is a FIFO, not a regular file"),
            "{err}"
        );
        let err = take_(Path::new("/dev/zero"), &dir.join("snap"), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/dev/zero is a character device"), "{err}");
        let err = take_(&dir, &dir.join("snap"), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a directory"), "{err}");

        let good = dir.join("good.so");
        std::fs::copy(std::env::current_exe().unwrap(), &good).unwrap();
        let limits = Limits {
            allow_writable: false,
            max_bytes: 4096,
        };
        let err = take(&good, &dir.join("snap"), limits, &AtomicBool::new(false))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("good.so is larger than max_plugin_bytes (4096 bytes)"),
            "{err}"
        );
        assert!(!dir.join("snap").exists(), "nothing was written");
        // A file that grows past the limit after its size was checked: /proc files say 0 bytes.
        let limits = Limits {
            max_bytes: 16,
            ..limits
        };
        let err = take(
            Path::new("/proc/self/maps"),
            &dir.join("snap"),
            limits,
            &AtomicBool::new(false),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("is larger than max_plugin_bytes (16 bytes)"),
            "{err}"
        );
        let left = std::fs::read_dir(dir.join("snap")).map_or(0, |d| d.count());
        assert_eq!(left, 0, "nothing is left of the partial copy");

        let limits = Limits {
            max_bytes: 512 * MIB,
            ..limits
        };
        let err = take(&good, &dir.join("snap"), limits, &AtomicBool::new(true));
        assert!(
            matches!(err, Err(SnapshotError::Cancelled { .. })),
            "{err:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_a_file_others_can_write_unless_allowed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("host-snapshot-perm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plugin = dir.join("p.so");
        std::fs::copy(std::env::current_exe().unwrap(), &plugin).unwrap();
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = take_(&plugin, &dir.join("snap"), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("p.so")
                && err.contains("writable by everyone")
                && err.contains("allow_writable_plugin"),
            "{err}"
        );
        assert!(take_(&plugin, &dir.join("snap"), true).is_ok());

        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775)).unwrap();
        let err = take_(&plugin, &dir.join("snap"), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("its directory") && err.contains("its group"),
            "{err}"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(take_(&plugin, &dir.join("snap"), false).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
