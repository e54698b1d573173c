//! An MLflow Model Registry as a model source (`[[mlflow]]`).
//!
//! Every `poll_interval_ms` the gateway asks the tracking server (its REST API) which
//! version of the registered model the configured alias (or stage) names. A version
//! the repository does not have yet is fetched: its ONNX artifact downloaded through
//! the server's artifact proxy (`mlflow server --serve-artifacts`, the default) into a
//! hidden folder while its SHA-256 is computed, checked against the `sha256` tag of the
//! model version when it has one, written with a model card made from the registry
//! (the run's metrics and parameters, the run id, the owner, the `semver` tag) and the
//! file's SHA-256, then renamed into place as `<repository>/<model>/<version>/` and
//! loaded. A download cut short never becomes a version: it stays in the hidden
//! folder, which the next try starts again. With `rollout`, a new version is rolled
//! out as the canary against the version serving the most traffic.
//!
//! The registry being down, or the alias missing, is logged and changes nothing: the
//! gateway keeps serving what it has.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use ::http::Uri;
use aviary_router::rollout::{Gates, RolloutPlan, Step};
use aviary_worker::{
    registry::{Lineage, Sha256},
    repository::{CARD_FILE, ModelCard},
};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::watch;

use super::{SourceError, common_problems, http, look_every};
use crate::{GatewayError, control::Control, rollouts::Rollouts};

/// The model file's name in the repository.
const MODEL_FILE: &str = "model.onnx";

/// `[[mlflow]]`: one registered model of an MLflow tracking server, as a source of
/// one model's versions.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlflowConfig {
    /// The tracking server, `http://host:port`.
    pub tracking_uri: String,
    /// The registered model's name in MLflow.
    pub registered_model: String,
    /// The model's name here (its folder in the repository); default: the registered
    /// model's.
    #[serde(default)]
    pub model: Option<String>,
    /// The alias whose version is served (e.g. "champion"); or set `stage`.
    #[serde(default)]
    pub alias: Option<String>,
    /// The (legacy) stage whose latest version is served (e.g. "Production").
    #[serde(default)]
    pub stage: Option<String>,
    /// The ONNX file in the version's artifacts (a path below them).
    #[serde(default = "default_artifact")]
    pub artifact: String,
    /// How often the registry is asked, in milliseconds (default 30000).
    #[serde(default = "super::default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Roll each new version out as the canary against the version serving the most
    /// unpinned traffic; absent: a new version is loaded and routed as any other.
    #[serde(default)]
    pub rollout: Option<SourceRollout>,
}

/// The rollout of a version a source brought: its steps and gates.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceRollout {
    /// Canary weights in order; strictly increasing, the last one 100.
    pub steps: Vec<Step>,
    /// What the canary must keep to within to go on.
    pub gates: Gates,
}

fn default_artifact() -> String {
    MODEL_FILE.to_owned()
}

impl MlflowConfig {
    /// The model's name here.
    pub fn model(&self) -> &str {
        self.model.as_deref().unwrap_or(&self.registered_model)
    }

    /// The rollout plan of `canary` against `baseline`, when `rollout` is set.
    pub fn plan(&self, canary: &str, baseline: &str) -> Option<RolloutPlan> {
        self.rollout.as_ref().map(|r| RolloutPlan {
            model: self.model().to_owned(),
            canary: canary.to_owned(),
            baseline: baseline.to_owned(),
            steps: r.steps.clone(),
            gates: r.gates.clone(),
        })
    }
}

/// What is wrong with the `[[mlflow]]` sources, each with its path; `repository`
/// is `[repository]`, `controlled` whether a controller runs the rollouts.
pub fn problems(
    sources: &[MlflowConfig],
    repository: Option<&crate::config::RepositoryConfig>,
    controlled: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut models = BTreeSet::new();
    for (i, source) in sources.iter().enumerate() {
        let path = format!("mlflow[{i}]");
        if source.rollout.is_some() && controlled {
            problems.push(format!(
                "{path}.rollout: an aviary controller runs this gateway's rollouts \
                 ([rollouts] controlled = true); start them there"
            ));
        }
        if source.rollout.is_some() && repository.is_some_and(|r| r.watch) {
            problems.push(format!(
                "{path}.rollout: with [repository] watch = true the watcher could load a fetched \
                 version (as the newest, taking the traffic) before its rollout; set watch = false"
            ));
        }
        problems.extend(common_problems(
            &path,
            repository.is_some(),
            source.poll_interval_ms,
        ));
        if let Err(why) = http::check_uri(&source.tracking_uri) {
            problems.push(format!("{path}.tracking_uri: {why}"));
        }
        if source.registered_model.is_empty() {
            problems.push(format!("{path}.registered_model: must not be empty"));
        }
        let model = source.model();
        if let Some(why) = aviary::names::model_name_problem(model) {
            problems.push(format!(
                "{path}.model: \"{model}\" is not a model name: {why} (set model to the name \
                 to serve it under)"
            ));
        }
        if !models.insert(model.to_owned()) {
            problems.push(format!(
                "{path}.model: another [[mlflow]] source already brings model \"{model}\""
            ));
        }
        match (&source.alias, &source.stage) {
            (Some(_), Some(_)) => problems.push(format!("{path}: set alias or stage, not both")),
            (None, None) => problems.push(format!(
                "{path}: set alias (e.g. \"champion\") or stage (e.g. \"Production\")"
            )),
            (Some(name), None) | (None, Some(name)) if name.is_empty() => {
                problems.push(format!("{path}: the alias or stage must not be empty"));
            }
            _ => {}
        }
        if source.artifact.is_empty()
            || source.artifact.starts_with('/')
            || source.artifact.split('/').any(|part| part == "..")
        {
            problems.push(format!(
                "{path}.artifact: \"{}\" is not a path below the version's artifacts",
                source.artifact
            ));
        }
        // The plan's own checks, on stand-in versions: only steps and gates can fail.
        if let Some(plan) = source.plan("2", "1")
            && let Err(errors) = plan.validate()
        {
            problems.extend(
                errors
                    .errors()
                    .iter()
                    .map(|e| format!("{path}.rollout.{e}")),
            );
        }
    }
    problems
}

/// A model version as the registry describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisteredVersion {
    /// Its number ("3"): the version's name here too.
    pub version: String,
    /// The run that produced it; empty when none.
    pub run_id: String,
    /// Its description.
    pub description: String,
    /// Who registered it.
    pub user_id: String,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
}

/// `{"key": .., "value": ..}` lists as a map.
fn pairs(list: &Value) -> BTreeMap<String, Value> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["key"].as_str()?.to_owned(), p["value"].clone())))
        .collect()
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

impl RegisteredVersion {
    /// From a `model_version` object; `Err` when its version is not a number.
    pub fn from_json(json: &Value) -> Result<RegisteredVersion, SourceError> {
        let version = text(&json["version"]);
        if version.parse::<u64>().map_or(true, |n| n == 0) {
            return Err(SourceError::Invalid(format!(
                "the registry answered version \"{version}\"; versions are numbers from 1"
            )));
        }
        Ok(RegisteredVersion {
            version,
            run_id: text(&json["run_id"]),
            description: text(&json["description"]),
            user_id: text(&json["user_id"]),
            tags: pairs(&json["tags"])
                .into_iter()
                .map(|(k, v)| (k, text(&v)))
                .collect(),
        })
    }
}

/// A run's metrics, parameters and tags.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunRecord {
    /// Each metric's latest value.
    pub metrics: BTreeMap<String, f64>,
    /// The parameters, as logged (strings).
    pub params: BTreeMap<String, String>,
    /// The run's tags (`mlflow.source.git.commit`, ...).
    pub tags: BTreeMap<String, String>,
}

impl RunRecord {
    /// From a `run` object.
    pub fn from_json(json: &Value) -> RunRecord {
        let data = &json["data"];
        RunRecord {
            metrics: pairs(&data["metrics"])
                .into_iter()
                .filter_map(|(k, v)| v.as_f64().filter(|v| v.is_finite()).map(|v| (k, v)))
                .collect(),
            params: pairs(&data["params"])
                .into_iter()
                .map(|(k, v)| (k, text(&v)))
                .collect(),
            tags: pairs(&data["tags"])
                .into_iter()
                .map(|(k, v)| (k, text(&v)))
                .collect(),
        }
    }
}

/// A logged parameter as a card's hyperparameter: a number or boolean when it reads
/// as one, else the string.
fn parameter_value(text: &str) -> Value {
    if let Ok(n) = text.parse::<i64>() {
        return Value::from(n);
    }
    if let Some(n) = text.parse::<f64>().ok().filter(|n| n.is_finite()) {
        return Value::from(n);
    }
    match text {
        "true" | "True" => Value::Bool(true),
        "false" | "False" => Value::Bool(false),
        _ => Value::String(text.to_owned()),
    }
}

/// The model card of `version` from `config`'s registry, its file's SHA-256 stated
/// (so a file swapped later is refused at load). The stage is not stated: with
/// `[registry]`, the version is a candidate until approved here.
pub fn card(
    config: &MlflowConfig,
    version: &RegisteredVersion,
    run: &RunRecord,
    sha256: Sha256,
) -> ModelCard {
    let description = match version.description.is_empty() {
        true => format!(
            "MLflow registered model \"{}\" version {}",
            config.registered_model, version.version
        ),
        false => version.description.clone(),
    };
    ModelCard {
        description,
        owner: version.user_id.clone(),
        metrics: run.metrics.clone(),
        semver: version
            .tags
            .get("semver")
            .and_then(|s| semver::Version::parse(s).ok()),
        sha256: Some(sha256),
        lineage: Some(Lineage {
            dataset: version.tags.get("dataset").cloned().unwrap_or_default(),
            dataset_sha256: version
                .tags
                .get("dataset_sha256")
                .and_then(|s| Sha256::try_from(s.clone()).ok()),
            code_revision: run
                .tags
                .get("mlflow.source.git.commit")
                .cloned()
                .unwrap_or_default(),
            training_run: version.run_id.clone(),
            hyperparameters: run
                .params
                .iter()
                .map(|(k, v)| (k.clone(), parameter_value(v)))
                .collect(),
        }),
        ..ModelCard::default()
    }
}

/// The first line of a card this source writes: how a folder it wrote is told from
/// one it did not (which it never takes as the registry's version, nor deletes).
fn card_header(config: &MlflowConfig, version: &RegisteredVersion) -> String {
    format!(
        "# Written by aviary from MLflow {} registered model \"{}\" version {}.\n",
        config.tracking_uri, config.registered_model, version.version
    )
}

/// Where the server's artifact proxy serves `file` of the artifacts at
/// `artifact_uri` (`mlflow-artifacts:/<path>`); `Err` for a store the gateway would
/// have to reach itself (s3://, ...).
pub fn artifact_url(
    tracking_uri: &str,
    artifact_uri: &str,
    file: &str,
) -> Result<String, SourceError> {
    let path = artifact_uri
        .strip_prefix("mlflow-artifacts:")
        .map(|rest| match rest.strip_prefix("//") {
            // mlflow-artifacts://host:port/path: the path after the authority.
            Some(with_host) => with_host.split_once('/').map_or("", |(_, p)| p),
            None => rest,
        })
        .ok_or_else(|| {
            SourceError::Invalid(format!(
                "artifact URI \"{artifact_uri}\" is not served by the tracking server \
                 (mlflow-artifacts:); run mlflow server with --serve-artifacts"
            ))
        })?;
    let encoded = |path: &str| -> String {
        path.split('/')
            .filter(|segment| !segment.is_empty())
            .map(query)
            .collect::<Vec<_>>()
            .join("/")
    };
    Ok(format!(
        "{}/api/2.0/mlflow-artifacts/artifacts/{}/{}",
        tracking_uri.trim_end_matches('/'),
        encoded(path),
        encoded(file)
    ))
}

/// Percent-encodes a query value.
fn query(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One `[[mlflow]]` source over a repository.
#[derive(Debug)]
pub struct MlflowSource {
    config: MlflowConfig,
    repository: PathBuf,
    /// Versions whose artifact was refused (checksum, load): not fetched again until
    /// the registry names another version or the gateway restarts.
    refused: Mutex<BTreeSet<String>>,
    /// The version the registry named at the last look.
    last_wanted: Mutex<Option<String>>,
}

impl MlflowSource {
    /// `config`'s source, writing versions into `repository`.
    pub fn new(config: MlflowConfig, repository: PathBuf) -> MlflowSource {
        MlflowSource {
            config,
            repository,
            refused: Mutex::new(BTreeSet::new()),
            last_wanted: Mutex::new(None),
        }
    }

    fn api(&self, path: &str) -> Result<Uri, SourceError> {
        let uri = format!(
            "{}/api/2.0/mlflow/{path}",
            self.config.tracking_uri.trim_end_matches('/')
        );
        uri.parse()
            .map_err(|e| SourceError::Invalid(format!("{uri}: {e}")))
    }

    /// The version the alias (or stage) names now.
    pub async fn wanted(&self) -> Result<RegisteredVersion, SourceError> {
        let name = query(&self.config.registered_model);
        match (&self.config.alias, &self.config.stage) {
            (Some(alias), _) => {
                let answer = http::get_json(&self.api(&format!(
                    "registered-models/alias?name={name}&alias={}",
                    query(alias)
                ))?)
                .await?;
                RegisteredVersion::from_json(&answer["model_version"])
            }
            (None, Some(stage)) => {
                let answer = http::get_json(&self.api(&format!(
                    "registered-models/get-latest-versions?name={name}&stages={}",
                    query(stage)
                ))?)
                .await?;
                let versions = answer["model_versions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let latest = versions
                    .iter()
                    .max_by_key(|v| v["version"].as_str().and_then(|v| v.parse::<u64>().ok()));
                match latest {
                    Some(version) => RegisteredVersion::from_json(version),
                    None => Err(SourceError::NotFound(format!(
                        "registered model \"{}\" has no version at stage \"{stage}\"",
                        self.config.registered_model
                    ))),
                }
            }
            (None, None) => Err(SourceError::Invalid("no alias or stage".into())),
        }
    }

    /// Downloads `version` into the repository with its card, renamed into place once
    /// complete; returns its folder. Whatever fails, nothing half-written is left.
    async fn fetch(&self, version: &RegisteredVersion) -> Result<PathBuf, SourceError> {
        let name = query(&self.config.registered_model);
        let number = query(&version.version);
        let location = http::get_json(&self.api(&format!(
            "model-versions/get-download-uri?name={name}&version={number}"
        ))?)
        .await?;
        let artifact_uri = text(&location["artifact_uri"]);
        let url = artifact_url(
            &self.config.tracking_uri,
            &artifact_uri,
            &self.config.artifact,
        )?;
        let url: Uri = url
            .parse()
            .map_err(|e| SourceError::Invalid(format!("{url}: {e}")))?;
        let run = self.run_of(version).await?;
        let model_folder = self.repository.join(self.config.model());
        let partial = model_folder.join(format!(".mlflow-{}.partial", version.version));
        if let Err(error) = self.write_partial(&partial, &url, version, &run).await {
            let _ = tokio::fs::remove_dir_all(&partial).await;
            return Err(error);
        }
        let folder = model_folder.join(&version.version);
        if let Err(error) = tokio::fs::rename(&partial, &folder).await {
            let _ = tokio::fs::remove_dir_all(&partial).await;
            return Err(SourceError::Storage(format!(
                "{}: {error}",
                folder.display()
            )));
        }
        Ok(folder)
    }

    /// The run that produced `version`; an empty record when it has none, or when the
    /// run is gone (the card then lacks its metrics and parameters, not the version).
    async fn run_of(&self, version: &RegisteredVersion) -> Result<RunRecord, SourceError> {
        if version.run_id.is_empty() {
            return Ok(RunRecord::default());
        }
        let uri = self.api(&format!("runs/get?run_id={}", query(&version.run_id)))?;
        match http::get_json(&uri).await {
            Ok(answer) => Ok(RunRecord::from_json(&answer["run"])),
            Err(SourceError::NotFound(why)) => {
                tracing::warn!(run_id = version.run_id, why, "the version's run is gone");
                Ok(RunRecord::default())
            }
            Err(error) => Err(error),
        }
    }

    /// Downloads the artifact at `url` into the hidden folder `partial` (made afresh)
    /// and writes `version`'s card beside it.
    async fn write_partial(
        &self,
        partial: &std::path::Path,
        url: &Uri,
        version: &RegisteredVersion,
        run: &RunRecord,
    ) -> Result<(), SourceError> {
        let storage =
            |e: std::io::Error| SourceError::Storage(format!("{}: {e}", partial.display()));
        // A download cut short before starts again from nothing.
        if partial.exists() {
            tokio::fs::remove_dir_all(partial).await.map_err(storage)?;
        }
        tokio::fs::create_dir_all(partial).await.map_err(storage)?;
        let mut file = tokio::fs::File::create(partial.join(MODEL_FILE))
            .await
            .map_err(storage)?;
        let (length, sha256) = http::download(url, &mut file).await?;
        file.sync_all().await.map_err(storage)?;
        if let Some(stated) = version.tags.get("sha256")
            && !stated.trim().eq_ignore_ascii_case(sha256.as_str())
        {
            return Err(SourceError::Invalid(format!(
                "version {} of \"{}\": the artifact's SHA-256 is {sha256} ({length} bytes), the \
                 registry's sha256 tag says {stated}",
                version.version, self.config.registered_model
            )));
        }
        let card = card(&self.config, version, run, sha256);
        let text = toml::to_string(&card)
            .map_err(|e| SourceError::Invalid(format!("the model card: {e}")))?;
        tokio::fs::write(
            partial.join(CARD_FILE),
            card_header(&self.config, version) + &text,
        )
        .await
        .map_err(storage)
    }

    /// One look at the registry: fetches and loads the version it names if this
    /// gateway does not have it, and starts its rollout (with `rollout`). Returns the
    /// version loaded, if any.
    pub async fn poll(
        &self,
        control: &Control,
        rollouts: Option<&Rollouts>,
    ) -> Result<Option<String>, GatewayError> {
        let wanted = self.wanted().await?;
        let model = self.config.model();
        let version = wanted.version.clone();
        let moved = self.note_wanted(&version);
        if self.refused().contains(&version) {
            return Ok(None);
        }
        let loaded = control.worker().is_some_and(|w| {
            w.inventory()
                .get(model)
                .is_some_and(|v| v.contains(&version))
        });
        if loaded {
            if moved {
                self.bring_back(control, rollouts, &version).await;
            }
            return Ok(None);
        }
        let folder = self.repository.join(model).join(&version);
        match folder.exists() {
            // Fetched before (a restart between the rename and the load), or not ours.
            true if !self.wrote(&folder) => {
                self.refused().insert(version.clone());
                return Err(SourceError::Invalid(format!(
                    "{} exists and was not written from MLflow: it is neither taken as the \
                     registry's version {version} nor replaced; move it away, or serve the \
                     registered model under another model name",
                    folder.display()
                ))
                .into());
            }
            true => {}
            false => {
                if let Err(error) = self.fetch(&wanted).await {
                    if matches!(error, SourceError::Invalid(_)) {
                        self.refused().insert(version.clone());
                    }
                    return Err(error.into());
                }
            }
        }
        // The version serving the most before this one arrives is the rollout's baseline;
        // to be rolled out, the new one comes in at weight 0.
        let baseline = serving_most(control, model);
        let loaded = match self.config.rollout.is_some() && baseline.is_some() {
            true => control.load_version_unweighted(model, &version).await,
            false => control.load_version(model, &version).await,
        };
        match loaded {
            Ok(_) => {}
            // The model itself does not load: not left loadable for the next start.
            Err(error @ GatewayError::Worker(_)) => {
                self.refused().insert(version.clone());
                let _ = tokio::fs::remove_dir_all(&folder).await;
                return Err(error);
            }
            Err(error) => return Err(error),
        }
        tracing::info!(
            model,
            version,
            registered_model = self.config.registered_model,
            "version from MLflow loaded"
        );
        if let Some(baseline) = baseline {
            self.roll_out(rollouts, &version, &baseline).await;
        }
        Ok(Some(version))
    }

    /// Whether `folder` was written by this source (its card's first line says so).
    fn wrote(&self, folder: &std::path::Path) -> bool {
        std::fs::read_to_string(folder.join(CARD_FILE))
            .is_ok_and(|card| card.starts_with("# Written by aviary from MLflow"))
    }

    /// Notes the version the registry names now; whether it moved since the last look
    /// (a version refused before is tried again once the alias moves on and back).
    fn note_wanted(&self, version: &str) -> bool {
        let mut last = self
            .last_wanted
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let moved = last.as_deref().is_some_and(|last| last != version);
        if moved {
            self.refused().clear();
        }
        *last = Some(version.to_owned());
        moved
    }

    /// The alias moved to `version`, which this gateway already has (a rollback in
    /// MLflow): rolled out against the version serving the most, with `rollout`;
    /// else said, as the weights are the operator's.
    async fn bring_back(&self, control: &Control, rollouts: Option<&Rollouts>, version: &str) {
        let model = self.config.model();
        match serving_most(control, model) {
            Some(serving) if serving != version => {
                if self.config.rollout.is_some() {
                    self.roll_out(rollouts, version, &serving).await;
                } else {
                    tracing::warn!(
                        model,
                        version,
                        serving,
                        "the MLflow alias moved to a version this gateway has; its weights are \
                         not changed by the source (set them, or configure rollout)"
                    );
                }
            }
            _ => {}
        }
    }

    /// Starts the rollout of `canary` against `baseline`, with `rollout`.
    async fn roll_out(&self, rollouts: Option<&Rollouts>, canary: &str, baseline: &str) {
        let model = self.config.model();
        let (Some(rollouts), Some(plan)) = (rollouts, self.config.plan(canary, baseline)) else {
            return;
        };
        match rollouts.start(plan).await {
            Ok(_) => tracing::info!(
                model,
                canary,
                baseline,
                "rollout of the MLflow version started"
            ),
            Err(error) => tracing::warn!(
                model,
                canary,
                %error,
                "the MLflow version's rollout did not start; it stays at weight 0"
            ),
        }
    }

    fn refused(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.refused.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Polls every `poll_interval_ms` until `stop` turns true; failures are logged.
    pub async fn run(
        self,
        control: Arc<Control>,
        rollouts: Option<Arc<Rollouts>>,
        stop: watch::Receiver<bool>,
    ) {
        let interval = Duration::from_millis(self.config.poll_interval_ms);
        let (this, control, rollouts) = (&self, &control, rollouts.as_deref());
        look_every(interval, stop, || async move {
            match this.poll(control, rollouts).await {
                Ok(_) => true,
                // No version at the alias yet is a state, not a failure: no backoff.
                Err(error @ GatewayError::Source(SourceError::NotFound(_))) => {
                    tracing::info!(registered_model = this.config.registered_model, %error, "MLflow source: nothing to serve yet");
                    true
                }
                Err(error) => {
                    tracing::warn!(
                        tracking_uri = this.config.tracking_uri,
                        registered_model = this.config.registered_model,
                        %error,
                        "MLflow source: nothing changed"
                    );
                    false
                }
            }
        })
        .await;
    }
}

/// The version of `model` with the most unpinned weight now, if any has weight.
fn serving_most(control: &Control, model: &str) -> Option<String> {
    let routing = control.routing().load();
    let route = routing.routes.get(model)?;
    route
        .versions
        .iter()
        .filter(|v| v.weight > 0)
        .max_by_key(|v| v.weight)
        .map(|v| v.version.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MlflowConfig {
        toml::from_str(
            r#"
tracking_uri = "http://127.0.0.1:5000"
registered_model = "iris"
alias = "champion"
"#,
        )
        .expect("a source")
    }

    #[test]
    fn artifact_urls_go_through_the_servers_proxy() {
        let url = artifact_url(
            "http://h:5000/",
            "mlflow-artifacts:/2/abc/artifacts/model",
            "model.onnx",
        );
        assert_eq!(
            url.expect("served"),
            "http://h:5000/api/2.0/mlflow-artifacts/artifacts/2/abc/artifacts/model/model.onnx"
        );
        let with_host = artifact_url("http://h:5000", "mlflow-artifacts://h:5000/1/x", "m.onnx");
        assert_eq!(
            with_host.expect("served"),
            "http://h:5000/api/2.0/mlflow-artifacts/artifacts/1/x/m.onnx"
        );
        let s3 = artifact_url("http://h:5000", "s3://bucket/1/x", "model.onnx");
        assert!(matches!(s3, Err(SourceError::Invalid(m)) if m.contains("--serve-artifacts")));
    }

    #[test]
    fn the_card_carries_the_registrys_metadata() {
        let version = RegisteredVersion::from_json(&serde_json::json!({
            "version": "2", "run_id": "r1", "description": "", "user_id": "ana",
            "tags": [{"key": "semver", "value": "2.1.0"}, {"key": "dataset", "value": "s3://d/v7"}],
        }))
        .expect("a version");
        let run = RunRecord::from_json(&serde_json::json!({"data": {
            "metrics": [{"key": "accuracy", "value": 0.93}],
            "params": [{"key": "lr", "value": "0.3"}, {"key": "layers", "value": "2"}, {"key": "opt", "value": "adam"}],
            "tags": [{"key": "mlflow.source.git.commit", "value": "abc123"}],
        }}));
        let sha = Sha256::of(b"model");
        let card = card(&config(), &version, &run, sha.clone());
        assert_eq!(
            card.description,
            "MLflow registered model \"iris\" version 2"
        );
        assert_eq!(card.owner, "ana");
        assert_eq!(card.metrics["accuracy"], 0.93);
        assert_eq!(
            card.semver.as_ref().map(ToString::to_string).as_deref(),
            Some("2.1.0")
        );
        assert_eq!(card.sha256.as_ref(), Some(&sha));
        let lineage = card.lineage.clone().expect("lineage");
        assert_eq!(lineage.training_run, "r1");
        assert_eq!(lineage.code_revision, "abc123");
        assert_eq!(lineage.dataset, "s3://d/v7");
        assert_eq!(lineage.hyperparameters["lr"], serde_json::json!(0.3));
        assert_eq!(lineage.hyperparameters["layers"], serde_json::json!(2));
        assert_eq!(lineage.hyperparameters["opt"], serde_json::json!("adam"));
        // The card round-trips through the file the worker reads.
        let text = toml::to_string(&card).expect("TOML");
        let read: ModelCard = toml::from_str(&text).expect("a card the worker reads");
        assert_eq!(read.lineage.expect("lineage").training_run, "r1");
    }

    #[test]
    fn versions_must_be_numbers() {
        let bad = RegisteredVersion::from_json(&serde_json::json!({"version": "v2"}));
        assert!(matches!(bad, Err(SourceError::Invalid(m)) if m.contains("\"v2\"")));
    }

    #[test]
    fn problems_name_their_field() {
        let mut bad = config();
        bad.tracking_uri = "https://mlflow.example".into();
        bad.stage = Some("Production".into());
        bad.artifact = "../x.onnx".into();
        bad.poll_interval_ms = 5;
        let found = problems(&[bad, config()], None, false);
        crate::sources::assert_named(
            &found,
            &[
                "mlflow[0]: needs [repository]",
                "mlflow[0].tracking_uri: https is not supported yet",
                "mlflow[0]: set alias or stage, not both",
                "mlflow[0].artifact: \"../x.onnx\"",
                "mlflow[0].poll_interval_ms: 5",
                "mlflow[1].model: another [[mlflow]] source already brings model \"iris\"",
            ],
        );
        let repository: crate::config::RepositoryConfig =
            toml::from_str("path = \"models\"\nwatch = true").expect("a repository");
        assert!(problems(&[config()], Some(&repository), false).is_empty());
        let mut rolled = config();
        rolled.model = Some("bad name".into());
        rolled.rollout = Some(SourceRollout {
            steps: vec![Step {
                weight: 100,
                min_duration_ms: 1,
                min_requests: 1,
            }],
            gates: Gates::error_rate(0.01),
        });
        let found = problems(&[rolled], Some(&repository), true);
        crate::sources::assert_named(
            &found,
            &[
                "mlflow[0].rollout: an aviary controller runs",
                "mlflow[0].rollout: with [repository] watch = true",
                "mlflow[0].model: \"bad name\" is not a model name",
            ],
        );
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(query("my model/1"), "my%20model%2F1");
    }
}
