//! The catalog: the loaded and the failed versions, and the look-ups on them.
//!
//! Pure data, so the lifecycle can change it and the worker can read it without either
//! knowing about the other. A published catalog is immutable: a change clones it, edits
//! the copy and publishes that, so a request reads one consistent catalog without a lock.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use arc_swap::ArcSwap;
use aviary::pb::inference::{ModelStatistics, repository_index_response::ModelIndex};

use crate::{
    WorkerError, admission::Admission, model::LoadedModel, repository::Fingerprint,
    stats::VersionStats,
};

/// One model version slot: the loaded model and its cumulative statistics.
#[derive(Debug)]
pub struct VersionSlot {
    current: ArcSwap<LoadedModel>,
    stats: VersionStats,
    admission: Arc<Admission>,
}

impl VersionSlot {
    pub(crate) fn new(model: Arc<LoadedModel>, admission: Arc<Admission>) -> VersionSlot {
        VersionSlot {
            current: ArcSwap::new(model),
            stats: VersionStats::default(),
            admission,
        }
    }

    /// The worker's decoded-tensor budgets, which requests to this version draw on
    /// (shared with every other version, so a caller holding only the slot is held to
    /// them too).
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// Swaps in a new copy of the version. Requests already running keep the old one,
    /// and the statistics carry on, because they belong to the version, not the file.
    /// Returns the copy it replaced.
    pub(crate) fn replace(&self, model: Arc<LoadedModel>) -> Arc<LoadedModel> {
        self.current.swap(model)
    }

    /// The model currently in this slot.
    pub fn current(&self) -> Arc<LoadedModel> {
        self.current.load_full()
    }

    /// The slot's statistics.
    pub fn stats(&self) -> &VersionStats {
        &self.stats
    }
}

/// Every loaded version, and the versions whose last load failed. Immutable once
/// published; changes publish a new catalog.
#[derive(Debug, Default, Clone)]
pub(crate) struct Catalog {
    pub(crate) models: BTreeMap<String, BTreeMap<u64, Arc<VersionSlot>>>,
    pub(crate) failed: BTreeMap<(String, u64), Failure>,
}

/// Why a version's last load failed, and which file it was.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) reason: String,
    pub(crate) fingerprint: Fingerprint,
}

impl Catalog {
    /// Loaded versions per model, for route validation.
    pub(crate) fn inventory(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.models
            .iter()
            .map(|(m, versions)| (m.clone(), versions.keys().map(u64::to_string).collect()))
            .collect()
    }

    /// The slot for `model` at `version`; an empty version means the newest loaded.
    pub(crate) fn slot(&self, model: &str, version: &str) -> Result<Arc<VersionSlot>, WorkerError> {
        let versions = self
            .models
            .get(model)
            .ok_or_else(|| WorkerError::UnknownModel {
                model: model.to_owned(),
                available: self.models.keys().cloned().collect::<Vec<_>>().join(", "),
            })?;
        let unknown = || WorkerError::UnknownVersion {
            model: model.to_owned(),
            version: version.to_owned(),
            available: versions
                .keys()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        };
        let slot = if version.is_empty() {
            versions.values().next_back()
        } else {
            let number: u64 = version.parse().map_err(|_| unknown())?;
            versions.get(&number)
        };
        slot.cloned().ok_or_else(unknown)
    }

    /// The slot of a loaded version, if it is loaded.
    pub(crate) fn running(&self, model: &str, version: u64) -> Option<&Arc<VersionSlot>> {
        self.models.get(model).and_then(|v| v.get(&version))
    }

    /// Loaded versions of `model`, oldest first.
    pub(crate) fn versions(&self, model: &str) -> Vec<String> {
        self.models
            .get(model)
            .map(|v| v.keys().map(u64::to_string).collect())
            .unwrap_or_default()
    }

    /// The file a version last failed to load from, if its last load failed.
    pub(crate) fn failed_fingerprint(&self, model: &str, version: u64) -> Option<Fingerprint> {
        self.failed
            .get(&(model.to_owned(), version))
            .map(|f| f.fingerprint)
    }

    /// `ModelStatistics` for one version, every version of a model, or every model.
    pub(crate) fn statistics(
        &self,
        model: &str,
        version: &str,
    ) -> Result<Vec<ModelStatistics>, WorkerError> {
        if !model.is_empty() {
            if !version.is_empty() {
                let slot = self.slot(model, version)?;
                return Ok(vec![slot.stats.snapshot(model, &slot.current().version)]);
            }
            self.slot(model, "")?;
        }
        Ok(self
            .models
            .iter()
            .filter(|(name, _)| model.is_empty() || *name == model)
            .flat_map(|(name, versions)| {
                versions
                    .iter()
                    .map(move |(v, slot)| slot.stats.snapshot(name, &v.to_string()))
            })
            .collect())
    }

    /// Every loaded version's queue and compute duration histograms and memory.
    pub(crate) fn durations(&self) -> Vec<VersionDurations> {
        self.models
            .iter()
            .flat_map(|(name, versions)| {
                versions.iter().map(move |(v, slot)| {
                    let (queue, compute) = slot.stats.durations();
                    VersionDurations {
                        model: name.clone(),
                        version: v.to_string(),
                        queue,
                        compute,
                        memory_bytes: slot.current().memory_bytes,
                    }
                })
            })
            .collect()
    }

    /// Every loaded version: (model, version, its running copy).
    pub(crate) fn loaded(&self) -> Vec<(String, String, Arc<LoadedModel>)> {
        self.models
            .iter()
            .flat_map(|(name, versions)| {
                versions
                    .iter()
                    .map(move |(v, slot)| (name.clone(), v.to_string(), slot.current()))
            })
            .collect()
    }

    /// Every loaded version's counts of values that broke its card's input rules:
    /// (model, version, input, feature, rule, count), zeros left out.
    pub(crate) fn input_violations(&self) -> Vec<InputViolation> {
        self.loaded()
            .into_iter()
            .flat_map(|(name, v, model)| {
                model
                    .input_rules
                    .as_ref()
                    .map(|rules| rules.counts())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(input, feature, broken, count)| InputViolation {
                        model: name.clone(),
                        version: v.clone(),
                        input: input.to_owned(),
                        feature: feature.to_owned(),
                        rule: broken.label(),
                        count,
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// `RepositoryIndex`: every version in the repository with its state.
    pub(crate) fn index(&self, ready_only: bool) -> Vec<ModelIndex> {
        let mut index: Vec<ModelIndex> = self
            .models
            .iter()
            .flat_map(|(name, versions)| {
                versions.keys().map(move |v| ModelIndex {
                    name: name.clone(),
                    version: v.to_string(),
                    state: "READY".to_owned(),
                    // READY is true (the running copy serves), but not the whole truth.
                    reason: self
                        .failed
                        .get(&(name.clone(), *v))
                        .map(|failure| {
                            format!(
                                "the running copy serves; the last reload failed: {}",
                                failure.reason
                            )
                        })
                        .unwrap_or_default(),
                })
            })
            .collect();
        if !ready_only {
            index.extend(
                self.failed
                    .iter()
                    // A failed reload of a running version leaves that version READY.
                    .filter(|((name, version), _)| self.running(name, *version).is_none())
                    .map(|((name, version), failure)| ModelIndex {
                        name: name.clone(),
                        version: version.to_string(),
                        state: "UNAVAILABLE".to_owned(),
                        reason: failure.reason.clone(),
                    }),
            );
            index.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
        }
        index
    }

    /// Drops a version from the loaded ones, and its model once it has none left.
    pub(crate) fn remove_version(&mut self, model: &str, version: u64) {
        if let Some(versions) = self.models.get_mut(model) {
            versions.remove(&version);
            if versions.is_empty() {
                self.models.remove(model);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(reason: &str) -> Failure {
        Failure {
            reason: reason.to_owned(),
            fingerprint: Fingerprint {
                len: 1,
                modified_ns: 2,
                inode: 3,
                card: None,
            },
        }
    }

    #[test]
    fn unknown_models_are_named_with_the_served_ones() {
        let catalog = Catalog::default();
        assert!(matches!(
            catalog.slot("m", ""),
            Err(WorkerError::UnknownModel { model, .. }) if model == "m"
        ));
        assert!(catalog.versions("m").is_empty());
        assert!(catalog.inventory().is_empty());
        assert!(catalog.statistics("m", "").is_err());
        assert!(catalog.statistics("", "").is_ok_and(|s| s.is_empty()));
    }

    #[test]
    fn failed_versions_are_indexed_as_unavailable_unless_ready_only() {
        let mut catalog = Catalog::default();
        catalog
            .failed
            .insert(("b".to_owned(), 2), failure("bad file"));
        catalog
            .failed
            .insert(("a".to_owned(), 1), failure("worse file"));
        assert!(catalog.index(true).is_empty());
        let index = catalog.index(false);
        let listed: Vec<_> = index
            .iter()
            .map(|i| (i.name.as_str(), i.version.as_str(), i.state.as_str()))
            .collect();
        assert_eq!(
            listed,
            [("a", "1", "UNAVAILABLE"), ("b", "2", "UNAVAILABLE")]
        );
        assert_eq!(index[1].reason, "bad file");
        assert_eq!(catalog.failed_fingerprint("b", 2).map(|f| f.inode), Some(3));
        assert_eq!(catalog.failed_fingerprint("b", 3), None);
    }

    #[test]
    fn removing_an_unloaded_version_changes_nothing() {
        let mut catalog = Catalog::default();
        catalog.remove_version("m", 1);
        assert!(catalog.models.is_empty());
    }
}

/// One loaded version's request durations and memory in the worker, for `/metrics`.
#[derive(Debug, Clone)]
pub struct VersionDurations {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: String,
    /// Waiting for a session or a batch.
    pub queue: aviary::metrics::HistogramSnapshot,
    /// Building inputs, the ONNX Runtime run, encoding outputs.
    pub compute: aviary::metrics::HistogramSnapshot,
    /// What the running copy's load added to the process's resident memory.
    pub memory_bytes: Option<u64>,
}

/// How many values broke one input rule of a version's model card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputViolation {
    /// Model.
    pub model: String,
    /// Version.
    pub version: String,
    /// The input.
    pub input: String,
    /// The feature (`column N` unnamed), or the input's name for a whole-input rule.
    pub feature: String,
    /// Which rule (`below_min`, `above_max`, `not_allowed`, `nan`, `inf`).
    pub rule: &'static str,
    /// Values counted since the running copy loaded.
    pub count: u64,
}
