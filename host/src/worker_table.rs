//! The worker table: one shared memory region the master creates (a memfd) and maps into every
//! worker, with a cell per worker holding
//!
//! - how many connections it holds that will stay, while it accepts, so that a worker holding
//!   clearly more than the least loaded one lets the others take the next connection (nginx's
//!   `accept_disabled`, with the whole picture). All workers wait on one listening socket and
//!   the kernel wakes them all; when a burst arrives (every keep-alive client of a drained worker
//!   reconnecting at once), whichever worker is on a CPU would otherwise accept nearly all of it.
//! - the requests it has in flight (method, path, start time), so that when it dies abruptly
//!   (abort, segfault, `exit`) or hangs, the master can still say which requests it was serving:
//!   the record cannot depend on the dying process sending a last message.
//! - its cumulative request [`Counters`] (requests by status class, latency, bytes) for
//!   `/metrics`, which the master reads while the worker runs and folds into its generation's
//!   total after the worker is reaped, before the cell is freed: counters never go backwards
//!   when a worker is replaced, and the last requests of a worker that crashed are counted too.
//! - its plugin's own metrics ([`crate::plugin_metrics`]), read and folded the same way.
//!
//! The master gives each worker a cell of its own when it spawns it and frees the cell when it
//! reaps the worker; a worker clears its count when it stops accepting. Only the owning worker
//! writes its cell (from its I/O thread; request body bytes also from the threads that poll the
//! body); the master and the other workers only read. Every access is through atomics.
//!
//! The memfd is sealed against shrinking and growing before any worker exists, and a worker maps
//! it and closes its fd before it loads its plugin: plugin code (an ELF constructor, a handler)
//! can neither truncate the table under the master (which would die of SIGBUS at its next
//! read) nor find its fd. It can still write garbage into any cell through the mapping, so
//! everything read from the table is only a number to report: lengths are clamped to their
//! fields, strings decoded lossily, sums wrap, and no value found there is used as an index.
//!
//! This is one of the places host code uses `unsafe`: mapping the table. It reads and writes
//! cells; it decides nothing.

#![allow(unsafe_code)]

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use nix::sys::mman::{MapFlags, ProtFlags, mmap};

use crate::counters::Counters;
use crate::plugin_metrics::{SERIES, Series};

/// A cell's plugin metric series.
pub type PluginSeries = [Series; SERIES];

/// Where a worker finds the table.
pub const TABLE_FD: RawFd = 5;
/// A count no accepting worker owns.
const INACTIVE: u32 = u32::MAX;
/// Requests a worker records at once; more are only counted.
const RECORDS: usize = 32;
const METHOD_BYTES: usize = 8;
const PATH_WORDS: usize = 13;
const PATH_BYTES: usize = PATH_WORDS * 8;
const BUSY: u64 = 1 << 63;

/// One request in flight: 128 bytes. `head` is `BUSY | method_len << 8 | path_len` while the
/// request runs and 0 when the record is free; it is written last (Release) and read first.
#[repr(C)]
struct Record {
    head: AtomicU64,
    started_us: AtomicU64,
    method: AtomicU64,
    path: [AtomicU64; PATH_WORDS],
}

/// A worker's requests in flight.
#[repr(C)]
struct Requests {
    /// Requests in flight beyond the records.
    overflow: AtomicU64,
    _reserved: AtomicU64,
    records: [Record; RECORDS],
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerTableError {
    #[error("cannot create the worker table")]
    Create(#[source] nix::Error),
    #[error("cannot map the worker table")]
    Map(#[source] nix::Error),
    #[error("the worker table is not sealed against shrinking")]
    NotSealed,
    #[error("the worker table has {found} bytes, expected at least {expected}")]
    TooSmall { found: u64, expected: u64 },
}

/// A mapped table of `cells` cells. Never unmapped: it lives as long as the process.
#[derive(Clone, Copy)]
pub struct WorkerTable {
    counts: &'static [AtomicU32],
    requests: &'static [Requests],
    counters: &'static [Counters],
    series: &'static [PluginSeries],
}

impl std::fmt::Debug for WorkerTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WorkerTable({} cells)", self.counts.len())
    }
}

/// Where the request records start: after the counts, aligned for `Requests`.
fn requests_offset(cells: usize) -> usize {
    (cells * size_of::<AtomicU32>()).next_multiple_of(64)
}

/// Where the request counters start: after the request records, cache-line aligned.
fn counters_offset(cells: usize) -> usize {
    (requests_offset(cells) + cells * size_of::<Requests>()).next_multiple_of(64)
}

/// Where the plugin metric series start: after the request counters, cache-line aligned.
fn series_offset(cells: usize) -> usize {
    (counters_offset(cells) + cells * size_of::<Counters>()).next_multiple_of(64)
}

fn byte_len(cells: usize) -> usize {
    series_offset(cells) + cells * size_of::<PluginSeries>()
}

/// A request as recorded: method, path (both possibly cut short), and how long it has run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlight {
    pub method: String,
    pub path: String,
    pub age_us: u64,
}

impl WorkerTable {
    /// Creates a table of `cells` cells, none active: the master's, once at start. The request
    /// records start zeroed (free) and stay untouched pages until a worker uses them.
    pub fn create(cells: usize) -> Result<(WorkerTable, OwnedFd), WorkerTableError> {
        let cells = cells.max(1);
        use nix::fcntl::{FcntlArg, SealFlag, fcntl};
        use nix::sys::memfd::MFdFlags;
        let fd = nix::sys::memfd::memfd_create(
            c"host-worker-table",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(WorkerTableError::Create)?;
        nix::unistd::ftruncate(&fd, byte_len(cells) as i64).map_err(WorkerTableError::Create)?;
        // Its size is final: a plugin that finds the fd (or reopens it through /proc) and
        // truncates it would otherwise make every process that maps it, the master first, die
        // of SIGBUS at its next touch.
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
            ),
        )
        .map_err(WorkerTableError::Create)?;
        let table = WorkerTable::map(&fd, cells)?;
        for count in table.counts {
            count.store(INACTIVE, Ordering::Relaxed);
        }
        Ok((table, fd))
    }

    /// Maps a table of `cells` cells from `fd`: a worker's, once at start, before any plugin
    /// code runs (the worker closes `fd` right after). Refuses a table that is not sealed
    /// against shrinking: one a plugin could truncate under the master.
    pub fn map(fd: &impl AsFd, cells: usize) -> Result<WorkerTable, WorkerTableError> {
        let cells = cells.max(1);
        let len = byte_len(cells);
        let seals = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_GET_SEALS)
            .map_err(WorkerTableError::Map)?;
        if seals & nix::libc::F_SEAL_SHRINK == 0 {
            return Err(WorkerTableError::NotSealed);
        }
        let found = nix::sys::stat::fstat(fd.as_fd())
            .map_err(WorkerTableError::Map)?
            .st_size as u64;
        if found < len as u64 {
            // Mapping past the end of the file would fault on first touch.
            return Err(WorkerTableError::TooSmall {
                found,
                expected: len as u64,
            });
        }
        let length = NonZeroUsize::new(len).expect("at least one cell");
        // SAFETY: a fresh shared mapping of the first `len` bytes of a file checked above to be
        // at least that long; no existing memory is aliased (the kernel picks the address).
        let base = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd.as_fd(),
                0,
            )
        }
        .map_err(WorkerTableError::Map)?
        .as_ptr()
        .cast::<u8>();
        // SAFETY: the mapping is page-aligned and `len` bytes long: `cells` `AtomicU32`s at the
        // start, then `cells` `Requests`, `cells` `Counters` and `cells` `PluginSeries` (plain
        // atomics, valid for any bits, zero included), each at a 64-byte-aligned offset, all
        // inside it. It is
        // readable and writable and never unmapped, so `'static` holds; every process that maps
        // it touches it only through atomics.
        let (counts, requests, counters, series) = unsafe {
            (
                std::slice::from_raw_parts(base.cast::<AtomicU32>().cast_const(), cells),
                std::slice::from_raw_parts(
                    base.add(requests_offset(cells))
                        .cast::<Requests>()
                        .cast_const(),
                    cells,
                ),
                std::slice::from_raw_parts(
                    base.add(counters_offset(cells))
                        .cast::<Counters>()
                        .cast_const(),
                    cells,
                ),
                std::slice::from_raw_parts(
                    base.add(series_offset(cells))
                        .cast::<PluginSeries>()
                        .cast_const(),
                    cells,
                ),
            )
        };
        Ok(WorkerTable {
            counts,
            requests,
            counters,
            series,
        })
    }

    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// Publishes the staying-connection count of the worker owning `cell`.
    pub fn publish(&self, cell: usize, connections: u64) {
        if let Some(c) = self.counts.get(cell) {
            c.store(
                connections.min(u64::from(INACTIVE - 1)) as u32,
                Ordering::Relaxed,
            );
        }
    }

    /// Marks `cell`'s count as owned by no accepting worker.
    pub fn clear(&self, cell: usize) {
        if let Some(c) = self.counts.get(cell) {
            c.store(INACTIVE, Ordering::Relaxed);
        }
    }

    /// Frees `cell` entirely (count, request records, counters and plugin series), for its next
    /// worker.
    pub fn reset(&self, cell: usize) {
        self.clear(cell);
        if let Some(r) = self.requests.get(cell) {
            r.overflow.store(0, Ordering::Relaxed);
            for record in &r.records {
                record.head.store(0, Ordering::Release);
            }
        }
        if let Some(c) = self.counters.get(cell) {
            c.reset();
        }
        if let Some(s) = self.series.get(cell) {
            crate::plugin_metrics::reset(s);
        }
    }

    /// The plugin metric series of `cell`: the owning worker's to write, anyone's to read.
    pub fn plugin_series(&self, cell: usize) -> Option<&'static PluginSeries> {
        self.series.get(cell)
    }

    /// The request counters of `cell`: the owning worker's to write, anyone's to read.
    pub fn counters(&self, cell: usize) -> Option<&'static Counters> {
        self.counters.get(cell)
    }

    /// How many connections the other accepting workers hold together.
    pub fn others_total(&self, cell: usize) -> u64 {
        self.others(cell).map(u64::from).sum()
    }

    /// The fewest connections any other accepting worker holds, if there is one.
    pub fn least_loaded_other(&self, cell: usize) -> Option<u64> {
        self.others(cell).min().map(u64::from)
    }

    fn others(&self, cell: usize) -> impl Iterator<Item = u32> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(move |(i, _)| *i != cell)
            .map(|(_, c)| c.load(Ordering::Relaxed))
            .filter(|&n| n != INACTIVE)
    }

    /// Records a request starting in `cell` (the calling worker's own) at `now_us`
    /// (CLOCK_MONOTONIC); returns the record to give back to [`WorkerTable::end`], or `None` if
    /// every record is taken (the request is then only counted).
    pub fn begin(&self, cell: usize, method: &str, path: &str, now_us: u64) -> Option<usize> {
        let requests = self.requests.get(cell)?;
        let Some((i, record)) = requests
            .records
            .iter()
            .enumerate()
            .find(|(_, r)| r.head.load(Ordering::Relaxed) == 0)
        else {
            requests.overflow.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let method = &method.as_bytes()[..method.len().min(METHOD_BYTES)];
        let path = &path.as_bytes()[..path.len().min(PATH_BYTES)];
        record.started_us.store(now_us, Ordering::Relaxed);
        record.method.store(pack(method), Ordering::Relaxed);
        for (word, chunk) in record.path.iter().zip(path.chunks(8)) {
            word.store(pack(chunk), Ordering::Relaxed);
        }
        let head = BUSY | (method.len() as u64) << 8 | path.len() as u64;
        record.head.store(head, Ordering::Release);
        Some(i)
    }

    /// The request recorded by [`WorkerTable::begin`] in `cell` is done.
    pub fn end(&self, cell: usize, record: Option<usize>) {
        let Some(requests) = self.requests.get(cell) else {
            return;
        };
        match record.and_then(|i| requests.records.get(i)) {
            Some(r) => r.head.store(0, Ordering::Release),
            None => {
                let _ = requests
                    .overflow
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            }
        }
    }

    /// The requests in flight in `cell`, oldest first, and how many more ran unrecorded. Exact
    /// for a worker that is dead or stopped; for a live one, a snapshot that may be torn.
    pub fn in_flight(&self, cell: usize, now_us: u64) -> (Vec<InFlight>, u64) {
        let Some(requests) = self.requests.get(cell) else {
            return (Vec::new(), 0);
        };
        let mut found: Vec<InFlight> = requests
            .records
            .iter()
            .filter_map(|r| {
                let head = r.head.load(Ordering::Acquire);
                if head & BUSY == 0 {
                    return None;
                }
                let method_len = ((head >> 8) & 0xff) as usize;
                let path_len = (head & 0xff) as usize;
                let path: Vec<u8> = r
                    .path
                    .iter()
                    .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
                    .take(path_len.min(PATH_BYTES))
                    .collect();
                let method = r.method.load(Ordering::Relaxed).to_le_bytes();
                Some(InFlight {
                    method: String::from_utf8_lossy(&method[..method_len.min(METHOD_BYTES)])
                        .into_owned(),
                    path: String::from_utf8_lossy(&path).into_owned(),
                    age_us: now_us.saturating_sub(r.started_us.load(Ordering::Relaxed)),
                })
            })
            .collect();
        found.sort_by_key(|r| std::cmp::Reverse(r.age_us));
        (found, requests.overflow.load(Ordering::Relaxed))
    }
}

/// Up to 8 bytes as a little-endian word.
fn pack(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word[..bytes.len()].copy_from_slice(bytes);
    u64::from_le_bytes(word)
}

/// Whether a worker holding `mine` connections should let others take the next one, when the
/// least loaded other accepting worker holds `least`: it is ahead by more than one connection,
/// or by more than a quarter. (A tolerance of one keeps ten long-lived connections within 6:4
/// even when the other worker loses one race to accept; two let them end 7:3.)
pub fn over_share(mine: u64, least: u64) -> bool {
    mine > least + (least / 4).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_table_is_shared_and_starts_inactive() {
        let (master, fd) = WorkerTable::create(4).unwrap();
        let worker = WorkerTable::map(&fd, 4).unwrap();
        assert_eq!(worker.least_loaded_other(0), None);
        worker.publish(1, 7);
        worker.publish(2, 3);
        assert_eq!(master.least_loaded_other(0), Some(3));
        assert_eq!(master.least_loaded_other(2), Some(7));
        assert_eq!(master.others_total(0), 10);
        master.clear(2);
        assert_eq!(worker.least_loaded_other(0), Some(7));
        assert!(matches!(
            WorkerTable::map(&fd, 5000),
            Err(WorkerTableError::TooSmall { .. })
        ));
    }

    #[test]
    fn requests_in_flight_are_readable_by_another_mapping() {
        let (master, fd) = WorkerTable::create(3).unwrap();
        let worker = WorkerTable::map(&fd, 3).unwrap();
        let long_path = format!("/{}", "x".repeat(300));
        let a = worker.begin(1, "GET", "/exit", 1_000);
        let b = worker.begin(1, "OPTIONS", &long_path, 2_000);
        worker.begin(2, "GET", "/elsewhere", 1_500);
        let (seen, more) = master.in_flight(1, 5_000);
        assert_eq!(more, 0);
        assert_eq!(
            seen[0],
            InFlight {
                method: "GET".into(),
                path: "/exit".into(),
                age_us: 4_000
            }
        );
        assert_eq!(seen[1].method, "OPTIONS");
        assert_eq!(seen[1].path.len(), PATH_BYTES, "cut short");
        worker.end(1, a);
        let (seen, _) = master.in_flight(1, 5_000);
        assert_eq!(seen.len(), 1);
        worker.end(1, b);
        assert!(master.in_flight(1, 5_000).0.is_empty());

        // Past the records, requests are counted.
        let taken: Vec<_> = (0..RECORDS + 2)
            .map(|i| worker.begin(0, "GET", &format!("/{i}"), 0))
            .collect();
        assert_eq!(master.in_flight(0, 0), {
            let (v, _) = master.in_flight(0, 0);
            (v, 2)
        });
        for t in taken {
            worker.end(0, t);
        }
        assert_eq!(master.in_flight(0, 0), (Vec::new(), 0));
        master.reset(2);
        assert!(master.in_flight(2, 0).0.is_empty());
    }

    #[test]
    fn counters_are_shared_per_cell_and_reset_with_it() {
        let (master, fd) = WorkerTable::create(3).unwrap();
        let worker = WorkerTable::map(&fd, 3).unwrap();
        let mine = worker.counters(1).unwrap();
        mine.begin();
        mine.answered(200, 700);
        mine.begin();
        let seen = master.counters(1).unwrap().read();
        assert_eq!((seen.answered(), seen.in_flight), (1, 1));
        assert_eq!(master.counters(0).unwrap().read().answered(), 0);
        assert_eq!(master.counters(2).unwrap().read().answered(), 0);
        assert!(master.counters(3).is_none());
        master.reset(1);
        assert_eq!(worker.counters(1).unwrap().read().answered(), 0);
    }

    #[test]
    fn the_table_cannot_be_resized() {
        let (master, fd) = WorkerTable::create(2).unwrap();
        assert!(nix::unistd::ftruncate(&fd, 0).is_err(), "shrink refused");
        assert!(
            nix::unistd::ftruncate(&fd, 1 << 30).is_err(),
            "grow refused"
        );
        master.publish(0, 1);
        assert!(WorkerTable::map(&fd, 2).is_ok());
        // An unsealed table (not the master's) is refused.
        let loose = nix::sys::memfd::memfd_create(c"loose", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .unwrap();
        nix::unistd::ftruncate(&loose, byte_len(2) as i64).unwrap();
        assert!(matches!(
            WorkerTable::map(&loose, 2),
            Err(WorkerTableError::NotSealed)
        ));
    }

    #[test]
    fn garbage_in_a_cell_reads_as_bounded_values() {
        let (master, fd) = WorkerTable::create(2).unwrap();
        let worker = WorkerTable::map(&fd, 2).unwrap();
        // What a hostile plugin could write through the mapping: every byte 0xff.
        for r in &worker.requests[1].records {
            r.head.store(u64::MAX, Ordering::Relaxed);
            r.started_us.store(u64::MAX, Ordering::Relaxed);
            r.method.store(u64::MAX, Ordering::Relaxed);
            for w in &r.path {
                w.store(u64::MAX, Ordering::Relaxed);
            }
        }
        worker.requests[1]
            .overflow
            .store(u64::MAX, Ordering::Relaxed);
        worker.counts[1].store(u32::MAX - 1, Ordering::Relaxed);
        let (seen, more) = master.in_flight(1, 0);
        assert_eq!((seen.len(), more), (RECORDS, u64::MAX));
        assert!(
            seen.iter()
                .all(|r| r.path.chars().count() <= PATH_BYTES && r.age_us == 0)
        );
        assert_eq!(master.others_total(0), u64::from(u32::MAX - 1));
        master.reset(1);
        assert!(master.in_flight(1, 0).0.is_empty());
    }

    #[test]
    fn over_share_tolerates_a_little_and_a_quarter() {
        assert!(!over_share(1, 0));
        assert!(over_share(2, 0));
        assert!(!over_share(5, 4));
        assert!(over_share(6, 4));
        assert!(!over_share(10, 8));
        assert!(over_share(11, 8));
        assert!(!over_share(125, 100));
        assert!(over_share(126, 100));
    }
}
