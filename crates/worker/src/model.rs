//! A loaded model version: a small pool of ONNX Runtime sessions over one model file,
//! its schema and model card, and the code that turns validated tensors into ORT values
//! and ORT outputs into raw protocol bytes.
//!
//! `ort::Session::run` takes `&mut self`, so concurrency comes from `instances`
//! sessions (like Triton's instance groups), each lent to one request at a time. ORT
//! runs on tokio's blocking pool so it never stalls the async runtime.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant, SystemTime},
};

use aviary::tensor::{self, Datatype};
use ort::{
    session::{OutputSelector, RunOptions, Session, builder::GraphOptimizationLevel},
    value::{DynValue, Tensor, TensorElementType, ValueType},
};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, mpsc};

use crate::{
    WorkerError,
    admission::Reservation,
    batcher,
    batching::{self, BatchSettings},
    classification::Labels,
    default_prediction::DefaultPrediction,
    drift::DriftTracker,
    input_rules::InputRules,
    registry::{self, Sha256},
    repository::{Fingerprint, InputFormat, ModelCard},
    runtime,
    schema::ModelSchema,
    stats::Timings,
    string_tensors,
    validate::{InputTensor, TensorData, ValidatedRequest},
    warmup::Warmup,
};

/// How sessions are created for each model version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionOptions {
    /// Sessions per version; requests beyond this wait in a queue.
    pub instances: usize,
    /// Threads ORT uses inside one operator.
    pub intra_op_threads: usize,
    /// Threads ORT uses across independent operators.
    pub inter_op_threads: usize,
    /// Longest a request may be expected to run to run inline on the async thread that
    /// received it, skipping the hand-off to the blocking pool (zero: never inline).
    /// See [`InlinePolicy`].
    pub inline_max: Duration,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            instances: std::thread::available_parallelism().map_or(1, usize::from),
            intra_op_threads: 1,
            inter_op_threads: 1,
            inline_max: DEFAULT_INLINE_MAX,
        }
    }
}

/// Default [`SessionOptions::inline_max`]: well under a millisecond, so an async
/// thread running a request inline holds up the others no longer than handling a
/// request's bytes does.
pub const DEFAULT_INLINE_MAX: Duration = Duration::from_micros(100);

/// Timed warm-up runs whose median is a version's measured cost.
const TIMING_RUNS: usize = 7;

/// Where a version's requests run. Handing a request to the blocking pool costs two
/// thread wake-ups, more than a small model's whole run; running a slow model on an
/// async thread would stall every connection that thread serves. So a request runs
/// inline when its expected run time is at most `limit`: the version's measured
/// warm-up run time (inputs with every variable dimension 1), scaled by the request's
/// input elements over the warm-up's. Run time grows more slowly than the element
/// count for small models (fixed per-run costs), so the estimate errs towards the
/// pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InlinePolicy {
    /// The longest expected run allowed inline.
    pub limit: Duration,
    /// Median warm-up run time and the warm-up's input elements; `None`: not measured
    /// (never inline).
    pub measured: Option<(Duration, u64)>,
}

impl InlinePolicy {
    /// Whether a request of `elements` input elements runs inline.
    pub fn runs_inline(&self, elements: u64) -> bool {
        let Some((run, warm_up_elements)) = self.measured else {
            return false;
        };
        let scale = elements.div_ceil(warm_up_elements.max(1)).max(1);
        u32::try_from(scale)
            .ok()
            .and_then(|scale| run.checked_mul(scale))
            .is_some_and(|expected| expected <= self.limit)
    }
}

/// One output tensor, encoded for the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    /// Output name.
    pub name: String,
    /// Element type.
    pub datatype: Datatype,
    /// Concrete shape.
    pub shape: Vec<i64>,
    /// Raw little-endian contents (BYTES: length-prefixed elements).
    pub raw: Vec<u8>,
}

/// A model version ready to serve.
#[derive(Debug)]
pub struct LoadedModel {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: String,
    /// Inputs and outputs.
    pub schema: ModelSchema,
    /// Model card, if the version has one.
    pub card: Option<ModelCard>,
    /// The card's default prediction, checked against the schema.
    pub default_prediction: Option<DefaultPrediction>,
    /// The card's input rules, checked against the schema, with their counts.
    pub input_rules: Option<InputRules>,
    /// Drift tracking, when the card asks for it.
    pub drift: Option<DriftTracker>,
    /// The card's labels of classification outputs.
    pub labels: Labels,
    /// The model file it was loaded from.
    pub path: PathBuf,
    /// When loading finished.
    pub loaded_at: SystemTime,
    /// The model file's fingerprint when it was read.
    pub fingerprint: Fingerprint,
    /// A hash of the model file's bytes (BLAKE3, first 128 bits in hex): equal on every
    /// replica that loaded the same weights, different after any weight change. A
    /// gateway's prediction cache keys answers by it (see [`FINGERPRINT_PARAMETER`]).
    pub content_hash: String,
    /// The SHA-256 of the model file's bytes, the registry's fingerprint of it
    /// (checked against the card's `sha256` when the card states one).
    pub sha256: Sha256,
    /// Whether its requests run inline or on the blocking pool.
    pub inline: InlinePolicy,
    /// Dynamic batching, when the model card asks for it.
    pub batching: Option<BatchSettings>,
    /// How much the process's resident memory grew while this copy loaded (file,
    /// sessions, warm-up): its size in memory, roughly (another load or heavy traffic
    /// at the same time adds to it; memory the allocator kept from before takes from it).
    pub memory_bytes: Option<u64>,
    /// The batcher's queue, started with the first batched request.
    batch_queue: OnceLock<mpsc::Sender<batcher::Job>>,
    idle: Mutex<Vec<Session>>,
    permits: Arc<Semaphore>,
    instances: usize,
}

/// Response parameter (and `ModelConfig` parameter) naming the content hash of the
/// model that answered ([`LoadedModel::content_hash`]), so a gateway never mixes the
/// answers of two models loaded as the same version.
pub const FINGERPRINT_PARAMETER: &str = "aviary_model_fingerprint";

/// The first 128 bits of the BLAKE3 hash of `bytes`, in hex: collisions are not a
/// practical risk, and the value stays short in every response.
fn content_hash(bytes: &[u8]) -> String {
    let hash = blake3::hash(bytes);
    hash.to_hex()[..32].to_owned()
}

impl LoadedModel {
    /// Loads `path` into `options.instances` sessions and runs the warm-up its card
    /// declares ([`Warmup`]). Blocking: call it off the async runtime.
    pub fn load(
        model: &str,
        version: &str,
        path: &Path,
        card: Option<ModelCard>,
        fingerprint: Fingerprint,
        options: SessionOptions,
    ) -> Result<LoadedModel, WorkerError> {
        let load_error = |reason: String| WorkerError::Load {
            path: path.to_owned(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| load_error(e.to_string()))?;
        let sha256 = Sha256::of(&bytes);
        registry::check_file(&sha256, card.as_ref().and_then(|c| c.sha256.as_ref()))
            .map_err(load_error)?;
        let environment = runtime::environment()?;
        let instances = options.instances.max(1);
        let mut sessions = Vec::with_capacity(instances);
        for _ in 0..instances {
            let session = Session::builder(environment)
                .and_then(|b| {
                    b.with_optimization_level(GraphOptimizationLevel::Level3)
                        .map_err(Into::into)
                })
                .and_then(|b| {
                    b.with_intra_threads(options.intra_op_threads.max(1))
                        .map_err(Into::into)
                })
                .and_then(|b| {
                    b.with_inter_threads(options.inter_op_threads.max(1))
                        .map_err(Into::into)
                })
                .and_then(|mut b| b.commit_from_memory(&bytes))
                .map_err(|e| load_error(format!("ONNX Runtime rejected the model: {e}")))?;
            sessions.push(session);
        }
        let schema = sessions
            .first()
            .map(ModelSchema::from_session)
            .transpose()
            .map_err(load_error)?
            .unwrap_or_default();
        let batching = card
            .as_ref()
            .and_then(|c| c.dynamic_batching.as_ref())
            .map(|b| BatchSettings::from_card(b, &schema))
            .transpose()
            .map_err(load_error)?;
        let default_prediction = match &card {
            Some(card) => DefaultPrediction::from_card(&card.default_prediction, &schema)
                .map_err(load_error)?,
            None => None,
        };
        let input_rules = card
            .as_ref()
            .and_then(|c| c.input_rules.as_ref())
            .map(|rules| InputRules::from_card(rules, &schema))
            .transpose()
            .map_err(load_error)?;
        let drift = card
            .as_ref()
            .and_then(|c| c.drift.as_ref().map(|d| (d, c.input_rules.as_ref())))
            .map(|(drift, rules)| {
                let folder = path.parent().unwrap_or(Path::new("."));
                DriftTracker::from_card(drift, &schema, rules, folder)
            })
            .transpose()
            .map_err(load_error)?;
        if let Some(card) = &card {
            InputFormat::check_all(&card.formats, &schema).map_err(load_error)?;
        }
        let labels = match &card {
            Some(card) => {
                let folder = path.parent().unwrap_or(Path::new("."));
                Labels::from_card(&card.labels, &schema, folder).map_err(load_error)?
            }
            None => Labels::default(),
        };
        let mut loaded = LoadedModel {
            model: model.to_owned(),
            version: version.to_owned(),
            schema,
            card,
            default_prediction,
            input_rules,
            drift,
            labels,
            path: path.to_owned(),
            loaded_at: SystemTime::now(),
            fingerprint,
            content_hash: content_hash(&bytes),
            sha256,
            inline: InlinePolicy {
                limit: options.inline_max,
                measured: None,
            },
            batching,
            memory_bytes: None,
            batch_queue: OnceLock::new(),
            idle: Mutex::new(sessions),
            permits: Arc::new(Semaphore::new(instances)),
            instances,
        };
        let warmup = Warmup::from_card(
            loaded.card.as_ref().and_then(|c| c.warmup.as_ref()),
            &loaded.schema,
            path.parent().unwrap_or(Path::new(".")),
        )
        .map_err(|e| load_error(format!("model card: {e}")))?;
        loaded.inline.measured = loaded
            .warm_up(&warmup, options.inline_max)
            .map_err(|e| load_error(format!("{} failed: {e}", warmup.describe())))?;
        tracing::info!(model, version, inline = ?loaded.inline, "warmed up");
        Ok(loaded)
    }

    /// Runs every session once on `warmup`'s inputs (none when it is off), so the
    /// first real request does not pay for ORT's lazy initialisation; then, if that
    /// was fast enough to matter, times [`TIMING_RUNS`] more runs for the
    /// [`InlinePolicy`]: their median and the warm-up's input elements.
    fn warm_up(
        &self,
        warmup: &Warmup,
        inline_max: Duration,
    ) -> Result<Option<(Duration, u64)>, String> {
        let Some(ValidatedRequest { inputs, outputs }) = warmup.request(&self.schema) else {
            return Ok(None);
        };
        let mut idle = self
            .idle
            .lock()
            .map_err(|_| "session pool poisoned".to_owned())?;
        let request = || ValidatedRequest {
            inputs: inputs.clone(),
            outputs: outputs.clone(),
        };
        let mut first_run = Duration::MAX;
        for session in idle.iter_mut() {
            let started = Instant::now();
            run_timed(session, request())?;
            first_run = first_run.min(started.elapsed());
        }
        // A first run far over the limit (it includes ORT's lazy set-up) cannot come
        // under it: no need to time more.
        let Some(session) = idle.first_mut().filter(|_| first_run <= inline_max * 10) else {
            return Ok(None);
        };
        let mut runs = Vec::with_capacity(TIMING_RUNS);
        for _ in 0..TIMING_RUNS {
            let started = Instant::now();
            run_timed(session, request())?;
            runs.push(started.elapsed());
        }
        runs.sort();
        let elements = inputs
            .iter()
            .map(|i| tensor::element_count(&i.shape).unwrap_or(0) as u64)
            .sum();
        Ok(Some((runs[TIMING_RUNS / 2], elements)))
    }

    /// Runs a validated request on a free session. A request whose `deadline` passes
    /// while it waits for one is dropped unrun: its client has given up on it.
    /// `reservation` (the request's share of the memory budget) is held until its
    /// tensors are freed, even when the caller stops waiting while ORT runs.
    pub async fn infer(
        self: &Arc<Self>,
        request: ValidatedRequest,
        reservation: Reservation,
        deadline: Option<Instant>,
    ) -> Result<(Vec<OutputTensor>, Timings), WorkerError> {
        // A request larger than a batch runs alone, as it would without batching.
        if let Some(settings) = &self.batching
            && (1..=settings.max_batch_size).contains(&batching::rows(&request))
        {
            let queue = self
                .batch_queue
                .get_or_init(|| batcher::start(Arc::downgrade(self), settings.clone()));
            let (job, answer) = batcher::Job::new(request, reservation, deadline);
            queue.send(job).await.map_err(|_| self.unloading())?;
            return answer.await.map_err(|_| self.unloading())?;
        }
        let queued = Instant::now();
        let expired = || WorkerError::DeadlineExceeded {
            model: self.model.clone(),
            version: self.version.clone(),
            waited_ms: queued.elapsed().as_millis(),
        };
        let acquire = self.session_place();
        let acquired = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), acquire)
                .await
                .map_err(|_| expired())?,
            None => acquire.await,
        };
        let place = acquired.map_err(|_| self.unloading())?;
        if deadline.is_some_and(|deadline| deadline <= Instant::now()) {
            return Err(expired());
        }
        let queue = queued.elapsed();
        self.run_placed(request, reservation, place)
            .await
            .map(|(outputs, mut timings)| {
                timings.queue = queue;
                (outputs, timings)
            })
    }

    fn unloading(&self) -> WorkerError {
        WorkerError::Unavailable(format!("model \"{}\" is unloading", self.model))
    }

    /// How many sessions it runs.
    pub fn instances(&self) -> usize {
        self.instances
    }

    /// Whether a session other than one the caller holds is running now.
    pub fn others_busy(&self) -> bool {
        self.permits.available_permits() + 1 < self.instances
    }

    /// A place on one of the version's sessions, once one is free.
    pub async fn session_place(&self) -> Result<OwnedSemaphorePermit, AcquireError> {
        Arc::clone(&self.permits).acquire_owned().await
    }

    /// Runs `request` on the session `place` holds: inline when the version's
    /// [`InlinePolicy`] says it is cheap, else on the blocking pool. `held` (the
    /// request's memory reservations) is dropped once the tensors are freed, even when
    /// the caller stops waiting while ORT runs.
    pub async fn run_placed<H: Send + 'static>(
        self: &Arc<Self>,
        request: ValidatedRequest,
        held: H,
        place: OwnedSemaphorePermit,
    ) -> Result<(Vec<OutputTensor>, Timings), WorkerError> {
        let elements = request
            .inputs
            .iter()
            .map(|i| tensor::element_count(&i.shape).unwrap_or(usize::MAX) as u64)
            .sum();
        // The place goes with the run, not with the caller: a caller that stops waiting
        // (its deadline passed) must not free the place while its session still runs.
        let this = Arc::clone(self);
        let run = move || {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                this.run_on_a_session(request, held)
            }));
            match ran {
                Ok(result) => {
                    drop(place);
                    Ok(result)
                }
                Err(_) => {
                    // The session went down with the run: shrink the pool by keeping
                    // its place.
                    place.forget();
                    Err("ONNX Runtime panicked".to_owned())
                }
            }
        };
        let joined = if self.inline.runs_inline(elements) {
            // No await from here to the end of the run: it cannot be cancelled half-way.
            run()
        } else {
            tokio::task::spawn_blocking(run)
                .await
                .map_err(|join_error| join_error.to_string())
                .and_then(|ran| ran)
        };
        joined.unwrap_or_else(|failure| {
            Err(WorkerError::Unavailable(format!(
                "inference task failed: {failure}"
            )))
        })
    }

    /// Runs `request` on an idle session (the caller holds a place, so there is one),
    /// then frees the request's tensors and what `held` holds.
    fn run_on_a_session<H>(
        &self,
        request: ValidatedRequest,
        held: H,
    ) -> Result<(Vec<OutputTensor>, Timings), WorkerError> {
        let Some(mut session) = self.take_session() else {
            return Err(WorkerError::Unavailable(
                "no idle session despite a permit".into(),
            ));
        };
        let result = run_timed(&mut session, request);
        drop(held);
        self.return_session(session);
        result.map_err(|reason| WorkerError::Inference {
            model: self.model.clone(),
            version: self.version.clone(),
            reason,
        })
    }

    fn take_session(&self) -> Option<Session> {
        self.idle.lock().ok()?.pop()
    }

    fn return_session(&self, session: Session) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(session);
        }
    }
}

fn run_timed(
    session: &mut Session,
    request: ValidatedRequest,
) -> Result<(Vec<OutputTensor>, Timings), String> {
    let mut timings = Timings {
        executions: 1,
        ..Timings::default()
    };
    let started = Instant::now();
    let values = to_values(request.inputs)?;
    timings.compute_input = started.elapsed();

    let started = Instant::now();
    let selector = request
        .outputs
        .iter()
        .fold(OutputSelector::no_default(), |s, name| s.with(name.clone()));
    let options = RunOptions::new()
        .map_err(|e| e.to_string())?
        .with_outputs(selector);
    let mut outputs = session
        .run_with_options(values, &options)
        .map_err(|e| e.to_string())?;
    timings.compute_infer = started.elapsed();

    let started = Instant::now();
    let encoded = request
        .outputs
        .iter()
        .map(|name| {
            let value = outputs
                .remove(name.as_str())
                .ok_or_else(|| format!("ONNX Runtime returned no output \"{name}\""))?;
            encode_output(name, &value)
        })
        .collect::<Result<Vec<_>, String>>()?;
    timings.compute_output = started.elapsed();
    Ok((encoded, timings))
}

fn to_values(inputs: Vec<InputTensor>) -> Result<Vec<(String, DynValue)>, String> {
    inputs
        .into_iter()
        .map(|input| {
            let shape = input.shape;
            let value = match input.data {
                TensorData::Bool(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
                TensorData::Uint8(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
                TensorData::Uint16(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
                TensorData::Uint32(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
                TensorData::Uint64(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
                TensorData::Int8(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
                TensorData::Int16(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
                TensorData::Int32(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
                TensorData::Int64(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
                TensorData::Fp16(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
                TensorData::Bf16(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
                TensorData::Fp32(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
                TensorData::Fp64(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
                TensorData::Bytes(v) => {
                    return string_tensors::write(shape, &v)
                        .map(|v| (input.name.clone(), v))
                        .map_err(|e| format!("input \"{}\": {e}", input.name));
                }
            };
            value
                .map(|v| (input.name.clone(), v))
                .map_err(|e| format!("input \"{}\": {e}", input.name))
        })
        .collect()
}

fn encode_output(name: &str, value: &DynValue) -> Result<OutputTensor, String> {
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(format!("output \"{name}\" is not a tensor"));
    };
    let datatype = crate::schema::datatype_of(*ty).ok_or_else(|| {
        format!("output \"{name}\" has element type {ty:?}, which the v2 protocol cannot carry")
    })?;
    let fail = |e: ort::Error| format!("output \"{name}\": {e}");
    macro_rules! raw {
        ($t:ty) => {{
            let (shape, data) = value.try_extract_tensor::<$t>().map_err(fail)?;
            (shape.to_vec(), tensor::to_raw(data))
        }};
    }
    let (shape, raw) = match ty {
        TensorElementType::Bool => raw!(bool),
        TensorElementType::Uint8 => raw!(u8),
        TensorElementType::Uint16 => raw!(u16),
        TensorElementType::Uint32 => raw!(u32),
        TensorElementType::Uint64 => raw!(u64),
        TensorElementType::Int8 => raw!(i8),
        TensorElementType::Int16 => raw!(i16),
        TensorElementType::Int32 => raw!(i32),
        TensorElementType::Int64 => raw!(i64),
        TensorElementType::Float32 => raw!(f32),
        TensorElementType::Float64 => raw!(f64),
        TensorElementType::Float16 => {
            let (shape, data) = value.try_extract_tensor::<half::f16>().map_err(fail)?;
            let bits: Vec<u16> = data.iter().map(|v| v.to_bits()).collect();
            (shape.to_vec(), tensor::to_raw(&bits))
        }
        TensorElementType::Bfloat16 => {
            let (shape, data) = value.try_extract_tensor::<half::bf16>().map_err(fail)?;
            let bits: Vec<u16> = data.iter().map(|v| v.to_bits()).collect();
            (shape.to_vec(), tensor::to_raw(&bits))
        }
        TensorElementType::String => {
            let shape = match value.dtype() {
                ValueType::Tensor { shape, .. } => shape.to_vec(),
                _ => Vec::new(),
            };
            let count = tensor::element_count(&shape)
                .ok_or_else(|| format!("output \"{name}\": shape {shape:?}"))?;
            let elements = string_tensors::read(value, count)
                .map_err(|e| format!("output \"{name}\": {e}"))?;
            (shape, tensor::encode_bytes_elements(&elements))
        }
        other => {
            return Err(format!(
                "output \"{name}\" has unsupported element type {other:?}"
            ));
        }
    };
    Ok(OutputTensor {
        name: name.to_owned(),
        datatype,
        shape,
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_micros(100);

    fn measured(run_us: u64, elements: u64) -> InlinePolicy {
        InlinePolicy {
            limit: LIMIT,
            measured: Some((Duration::from_micros(run_us), elements)),
        }
    }

    #[test]
    fn a_cheap_request_runs_inline_and_a_larger_one_of_the_same_model_does_not() {
        let policy = measured(20, 4);
        assert!(policy.runs_inline(4), "the warm-up's size: 20 µs");
        assert!(
            policy.runs_inline(1),
            "smaller counts as the warm-up's size"
        );
        assert!(policy.runs_inline(20), "5 rows: 100 µs, at the limit");
        assert!(!policy.runs_inline(24), "6 rows: 120 µs");
        assert!(!policy.runs_inline(u64::MAX), "no overflow");
    }

    #[test]
    fn an_unmeasured_or_slow_model_never_runs_inline() {
        let unmeasured = InlinePolicy {
            limit: LIMIT,
            measured: None,
        };
        assert!(!unmeasured.runs_inline(1));
        assert!(!measured(150, 4).runs_inline(1));
        let off = InlinePolicy {
            limit: Duration::ZERO,
            ..measured(1, 4)
        };
        assert!(!off.runs_inline(1), "a zero limit turns inline runs off");
    }
}
