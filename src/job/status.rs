//! The job status machine: a pure transition table, checked before any write.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a job is in its life. Stored in Postgres as lower-case text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting in its queue for a free worker slot.
    Queued,
    /// Waiting for `run_at` (a delayed job, or a retry after backoff).
    Scheduled,
    /// Held by a worker under a lease.
    Running,
    /// Finished successfully. Terminal.
    Succeeded,
    /// Attempts exhausted (dead-letter). Terminal, but an admin may retry it.
    Dead,
    /// Cancelled by a person or the kill switch. Terminal.
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Queued,
        Status::Scheduled,
        Status::Running,
        Status::Succeeded,
        Status::Dead,
        Status::Cancelled,
    ];

    /// The non-terminal statuses: the jobs Valkey must index.
    pub const LIVE: [Status; 3] = [Status::Queued, Status::Scheduled, Status::Running];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Scheduled => "scheduled",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Dead => "dead",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Succeeded | Status::Dead | Status::Cancelled)
    }

    /// The transition table. Everything not listed here is forbidden.
    ///
    /// `Scheduled -> Running` exists because promotion of a due job is an index
    /// operation in Valkey: a worker may claim a job whose `run_at` has passed
    /// before any promoter recorded `Scheduled -> Queued`.
    /// `Dead -> Queued` is the admin retry of a dead-lettered job.
    pub fn can_transition_to(self, to: Status) -> bool {
        use Status::*;
        matches!(
            (self, to),
            (Queued, Running)
                | (Queued, Cancelled)
                | (Scheduled, Queued)
                | (Scheduled, Running)
                | (Scheduled, Cancelled)
                | (Running, Succeeded)
                | (Running, Scheduled)
                | (Running, Queued)
                | (Running, Dead)
                | (Running, Cancelled)
                | (Dead, Queued)
        )
    }

    /// Every status from which `to` may be reached; used to guard SQL updates
    /// with the same table the pure code uses.
    pub fn sources_of(to: Status) -> Vec<Status> {
        Status::ALL
            .into_iter()
            .filter(|from| from.can_transition_to(to))
            .collect()
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown job status {0:?}; expected one of queued, scheduled, running, succeeded, dead, cancelled")]
pub struct UnknownStatus(pub String);

impl FromStr for Status {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::Status::{self, *};

    /// The whole table written out: every pair of the 6x6 grid is listed once,
    /// so adding a status or a transition forces this test to be revisited.
    const TABLE: [(Status, [bool; 6]); 6] = [
        //            queued scheduled running succeeded dead  cancelled
        (Queued, [false, false, true, false, false, true]),
        (Scheduled, [true, false, true, false, false, true]),
        (Running, [true, true, false, true, true, true]),
        (Succeeded, [false, false, false, false, false, false]),
        (Dead, [true, false, false, false, false, false]),
        (Cancelled, [false, false, false, false, false, false]),
    ];

    #[test]
    fn every_pair_matches_the_table() {
        for (from, row) in TABLE {
            for (to, allowed) in Status::ALL.into_iter().zip(row) {
                assert_eq!(
                    from.can_transition_to(to),
                    allowed,
                    "{from} -> {to} should be {}",
                    if allowed { "allowed" } else { "forbidden" }
                );
            }
        }
    }

    #[test]
    fn terminal_statuses_only_leave_through_admin_retry() {
        for from in Status::ALL.into_iter().filter(|s| s.is_terminal()) {
            let exits: Vec<_> = Status::ALL
                .into_iter()
                .filter(|to| from.can_transition_to(*to))
                .collect();
            if from == Dead {
                assert_eq!(exits, vec![Queued]);
            } else {
                assert!(exits.is_empty(), "{from} must be final, has {exits:?}");
            }
        }
    }

    #[test]
    fn no_status_transitions_to_itself() {
        for s in Status::ALL {
            assert!(!s.can_transition_to(s), "{s} -> {s}");
        }
    }

    #[test]
    fn sources_agree_with_the_table() {
        assert_eq!(Status::sources_of(Running), vec![Queued, Scheduled]);
        assert_eq!(Status::sources_of(Succeeded), vec![Running]);
        assert_eq!(Status::sources_of(Queued), vec![Scheduled, Running, Dead]);
        assert_eq!(
            Status::sources_of(Cancelled),
            vec![Queued, Scheduled, Running]
        );
    }

    #[test]
    fn round_trips_through_text() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>().ok(), Some(s));
            assert_eq!(
                serde_json::to_string(&s).ok(),
                Some(format!("\"{}\"", s.as_str()))
            );
        }
        assert!("Queued".parse::<Status>().is_err());
        assert!("".parse::<Status>().is_err());
    }
}
