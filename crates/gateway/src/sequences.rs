//! Sequence affinity: every request of a sequence (Triton's `sequence_id`) goes to the
//! version that served its start, whatever the route's weights do meanwhile, until
//! its end or until it has been idle for the idle timeout. A canary ramp then never
//! splits a conversation whose state (carried by the client, or kept by the model)
//! only one version understands.
//!
//! The table lives in one gateway's memory: a client keeps a sequence on one gateway
//! (one gRPC connection does), as Triton's sequence batcher needs the same server.

use std::{sync::Arc, time::Duration};

use aviary::parameters::{Sequence, SequenceId};
use moka::sync::Cache;

use crate::GatewayError;

/// How long a sequence may go without a request before it is forgotten, by default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// At most this many sequences are held; past it, the least recently used go first.
const CAPACITY: u64 = 1_000_000;

/// The version each open sequence is on, per model.
#[derive(Clone)]
pub struct Sequences {
    open: Cache<(String, SequenceId), Arc<str>>,
    idle_timeout: Duration,
}

impl std::fmt::Debug for Sequences {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequences")
            .field("open", &self.open.entry_count())
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

impl Default for Sequences {
    fn default() -> Self {
        Sequences::new(DEFAULT_IDLE_TIMEOUT)
    }
}

/// Where a request of a sequence goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// It starts the sequence: route it as any request, then [`Sequences::settle`].
    Start,
    /// It continues the sequence: to this version.
    Continue(Arc<str>),
}

impl Sequences {
    /// An empty table forgetting sequences idle for `idle_timeout`.
    pub fn new(idle_timeout: Duration) -> Sequences {
        Sequences {
            open: Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_idle(idle_timeout)
                .build(),
            idle_timeout,
        }
    }

    /// Where `sequence`'s request to `model` goes; `pinned`, the version the request
    /// names, if any. A request that continues a sequence the gateway does not hold
    /// (never started, ended, or idle too long) is refused, as is one pinning another
    /// version than the sequence's.
    pub fn place(
        &self,
        model: &str,
        sequence: &Sequence,
        pinned: Option<&str>,
    ) -> Result<Placement, GatewayError> {
        if sequence.start {
            return Ok(Placement::Start);
        }
        let key = (model.to_owned(), sequence.id.clone());
        let Some(version) = self.open.get(&key) else {
            return Err(refused(format!(
                "inference request for sequence {} to model '{model}' must specify the START \
                 flag on the first request of the sequence (the gateway holds no open \
                 sequence {}: never started, ended, or idle for over {} ms)",
                sequence.id,
                sequence.id,
                self.idle_timeout.as_millis()
            )));
        };
        match pinned {
            Some(pinned) if pinned != &*version => Err(refused(format!(
                "sequence {} of model '{model}' is on version {version}; the request pins \
                 version {pinned}",
                sequence.id
            ))),
            _ => Ok(Placement::Continue(version)),
        }
    }

    /// Records that a request of `sequence` was answered: its end forgets the
    /// sequence; a start answered by `version` itself (`held`) holds it there.
    pub fn settle(&self, model: &str, sequence: &Sequence, version: &str, held: bool) {
        let key = (model.to_owned(), sequence.id.clone());
        if sequence.end {
            self.open.invalidate(&key);
        } else if held {
            self.open.insert(key, version.into());
        }
    }
}

fn refused(message: String) -> GatewayError {
    GatewayError::InvalidRequest(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: u64, start: bool, end: bool) -> Sequence {
        Sequence {
            id: SequenceId::Number(id),
            start,
            end,
        }
    }

    #[test]
    fn a_sequence_stays_on_the_version_of_its_start_until_its_end() {
        let sequences = Sequences::default();
        assert_eq!(
            sequences.place("m", &request(7, true, false), None).ok(),
            Some(Placement::Start)
        );
        sequences.settle("m", &request(7, true, false), "1", true);
        for _ in 0..3 {
            assert_eq!(
                sequences.place("m", &request(7, false, false), None).ok(),
                Some(Placement::Continue("1".into()))
            );
        }
        // Another model's sequence 7 is another sequence.
        assert!(
            sequences
                .place("other", &request(7, false, false), None)
                .is_err()
        );
        sequences.settle("m", &request(7, false, true), "1", false);
        let refused = sequences
            .place("m", &request(7, false, false), None)
            .expect_err("ended");
        assert!(
            refused.to_string().starts_with(
                "inference request for sequence 7 to model 'm' must specify the START flag"
            ),
            "{refused}"
        );
    }

    #[test]
    fn a_pin_must_agree_with_the_sequence_and_a_restart_moves_it() {
        let sequences = Sequences::default();
        sequences.settle("m", &request(1, true, false), "2", true);
        assert!(
            sequences
                .place("m", &request(1, false, false), Some("2"))
                .is_ok()
        );
        let refused = sequences
            .place("m", &request(1, false, false), Some("1"))
            .expect_err("another version");
        assert!(refused.to_string().contains("is on version 2"), "{refused}");
        // A new start of the same id is a new sequence.
        sequences.settle("m", &request(1, true, false), "1", true);
        assert_eq!(
            sequences.place("m", &request(1, false, false), None).ok(),
            Some(Placement::Continue("1".into()))
        );
        // A one-request sequence (start and end) is never held.
        sequences.settle("m", &request(9, true, true), "1", true);
        assert!(
            sequences
                .place("m", &request(9, false, false), None)
                .is_err()
        );
    }

    #[test]
    fn an_idle_sequence_is_forgotten() {
        let sequences = Sequences::new(Duration::from_millis(1));
        sequences.settle("m", &request(3, true, false), "1", true);
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            sequences
                .place("m", &request(3, false, false), None)
                .is_err()
        );
    }
}
