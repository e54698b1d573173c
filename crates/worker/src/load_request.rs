//! What Triton's RepositoryModelLoad may ask beyond "load this model": a load-time
//! `config` override (Triton's model configuration as JSON) and `file:<path>` model
//! files supplied by the client. Aviary takes the override fields it has settings for
//! (`max_batch_size` with `dynamic_batching`, the instance count, the version policy
//! and no warm-up) and refuses every other field, parameter or value naming
//! it, so a load never silently does less than asked. Pure code: the files are written
//! by the caller.

use std::collections::{BTreeSet, HashMap};

use aviary::pb::inference::{ModelRepositoryParameter, model_repository_parameter};
use serde_json::{Map, Value};

use crate::{
    WorkerError,
    batching::BatchingCard,
    lifecycle::VersionPolicy,
    repository::{CARD_FILE, MODEL_FILE, ModelCard},
    warmup::{WarmupCard, WarmupSwitch},
    worker::{BACKEND, PLATFORM},
};

/// A model's settings as a load-time `config` overrides them; `None`: as the
/// repository and the worker's settings say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelOverride {
    /// Which versions to load.
    pub policy: Option<VersionPolicy>,
    /// Sessions per version.
    pub instances: Option<usize>,
    /// Dynamic batching: `Some(None)` turns a card's off.
    pub batching: Option<Option<BatchingCard>>,
    /// The warm-up, over the cards'.
    pub warmup: Option<WarmupCard>,
}

impl ModelOverride {
    /// `card` (the version's model card, if any) with the settings this overrides.
    pub fn apply(&self, card: Option<ModelCard>) -> Option<ModelCard> {
        if self.batching.is_none() && self.warmup.is_none() {
            return card;
        }
        let mut card = card.unwrap_or_default();
        if let Some(batching) = &self.batching {
            card.dynamic_batching.clone_from(batching);
        }
        if let Some(warmup) = &self.warmup {
            card.warmup = Some(warmup.clone());
        }
        Some(card)
    }
}

/// One model file a client supplied: where under the model's folder, and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuppliedFile {
    /// The version folder.
    pub version: u64,
    /// `model.onnx` or `model.toml`.
    pub name: &'static str,
    /// The contents.
    pub bytes: Vec<u8>,
}

/// A RepositoryModelLoad's request, read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadRequest {
    /// The `config` override, if any.
    pub config: Option<ModelOverride>,
    /// The `file:` parameters.
    pub files: Vec<SuppliedFile>,
}

/// The fields of a `config` override Aviary takes.
const TAKEN: &str = "name, platform, backend, max_batch_size, dynamic_batching, \
                     instance_group, version_policy, model_warmup";

/// Reads a RepositoryModelLoad of `model` from `repository_name` with `parameters`.
pub fn read(
    model: &str,
    repository_name: &str,
    parameters: &HashMap<String, ModelRepositoryParameter>,
) -> Result<LoadRequest, WorkerError> {
    use model_repository_parameter::ParameterChoice;
    if !repository_name.is_empty() {
        return Err(invalid(format!(
            "repository_name \"{repository_name}\": Aviary serves one repository; leave it empty"
        )));
    }
    let mut request = LoadRequest::default();
    for (name, value) in parameters {
        let value = value.parameter_choice.as_ref();
        if name == "config" {
            let Some(ParameterChoice::StringParam(text)) = value else {
                return Err(invalid(
                    "parameter \"config\": must be a string (JSON)".into(),
                ));
            };
            request.config = Some(config_override(model, text)?);
        } else if let Some(path) = name.strip_prefix("file:") {
            let Some(ParameterChoice::BytesParam(bytes)) = value else {
                return Err(invalid(format!("parameter \"{name}\": must be bytes")));
            };
            request.files.push(supplied_file(path, bytes.clone())?);
        } else {
            return Err(invalid(format!(
                "parameter \"{name}\": not a RepositoryModelLoad parameter Aviary knows \
                 (config, file:<version>/{MODEL_FILE}, file:<version>/{CARD_FILE})"
            )));
        }
    }
    if !request.files.is_empty() && request.config.is_none() {
        // As Triton: supplied files come with the configuration they are loaded with.
        return Err(invalid(
            "parameter \"file:…\": model files need a \"config\" parameter too (\"{}\" keeps \
             every setting)"
                .into(),
        ));
    }
    Ok(request)
}

impl LoadRequest {
    /// The versions whose card is supplied without their model: each needs a model
    /// already in the repository, or the card would load nothing.
    pub fn cards_alone(&self) -> BTreeSet<u64> {
        let with_model: BTreeSet<u64> = self
            .files
            .iter()
            .filter(|f| f.name == MODEL_FILE)
            .map(|f| f.version)
            .collect();
        self.files
            .iter()
            .filter(|f| f.name == CARD_FILE && !with_model.contains(&f.version))
            .map(|f| f.version)
            .collect()
    }
}

/// The refusal of a card supplied for `version` of `model`, which has no model file
/// in the repository and none supplied.
pub fn card_without_model(model: &str, version: u64) -> WorkerError {
    invalid(format!(
        "parameter \"file:{version}/{CARD_FILE}\": {model} version {version} has no \
         {MODEL_FILE} in the repository and none is supplied; a card alone loads nothing"
    ))
}

/// `file:<version>/model.onnx` or `file:<version>/model.toml`; nothing else.
fn supplied_file(path: &str, bytes: Vec<u8>) -> Result<SuppliedFile, WorkerError> {
    let refuse = || {
        invalid(format!(
            "parameter \"file:{path}\": Aviary takes file:<version>/{MODEL_FILE} and \
             file:<version>/{CARD_FILE}, the version a positive number"
        ))
    };
    let (version, name) = path.split_once('/').ok_or_else(refuse)?;
    let version: u64 = version
        .parse()
        .ok()
        .filter(|v| *v > 0 && !version.starts_with('0'))
        .ok_or_else(refuse)?;
    let name = match name {
        MODEL_FILE => MODEL_FILE,
        CARD_FILE => CARD_FILE,
        _ => return Err(refuse()),
    };
    Ok(SuppliedFile {
        version,
        name,
        bytes,
    })
}

fn config_override(model: &str, text: &str) -> Result<ModelOverride, WorkerError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| invalid(format!("parameter \"config\": not JSON: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(invalid(
            "parameter \"config\": must be a JSON object".into(),
        ));
    };
    let mut over = ModelOverride::default();
    let mut max_batch_size = None;
    let mut dynamic = None;
    for (key, value) in &fields {
        let at = |reason: String| invalid(format!("config.{key}: {reason}"));
        match key.as_str() {
            "name" => {
                if value.as_str() != Some(model) {
                    return Err(at(format!("must be \"{model}\", the model loaded")));
                }
            }
            "platform" => {
                if value.as_str() != Some(PLATFORM) {
                    return Err(at(format!("Aviary runs \"{PLATFORM}\" models only")));
                }
            }
            "backend" => {
                if value.as_str() != Some(BACKEND) {
                    return Err(at(format!("Aviary's backend is \"{BACKEND}\"")));
                }
            }
            "max_batch_size" => max_batch_size = Some(count(value).map_err(at)?),
            "dynamic_batching" => dynamic = Some(dynamic_batching(value).map_err(at)?),
            "instance_group" => over.instances = Some(instances(value).map_err(at)?),
            "version_policy" => over.policy = Some(version_policy(value).map_err(at)?),
            "model_warmup" => over.warmup = Some(warmup(value)?),
            _ => {
                return Err(invalid(format!(
                    "config.{key}: Aviary does not take this field in a load-time override \
                     (it takes: {TAKEN})"
                )));
            }
        }
    }
    over.batching = match (max_batch_size, dynamic) {
        (None, None) => None,
        (Some(0), None) => Some(None),
        (Some(0), Some(_)) => {
            return Err(invalid(
                "config.dynamic_batching: needs max_batch_size above 0".into(),
            ));
        }
        (Some(max), Some((delay, preferred))) => Some(Some(BatchingCard {
            max_batch_size: max,
            max_queue_delay_us: delay,
            preferred_batch_sizes: preferred,
        })),
        (Some(_), None) => {
            return Err(invalid(
                "config.max_batch_size: above 0, Aviary batches requests only with \
                 dynamic_batching; add it, or set max_batch_size 0"
                    .into(),
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                "config.dynamic_batching: needs max_batch_size (the most rows a run takes)".into(),
            ));
        }
    };
    Ok(over)
}

/// A whole number ≥ 0, as a JSON number or, as proto3's JSON writes 64-bit integers,
/// a string of digits.
fn count(value: &Value) -> Result<usize, String> {
    value
        .as_u64()
        .or_else(|| value.as_str().and_then(|text| text.parse().ok()))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| format!("must be a whole number ≥ 0, not {value}"))
}

fn object<'a>(value: &'a Value, keys: &[&str]) -> Result<&'a Map<String, Value>, String> {
    let Value::Object(fields) = value else {
        return Err(format!("must be an object, not {value}"));
    };
    if let Some(other) = fields.keys().find(|k| !keys.contains(&k.as_str())) {
        return Err(format!(
            "field \"{other}\" is not taken (it takes: {})",
            keys.join(", ")
        ));
    }
    Ok(fields)
}

/// `{"preferred_batch_size": [..], "max_queue_delay_microseconds": n}`.
fn dynamic_batching(value: &Value) -> Result<(u64, Vec<usize>), String> {
    let fields = object(
        value,
        &["preferred_batch_size", "max_queue_delay_microseconds"],
    )?;
    let delay = match fields.get("max_queue_delay_microseconds") {
        None => 0,
        Some(v) => count(v)? as u64,
    };
    let preferred = match fields.get("preferred_batch_size") {
        None => Vec::new(),
        Some(Value::Array(sizes)) => sizes.iter().map(count).collect::<Result<_, _>>()?,
        Some(other) => return Err(format!("preferred_batch_size must be a list, not {other}")),
    };
    Ok((delay, preferred))
}

/// One CPU group: `[{"count": n, "kind": "KIND_CPU"}]`.
fn instances(value: &Value) -> Result<usize, String> {
    let Value::Array(groups) = value else {
        return Err(format!("must be a list of instance groups, not {value}"));
    };
    let [group] = groups.as_slice() else {
        return Err(format!(
            "Aviary runs one group of CPU sessions; {} groups given",
            groups.len()
        ));
    };
    let fields = object(group, &["name", "count", "kind"])?;
    match fields.get("kind").and_then(Value::as_str) {
        None | Some("KIND_CPU" | "KIND_AUTO") => {}
        Some(kind) => return Err(format!("kind {kind}: Aviary runs models on CPU (KIND_CPU)")),
    }
    let sessions = fields.get("count").map_or(Ok(1), count)?;
    if sessions == 0 {
        return Err("count must be at least 1".into());
    }
    Ok(sessions)
}

/// `{"all": {}}`, `{"latest": {"num_versions": n}}` or `{"specific": {"versions": [..]}}`.
fn version_policy(value: &Value) -> Result<VersionPolicy, String> {
    let fields = object(value, &["all", "latest", "specific"])?;
    let mut chosen = fields.iter();
    let (Some((kind, inner)), None) = (chosen.next(), chosen.next()) else {
        return Err("give exactly one of all, latest and specific".into());
    };
    match kind.as_str() {
        "all" => {
            object(inner, &[])?;
            Ok(VersionPolicy::All)
        }
        "latest" => {
            let n = object(inner, &["num_versions"])?
                .get("num_versions")
                .map_or(Ok(1), count)?;
            match u32::try_from(n) {
                Ok(n) if n >= 1 => Ok(VersionPolicy::Latest(n)),
                _ => Err(format!("latest.num_versions {n}: must be 1 or more")),
            }
        }
        _ => {
            let versions = match object(inner, &["versions"])?.get("versions") {
                Some(Value::Array(list)) => list
                    .iter()
                    .map(|v| count(v).map(|n| n as u64))
                    .collect::<Result<BTreeSet<u64>, _>>()?,
                _ => return Err("specific.versions must be a list of versions".into()),
            };
            Ok(VersionPolicy::Specific(versions))
        }
    }
}

/// Triton's `model_warmup`: an empty list turns warm-up off. Samples are not taken
/// here (their shapes, types and data would each need honouring): the model card's
/// `[warmup]` declares them.
fn warmup(value: &Value) -> Result<WarmupCard, WorkerError> {
    match value {
        Value::Array(samples) if samples.is_empty() => Ok(WarmupCard::Switch(WarmupSwitch::Off)),
        Value::Array(_) => Err(WorkerError::Unimplemented(
            "config.model_warmup: warm-up samples are not taken in a load-time override \
             ([] turns warm-up off); declare them in the model card's [warmup]"
                .into(),
        )),
        other => Err(invalid(format!(
            "config.model_warmup: must be a list, not {other}"
        ))),
    }
}

fn invalid(message: String) -> WorkerError {
    WorkerError::InvalidRequest(message)
}

#[cfg(test)]
mod tests;
