//! Content-addressed snapshots of the plugin file, one per generation.
//!
//! At each reload the master reads the configured plugin file once, hashes it (sha256) and
//! writes it, read-only, to `state_dir/plugins/<sha256>.so` (via a temporary file and a rename,
//! so a snapshot is never seen half-written). Every worker of the generation loads that path. A
//! file being rewritten mid-rollout, or `cp` over the original, can therefore never crash a
//! running worker or split a generation, and `dlopen` never returns a stale cached handle
//! (a new build is a new path). This module reads and writes files; it never loads them.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A generation's private copy of the plugin.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The snapshot file workers load.
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("plugin file {path} does not exist")]
    Missing { path: PathBuf },
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

/// Copies `source` to `tmp` through a small buffer, hashing as it goes. Returns the sha256, the
/// size and the first bytes. (Reading a whole multi-MiB plugin into memory would leave the
/// master's heap that much larger for good: glibc keeps it after the free.)
fn copy_and_hash(
    source: &mut std::fs::File,
    tmp: &Path,
) -> std::io::Result<(String, u64, Vec<u8>)> {
    use std::io::Read;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let (mut size, mut head) = (0u64, Vec::new());
    loop {
        let n = source.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if head.len() < 16 {
            head.extend_from_slice(&buf[..n.min(16 - head.len())]);
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        size += n as u64;
    }
    Ok((hex(&hasher.finalize()), size, head))
}

/// Snapshots `source` into `dir`, reusing an existing snapshot with the same content.
/// Unless `allow_writable`, refuses a file others can write (see [`check_permissions`]).
pub fn take(source: &Path, dir: &Path, allow_writable: bool) -> Result<Snapshot, SnapshotError> {
    if !allow_writable {
        check_permissions(source)?;
    }
    let mut file = std::fs::File::open(source).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SnapshotError::Missing {
            path: source.to_path_buf(),
        },
        _ => SnapshotError::Read {
            path: source.to_path_buf(),
            source: e,
        },
    })?;
    std::fs::create_dir_all(dir).map_err(|e| SnapshotError::Write {
        path: dir.to_path_buf(),
        source: e,
    })?;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".incoming.{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let result = (|| {
        let (sha256, size, head) =
            copy_and_hash(&mut file, &tmp).map_err(|e| SnapshotError::Read {
                path: source.to_path_buf(),
                source: e,
            })?;
        if size == 0 {
            return Err(SnapshotError::Empty {
                path: source.to_path_buf(),
            });
        }
        if !head.starts_with(b"\x7fELF") {
            let head = String::from_utf8_lossy(&head).into_owned();
            return Err(SnapshotError::NotElf {
                path: source.to_path_buf(),
                head,
            });
        }
        check_elf(source, &tmp, size)?;
        let path = dir.join(format!("{sha256}.so"));
        if !path.exists() {
            let write_err = |e| SnapshotError::Write {
                path: path.clone(),
                source: e,
            };
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(write_err)?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o500))
                .map_err(write_err)?;
            std::fs::rename(&tmp, &path).map_err(write_err)?;
        }
        Ok(Snapshot { path, sha256, size })
    })();
    let _ = std::fs::remove_file(&tmp); // gone already when renamed
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_missing_empty_and_non_elf_files_with_the_path() {
        let dir = std::env::temp_dir().join(format!("host-snapshot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.so");
        assert!(
            take(&missing, &dir, false)
                .unwrap_err()
                .to_string()
                .contains("missing.so does not exist")
        );
        let empty = dir.join("empty.so");
        std::fs::write(&empty, b"").unwrap();
        assert!(
            take(&empty, &dir, false)
                .unwrap_err()
                .to_string()
                .contains("empty.so is empty")
        );
        let truncated = dir.join("truncated.so");
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        std::fs::write(&truncated, &exe[..64 * 1024]).unwrap();
        let err = take(&truncated, &dir, false).unwrap_err().to_string();
        assert!(
            err.contains("truncated.so is not a loadable shared library"),
            "{err}"
        );
        let text = dir.join("text.so");
        std::fs::write(&text, b"hello world").unwrap();
        assert!(
            take(&text, &dir, false)
                .unwrap_err()
                .to_string()
                .contains("not an ELF")
        );

        let good = dir.join("good.so");
        std::fs::copy(std::env::current_exe().unwrap(), &good).unwrap();
        let a = take(&good, &dir.join("snap"), false).unwrap();
        let b = take(&good, &dir.join("snap"), false).unwrap();
        assert_eq!(a.path, b.path);
        assert_eq!(a.sha256.len(), 64);
        assert_eq!(
            std::fs::read(&a.path).unwrap(),
            std::fs::read(&good).unwrap()
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
        let err = take(&plugin, &dir.join("snap"), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("p.so")
                && err.contains("writable by everyone")
                && err.contains("allow_writable_plugin"),
            "{err}"
        );
        assert!(take(&plugin, &dir.join("snap"), true).is_ok());

        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775)).unwrap();
        let err = take(&plugin, &dir.join("snap"), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("its directory") && err.contains("its group"),
            "{err}"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(take(&plugin, &dir.join("snap"), false).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
