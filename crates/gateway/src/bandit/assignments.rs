//! Sticky users of bandit routes, kept on the version they were first given.
//!
//! A sticky key's hash picks a point of the split, so moving the weights moves the
//! users whose points fall where the segments moved. A bandit moves the weights all
//! the time; without this memory its users would flip between versions with every
//! update. Only new keys follow the current shares.

use std::time::Duration;

use moka::sync::Cache;

/// Keys remembered at most (about 100 bytes each); the least recently used go first.
pub const MAX_ASSIGNMENTS: u64 = 1_000_000;
/// A key not seen for this long is forgotten: it is placed afresh when it comes back.
pub const ASSIGNMENT_IDLE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Each (model, sticky key)'s version on bandit routes.
#[derive(Debug, Clone)]
pub struct Assignments {
    versions: Cache<(String, String), String>,
}

impl Default for Assignments {
    fn default() -> Self {
        Self {
            versions: Cache::builder()
                .max_capacity(MAX_ASSIGNMENTS)
                .time_to_idle(ASSIGNMENT_IDLE)
                .support_invalidation_closures()
                .build(),
        }
    }
}

impl Assignments {
    /// The version for `key` on `model`: the one it was given before when `serves`
    /// says that one still takes unpinned traffic, else `decided` (now remembered).
    pub fn keep(
        &self,
        model: &str,
        key: &str,
        decided: &str,
        serves: impl Fn(&str) -> bool,
    ) -> String {
        let entry = (model.to_owned(), key.to_owned());
        match self.versions.get(&entry) {
            Some(kept) if kept == decided || serves(&kept) => kept,
            _ => {
                self.versions.insert(entry, decided.to_owned());
                decided.to_owned()
            }
        }
    }

    /// Forgets every key of `model` (its route is no longer a bandit).
    pub fn forget(&self, model: &str) {
        let model = model.to_owned();
        // Only fails when invalidation closures are not enabled, and they are.
        let _ = self
            .versions
            .invalidate_entries_if(move |(m, _), _| *m == model);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_keeps_its_first_version_while_that_one_serves() {
        let assignments = Assignments::default();
        assert_eq!(assignments.keep("m", "alice", "1", |_| true), "1");
        // The shares moved: the hash now says 2, but alice stays on 1.
        assert_eq!(assignments.keep("m", "alice", "2", |_| true), "1");
        // A new user follows the shares.
        assert_eq!(assignments.keep("m", "bob", "2", |_| true), "2");
        // Version 1 left the split: alice moves, and stays moved.
        assert_eq!(assignments.keep("m", "alice", "2", |v| v != "1"), "2");
        assert_eq!(assignments.keep("m", "alice", "1", |_| true), "2");
        // Keys are per model.
        assert_eq!(assignments.keep("other", "alice", "1", |_| true), "1");
    }

    #[test]
    fn forgetting_a_model_places_its_keys_afresh() {
        let assignments = Assignments::default();
        assignments.keep("m", "alice", "1", |_| true);
        assignments.keep("other", "alice", "1", |_| true);
        assignments.forget("m");
        assignments.versions.run_pending_tasks();
        assert_eq!(assignments.keep("m", "alice", "2", |_| true), "2");
        assert_eq!(assignments.keep("other", "alice", "2", |_| true), "1");
    }
}
