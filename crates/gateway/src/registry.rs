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

use aviary_router::rollout::RolloutPlan;
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
    /// Held by a change while it saves, so changes apply one at a time.
    writes: Mutex<()>,
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
            writes: Mutex::new(()),
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

    /// The versions of `model` whose stage was set here.
    pub fn versions(&self, model: &str) -> Vec<String> {
        self.set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(model)
            .map(|versions| versions.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Sets `model` `version` to `record`: saved first, then in force, so a failed
    /// save changes nothing. Changes are serialised by `writes` (the file is written
    /// outside the map's lock, which requests' look-ups take).
    pub fn set(&self, model: &str, version: &str, record: StageRecord) -> Result<(), GatewayError> {
        let _one_at_a_time = self
            .writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = self
            .set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        next.entry(model.to_owned())
            .or_default()
            .insert(version.to_owned(), record);
        if let Some(path) = &self.state_file {
            write_state(path, &next)?;
        }
        *self
            .set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = next;
        Ok(())
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

/// Why `plan` could never finish under the registry's rule: its canary, at `stage`,
/// is not approved and a step gives it more than `cap_percent`. Checked when a rollout
/// starts, by the gateway that drives it or by the controller on every gateway.
pub fn plan_past_cap(plan: &RolloutPlan, stage: Stage, cap_percent: u32) -> Option<String> {
    if stage.may_take_traffic() {
        return None;
    }
    let step = plan.steps.iter().find(|step| step.weight > cap_percent)?;
    Some(format!(
        "canary {} is at stage {}, not approved: a step of {}% is past the {cap_percent}% \
         [registry] canary_cap_percent; approve it first (aviary ctl approve {} {})",
        plan.canary,
        stage.name(),
        step.weight,
        plan.model,
        plan.canary
    ))
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

/// Writes the stages through a temporary file, flushed to disk, then renamed over the
/// old: a crash leaves the old file or the new, never half of one.
fn write_state(
    path: &Path,
    set: &BTreeMap<String, BTreeMap<String, StageRecord>>,
) -> Result<(), GatewayError> {
    use std::io::Write;
    let problem = |e: std::io::Error| GatewayError::Config {
        path: "registry.state_file".to_owned(),
        message: format!("{}: {e}", path.display()),
    };
    let text = serde_json::to_string_pretty(set).unwrap_or_default();
    if let Some(folder) = path.parent().filter(|f| !f.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder).map_err(problem)?;
    }
    let mut staged_name = path.as_os_str().to_owned();
    staged_name.push(".saving");
    let staged = PathBuf::from(staged_name);
    let mut file = std::fs::File::create(&staged).map_err(problem)?;
    file.write_all(text.as_bytes()).map_err(problem)?;
    file.sync_all().map_err(problem)?;
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
    fn a_failed_save_changes_no_stage_and_a_missing_folder_is_made() {
        let dir = tempfile::tempdir().expect("temp dir");
        let record = StageRecord {
            stage: Stage::Approved,
            by: "key:ops".into(),
            at_ms: 1,
            note: String::new(),
        };
        let nested = dir.path().join("state/registry.json");
        let registry = StageRegistry::open(0, Some(nested.clone())).expect("open");
        registry
            .set("demo", "2", record.clone())
            .expect("the folder is made");
        assert!(nested.is_file());
        // A state file under a plain file cannot be written: the stage stays as it was.
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "x").expect("file");
        let registry = StageRegistry::open(0, Some(plain.join("registry.json"))).expect("open");
        assert!(registry.set("demo", "2", record).is_err());
        assert_eq!(registry.stage("demo", "2", None).stage, Stage::Candidate);
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
