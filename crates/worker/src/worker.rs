//! The worker: every loaded model version of one repository, and the v2 operations on
//! them (infer, metadata, config, statistics, index).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use arc_swap::ArcSwap;
use aviary::{
    pb::inference::{
        ModelConfig, ModelInferRequest, ModelInferResponse, ModelInput, ModelInstanceGroup,
        ModelMetadataResponse, ModelOutput, ModelParameter, ModelStatistics, ModelVersionPolicy,
        model_infer_response::InferOutputTensor, model_instance_group,
        model_metadata_response::TensorMetadata, model_version_policy,
        repository_index_response::ModelIndex,
    },
    tensor::Datatype,
};
use bytes::Bytes;

use crate::{
    WorkerError,
    lifecycle::VersionPolicy,
    model::{LoadedModel, SessionOptions},
    repository,
    repository::Fingerprint,
    stats::VersionStats,
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
}

impl WorkerConfig {
    /// Every version of every model in `repository`, with `session` settings.
    pub fn new(repository: PathBuf, session: SessionOptions) -> WorkerConfig {
        WorkerConfig {
            repository,
            session,
            default_policy: VersionPolicy::All,
            policies: BTreeMap::new(),
        }
    }
}

/// One model version slot: the loaded model and its cumulative statistics.
#[derive(Debug)]
pub struct VersionSlot {
    pub(crate) current: ArcSwap<LoadedModel>,
    pub(crate) stats: VersionStats,
}

impl VersionSlot {
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

/// Every loaded version of a repository's models.
#[derive(Debug)]
pub struct Worker {
    pub(crate) config: WorkerConfig,
    pub(crate) catalog: ArcSwap<Catalog>,
    /// Serialises load, reload, unload and sync; requests never take it.
    pub(crate) lifecycle: tokio::sync::Mutex<()>,
}

impl Worker {
    /// Scans the repository and loads (and warms up) every version its version policy
    /// selects. A version that fails to load is logged and listed as unavailable in the
    /// repository index; the others still serve.
    pub async fn open(config: WorkerConfig) -> Result<Worker, WorkerError> {
        // Fail early, with the message that says what to do, when ONNX Runtime is missing.
        crate::runtime::environment()?;
        let worker = Worker {
            config,
            catalog: ArcSwap::from_pointee(Catalog::default()),
            lifecycle: tokio::sync::Mutex::new(()),
        };
        worker.sync(None, &BTreeSet::new(), &|_, _| true).await?;
        Ok(worker)
    }

    /// The repository root.
    pub fn repository(&self) -> &Path {
        &self.config.repository
    }

    /// Loaded versions per model, for route validation.
    pub fn inventory(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.catalog
            .load()
            .models
            .iter()
            .map(|(m, versions)| (m.clone(), versions.keys().map(u64::to_string).collect()))
            .collect()
    }

    /// The slot for `model` at `version`; an empty version means the newest loaded.
    pub fn slot(&self, model: &str, version: &str) -> Result<Arc<VersionSlot>, WorkerError> {
        let catalog = self.catalog.load();
        let versions = catalog
            .models
            .get(model)
            .ok_or_else(|| WorkerError::UnknownModel {
                model: model.to_owned(),
                available: catalog
                    .models
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
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

    /// Validates and runs one inference on the version the request names (the newest
    /// when it names none).
    pub async fn infer(
        &self,
        request: ModelInferRequest,
    ) -> Result<ModelInferResponse, WorkerError> {
        let slot = self.slot(&request.model_name, &request.model_version)?;
        infer_on(&slot, request).await
    }
}

/// Validates and runs one inference on `slot`, whatever version the request names. A
/// caller holding the slot can use it even after the version is unloaded.
pub async fn infer_on(
    slot: &VersionSlot,
    request: ModelInferRequest,
) -> Result<ModelInferResponse, WorkerError> {
    let started = Instant::now();
    let model = slot.current();
    let result = async {
        let validated = validate::validate(&model.schema, &request)?;
        let batch = validated
            .inputs
            .first()
            .and_then(|i| i.shape.first())
            .map_or(1, |&d| u64::try_from(d).unwrap_or(0));
        let (outputs, timings) = model.infer(validated).await?;
        Ok::<_, WorkerError>((outputs, timings, batch))
    }
    .await;
    match result {
        Ok((outputs, timings, batch)) => {
            slot.stats.record_success(started.elapsed(), timings, batch);
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
            Ok(ModelInferResponse {
                model_name: model.model.clone(),
                model_version: model.version.clone(),
                id: request.id,
                parameters: Default::default(),
                outputs: tensors,
                raw_output_contents: raw,
            })
        }
        Err(error) => {
            slot.stats.record_failure(started.elapsed());
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
        self.catalog
            .load()
            .models
            .get(model)
            .map(|v| v.keys().map(u64::to_string).collect())
            .unwrap_or_default()
    }

    /// `ModelConfig`: the subset of Triton's configuration that its tools read.
    pub fn config(&self, model: &str, version: &str) -> Result<ModelConfig, WorkerError> {
        let loaded = self.slot(model, version)?.current();
        let dtype = |d: Datatype| d.config_type() as i32;
        Ok(ModelConfig {
            name: model.to_owned(),
            platform: PLATFORM.to_owned(),
            backend: BACKEND.to_owned(),
            version_policy: Some(ModelVersionPolicy {
                policy_choice: Some(model_version_policy::PolicyChoice::All(
                    model_version_policy::All {},
                )),
            }),
            // Aviary passes shapes through as the model declares them, batch dimension
            // included, which Triton expresses as max_batch_size 0.
            max_batch_size: 0,
            input: loaded
                .schema
                .inputs
                .iter()
                .map(|s| ModelInput {
                    name: s.name.clone(),
                    data_type: dtype(s.datatype),
                    dims: s.shape.clone(),
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
                    dims: s.shape.clone(),
                    ..Default::default()
                })
                .collect(),
            instance_group: vec![ModelInstanceGroup {
                name: format!("{model}_cpu"),
                count: i32::try_from(self.config.session.instances).unwrap_or(i32::MAX),
                kind: model_instance_group::Kind::Cpu as i32,
            }],
            default_model_filename: repository::MODEL_FILE.to_owned(),
            parameters: loaded
                .card
                .as_ref()
                .map(card_parameters)
                .unwrap_or_default(),
            ..Default::default()
        })
    }

    /// `ModelStatistics` for one version, every version of a model, or every model.
    pub fn statistics(
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
        let catalog = self.catalog.load();
        Ok(catalog
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

    /// `RepositoryIndex`: every version in the repository with its state.
    pub fn index(&self, ready_only: bool) -> Vec<ModelIndex> {
        let catalog = self.catalog.load();
        let mut index: Vec<ModelIndex> = catalog
            .models
            .iter()
            .flat_map(|(name, versions)| {
                versions.keys().map(move |v| ModelIndex {
                    name: name.clone(),
                    version: v.to_string(),
                    state: "READY".to_owned(),
                    reason: String::new(),
                })
            })
            .collect();
        if !ready_only {
            index.extend(
                catalog
                    .failed
                    .iter()
                    // A failed reload of a running version leaves that version READY.
                    .filter(|((name, version), _)| {
                        catalog
                            .models
                            .get(name)
                            .is_none_or(|v| !v.contains_key(version))
                    })
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
}

/// A model card as config parameters (`card.owner`, `card.metrics.accuracy`, …), the
/// place Triton clients already read free-form model facts from.
fn card_parameters(card: &repository::ModelCard) -> HashMap<String, ModelParameter> {
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
        .map(|(key, string_value)| (key, ModelParameter { string_value }))
        .collect()
}
