//! The approval workflow (`[registry]`): each version's stage (candidate, approved,
//! production, archived) with who set it and when, and the rule that a version not
//! approved takes no more unpinned traffic than the canary cap. Stages start as the
//! version's model card declares (`stage`, `[approval]`), or `candidate`; `aviary ctl
//! approve` and promotion to all of a route's weight change them, kept in `[registry]
//! state_file` across restarts.
//!
//! The rule is checked by [`Control`](crate::control::Control) on every routing change
//! (config file, admin API, rollouts), so no path gives a candidate more than the cap.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aviary_worker::registry::Stage;
use serde::{Deserialize, Serialize};

use crate::GatewayError;

/// A version's stage and how it got there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    /// The stage.
    pub stage: Stage,
    /// Who set it (`key:ops`, `config-file`, the card).
    pub by: String,
    /// When, in milliseconds since the Unix epoch (0: as the card declared it).
    pub at_ms: u64,
    /// Why, as they said.
    #[serde(default)]
    pub note: String,
}

/// The stages the registry has set, by (model, version), and the cap it enforces.
#[derive(Debug)]
pub struct StageRegistry {
    /// The largest share of a model's unpinned traffic, in percent, a version that is
    /// not approved may take.
    cap_percent: u32,
    /// Where the stages set here are kept; `None`: in memory only.
    state_file: Option<PathBuf>,
    set: Mutex<BTreeMap<String, BTreeMap<String, StageRecord>>>,
}

impl StageRegistry {
    /// A registry enforcing `cap_percent`, with the stages saved in `state_file` (read
    /// now when it exists).
    pub fn open(
        cap_percent: u32,
        state_file: Option<PathBuf>,
    ) -> Result<StageRegistry, GatewayError> {
        let set = match &state_file {
            Some(path) if path.exists() => read_state(path)?,
            _ => BTreeMap::new(),
        };
        Ok(StageRegistry {
            cap_percent,
            state_file,
            set: Mutex::new(set),
        })
    }

    /// The canary cap, in percent.
    pub fn cap_percent(&self) -> u32 {
        self.cap_percent
    }

    /// The stage of `model` `version`: as set here, else as its card declares
    /// (`declared`), else candidate.
    pub fn stage(&self, model: &str, version: &str, declared: Option<StageRecord>) -> StageRecord {
        self.set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(model)
            .and_then(|versions| versions.get(version))
            .cloned()
            .or(declared)
            .unwrap_or(StageRecord {
                stage: Stage::Candidate,
                by: String::new(),
                at_ms: 0,
                note: String::new(),
            })
    }

    /// Sets `model` `version` to `record` and saves every stage set.
    pub fn set(&self, model: &str, version: &str, record: StageRecord) -> Result<(), GatewayError> {
        let mut set = self
            .set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        set.entry(model.to_owned())
            .or_default()
            .insert(version.to_owned(), record);
        match &self.state_file {
            Some(path) => write_state(path, &set),
            None => Ok(()),
        }
    }
}

/// Checks one model's weights against the cap: every version with weight whose stage
/// (`stage_of`) does not let it take traffic must hold at most `cap_percent` of the
/// total. The refusal names the version, its stage, its share and the rule.
pub fn check_weights(
    model: &str,
    weights: &[(String, u32)],
    cap_percent: u32,
    stage_of: impl Fn(&str) -> Stage,
) -> Result<(), GatewayError> {
    let total: u64 = weights.iter().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return Ok(());
    }
    for (version, weight) in weights {
        let stage = stage_of(version);
        // share > cap, in integers: weight / total > cap / 100.
        if !stage.may_take_traffic() && u64::from(*weight) * 100 > u64::from(cap_percent) * total {
            return Err(GatewayError::NotApproved {
                model: model.to_owned(),
                version: version.clone(),
                stage: stage.name(),
                share: format!("{:.1}", *weight as f64 * 100.0 / total as f64),
                cap_percent,
            });
        }
    }
    Ok(())
}

fn read_state(
    path: &Path,
) -> Result<BTreeMap<String, BTreeMap<String, StageRecord>>, GatewayError> {
    let problem = |message: String| GatewayError::Config {
        path: "registry.state_file".to_owned(),
        message: format!("{}: {message}", path.display()),
    };
    let text = std::fs::read_to_string(path).map_err(|e| problem(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| problem(e.to_string()))
}

/// Writes the stages through a temporary file renamed over the old: never half a file.
fn write_state(
    path: &Path,
    set: &BTreeMap<String, BTreeMap<String, StageRecord>>,
) -> Result<(), GatewayError> {
    let problem = |e: std::io::Error| GatewayError::Config {
        path: "registry.state_file".to_owned(),
        message: format!("{}: {e}", path.display()),
    };
    let text = serde_json::to_string_pretty(set).unwrap_or_default();
    let staged = path.with_extension("tmp");
    std::fs::write(&staged, text).map_err(problem)?;
    std::fs::rename(&staged, path).map_err(problem)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(pairs: &[(&str, u32)]) -> Vec<(String, u32)> {
        pairs.iter().map(|(v, w)| ((*v).to_owned(), *w)).collect()
    }

    #[test]
    fn a_candidate_takes_at_most_the_cap() {
        let stage_of = |v: &str| match v {
            "1" => Stage::Production,
            _ => Stage::Candidate,
        };
        assert!(check_weights("demo", &weights(&[("1", 90), ("2", 10)]), 10, stage_of).is_ok());
        assert!(check_weights("demo", &weights(&[("1", 100), ("2", 0)]), 0, stage_of).is_ok());
        let refused = check_weights("demo", &weights(&[("1", 89), ("2", 11)]), 10, stage_of)
            .expect_err("over the cap")
            .to_string();
        assert!(
            refused.contains("version 2 is at stage candidate") && refused.contains("11.0%"),
            "{refused}"
        );
        let approved = |_: &str| Stage::Approved;
        assert!(check_weights("demo", &weights(&[("1", 0), ("2", 100)]), 0, approved).is_ok());
    }

    #[test]
    fn stages_set_here_win_over_the_card_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("registry.json");
        let registry = StageRegistry::open(0, Some(file.clone())).expect("open");
        let declared = StageRecord {
            stage: Stage::Approved,
            by: "card".into(),
            at_ms: 0,
            note: String::new(),
        };
        assert_eq!(
            registry.stage("demo", "2", Some(declared.clone())).stage,
            Stage::Approved
        );
        assert_eq!(registry.stage("demo", "3", None).stage, Stage::Candidate);
        let record = StageRecord {
            stage: Stage::Archived,
            by: "key:ops".into(),
            at_ms: 7,
            note: "replaced".into(),
        };
        registry.set("demo", "2", record.clone()).expect("set");
        let reopened = StageRegistry::open(0, Some(file)).expect("reopen");
        assert_eq!(reopened.stage("demo", "2", Some(declared)), record);
    }
}
