//! What a worker was doing when it hung or died: the requests it had in flight (method, path,
//! age), read from its cell in the shared worker table (see `worker_table`), where the worker
//! records each request as it starts and clears it as it ends. The record survives an abrupt
//! death (abort, segfault, `exit`): the master reads it after the worker is gone, before the cell
//! is given to another worker. Only read for the log lines of [`health`](super::health); it never
//! changes a worker or a slot.

use super::{Supervisor, WorkerId};

impl Supervisor {
    /// The requests worker `id` had in flight, oldest first, for a log line: `GET /exit (12ms),
    /// GET / (1ms)`, `none`, or empty when unknown (no worker table).
    pub(super) fn in_flight_evidence(&self, id: WorkerId) -> String {
        let (Some(w), Some((table, _))) = (self.workers.get(&id), &self.worker_table) else {
            return String::new();
        };
        let Some(cell) = w.table_cell else {
            return String::new();
        };
        let now_us = crate::worker::monotonic_ns() / 1000;
        let (requests, unrecorded) = table.in_flight(cell as usize, now_us);
        if requests.is_empty() && unrecorded == 0 {
            return "none".into();
        }
        let mut listed: Vec<String> = requests
            .iter()
            .map(|r| {
                let age = std::time::Duration::from_micros(r.age_us - r.age_us % 1000);
                format!(
                    "{} {} ({})",
                    r.method,
                    r.path,
                    humantime::format_duration(age)
                )
            })
            .collect();
        if unrecorded > 0 {
            listed.push(format!("{unrecorded} more"));
        }
        listed.join(", ")
    }

    /// [`Self::in_flight_evidence`] as the tail of a log message: `"; in flight: ..."`, or
    /// nothing.
    pub(super) fn evidence_suffix(&self, id: WorkerId) -> String {
        match self.in_flight_evidence(id) {
            e if e.is_empty() => String::new(),
            e => format!("; in flight: {e}"),
        }
    }
}
