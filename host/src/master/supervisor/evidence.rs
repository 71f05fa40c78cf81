//! What a worker was doing when it hung or died: the requests it had in flight (method, path,
//! age). Only read for the log lines of [`health`](super::health); it never changes a worker or
//! a slot.
//!
//! The master does not collect that yet: [`Supervisor::in_flight_evidence`] is the one place
//! that will, and says nothing until then.

use super::{Supervisor, WorkerId};

impl Supervisor {
    /// The requests worker `id` had in flight, for a log line; empty when unknown.
    pub(super) fn in_flight_evidence(&self, _id: WorkerId) -> String {
        String::new()
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
