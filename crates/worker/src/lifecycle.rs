//! Changing what a running worker serves: load, reload and unload versions, version
//! policies, and syncing with the repository on disk.
//!
//! A reload loads and warms up the new file beside the running copy, then swaps it
//! into the version's slot with one `ArcSwap` store: requests already running keep
//! their `Arc` of the old copy and finish on it; the old sessions drop with the last
//! of them. A failed load leaves the running copy serving and returns the error.
//! Lifecycle operations are serialised; requests never wait on them.
//!
//! The lifecycle changes a catalog it is handed and never sees the worker that
//! serves from it, so the worker's reads and its changes do not depend on each other.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use serde::Deserialize;

use crate::{
    WorkerError,
    admission::Admission,
    catalog::{Catalog, Failure, VersionSlot},
    load_request::ModelOverride,
    loader,
    model::{LoadedModel, SessionOptions},
    repository::{self, VersionEntry},
};

/// Which versions of a model the worker keeps loaded (Triton's version policy).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VersionPolicy {
    /// Every version in the repository.
    #[default]
    All,
    /// The newest N versions.
    Latest(u32),
    /// Exactly these versions (those present in the repository).
    Specific(BTreeSet<u64>),
}

impl VersionPolicy {
    /// The versions to keep out of those `present`.
    pub fn select(&self, present: &BTreeSet<u64>) -> BTreeSet<u64> {
        match self {
            VersionPolicy::All => present.clone(),
            VersionPolicy::Latest(n) => present.iter().rev().take(*n as usize).copied().collect(),
            VersionPolicy::Specific(wanted) => present.intersection(wanted).copied().collect(),
        }
    }
}

/// What loading one version did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOutcome {
    /// A running copy was replaced (a reload), rather than a new version added.
    pub replaced: bool,
    /// Reading, creating sessions and warming up.
    pub load_time: Duration,
}

/// What one sync with the repository changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Versions newly loaded.
    pub loaded: Vec<(String, u64)>,
    /// Versions whose file changed and was swapped in.
    pub reloaded: Vec<(String, u64)>,
    /// Versions unloaded (gone from disk or outside the policy).
    pub unloaded: Vec<(String, u64)>,
    /// Versions that should go but were kept, because the caller still routes them.
    pub kept: Vec<(String, u64)>,
    /// Versions that failed to load, with the reason; running copies keep serving.
    pub failed: Vec<(String, u64, String)>,
}

impl SyncReport {
    /// Whether the set of loaded versions changed.
    pub fn changed_inventory(&self) -> bool {
        !(self.loaded.is_empty() && self.unloaded.is_empty())
    }
}

/// Changes the catalog it is given: owns the repository root, the session settings and
/// the version policies, and serialises every change.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    repository: PathBuf,
    session: SessionOptions,
    default_policy: VersionPolicy,
    policies: BTreeMap<String, VersionPolicy>,
    /// Settings of models loaded with a load-time `config` override, until they are
    /// loaded again without one.
    overrides: std::sync::Mutex<BTreeMap<String, ModelOverride>>,
    /// The decoded-tensor budgets every version's requests share.
    admission: Arc<Admission>,
    /// Serialises load, reload, unload and sync; requests never take it.
    serial: tokio::sync::Mutex<()>,
    /// What it has done, for `/metrics`.
    counts: LifecycleCounts,
}

/// Loads, reloads and unloads since start-up, and the time loads took.
#[derive(Debug, Default)]
pub struct LifecycleCounts {
    loads: AtomicU64,
    failed_loads: AtomicU64,
    reloads: AtomicU64,
    failed_reloads: AtomicU64,
    unloads: AtomicU64,
    load_micros: AtomicU64,
}

/// A reading of [`LifecycleCounts`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LifecycleTotals {
    /// New versions loaded.
    pub loads: u64,
    /// New versions that failed to load.
    pub failed_loads: u64,
    /// Running versions swapped for a new copy of their file.
    pub reloads: u64,
    /// Reloads that failed (the running copy kept serving).
    pub failed_reloads: u64,
    /// Versions unloaded, asked for or gone from the repository.
    pub unloads: u64,
    /// Time successful loads and reloads took (file, sessions, warm-up), summed.
    pub load_seconds: f64,
}

impl LifecycleCounts {
    fn record_load(&self, reload: bool, result: Result<Duration, ()>) {
        let counter = match (reload, result.is_ok()) {
            (false, true) => &self.loads,
            (false, false) => &self.failed_loads,
            (true, true) => &self.reloads,
            (true, false) => &self.failed_reloads,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(took) = result {
            let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
            self.load_micros.fetch_add(micros, Ordering::Relaxed);
        }
    }

    fn record_unloads(&self, count: usize) {
        self.unloads.fetch_add(count as u64, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn totals(&self) -> LifecycleTotals {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        LifecycleTotals {
            loads: read(&self.loads),
            failed_loads: read(&self.failed_loads),
            reloads: read(&self.reloads),
            failed_reloads: read(&self.failed_reloads),
            unloads: read(&self.unloads),
            load_seconds: read(&self.load_micros) as f64 / 1e6,
        }
    }
}

impl Lifecycle {
    /// A lifecycle for `<repository>/<model>/<version>` with `session` settings, keeping
    /// the versions `policies` (or `default_policy`, for models without one) select, and
    /// giving each version's slot `admission`. It loads nothing until asked.
    pub(crate) fn new(
        repository: PathBuf,
        session: SessionOptions,
        default_policy: VersionPolicy,
        policies: BTreeMap<String, VersionPolicy>,
        admission: Arc<Admission>,
    ) -> Lifecycle {
        Lifecycle {
            repository,
            session,
            default_policy,
            policies,
            overrides: std::sync::Mutex::default(),
            admission,
            serial: tokio::sync::Mutex::new(()),
            counts: LifecycleCounts::default(),
        }
    }

    /// The repository root.
    pub(crate) fn repository(&self) -> &Path {
        &self.repository
    }

    /// Loads `<repo>/<model>/<version>` and warms it up. If the version is already
    /// loaded, the new copy replaces it (a reload) once it is ready; on any failure
    /// the running copy keeps serving.
    pub(crate) async fn load_version(
        &self,
        catalog: &ArcSwap<Catalog>,
        model: &str,
        version: u64,
    ) -> Result<LoadOutcome, WorkerError> {
        let _serial = self.serial.lock().await;
        let entry = repository::version_entry(self.repository(), model, version)?;
        self.load_entry(catalog, entry).await
    }

    /// Loads the running version's file again and swaps it in; an error if the version
    /// is not loaded.
    pub(crate) async fn reload_version(
        &self,
        catalog: &ArcSwap<Catalog>,
        model: &str,
        version: u64,
    ) -> Result<LoadOutcome, WorkerError> {
        let _serial = self.serial.lock().await;
        // Checked under the lock, so a concurrent unload cannot be undone by this reload.
        catalog.load().slot(model, &version.to_string())?;
        let entry = repository::version_entry(self.repository(), model, version)?;
        self.load_entry(catalog, entry).await
    }

    /// Stops serving a version. Requests already running on it finish; its sessions
    /// are freed when the last one does.
    pub(crate) async fn unload_version(
        &self,
        catalog: &ArcSwap<Catalog>,
        model: &str,
        version: u64,
    ) -> Result<(), WorkerError> {
        let _serial = self.serial.lock().await;
        catalog.load().slot(model, &version.to_string())?;
        update(catalog, |catalog| {
            catalog.remove_version(model, version);
            catalog.failed.remove(&(model.to_owned(), version));
        });
        self.counts.record_unloads(1);
        tracing::info!(model, version, "unloaded model version");
        Ok(())
    }

    /// Brings the loaded versions in line with the repository and the version
    /// policies: loads new versions, reloads versions whose file changed, unloads
    /// versions that are gone or outside the policy unless `may_unload` says no.
    /// `only_model` limits the sync to one model; versions in `unsettled` (files still
    /// being written) are left as they are.
    pub(crate) async fn sync(
        &self,
        catalog: &ArcSwap<Catalog>,
        only_model: Option<&str>,
        unsettled: &BTreeSet<(String, u64)>,
        may_unload: &(dyn Fn(&str, u64) -> bool + Send + Sync),
    ) -> Result<SyncReport, WorkerError> {
        let _serial = self.serial.lock().await;
        self.sync_locked(catalog, only_model, unsettled, may_unload, false)
            .await
    }

    /// [`Lifecycle::sync`], the caller holding `serial`; `reload` also reloads versions
    /// whose file did not change (their settings or card did).
    async fn sync_locked(
        &self,
        catalog: &ArcSwap<Catalog>,
        only_model: Option<&str>,
        unsettled: &BTreeSet<(String, u64)>,
        may_unload: &(dyn Fn(&str, u64) -> bool + Send + Sync),
        reload: bool,
    ) -> Result<SyncReport, WorkerError> {
        let scanned = repository::scan(self.repository())?;
        let mut present: BTreeMap<String, BTreeMap<u64, VersionEntry>> = BTreeMap::new();
        for entry in scanned {
            if only_model.is_none_or(|m| m == entry.model) {
                present
                    .entry(entry.model.clone())
                    .or_default()
                    .insert(entry.version, entry);
            }
        }
        let mut report = SyncReport::default();
        let before = catalog.load_full();

        for (model, versions) in &present {
            let numbers: BTreeSet<u64> = versions.keys().copied().collect();
            let wanted = self.policy(model).select(&numbers);
            for number in wanted {
                let key = (model.clone(), number);
                if unsettled.contains(&key) {
                    continue;
                }
                let entry = &versions[&number];
                let running = before.running(model, number);
                let is_new = running.is_none();
                if let Some(slot) = running {
                    if slot.current().fingerprint == entry.fingerprint && !reload {
                        continue;
                    }
                } else if catalog.load().failed_fingerprint(model, number)
                    == Some(entry.fingerprint)
                {
                    // Same broken file as last time: do not retry on every sync.
                    continue;
                }
                match self.load_entry(catalog, entry.clone()).await {
                    Ok(_) if is_new => report.loaded.push(key),
                    Ok(_) => report.reloaded.push(key),
                    Err(error) => report
                        .failed
                        .push((model.clone(), number, error.to_string())),
                }
            }
        }

        let after = catalog.load_full();
        for (model, versions) in &after.models {
            if only_model.is_some_and(|m| m != model) {
                continue;
            }
            let numbers: BTreeSet<u64> = present
                .get(model)
                .map(|v| v.keys().copied().collect())
                .unwrap_or_default();
            let wanted = self.policy(model).select(&numbers);
            for &number in versions.keys() {
                let key = (model.clone(), number);
                if wanted.contains(&number) || unsettled.contains(&key) {
                    continue;
                }
                if may_unload(model, number) {
                    report.unloaded.push(key);
                } else {
                    report.kept.push(key);
                }
            }
        }
        if !report.unloaded.is_empty() {
            let gone = report.unloaded.clone();
            update(catalog, |catalog| {
                for (model, number) in &gone {
                    catalog.remove_version(model, *number);
                }
            });
            self.counts.record_unloads(report.unloaded.len());
            for (model, version) in &report.unloaded {
                tracing::info!(%model, version, "unloaded model version (gone from the repository or the policy)");
            }
        }
        // A failure kept for a version nothing runs, whose folder is gone (or left the
        // policy), is forgotten: no load will be tried again, and keeping it would go on
        // reporting the version as failed (UNAVAILABLE, `load_failed`) forever.
        let forgotten: Vec<(String, u64)> = {
            let now = catalog.load();
            now.failed
                .keys()
                .filter(|(model, number)| {
                    let wanted = present.get(model).is_some_and(|versions| {
                        let numbers: BTreeSet<u64> = versions.keys().copied().collect();
                        self.policy(model).select(&numbers).contains(number)
                    });
                    only_model.is_none_or(|m| m == model)
                        && !unsettled.contains(&(model.clone(), *number))
                        && now.running(model, *number).is_none()
                        && !wanted
                })
                .cloned()
                .collect()
        };
        if !forgotten.is_empty() {
            update(catalog, |catalog| {
                for key in &forgotten {
                    catalog.failed.remove(key);
                }
            });
            for (model, version) in &forgotten {
                tracing::info!(%model, version, "forgot a failed load: the version is gone from the repository or the policy");
            }
        }
        Ok(report)
    }

    /// Triton's RepositoryModelLoad: loads or reloads `model` from the repository as
    /// its version policy says, new copies beside running ones (no unload-before-load
    /// gap), with the settings `config` overrides (until the next load without one:
    /// every running version is reloaded when they change, or when `reload` says its
    /// files were just supplied). An error when no version of the model ends up
    /// loaded, or one failed; then the previous override is back.
    pub(crate) async fn load_model(
        &self,
        catalog: &ArcSwap<Catalog>,
        model: &str,
        config: Option<ModelOverride>,
        reload: bool,
        may_unload: &(dyn Fn(&str, u64) -> bool + Send + Sync),
    ) -> Result<SyncReport, WorkerError> {
        repository::check_model_name(model)?;
        let _serial = self.serial.lock().await;
        let previous = self.set_override(model, config.clone());
        let changed = previous != config;
        // An explicit load retries files that failed before, even unchanged ones.
        update(catalog, |catalog| {
            catalog.failed.retain(|(m, _), _| m != model)
        });
        let result = self
            .sync_locked(
                catalog,
                Some(model),
                &BTreeSet::new(),
                may_unload,
                changed || reload,
            )
            .await
            .and_then(|report| self.loaded_as_asked(catalog, model, report));
        if result.is_err() {
            self.set_override(model, previous);
        }
        result
    }

    /// Sets (or clears) `model`'s load-time override; returns the one it replaces.
    fn set_override(&self, model: &str, config: Option<ModelOverride>) -> Option<ModelOverride> {
        let mut overrides = self
            .overrides
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match config {
            Some(config) => overrides.insert(model.to_owned(), config),
            None => overrides.remove(model),
        }
    }

    /// `report` of loading `model`, or the error when no version of it is loaded or
    /// one failed.
    fn loaded_as_asked(
        &self,
        catalog: &ArcSwap<Catalog>,
        model: &str,
        report: SyncReport,
    ) -> Result<SyncReport, WorkerError> {
        if catalog.load().versions(model).is_empty() {
            let reasons: Vec<String> = report
                .failed
                .iter()
                .map(|(_, v, reason)| format!("version {v}: {reason}"))
                .collect();
            return Err(if reasons.is_empty() {
                WorkerError::UnknownModel {
                    model: model.to_owned(),
                    available: "no loadable version in the repository".to_owned(),
                }
            } else {
                WorkerError::Load {
                    path: self.repository().join(model),
                    reason: reasons.join("; "),
                }
            });
        }
        if let Some((_, version, reason)) = report.failed.first() {
            return Err(WorkerError::Load {
                path: self.repository().join(model).join(version.to_string()),
                reason: format!("{reason} (the versions that were running keep serving)"),
            });
        }
        Ok(report)
    }

    /// Triton's RepositoryModelUnload: unloads every version of `model`.
    pub(crate) async fn unload_model(
        &self,
        catalog: &ArcSwap<Catalog>,
        model: &str,
    ) -> Result<Vec<u64>, WorkerError> {
        catalog.load().slot(model, "")?;
        // A later load starts from the repository's settings again.
        self.set_override(model, None);
        let versions: Vec<u64> = catalog
            .load()
            .versions(model)
            .iter()
            .filter_map(|v| v.parse().ok())
            .collect();
        for &version in &versions {
            self.unload_version(catalog, model, version).await?;
        }
        Ok(versions)
    }

    /// What it has done since start-up.
    pub(crate) fn totals(&self) -> LifecycleTotals {
        self.counts.totals()
    }

    /// The version policy of `model`: its load-time override's, else its own, else
    /// the default.
    pub(crate) fn policy(&self, model: &str) -> VersionPolicy {
        self.override_of(model)
            .and_then(|o| o.policy)
            .or_else(|| self.policies.get(model).cloned())
            .unwrap_or_else(|| self.default_policy.clone())
    }

    fn override_of(&self, model: &str) -> Option<ModelOverride> {
        self.overrides
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(model)
            .cloned()
    }

    /// Loads one version off the async runtime, then adds it or swaps it in.
    async fn load_entry(
        &self,
        catalog: &ArcSwap<Catalog>,
        entry: VersionEntry,
    ) -> Result<LoadOutcome, WorkerError> {
        let over = self.override_of(&entry.model).unwrap_or_default();
        let options = SessionOptions {
            instances: over.instances.unwrap_or(self.session.instances),
            ..self.session
        };
        let started = Instant::now();
        let (model, number, fingerprint) = (entry.model.clone(), entry.version, entry.fingerprint);
        let reload = catalog.load().running(&model, number).is_some();
        let loaded = loader::off_the_serving_path("load", move || {
            let card = entry
                .card_path
                .as_deref()
                .map(repository::read_card)
                .transpose()?;
            let card = over.apply(card);
            let version = entry.version.to_string();
            let before = aviary::metrics::resident_bytes();
            let mut loaded = LoadedModel::load(
                &entry.model,
                &version,
                &entry.model_path,
                card,
                entry.fingerprint,
                options,
            )?;
            loaded.memory_bytes = before
                .zip(aviary::metrics::resident_bytes())
                .map(|(before, after)| after.saturating_sub(before));
            Ok::<_, WorkerError>(loaded)
        })
        .await?;
        let loaded = match loaded {
            Ok(loaded) => Arc::new(loaded),
            Err(error) => {
                self.counts.record_load(reload, Err(()));
                tracing::error!(%error, model, version = number, "model version failed to load; running copy (if any) keeps serving");
                let reason = error.to_string();
                update(catalog, |catalog| {
                    catalog.failed.insert(
                        (model.clone(), number),
                        Failure {
                            reason: reason.clone(),
                            fingerprint,
                        },
                    );
                });
                return Err(error);
            }
        };
        let load_time = started.elapsed();
        let existing = catalog.load().running(&model, number).cloned();
        self.counts.record_load(existing.is_some(), Ok(load_time));
        let replaced = existing.is_some();
        match existing {
            Some(slot) => {
                // Requests still running on the old copy free it when they end;
                // otherwise it is freed here, off the serving path.
                loader::drop_off_the_serving_path("free", slot.replace(loaded));
            }
            None => {
                let slot = Arc::new(VersionSlot::new(loaded, Arc::clone(&self.admission)));
                update(catalog, |catalog| {
                    catalog
                        .models
                        .entry(model.clone())
                        .or_default()
                        .insert(number, Arc::clone(&slot));
                });
            }
        }
        update(catalog, |catalog| {
            catalog.failed.remove(&(model.clone(), number));
        });
        tracing::info!(
            model,
            version = number,
            replaced,
            load_ms = load_time.as_millis() as u64,
            "model version ready"
        );
        Ok(LoadOutcome {
            replaced,
            load_time,
        })
    }
}

/// Applies `change` to a copy of the catalog and publishes it.
fn update(catalog: &ArcSwap<Catalog>, change: impl Fn(&mut Catalog)) {
    catalog.rcu(|current| {
        let mut next = Catalog::clone(current);
        change(&mut next);
        next
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_select_versions() {
        let present: BTreeSet<u64> = [1, 2, 5, 9].into();
        assert_eq!(VersionPolicy::All.select(&present), present);
        assert_eq!(VersionPolicy::Latest(2).select(&present), [5, 9].into());
        assert_eq!(VersionPolicy::Latest(0).select(&present), BTreeSet::new());
        assert_eq!(
            VersionPolicy::Specific([2, 3].into()).select(&present),
            [2].into()
        );
    }

    #[test]
    fn policies_parse_from_toml() {
        #[derive(Deserialize)]
        struct Wrapper {
            policy: VersionPolicy,
        }
        let parse = |text: &str| toml::from_str::<Wrapper>(text).map(|w| w.policy);
        assert_eq!(parse("policy = \"all\"").ok(), Some(VersionPolicy::All));
        assert_eq!(
            parse("policy = { latest = 2 }").ok(),
            Some(VersionPolicy::Latest(2))
        );
        assert_eq!(
            parse("policy = { specific = [1, 3] }").ok(),
            Some(VersionPolicy::Specific([1, 3].into()))
        );
        assert!(parse("policy = { newest = 1 }").is_err());
    }
}
