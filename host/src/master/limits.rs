//! The master's process limits: at start it raises its soft open-files limit (`RLIMIT_NOFILE`)
//! to the hard limit, as Go's runtime and nginx's `worker_rlimit_nofile` do, so that workers,
//! which inherit it, can hold as many connections as the system allows (each one is an fd in
//! its worker). It logs the change, and warns when the hard limit itself is low.
//!
//! It never raises the hard limit (that takes privilege, and is the operator's call), and a
//! failure to raise is a warning, not a reason to refuse to start.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// A hard limit below this is worth a warning: ten thousand connections and their upstreams,
/// files and pipes do not fit.
pub const LOW_HARD_LIMIT: u64 = 65536;

/// The limit the warning recommends, and the one `dist/host.service` and `dist/host@.service`
/// set (`LimitNOFILE=`); a unit test keeps them in agreement.
pub const RECOMMENDED_NOFILE: u64 = 1_048_576;

/// What [`raise_nofile`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NofileOutcome {
    /// The soft limit went from `from` to `to` (the hard limit).
    Raised { from: u64, to: u64 },
    /// The soft limit already was the hard limit.
    AtHard { limit: u64 },
    /// The soft limit could not be raised, and stays.
    Refused {
        soft: u64,
        hard: u64,
        error: nix::Error,
    },
    /// The limits could not be read.
    Unknown { error: nix::Error },
}

impl NofileOutcome {
    /// The soft limit in force after the attempt, if known.
    pub fn soft(&self) -> Option<u64> {
        match *self {
            NofileOutcome::Raised { to, .. } => Some(to),
            NofileOutcome::AtHard { limit } => Some(limit),
            NofileOutcome::Refused { soft, .. } => Some(soft),
            NofileOutcome::Unknown { .. } => None,
        }
    }

    /// Logs the outcome: one line, plus a warning when the limit stays low.
    pub fn log(&self) {
        match *self {
            NofileOutcome::Raised { from, to } => tracing::info!(
                "raised the open-files limit (RLIMIT_NOFILE) from {from} to {to}, the hard limit"
            ),
            NofileOutcome::AtHard { limit } => {
                tracing::info!("open-files limit (RLIMIT_NOFILE): {limit}, the hard limit")
            }
            NofileOutcome::Refused { soft, hard, error } => tracing::warn!(
                "cannot raise the open-files limit (RLIMIT_NOFILE) from {soft} to the hard limit {hard}: {error}"
            ),
            NofileOutcome::Unknown { error } => {
                tracing::warn!("cannot read the open-files limit (RLIMIT_NOFILE): {error}")
            }
        }
        if let Some(soft) = self.soft()
            && soft < LOW_HARD_LIMIT
        {
            tracing::warn!(
                "open-files limit is only {soft}: a worker fails to accept connections beyond \
                 about that many open at once; raise the hard limit where the host is started \
                 (systemd: LimitNOFILE={RECOMMENDED_NOFILE} in the unit; a shell: `ulimit -Hn \
                 {RECOMMENDED_NOFILE}` as root, or `nofile` in /etc/security/limits.conf)"
            );
        }
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit. Children started afterwards
/// (the workers) inherit the raised limit.
pub fn raise_nofile() -> NofileOutcome {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(error) => return NofileOutcome::Unknown { error },
    };
    raise_to_hard(soft, hard, |soft, hard| {
        setrlimit(Resource::RLIMIT_NOFILE, soft, hard)
    })
}

/// The decision, apart from the system call `set(soft, hard)`.
fn raise_to_hard(
    soft: u64,
    hard: u64,
    set: impl FnOnce(u64, u64) -> nix::Result<()>,
) -> NofileOutcome {
    if soft >= hard {
        return NofileOutcome::AtHard { limit: soft };
    }
    match set(hard, hard) {
        Ok(()) => NofileOutcome::Raised {
            from: soft,
            to: hard,
        },
        Err(error) => NofileOutcome::Refused { soft, hard, error },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_files_set_the_limit_the_warning_recommends() {
        let line = format!("\nLimitNOFILE={RECOMMENDED_NOFILE}\n");
        for (name, unit) in [
            ("host.service", include_str!("../../../dist/host.service")),
            ("host@.service", include_str!("../../../dist/host@.service")),
        ] {
            assert!(unit.contains(&line), "dist/{name} lacks{line}");
        }
    }

    #[test]
    fn a_soft_limit_below_the_hard_one_is_raised_to_it() {
        let mut asked = None;
        let outcome = raise_to_hard(1024, 524288, |s, h| {
            asked = Some((s, h));
            Ok(())
        });
        assert_eq!(asked, Some((524288, 524288)));
        assert_eq!(
            outcome,
            NofileOutcome::Raised {
                from: 1024,
                to: 524288
            }
        );
        assert_eq!(outcome.soft(), Some(524288));
    }

    #[test]
    fn a_soft_limit_at_the_hard_one_is_left_alone() {
        let outcome = raise_to_hard(4096, 4096, |_, _| panic!("no system call needed"));
        assert_eq!(outcome, NofileOutcome::AtHard { limit: 4096 });
    }

    #[test]
    fn a_refused_raise_keeps_the_soft_limit() {
        let outcome = raise_to_hard(1024, 4096, |_, _| Err(nix::Error::EPERM));
        assert_eq!(outcome.soft(), Some(1024));
        assert!(matches!(outcome, NofileOutcome::Refused { .. }));
    }

    #[test]
    fn raising_this_process_leaves_its_soft_limit_at_the_hard_one() {
        raise_nofile();
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, hard);
    }
}
