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

/// Snapshots `source` into `dir`, reusing an existing snapshot with the same content.
pub fn take(source: &Path, dir: &Path) -> Result<Snapshot, SnapshotError> {
    let bytes = std::fs::read(source).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SnapshotError::Missing {
            path: source.to_path_buf(),
        },
        _ => SnapshotError::Read {
            path: source.to_path_buf(),
            source: e,
        },
    })?;
    if bytes.is_empty() {
        return Err(SnapshotError::Empty {
            path: source.to_path_buf(),
        });
    }
    if !bytes.starts_with(b"\x7fELF") {
        let head = String::from_utf8_lossy(&bytes[..bytes.len().min(16)]).into_owned();
        return Err(SnapshotError::NotElf {
            path: source.to_path_buf(),
            head,
        });
    }
    let sha256 = hex(&Sha256::digest(&bytes));
    let path = dir.join(format!("{sha256}.so"));
    if !path.exists() {
        let write_err = |e| SnapshotError::Write {
            path: path.clone(),
            source: e,
        };
        std::fs::create_dir_all(dir).map_err(write_err)?;
        let tmp = dir.join(format!(".{sha256}.{}.tmp", std::process::id()));
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o500))?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(write_err(e));
        }
    }
    Ok(Snapshot {
        path,
        sha256,
        size: bytes.len() as u64,
    })
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
            take(&missing, &dir)
                .unwrap_err()
                .to_string()
                .contains("missing.so does not exist")
        );
        let empty = dir.join("empty.so");
        std::fs::write(&empty, b"").unwrap();
        assert!(
            take(&empty, &dir)
                .unwrap_err()
                .to_string()
                .contains("empty.so is empty")
        );
        let text = dir.join("text.so");
        std::fs::write(&text, b"hello world").unwrap();
        assert!(
            take(&text, &dir)
                .unwrap_err()
                .to_string()
                .contains("not an ELF")
        );

        let good = dir.join("good.so");
        std::fs::write(&good, b"\x7fELF pretend").unwrap();
        let a = take(&good, &dir.join("snap")).unwrap();
        let b = take(&good, &dir.join("snap")).unwrap();
        assert_eq!(a.path, b.path);
        assert_eq!(a.sha256.len(), 64);
        assert_eq!(std::fs::read(&a.path).unwrap(), b"\x7fELF pretend");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
