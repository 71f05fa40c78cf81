//! The accept table: one small shared memory region where every accepting worker publishes how
//! many connections it holds, so that a worker holding clearly more than the least loaded one
//! lets the others take the next connection (nginx's `accept_disabled`, with the whole picture).
//!
//! Why: all workers wait on one listening socket, and the kernel wakes them all for a new
//! connection; when a burst arrives (every keep-alive client of a drained worker reconnecting at
//! once), whichever worker is on a CPU accepts in a loop and takes nearly all of it, and
//! keep-alive connections then stay where they landed.
//!
//! The master creates the table (a memfd, one `u32` cell per worker that can accept at a time)
//! and maps it into each worker as [`TABLE_FD`] with a cell of its own, which it clears again
//! when it reaps the worker (a worker that dies abruptly cannot). A worker writes its live
//! connection count into its cell while it accepts and clears the cell when it stops. Cells are
//! only touched with atomics.
//!
//! This is one of the places host code uses `unsafe`: mapping the table. It reads and writes
//! cells; it decides nothing about accepting.

#![allow(unsafe_code)]

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::mman::{MapFlags, ProtFlags, mmap};

/// Where a worker finds the table.
pub const TABLE_FD: RawFd = 5;
/// A cell no accepting worker owns.
const INACTIVE: u32 = u32::MAX;

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("cannot create the accept table")]
    Create(#[source] nix::Error),
    #[error("cannot map the accept table")]
    Map(#[source] nix::Error),
    #[error("the accept table has {found} bytes, expected at least {expected}")]
    TooSmall { found: u64, expected: u64 },
}

/// A mapped table of `cells` connection counts. Never unmapped: it lives as long as the process.
#[derive(Clone, Copy)]
pub struct Table {
    cells: &'static [AtomicU32],
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Table({} cells)", self.cells.len())
    }
}

fn byte_len(cells: usize) -> usize {
    cells.max(1) * std::mem::size_of::<AtomicU32>()
}

impl Table {
    /// Creates a table of `cells` inactive cells: the master's, once at start.
    pub fn create(cells: usize) -> Result<(Table, OwnedFd), TableError> {
        let fd = nix::sys::memfd::memfd_create(
            c"host-accept-table",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .map_err(TableError::Create)?;
        nix::unistd::ftruncate(&fd, byte_len(cells) as i64).map_err(TableError::Create)?;
        let table = Table::map(&fd, cells)?;
        for cell in table.cells {
            cell.store(INACTIVE, Ordering::Relaxed);
        }
        Ok((table, fd))
    }

    /// Maps a table of `cells` cells from `fd`: a worker's, once at start.
    pub fn map(fd: &impl AsFd, cells: usize) -> Result<Table, TableError> {
        let len = byte_len(cells);
        let found = nix::sys::stat::fstat(fd.as_fd())
            .map_err(TableError::Map)?
            .st_size as u64;
        if found < len as u64 {
            // Mapping past the end of the file would fault on first touch.
            return Err(TableError::TooSmall {
                found,
                expected: len as u64,
            });
        }
        let length = NonZeroUsize::new(len).expect("byte_len is at least 4");
        // SAFETY: a fresh shared mapping of the first `len` bytes of a file checked above to be
        // at least that long; no existing memory is aliased (the kernel picks the address).
        let ptr = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd.as_fd(),
                0,
            )
        }
        .map_err(TableError::Map)?;
        // SAFETY: the mapping is page-aligned (so aligned for `AtomicU32`), `len` bytes long, which
        // is `cells` `AtomicU32`s, readable and writable, and never unmapped, so `'static` holds.
        // Every process that maps it touches it only through these atomics.
        let cells = unsafe {
            std::slice::from_raw_parts(ptr.as_ptr().cast::<AtomicU32>().cast_const(), cells)
        };
        Ok(Table { cells })
    }

    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// Publishes the connection count of the worker owning `cell`.
    pub fn publish(&self, cell: usize, connections: u64) {
        if let Some(c) = self.cells.get(cell) {
            c.store(
                connections.min(u64::from(INACTIVE - 1)) as u32,
                Ordering::Relaxed,
            );
        }
    }

    /// Marks `cell` as owned by no accepting worker.
    pub fn clear(&self, cell: usize) {
        if let Some(c) = self.cells.get(cell) {
            c.store(INACTIVE, Ordering::Relaxed);
        }
    }

    /// How many connections the other accepting workers hold together.
    pub fn others_total(&self, cell: usize) -> u64 {
        self.cells
            .iter()
            .enumerate()
            .filter(|(i, c)| *i != cell && c.load(Ordering::Relaxed) != INACTIVE)
            .map(|(_, c)| u64::from(c.load(Ordering::Relaxed)))
            .sum()
    }

    /// The fewest connections any other accepting worker holds, if there is one.
    pub fn least_loaded_other(&self, cell: usize) -> Option<u64> {
        self.cells
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != cell)
            .map(|(_, c)| c.load(Ordering::Relaxed))
            .filter(|&n| n != INACTIVE)
            .min()
            .map(u64::from)
    }
}

/// Whether a worker holding `mine` connections should let others take the next one, when the
/// least loaded other accepting worker holds `least`: it is ahead by more than a couple of
/// connections, or by more than a quarter.
pub fn over_share(mine: u64, least: u64) -> bool {
    mine > least + (least / 4).max(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_table_is_shared_and_starts_inactive() {
        let (master, fd) = Table::create(4).unwrap();
        let worker = Table::map(&fd, 4).unwrap();
        assert_eq!(worker.least_loaded_other(0), None);
        worker.publish(1, 7);
        worker.publish(2, 3);
        assert_eq!(master.least_loaded_other(0), Some(3));
        assert_eq!(master.least_loaded_other(2), Some(7));
        master.clear(2);
        assert_eq!(worker.least_loaded_other(0), Some(7));
        assert!(matches!(
            Table::map(&fd, 5000),
            Err(TableError::TooSmall { .. })
        ));
    }

    #[test]
    fn over_share_tolerates_a_little_and_a_quarter() {
        assert!(!over_share(2, 0));
        assert!(over_share(3, 0));
        assert!(!over_share(10, 8));
        assert!(over_share(11, 8));
        assert!(!over_share(125, 100));
        assert!(over_share(126, 100));
    }
}
