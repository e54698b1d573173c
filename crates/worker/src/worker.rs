//! The worker: a catalog and its lifecycle behind one API, and the v2 operations on it.
//!
//! Reads (infer, metadata, config, statistics, index) go to the published catalog and
//! changes go to the lifecycle, so the worker only wires the two together; neither of
//! them knows about it or about each other.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use arc_swap::ArcSwap;
use aviary::{
    parameters,
    pb::inference::{
        InferParameter, ModelConfig, ModelDynamicBatching, ModelInferRequest, ModelInferResponse,
        ModelInput, ModelInstanceGroup, ModelMetadataResponse, ModelOutput, ModelParameter,
        ModelStatistics, ModelVersionPolicy, infer_parameter::ParameterChoice, model_config,
        model_infer_response::InferOutputTensor, model_input, model_instance_group,
        model_metadata_response::TensorMetadata, model_version_policy,
        repository_index_response::ModelIndex,
    },
    telemetry::{self, Stage, attribute},
    tensor::Datatype,
};
use bytes::Bytes;

pub use crate::catalog::VersionSlot;
use crate::{
    DefaultPrediction, WorkerError,
    admission::{Admission, TensorLimits},
    catalog::Catalog,
    classification, default_prediction,
    input_rules::{self, MODE_PARAMETER, RuleMode},
    lifecycle::{Lifecycle, LoadOutcome, SyncReport, VersionPolicy},
    load_request::{self, LoadRequest},
    model::{FINGERPRINT_PARAMETER, LoadedModel, OutputTensor, SessionOptions},
    repository::{self, InputFormat, ModelCard},
    stats::Timings,
    validate,
};

/// Platform name Triton uses for ONNX models.
pub const PLATFORM: &str = "onnxruntime_onnx";

/// Backend name Triton uses for ONNX Runtime.
pub const BACKEND: &str = "onnxruntime";

/// Where a worker finds its models and how it runs them.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Repository root: `<root>/<model>/<version>/model.onnx`.
    pub repository: PathBuf,
    /// Session settings for every version.
    pub session: SessionOptions,
    /// Version policy of models not in `policies`.
    pub default_policy: VersionPolicy,
    /// Version policy per model.
    pub policies: BTreeMap<String, VersionPolicy>,
    /// Budgets for decoded input tensors, per request and for the whole process.
    pub limits: TensorLimits,
}

impl WorkerConfig {
    /// Every version of every model in `repository`, with `session` settings.
    pub fn new(repository: PathBuf, session: SessionOptions) -> WorkerConfig {
        WorkerConfig {
            repository,
            session,
            default_policy: VersionPolicy::All,
            policies: BTreeMap::new(),
            limits: TensorLimits::default(),
        }
    }
}

/// Every loaded version of a repository's models.
#[derive(Debug)]
pub struct Worker {
    catalog: ArcSwap<Catalog>,
    lifecycle: Lifecycle,
}

impl Worker {
    /// Scans the repository and loads (and warms up) every version its version policy
    /// selects. A version that fails to load is logged and listed as unavailable in the
    /// repository index; the others still serve. Fails at once on limits that do not
    /// hold together.
    pub async fn open(config: WorkerConfig) -> Result<Worker, WorkerError> {
        let problems = config.limits.problems();
        if !problems.is_empty() {
            return Err(WorkerError::Config(problems.join("\n")));
        }
        // Fail early, with the message that says what to do, when ONNX Runtime is missing.
        crate::runtime::environment()?;
        let WorkerConfig {
            repository,
            session,
            default_policy,
            policies,
            limits,
        } = config;
        // The codec refuses a request whose typed contents alone are over the request
        // budget before it decodes them (they can expand 8×, before any admission).
        aviary::contents::set_decode_limit(limits.max_request_tensor_bytes);
        let admission = Arc::new(Admission::new(limits));
        let worker = Worker {
            catalog: ArcSwap::from_pointee(Catalog::default()),
            lifecycle: Lifecycle::new(repository, session, default_policy, policies, admission),
        };
        worker.sync(None, &BTreeSet::new(), &|_, _| true).await?;
        Ok(worker)
    }

    /// The repository root.
    pub fn repository(&self) -> &Path {
        self.lifecycle.repository()
    }

    /// Loaded versions per model, for route validation.
    pub fn inventory(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.catalog.load().inventory()
    }

    /// The slot for `model` at `version`; an empty version means the newest loaded.
    pub fn slot(&self, model: &str, version: &str) -> Result<Arc<VersionSlot>, WorkerError> {
        self.catalog.load().slot(model, version)
    }

    /// Validates and runs one inference on the version the request names (the newest
    /// when it names none), unless its `deadline` passes before a session is free.
    pub async fn infer(
        &self,
        request: ModelInferRequest,
        deadline: Option<Instant>,
    ) -> Result<ModelInferResponse, WorkerError> {
        let slot = self.slot(&request.model_name, &request.model_version)?;
        infer_on(&slot, request, deadline).await
    }
}

/// A version policy as Triton's model configuration writes it.
fn config_policy(policy: &VersionPolicy) -> ModelVersionPolicy {
    use model_version_policy::PolicyChoice;
    ModelVersionPolicy {
        policy_choice: Some(match policy {
            VersionPolicy::All => PolicyChoice::All(model_version_policy::All {}),
            VersionPolicy::Latest(n) => {
                PolicyChoice::Latest(model_version_policy::Latest { num_versions: *n })
            }
            VersionPolicy::Specific(versions) => {
                PolicyChoice::Specific(model_version_policy::Specific {
                    versions: versions
                        .iter()
                        .map(|&v| i64::try_from(v).unwrap_or(i64::MAX))
                        .collect(),
                })
            }
        }),
    }
}

/// The `format` of input `name` as the card declares it (checked at load).
fn config_format(card: Option<&ModelCard>, name: &str) -> model_input::Format {
    match card.and_then(|c| c.formats.get(name)) {
        Some(InputFormat::Nchw) => model_input::Format::Nchw,
        Some(InputFormat::Nhwc) => model_input::Format::Nhwc,
        None => model_input::Format::None,
    }
}

/// The input-rule mode a gateway's route sets on the request, if any.
fn mode_of(request: &ModelInferRequest) -> Result<Option<RuleMode>, WorkerError> {
    let Some(parameter) = request.parameters.get(MODE_PARAMETER) else {
        return Ok(None);
    };
    match &parameter.parameter_choice {
        Some(ParameterChoice::StringParam(value)) => RuleMode::from_parameter(value)
            .map(Some)
            .map_err(WorkerError::invalid),
        _ => Err(WorkerError::invalid(format!(
            "parameter \"{MODE_PARAMETER}\": must be a string (reject, flag)"
        ))),
    }
}

/// The request's own parameters, refusing any the worker does not know and a sequence
/// sent to a version whose card does not take them.
fn read_parameters(
    model: &LoadedModel,
    request: &ModelInferRequest,
) -> Result<parameters::RequestParameters, WorkerError> {
    let asked = parameters::read_request(&request.parameters, |name| name == MODE_PARAMETER)?;
    if let Some(sequence) = &asked.sequence
        && !model.card.as_ref().is_some_and(|card| card.sequences)
    {
        return Err(WorkerError::invalid(format!(
            "parameter \"{}\": model '{}' version {} does not take sequences (sequence {} \
             sent): its model card does not say `sequences = true`",
            parameters::SEQUENCE_ID,
            model.model,
            model.version,
            sequence.id
        )));
    }
    Ok(asked)
}

/// `outputs` with those asked for as classes replaced by their top classes.
fn classify(
    model: &LoadedModel,
    mut outputs: Vec<OutputTensor>,
    classifications: &[(String, u32)],
) -> Result<Vec<OutputTensor>, WorkerError> {
    for (name, classes) in classifications {
        let Some(output) = outputs.iter_mut().find(|o| &o.name == name) else {
            continue;
        };
        // Row by row when the model's first dimension of the output is the batch.
        let per_row = model
            .schema
            .output(name)
            .is_some_and(|spec| spec.shape.first() == Some(&-1));
        *output = classification::classify(output, *classes, per_row, model.labels.of(name))
            .map_err(|reason| classification_refused(name, &reason))?;
    }
    Ok(outputs)
}

/// A refused `classification` parameter of output `name`.
fn classification_refused(name: &str, reason: &str) -> WorkerError {
    WorkerError::invalid(format!(
        "parameter \"{}\" of output \"{name}\": {reason}",
        parameters::CLASSIFICATION
    ))
}

/// Validates and runs one inference on `slot`, whatever version the request names,
/// unless its `deadline` passes before a session is free. A caller holding the slot
/// can use it even after the version is unloaded.
///
/// The request is checked and its decoded size reserved from the worker's budgets
/// before anything is decoded; over budget, it is refused at once
/// ([`WorkerError::OverBudget`]). The reservation lasts until its inference ends.
pub async fn infer_on(
    slot: &VersionSlot,
    request: ModelInferRequest,
    deadline: Option<Instant>,
) -> Result<ModelInferResponse, WorkerError> {
    let started = Instant::now();
    let mut decoded = started;
    let model = slot.current();
    let result = async {
        let asked = read_parameters(&model, &request)?;
        let deadline = match asked.timeout {
            Some(timeout) => Some(deadline.map_or(started + timeout, |d| d.min(started + timeout))),
            None => deadline,
        };
        let checked = validate::check(&model.schema, &request)?;
        // Outputs asked for as classes are checked before the run, not after it.
        let classifications = checked.classifications().to_vec();
        for (name, _) in &classifications {
            if let Some(spec) = model.schema.output(name) {
                classification::classifiable(name, spec.datatype)
                    .map_err(|reason| classification_refused(name, &reason))?;
            }
        }
        let reservation = slot.admission().admit(checked.cost())?;
        let validated = checked.decode()?;
        if let Some(rules) = &model.input_rules {
            // Flag mode counts and serves; reject mode refuses the first broken rule.
            let mode = mode_of(&request)?.unwrap_or(rules.mode());
            if let Some(violation) = rules
                .check_as(&validated.inputs, mode)
                .map_err(WorkerError::invalid)?
            {
                return Err(WorkerError::invalid(violation.to_string()));
            }
        }
        if let Some(drift) = &model.drift {
            drift.record_inputs(&validated.inputs);
        }
        decoded = Instant::now();
        let batch = validated
            .inputs
            .first()
            .and_then(|i| i.shape.first())
            .map_or(1, |&d| u64::try_from(d).unwrap_or(0));
        let (outputs, timings) = model.infer(validated, reservation, deadline).await?;
        if let Some(drift) = &model.drift {
            drift.record_outputs(&outputs);
        }
        let outputs = classify(&model, outputs, &classifications)?;
        Ok::<_, WorkerError>((outputs, timings, batch))
    }
    .await;
    match result {
        Ok((outputs, timings, batch)) => {
            slot.stats()
                .record_success(started.elapsed(), timings, batch);
            if telemetry::tracing_on() {
                telemetry::record_stages(|| stage_spans(started, decoded, &timings, batch));
            }
            let (tensors, raw): (Vec<_>, Vec<_>) = outputs
                .into_iter()
                .map(|o| {
                    let tensor = InferOutputTensor {
                        name: o.name,
                        datatype: o.datatype.as_str().to_owned(),
                        shape: o.shape,
                        ..Default::default()
                    };
                    (tensor, Bytes::from(o.raw))
                })
                .unzip();
            // Which weights answered, for a gateway's prediction cache: the slot may
            // hold another model by the time the caller reads it.
            let fingerprint = InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam(model.content_hash.clone())),
            };
            Ok(ModelInferResponse {
                model_name: model.model.clone(),
                model_version: model.version.clone(),
                id: request.id,
                parameters: HashMap::from([(FINGERPRINT_PARAMETER.to_owned(), fingerprint)]),
                outputs: tensors,
                raw_output_contents: raw,
            })
        }
        Err(error @ WorkerError::DeadlineExceeded { .. }) => {
            slot.stats().record_expired(started.elapsed());
            Err(error)
        }
        Err(error) => {
            slot.stats().record_failure(started.elapsed());
            Err(error)
        }
    }
}

impl Worker {
    /// Whether `model` (at `version`, or any version when empty) is ready.
    pub fn ready(&self, model: &str, version: &str) -> bool {
        self.slot(model, version).is_ok()
    }

    /// `ModelMetadata`: every loaded version, and the tensors of the requested (or newest).
    pub fn metadata(
        &self,
        model: &str,
        version: &str,
    ) -> Result<ModelMetadataResponse, WorkerError> {
        let loaded = self.slot(model, version)?.current();
        let describe = |specs: &[crate::schema::TensorSpec]| {
            specs
                .iter()
                .map(|s| TensorMetadata {
                    name: s.name.clone(),
                    datatype: s.datatype.as_str().to_owned(),
                    shape: s.shape.clone(),
                })
                .collect()
        };
        Ok(ModelMetadataResponse {
            name: model.to_owned(),
            versions: self.versions(model),
            platform: PLATFORM.to_owned(),
            inputs: describe(&loaded.schema.inputs),
            outputs: describe(&loaded.schema.outputs),
        })
    }

    /// Loaded versions of `model`, oldest first.
    pub fn versions(&self, model: &str) -> Vec<String> {
        self.catalog.load().versions(model)
    }

    /// `ModelConfig`: the subset of Triton's configuration that its tools read.
    pub fn config(&self, model: &str, version: &str) -> Result<ModelConfig, WorkerError> {
        let loaded = self.slot(model, version)?.current();
        let dtype = |d: Datatype| d.config_type() as i32;
        Ok(ModelConfig {
            name: model.to_owned(),
            platform: PLATFORM.to_owned(),
            backend: BACKEND.to_owned(),
            version_policy: Some(config_policy(&self.lifecycle.policy(model))),
            // Without batching, Aviary passes shapes through as the model declares them,
            // batch dimension included, which Triton expresses as max_batch_size 0.
            // With it, Triton's convention: max_batch_size > 0 and dims without the
            // batch dimension.
            max_batch_size: loaded
                .batching
                .as_ref()
                .map_or(0, |b| i32::try_from(b.max_batch_size).unwrap_or(i32::MAX)),
            scheduling_choice: loaded.batching.as_ref().map(|b| {
                model_config::SchedulingChoice::DynamicBatching(ModelDynamicBatching {
                    preferred_batch_size: b
                        .preferred
                        .iter()
                        .map(|&s| i32::try_from(s).unwrap_or(i32::MAX))
                        .collect(),
                    max_queue_delay_microseconds: u64::try_from(b.max_queue_delay.as_micros())
                        .unwrap_or(u64::MAX),
                    preserve_ordering: false,
                })
            }),
            input: loaded
                .schema
                .inputs
                .iter()
                .map(|s| ModelInput {
                    name: s.name.clone(),
                    data_type: dtype(s.datatype),
                    format: config_format(loaded.card.as_ref(), &s.name) as i32,
                    dims: config_dims(&s.shape, loaded.batching.is_some()),
                    ..Default::default()
                })
                .collect(),
            output: loaded
                .schema
                .outputs
                .iter()
                .map(|s| ModelOutput {
                    name: s.name.clone(),
                    data_type: dtype(s.datatype),
                    dims: config_dims(&s.shape, loaded.batching.is_some()),
                    ..Default::default()
                })
                .collect(),
            instance_group: vec![ModelInstanceGroup {
                name: format!("{model}_cpu"),
                count: i32::try_from(loaded.instances()).unwrap_or(i32::MAX),
                kind: model_instance_group::Kind::Cpu as i32,
            }],
            default_model_filename: repository::MODEL_FILE.to_owned(),
            parameters: loaded
                .card
                .as_ref()
                .map(|card| card_parameters(card, loaded.default_prediction.as_ref()))
                .unwrap_or_default()
                .into_iter()
                .chain([
                    (
                        FINGERPRINT_PARAMETER.to_owned(),
                        ModelParameter {
                            string_value: loaded.content_hash.clone(),
                        },
                    ),
                    (
                        SHA256_PARAMETER.to_owned(),
                        ModelParameter {
                            string_value: loaded.sha256.to_string(),
                        },
                    ),
                ])
                .collect(),
            ..Default::default()
        })
    }

    /// `ModelStatistics` for one version, every version of a model, or every model.
    pub fn statistics(
        &self,
        model: &str,
        version: &str,
    ) -> Result<Vec<ModelStatistics>, WorkerError> {
        self.catalog.load().statistics(model, version)
    }

    /// Every loaded version's queue and compute duration histograms.
    pub fn durations(&self) -> Vec<crate::catalog::VersionDurations> {
        self.catalog.load().durations()
    }

    /// Every loaded version with drift tracking: (model, version, its features' drift).
    pub fn drift(&self) -> Vec<(String, String, Vec<crate::drift::FeatureDrift>)> {
        self.drift_tracked()
            .into_iter()
            .map(|(model, version, loaded)| {
                let report = loaded
                    .drift
                    .as_ref()
                    .map(|d| d.report())
                    .unwrap_or_default();
                (model, version, report)
            })
            .collect()
    }

    /// Every loaded version with drift tracking: (model, version, its running copy,
    /// whose `drift` is set).
    pub fn drift_tracked(&self) -> Vec<(String, String, Arc<crate::model::LoadedModel>)> {
        let mut loaded = self.loaded();
        loaded.retain(|(_, _, model)| model.drift.is_some());
        loaded
    }

    /// Every loaded version: (model, version, its running copy).
    pub fn loaded(&self) -> Vec<(String, String, Arc<crate::model::LoadedModel>)> {
        self.catalog.load().loaded()
    }

    /// Every loaded version's counts of values that broke its card's input rules.
    pub fn input_violations(&self) -> Vec<crate::catalog::InputViolation> {
        self.catalog.load().input_violations()
    }

    /// Loads, reloads and unloads since start-up.
    pub fn lifecycle_totals(&self) -> crate::lifecycle::LifecycleTotals {
        self.lifecycle.totals()
    }

    /// Versions whose last load or reload failed, with the reason; a running copy of
    /// such a version may still be serving.
    pub fn failed_loads(&self) -> Vec<(String, u64, String)> {
        self.catalog
            .load()
            .failed
            .iter()
            .map(|((model, version), failure)| (model.clone(), *version, failure.reason.clone()))
            .collect()
    }

    /// `RepositoryIndex`: every version in the repository with its state.
    pub fn index(&self, ready_only: bool) -> Vec<ModelIndex> {
        self.catalog.load().index(ready_only)
    }

    /// Loads `<repo>/<model>/<version>` and warms it up. If the version is already
    /// loaded, the new copy replaces it (a reload) once it is ready; on any failure
    /// the running copy keeps serving.
    pub async fn load_version(
        &self,
        model: &str,
        version: u64,
    ) -> Result<LoadOutcome, WorkerError> {
        self.lifecycle
            .load_version(&self.catalog, model, version)
            .await
    }

    /// Loads the running version's file again and swaps it in; an error if the version
    /// is not loaded.
    pub async fn reload_version(
        &self,
        model: &str,
        version: u64,
    ) -> Result<LoadOutcome, WorkerError> {
        self.lifecycle
            .reload_version(&self.catalog, model, version)
            .await
    }

    /// Stops serving a version. Requests already running on it finish; its sessions
    /// are freed when the last one does.
    pub async fn unload_version(&self, model: &str, version: u64) -> Result<(), WorkerError> {
        self.lifecycle
            .unload_version(&self.catalog, model, version)
            .await
    }

    /// Brings the loaded versions in line with the repository and the version
    /// policies: loads new versions, reloads versions whose file changed, unloads
    /// versions that are gone or outside the policy unless `may_unload` says no.
    /// `only_model` limits the sync to one model; versions in `unsettled` (files still
    /// being written) are left as they are.
    pub async fn sync(
        &self,
        only_model: Option<&str>,
        unsettled: &BTreeSet<(String, u64)>,
        may_unload: &(dyn Fn(&str, u64) -> bool + Send + Sync),
    ) -> Result<SyncReport, WorkerError> {
        self.lifecycle
            .sync(&self.catalog, only_model, unsettled, may_unload)
            .await
    }

    /// Triton's RepositoryModelLoad: loads or reloads `model` from the repository as
    /// its version policy says, new copies beside running ones (no unload-before-load
    /// gap). An error when no version of the model ends up loaded.
    pub async fn load_model(
        &self,
        model: &str,
        request: LoadRequest,
        may_unload: &(dyn Fn(&str, u64) -> bool + Send + Sync),
    ) -> Result<SyncReport, WorkerError> {
        repository::check_model_name(model)?;
        // Supplied files are loaded even where the model file's fingerprint did not
        // change (a card alone).
        let supplied = !request.files.is_empty();
        if supplied {
            let root = self.repository().to_owned();
            let model = model.to_owned();
            let cards_alone = request.cards_alone();
            let files = request.files;
            tokio::task::spawn_blocking(move || {
                // Checked before anything is written: a refused load leaves no file.
                for version in cards_alone {
                    let model_file = root
                        .join(&model)
                        .join(version.to_string())
                        .join(repository::MODEL_FILE);
                    if !model_file.is_file() {
                        return Err(load_request::card_without_model(&model, version));
                    }
                }
                check_supplied(&root, &model, &files)?;
                files
                    .iter()
                    .try_for_each(|file| repository::write_supplied(&root, &model, file))
            })
            .await
            .map_err(|e| WorkerError::Unavailable(format!("writing model files: {e}")))??;
        }
        self.lifecycle
            .load_model(&self.catalog, model, request.config, supplied, may_unload)
            .await
    }

    /// Triton's RepositoryModelUnload: unloads every version of `model`.
    pub async fn unload_model(&self, model: &str) -> Result<Vec<u64>, WorkerError> {
        self.lifecycle.unload_model(&self.catalog, model).await
    }
}

/// Refuses supplied files that could not load, before any is written: a supplied card
/// that does not parse, and a model whose SHA-256 is not the one its card states (the
/// supplied card, else the one in the repository). Otherwise the repository would keep
/// a pair that fails at every start.
fn check_supplied(
    root: &std::path::Path,
    model: &str,
    files: &[load_request::SuppliedFile],
) -> Result<(), WorkerError> {
    let versions: std::collections::BTreeSet<u64> = files.iter().map(|f| f.version).collect();
    for version in versions {
        let dir = root.join(model).join(version.to_string());
        let supplied = |name: &str| {
            files
                .iter()
                .find(|f| f.version == version && f.name == name)
        };
        let refuse = |name: &str, reason: String| {
            WorkerError::InvalidRequest(format!("parameter \"file:{version}/{name}\": {reason}"))
        };
        let card = match supplied(repository::CARD_FILE) {
            Some(file) => Some(
                std::str::from_utf8(&file.bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|text| {
                        toml::from_str::<repository::ModelCard>(text).map_err(|e| e.to_string())
                    })
                    .map_err(|e| {
                        refuse(repository::CARD_FILE, format!("invalid model card: {e}"))
                    })?,
            ),
            None => {
                let path = dir.join(repository::CARD_FILE);
                path.is_file()
                    .then(|| repository::read_card(&path))
                    .transpose()?
            }
        };
        let Some(stated) = card.and_then(|card| card.sha256) else {
            continue;
        };
        let actual = match supplied(repository::MODEL_FILE) {
            Some(file) => crate::registry::Sha256::of(&file.bytes),
            // A card alone for a version without a model was refused before this.
            None => match std::fs::read(dir.join(repository::MODEL_FILE)) {
                Ok(bytes) => crate::registry::Sha256::of(&bytes),
                Err(_) => continue,
            },
        };
        crate::registry::check_file(&actual, Some(&stated))
            .map_err(|reason| refuse(repository::MODEL_FILE, reason))?;
    }
    Ok(())
}

/// A tensor's dims as `ModelConfig` states them: without the batch dimension when the
/// version batches (Triton's convention for `max_batch_size` > 0).
fn config_dims(shape: &[i64], batched: bool) -> Vec<i64> {
    match batched {
        true => shape.get(1..).unwrap_or_default().to_vec(),
        false => shape.to_vec(),
    }
}

/// A model card as config parameters (`card.owner`, `card.metrics.accuracy`, …), the
/// place Triton clients already read free-form model facts from; its checked default
/// prediction as JSON under [`default_prediction::PARAMETER`], where gateways read it.
fn card_parameters(
    card: &repository::ModelCard,
    default: Option<&DefaultPrediction>,
) -> HashMap<String, ModelParameter> {
    let text = [
        ("description", &card.description),
        ("owner", &card.owner),
        ("intended_use", &card.intended_use),
        ("limitations", &card.limitations),
        ("training_data", &card.training_data),
    ];
    text.into_iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(key, value)| (format!("card.{key}"), value.clone()))
        .chain(
            card.metrics
                .iter()
                .map(|(name, value)| (format!("card.metrics.{name}"), value.to_string())),
        )
        .chain(registry_parameters(card))
        .chain(default.map(|d| (default_prediction::PARAMETER.to_owned(), d.to_json())))
        .chain(card.input_rules.as_ref().map(|rules| {
            // Plain data of strings, numbers and maps: serialising cannot fail.
            let json = serde_json::to_string(rules).unwrap_or_default();
            (input_rules::PARAMETER.to_owned(), json)
        }))
        .map(|(key, string_value)| (key, ModelParameter { string_value }))
        .collect()
}

/// `ModelConfig` parameter holding the SHA-256 of the model file the version loaded:
/// the registry's fingerprint of it, whether or not its card states one.
pub const SHA256_PARAMETER: &str = "model.sha256";

/// A card's registry record as config parameters: `card.semver` and
/// `card.lineage.*` (its hyperparameters as one JSON object).
fn registry_parameters(card: &repository::ModelCard) -> Vec<(String, String)> {
    let mut parameters = Vec::new();
    if let Some(semver) = &card.semver {
        parameters.push(("card.semver".to_owned(), semver.to_string()));
    }
    if let Some(sha256) = &card.sha256 {
        parameters.push(("card.sha256".to_owned(), sha256.to_string()));
    }
    if let Some(stage) = card.stage {
        parameters.push(("card.stage".to_owned(), stage.name().to_owned()));
    }
    if let Some(approval) = &card.approval {
        for (key, value) in [
            ("by", &approval.by),
            ("at", &approval.at),
            ("note", &approval.note),
        ] {
            if !value.is_empty() {
                parameters.push((format!("card.approval.{key}"), value.clone()));
            }
        }
    }
    if let Some(lineage) = &card.lineage {
        let text = [
            ("dataset", lineage.dataset.clone()),
            (
                "dataset_sha256",
                lineage
                    .dataset_sha256
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            ),
            ("code_revision", lineage.code_revision.clone()),
            ("training_run", lineage.training_run.clone()),
        ];
        parameters.extend(
            text.into_iter()
                .filter(|(_, value)| !value.is_empty())
                .map(|(key, value)| (format!("card.lineage.{key}"), value)),
        );
        if !lineage.hyperparameters.is_empty() {
            // Plain JSON values: serialising cannot fail.
            let json = serde_json::to_string(&lineage.hyperparameters).unwrap_or_default();
            parameters.push(("card.lineage.hyperparameters".to_owned(), json));
        }
    }
    parameters
}

/// The spans of a request's stages in the worker, laid end to end from their measured
/// times: validation (and decoding), the wait for a session or a batch, the ONNX
/// Runtime run (with building its inputs and encoding its outputs).
fn stage_spans(started: Instant, decoded: Instant, timings: &Timings, rows: u64) -> Vec<Stage> {
    let queued = decoded + timings.queue;
    let ran = queued + timings.compute_input + timings.compute_infer + timings.compute_output;
    vec![
        Stage {
            name: "aviary.validate",
            start: started,
            end: decoded,
            attributes: Vec::new(),
        },
        Stage {
            name: "aviary.queue",
            start: decoded,
            end: queued,
            attributes: Vec::new(),
        },
        Stage {
            name: "onnxruntime.run",
            start: queued,
            end: ran,
            attributes: vec![
                attribute("aviary.rows", i64::try_from(rows).unwrap_or(i64::MAX)),
                // 0: the request rode in a dynamic batch another request's run served.
                attribute(
                    "aviary.executions",
                    i64::try_from(timings.executions).unwrap_or(i64::MAX),
                ),
                attribute(
                    "aviary.session_run_seconds",
                    timings.compute_infer.as_secs_f64(),
                ),
            ],
        },
    ]
}
