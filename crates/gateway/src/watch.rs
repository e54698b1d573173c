//! Watching the config file and the model repository while the gateway runs.
//!
//! The config file is re-read when its folder reports a change (inotify through
//! `notify`) and, as a fallback for filesystems without events, every few seconds. The
//! decision is made on the file's contents, read through any symlinks, so all the
//! ways a file gets replaced look the same: editors that write a temporary file and
//! rename it, Kubernetes ConfigMap volumes (`..data` symlink swap), plain rewrites. A
//! deleted file keeps the last good config; an invalid one is rejected with every
//! error logged and shown by the admin API, and the last good routes keep serving.
//!
//! The repository is scanned every `interval`. A version folder is acted on only once
//! its model file looked the same (size, mtime, inode) in two consecutive scans, so a
//! file still being copied is never loaded half-written.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aviary_worker::repository::{self, Fingerprint};
use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::{
    config::{Config, PlanConfig},
    control::Control,
    rollouts::Rollouts,
    route::Route,
};

/// How often the config file is re-read even without a change event.
const CONFIG_POLL: Duration = Duration::from_secs(2);

/// Events often come in bursts (write, chmod, rename); wait this long for the burst
/// to end before reading.
const SETTLE: Duration = Duration::from_millis(50);

/// Applies changes of the config file at `path` until `stop` turns true: routes per
/// changed model (see [`Control::apply_file_routes`]), and rollout plans that are new
/// or changed (with `rollouts`, the gateway's own driver). What does not apply while
/// running is reported in the config status.
pub async fn watch_config(
    path: PathBuf,
    started_with: Config,
    control: Arc<Control>,
    rollouts: Option<Arc<Rollouts>>,
    mut stop: watch::Receiver<bool>,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel::<()>();
    // The folder is watched, not the file: editors and ConfigMaps replace the file.
    let folder = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let _watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = events_tx.send(());
        }
    })
    .and_then(|mut w| w.watch(&folder, RecursiveMode::NonRecursive).map(|()| w))
    .inspect_err(|error| tracing::warn!(%error, folder = %folder.display(), "no file events; polling the config file"))
    .ok();

    let shown = path.display().to_string();
    // No baseline: the first pass compares the file with the routes in force, so an
    // edit saved while the gateway was starting (loading models) still applies.
    let mut last_seen: Option<Vec<u8>> = None;
    let mut applied = started_with.clone();
    let mut warned_missing = false;
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            tokio::select! {
                () = stopped(&mut stop) => return,
                Some(()) = events.recv() => {
                    tokio::time::sleep(SETTLE).await;
                    while events.try_recv().is_ok() {}
                }
                () = tokio::time::sleep(CONFIG_POLL) => {}
            }
        }
        let contents = match std::fs::read(&path) {
            Ok(contents) => contents,
            Err(error) => {
                if !warned_missing {
                    tracing::warn!(path = %shown, %error, "config file unreadable or deleted; keeping the last good config");
                    warned_missing = true;
                }
                control.record_file_readable(Some(format!("cannot read the file: {error}")));
                continue;
            }
        };
        warned_missing = false;
        if contents.iter().all(u8::is_ascii_whitespace) {
            // An in-place save truncates before it writes; an empty file is never meant.
            tracing::debug!(path = %shown, "config file is empty; waiting for its contents");
            control.record_file_readable(Some("the file is empty".to_owned()));
            continue;
        }
        control.record_file_readable(None);
        if last_seen.as_deref() == Some(contents.as_slice()) {
            continue;
        }
        if let Some(config) = apply_config(
            &path,
            &contents,
            &started_with,
            &applied,
            &control,
            rollouts.as_deref(),
        )
        .await
        {
            applied = config;
        }
        last_seen = Some(contents);
    }
}

/// Applies the file contents that were read (not a second read, which could see a
/// newer version and apply it twice); `applied` is the config last applied. Returns
/// the new config when it applied.
async fn apply_config(
    path: &Path,
    contents: &[u8],
    started_with: &Config,
    applied: &Config,
    control: &Control,
    rollouts: Option<&Rollouts>,
) -> Option<Config> {
    let shown = path.display().to_string();
    let parsed = std::str::from_utf8(contents)
        .map_err(|e| crate::GatewayError::Config {
            path: shown.clone(),
            message: format!("not UTF-8: {e}"),
        })
        .and_then(|text| Config::from_text(text, path));
    let reject = |errors: Vec<String>| {
        tracing::error!(path = %shown, errors = ?errors, "config change rejected; the last good config keeps serving");
        control.record_config(&shown, errors, Vec::new());
    };
    let config = match parsed {
        Ok(config) => config,
        Err(error) => {
            reject(error.to_string().lines().map(str::to_owned).collect());
            return None;
        }
    };
    if let Err(error) = control
        .apply_file_routes(Route::all_from(&config.routes))
        .await
    {
        reject(error.to_string().lines().map(str::to_owned).collect());
        return None;
    }
    let mut notes = restart_only(started_with, &config);
    if let Some(rollouts) = rollouts {
        notes.extend(apply_plans(&applied.rollouts.plans, &config.rollouts.plans, rollouts).await);
    }
    for note in &notes {
        tracing::warn!(path = %shown, note, "config applied in part");
    }
    tracing::info!(path = %shown, generation = control.routing().load().generation, "config applied");
    control.record_config(&shown, Vec::new(), notes);
    Some(config)
}

/// A note for every setting that differs from the one the gateway started with and
/// applies only at restart.
fn restart_only(started_with: &Config, config: &Config) -> Vec<String> {
    // Every section is named here, so a new one does not compile until it is sorted
    // into applied-at-once (routes, rollout plans) or named below.
    let Config {
        server: _,
        admin: _,
        metrics: _,
        http: _,
        registry: _,
        tracing: _,
        auth: _,
        audit: _,
        workers: _,
        repository: _,
        mlflow: _,
        bucket: _,
        routes: _,
        rollouts: _,
        dead_letters: _,
        cache: _,
    } = config;
    let (before, after) = (&started_with.rollouts, &config.rollouts);
    [
        ("server", config.server != started_with.server),
        ("admin", config.admin != started_with.admin),
        ("metrics", config.metrics != started_with.metrics),
        ("http", config.http != started_with.http),
        ("registry", config.registry != started_with.registry),
        ("tracing", config.tracing != started_with.tracing),
        // The keys file's contents apply at once; which file, at restart.
        ("auth", config.auth != started_with.auth),
        // The trail is opened once; the workers' clients are made once (their TLS and
        // token files are re-read when they change, which files at restart).
        ("audit", config.audit != started_with.audit),
        ("workers", config.workers != started_with.workers),
        ("repository", config.repository != started_with.repository),
        // The sources' pollers start with the gateway.
        ("mlflow", config.mlflow != started_with.mlflow),
        ("bucket", config.bucket != started_with.bucket),
        (
            "rollouts.evaluate_interval_ms",
            before.evaluate_interval_ms != after.evaluate_interval_ms,
        ),
        ("rollouts.state_file", before.state_file != after.state_file),
        ("rollouts.controlled", before.controlled != after.controlled),
        // The queue and its Redis sink are opened once, at start.
        (
            "dead_letters",
            config.dead_letters != started_with.dead_letters,
        ),
        // The cache's bound and Redis tier too (a route's `cache` applies at once).
        ("cache", config.cache != started_with.cache),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(path, _)| format!("{path}: changed in the file; applies at restart"))
    .chain(dead_letters_at_restart(started_with, config))
    .collect()
}

/// A note for each route that asks for dead letters when the gateway started with
/// none: the queue is opened at start only.
fn dead_letters_at_restart(started_with: &Config, config: &Config) -> Vec<String> {
    if started_with.routes.values().any(|r| r.dead_letters) {
        return Vec::new();
    }
    config
        .routes
        .iter()
        .filter(|(_, route)| route.dead_letters)
        .map(|(model, _)| {
            format!("routes.{model}.dead_letters: the dead-letter queue opens at restart")
        })
        .collect()
}

/// Starts the plans that are new or changed since `before`; a note for each one that
/// did not start and for each one removed (removing a plan stops no rollout).
async fn apply_plans(
    before: &BTreeMap<String, PlanConfig>,
    after: &BTreeMap<String, PlanConfig>,
    rollouts: &Rollouts,
) -> Vec<String> {
    let changed: BTreeMap<String, PlanConfig> = after
        .iter()
        .filter(|(model, plan)| before.get(*model) != Some(*plan))
        .map(|(model, plan)| (model.clone(), plan.clone()))
        .collect();
    let mut notes: Vec<String> = before
        .keys()
        .filter(|model| !after.contains_key(*model))
        .map(|model| {
            format!(
                "rollouts.plans.{model}: removed from the file; that stops no rollout (aviary ctl rollout abort {model})"
            )
        })
        .collect();
    for (model, plan) in changed {
        match rollouts.start_plans(&BTreeMap::from([(model, plan)])).await {
            Ok(skipped) => notes.extend(skipped),
            Err(error) => notes.push(error.to_string().replace('\n', "; ")),
        }
    }
    notes
}

/// Syncs the embedded worker with `root` every `interval` until `stop` turns true.
pub async fn watch_repository(
    root: PathBuf,
    interval: Duration,
    control: Arc<Control>,
    mut stop: watch::Receiver<bool>,
) {
    // Nothing seen yet: the first scan finds every version "changed", and the one after
    // it (once they are settled) syncs the worker with the folder. Starting from a scan
    // taken here instead would miss a version published between the worker's load at
    // start and this task's first run: it would look unchanged ever after.
    let mut previous = BTreeMap::new();
    // Versions that were still changing at the last scan, to act on once they settle.
    let mut pending = false;
    loop {
        tokio::select! {
            () = stopped(&mut stop) => return,
            () = tokio::time::sleep(interval) => {}
        }
        let current = fingerprints(&root);
        let unsettled: BTreeSet<(String, u64)> = current
            .iter()
            .filter(|(key, fingerprint)| previous.get(*key) != Some(*fingerprint))
            .map(|(key, _)| key.clone())
            .collect();
        let changed = current != previous;
        previous = current;
        if !changed && !pending {
            // Nothing moved since the last sync; a sync could only retry known failures.
            continue;
        }
        pending = !unsettled.is_empty();
        match control.sync_repository(&unsettled).await {
            Ok(report) => {
                if !report.kept.is_empty() {
                    tracing::warn!(versions = ?report.kept, "versions gone from the repository still have weight; keeping them loaded");
                }
                for (model, version, reason) in &report.failed {
                    tracing::error!(%model, version, %reason, "repository version failed to load");
                }
            }
            Err(error) => tracing::error!(%error, "repository sync failed"),
        }
    }
}

fn fingerprints(root: &Path) -> BTreeMap<(String, u64), Fingerprint> {
    repository::scan(root)
        .map(|entries| {
            entries
                .into_iter()
                .map(|e| ((e.model, e.version), e.fingerprint))
                .collect()
        })
        .unwrap_or_default()
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // Map the borrow guard away at once: it must not live across an await.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every section a running gateway does not re-apply is named when it changes: a
    /// saved edit is never silently left out.
    #[test]
    fn every_restart_only_section_is_named_when_changed() {
        let parse = |text: &str| Config::parse(text).expect("valid config");
        let before = parse("");
        let cases = [
            ("[server]\nlisten = \"127.0.0.1:9001\"", "server"),
            ("[admin]\nlisten = \"127.0.0.1:9003\"", "admin"),
            ("[metrics]\nenabled = false", "metrics"),
            ("[http]\nenabled = false", "http"),
            ("[registry]\ncanary_cap_percent = 5", "registry"),
            ("[tracing]\nsample_ratio = 0.5", "tracing"),
            ("[auth]\nkeys_file = \"keys.toml\"", "auth"),
            ("[audit]\ndir = \"audit\"", "audit"),
            ("[workers]\ntoken_file = \"token\"", "workers"),
            ("[repository]\npath = \"models\"", "repository"),
            (
                "[rollouts]\nevaluate_interval_ms = 10",
                "rollouts.evaluate_interval_ms",
            ),
            ("[rollouts]\ncontrolled = true", "rollouts.controlled"),
            (
                "[rollouts]\nstate_file = \"rollouts.json\"",
                "rollouts.state_file",
            ),
            ("[dead_letters]\nfolder = \"letters\"", "dead_letters"),
            ("[cache]\nmax_entries = 7", "cache"),
        ];
        for (text, section) in cases {
            assert_eq!(
                restart_only(&before, &parse(text)),
                vec![format!(
                    "{section}: changed in the file; applies at restart"
                )],
                "{text}"
            );
        }
        assert!(restart_only(&before, &parse("")).is_empty());
    }
}
