//! Shadow traffic: a share of a model's requests is also sent to a shadow version, off
//! the request path, and the shadow's answers are compared with the primary's.
//!
//! The request path only flips a coin and `try_send`s the request and the primary's
//! response into a bounded queue; when the queue is full the mirror is dropped and
//! counted, so the primary never waits on the shadow. A dispatcher task runs at most
//! `concurrency` shadow calls at once. Comparison (agreement of the arg-max per row for
//! classifier-shaped outputs, exact agreement for integer outputs, mean and max
//! absolute difference for floating-point outputs, and a sample of output values for a
//! distribution test) happens in those tasks too.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use arc_swap::ArcSwap;
use aviary::{
    pb::inference::{ModelInferRequest, ModelInferResponse},
    tensor::{self, Datatype},
};
use rand::Rng;
use tokio::sync::{Semaphore, mpsc};

use tower::ServiceExt;

use crate::{
    config::ShadowConfig,
    stack::{Call, Deadline, InferService, Limits},
};

/// Values kept per output and side for the distribution test.
const SAMPLE_CAPACITY: usize = 2000;

/// One mirrored request and the primary's answer to it.
#[derive(Debug)]
struct Job {
    request: ModelInferRequest,
    primary: ModelInferResponse,
}

/// Running totals of one output's comparison.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutputComparison {
    /// Responses in which both sides had this output with the same shape.
    pub compared: u64,
    /// Rows (classifier outputs) or responses (other outputs) compared for agreement.
    pub agreement_total: u64,
    /// Of those, how many agreed (same arg-max per row, or identical values).
    pub agreement_equal: u64,
    /// Elements compared numerically.
    pub elements: u64,
    /// Sum of absolute differences over those elements.
    pub abs_diff_sum: f64,
    /// Largest absolute difference seen.
    pub abs_diff_max: f64,
    /// Shapes or datatypes differed.
    pub mismatched: u64,
    /// A sample of the primary's values (reservoir).
    pub primary_sample: Vec<f64>,
    /// A sample of the shadow's values (reservoir).
    pub shadow_sample: Vec<f64>,
    seen: u64,
}

impl OutputComparison {
    /// Share of agreeing rows or responses.
    pub fn agreement(&self) -> Option<f64> {
        (self.agreement_total > 0)
            .then(|| self.agreement_equal as f64 / self.agreement_total as f64)
    }

    /// Mean absolute difference per element.
    pub fn mean_abs_diff(&self) -> Option<f64> {
        (self.elements > 0).then(|| self.abs_diff_sum / self.elements as f64)
    }
}

/// What a shadow has seen so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShadowReport {
    /// The shadow version.
    pub version: String,
    /// Mirrors queued.
    pub sent: u64,
    /// Mirrors dropped because the queue was full.
    pub dropped: u64,
    /// Shadow calls that failed.
    pub failed: u64,
    /// Per output name.
    pub outputs: BTreeMap<String, OutputComparison>,
}

/// The mirror of one model: its queue, its dispatcher and its running comparison.
#[derive(Debug)]
pub struct Mirror {
    config: ShadowConfig,
    /// The shadow version's request path, and the deadline of one shadow call.
    target: ArcSwap<(InferService, Limits)>,
    queue: mpsc::Sender<Job>,
    sent: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    outputs: Mutex<BTreeMap<String, OutputComparison>>,
}

impl Mirror {
    /// Starts a mirror to the shadow version's `service` under that version's `limits`
    /// (their timeout is each shadow call's deadline); the dispatcher runs until the
    /// mirror is dropped.
    pub fn start(config: ShadowConfig, service: InferService, limits: Limits) -> Arc<Mirror> {
        let (queue, jobs) = mpsc::channel(config.queue.max(1));
        let mirror = Arc::new(Mirror {
            target: ArcSwap::from_pointee((service, limits)),
            queue,
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            outputs: Mutex::new(BTreeMap::new()),
            config,
        });
        tokio::spawn(dispatch(Arc::downgrade(&mirror), jobs));
        mirror
    }

    /// The shadow's settings.
    pub fn config(&self) -> &ShadowConfig {
        &self.config
    }

    /// Points the mirror at the version's current request path (after a routing
    /// rebuild).
    pub fn set_service(&self, service: InferService, limits: Limits) {
        self.target.store(Arc::new((service, limits)));
    }

    /// Whether this request is mirrored (the percentage coin flip). Called on the
    /// request path before the primary runs, so only mirrored requests are copied.
    pub fn chosen<R: Rng + ?Sized>(&self, rng: &mut R) -> bool {
        rng.random::<f64>() * 100.0 < self.config.percent
    }

    /// Queues a mirror of `request` with the primary's answer. Never waits: when the
    /// queue is full the mirror is dropped and counted.
    pub fn enqueue(&self, mut request: ModelInferRequest, primary: &ModelInferResponse) {
        if primary.model_version == self.config.version {
            return;
        }
        request.model_version = self.config.version.clone();
        let job = Job {
            request,
            primary: primary.clone(),
        };
        match self.queue.try_send(job) {
            Ok(()) => self.sent.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.dropped.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// The comparison so far.
    pub fn report(&self) -> ShadowReport {
        ShadowReport {
            version: self.config.version.clone(),
            sent: self.sent.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            outputs: self.outputs.lock().map(|o| o.clone()).unwrap_or_default(),
        }
    }

    fn record(&self, primary: &ModelInferResponse, shadow: &ModelInferResponse) {
        let Ok(mut outputs) = self.outputs.lock() else {
            return;
        };
        for (index, output) in primary.outputs.iter().enumerate() {
            let Some(shadow_index) = shadow.outputs.iter().position(|o| o.name == output.name)
            else {
                continue;
            };
            let entry = outputs.entry(output.name.clone()).or_default();
            let theirs = &shadow.outputs[shadow_index];
            let (Some(mine_raw), Some(theirs_raw)) = (
                primary.raw_output_contents.get(index),
                shadow.raw_output_contents.get(shadow_index),
            ) else {
                continue;
            };
            if output.shape != theirs.shape || output.datatype != theirs.datatype {
                entry.mismatched += 1;
                continue;
            }
            let Some(datatype) = Datatype::parse(&output.datatype) else {
                continue;
            };
            let (Some(mine), Some(other)) =
                (as_f64(datatype, mine_raw), as_f64(datatype, theirs_raw))
            else {
                continue;
            };
            compare(entry, datatype, &output.shape, &mine, &other);
        }
    }
}

/// Runs queued mirrors, at most `concurrency` at once, until the mirror is gone.
async fn dispatch(mirror: std::sync::Weak<Mirror>, mut jobs: mpsc::Receiver<Job>) {
    let Some(concurrency) = mirror.upgrade().map(|m| m.config.concurrency.max(1)) else {
        return;
    };
    let permits = Arc::new(Semaphore::new(concurrency));
    while let Some(job) = jobs.recv().await {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let Some(mirror) = mirror.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let (service, limits) = mirror.target.load().as_ref().clone();
            // A shadow call has a deadline like any other: a hung shadow never holds
            // its permit for good.
            let call = Call::new(
                job.request,
                Some(Deadline::routes(Instant::now() + limits.timeout)),
            );
            match service.oneshot(call).await {
                Ok(shadow) => mirror.record(&job.primary, &shadow),
                Err(error) => {
                    tracing::debug!(%error, version = %mirror.config.version, "shadow call failed");
                    mirror.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
    }
}

/// Elements as f64 for numeric datatypes (BYTES has no numeric comparison).
fn as_f64(datatype: Datatype, raw: &[u8]) -> Option<Vec<f64>> {
    fn convert<T: tensor::Element + Into<f64>>(raw: &[u8]) -> Option<Vec<f64>> {
        tensor::from_raw::<T>(raw).map(|v| v.into_iter().map(Into::into).collect())
    }
    match datatype {
        Datatype::Fp32 => convert::<f32>(raw),
        Datatype::Fp64 => convert::<f64>(raw),
        Datatype::Int8 => convert::<i8>(raw),
        Datatype::Int16 => convert::<i16>(raw),
        Datatype::Int32 => convert::<i32>(raw),
        Datatype::Uint8 => convert::<u8>(raw),
        Datatype::Uint16 => convert::<u16>(raw),
        Datatype::Uint32 => convert::<u32>(raw),
        // 64-bit integers as f64 lose precision only beyond 2^53, which labels never reach.
        Datatype::Int64 => {
            tensor::from_raw::<i64>(raw).map(|v| v.into_iter().map(|x| x as f64).collect())
        }
        Datatype::Uint64 => {
            tensor::from_raw::<u64>(raw).map(|v| v.into_iter().map(|x| x as f64).collect())
        }
        Datatype::Bool => {
            tensor::from_raw::<bool>(raw).map(|v| v.into_iter().map(f64::from).collect())
        }
        Datatype::Fp16 => tensor::from_raw::<u16>(raw).map(|v| {
            v.into_iter()
                .map(|b| half::f16::from_bits(b).to_f64())
                .collect()
        }),
        Datatype::Bf16 => tensor::from_raw::<u16>(raw).map(|v| {
            v.into_iter()
                .map(|b| half::bf16::from_bits(b).to_f64())
                .collect()
        }),
        Datatype::Bytes => None,
    }
}

/// Adds one response pair to `entry`. Floating-point outputs of shape [N, C] with C > 1
/// are classifier scores: rows agree when their arg-max does; other floating-point
/// outputs agree when every element is equal. Integer outputs (labels, ids) agree
/// element by element.
pub fn compare(
    entry: &mut OutputComparison,
    datatype: Datatype,
    shape: &[i64],
    mine: &[f64],
    theirs: &[f64],
) {
    if mine.len() != theirs.len() {
        entry.mismatched += 1;
        return;
    }
    entry.compared += 1;
    let floating = matches!(
        datatype,
        Datatype::Fp16 | Datatype::Bf16 | Datatype::Fp32 | Datatype::Fp64
    );
    match (floating, shape) {
        (true, [_, classes]) if *classes > 1 => {
            let width = usize::try_from(*classes).unwrap_or(1);
            for (a, b) in mine.chunks(width).zip(theirs.chunks(width)) {
                entry.agreement_total += 1;
                entry.agreement_equal += u64::from(argmax(a) == argmax(b));
            }
        }
        (true, _) => {
            entry.agreement_total += 1;
            entry.agreement_equal += u64::from(mine == theirs);
        }
        // Integer outputs are labels or ids: each element is one prediction.
        (false, _) => {
            entry.agreement_total += mine.len() as u64;
            entry.agreement_equal += mine.iter().zip(theirs).filter(|(a, b)| a == b).count() as u64;
        }
    }
    if floating {
        for (a, b) in mine.iter().zip(theirs) {
            let diff = (a - b).abs();
            entry.elements += 1;
            entry.abs_diff_sum += diff;
            entry.abs_diff_max = entry.abs_diff_max.max(diff);
        }
    }
    // Reservoir sampling keeps a uniform sample of every value seen on both sides.
    let mut rng = rand::rng();
    for (a, b) in mine.iter().zip(theirs) {
        entry.seen += 1;
        if entry.primary_sample.len() < SAMPLE_CAPACITY {
            entry.primary_sample.push(*a);
            entry.shadow_sample.push(*b);
        } else {
            let slot = rng.random_range(0..entry.seen);
            if let Ok(slot) = usize::try_from(slot)
                && slot < SAMPLE_CAPACITY
            {
                entry.primary_sample[slot] = *a;
                entry.shadow_sample[slot] = *b;
            }
        }
    }
}

fn argmax(values: &[f64]) -> Option<usize> {
    values
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_nan())
        .max_by(|(_, a), (_, b)| a.total_cmp(b))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifier_rows_agree_by_argmax_and_differences_add_up() {
        let mut entry = OutputComparison::default();
        // Two rows of 3 classes: row 0 agrees (both pick class 0), row 1 does not.
        let mine = [0.7, 0.2, 0.1, 0.1, 0.6, 0.3];
        let theirs = [0.6, 0.3, 0.1, 0.1, 0.3, 0.6];
        compare(&mut entry, Datatype::Fp32, &[2, 3], &mine, &theirs);
        assert_eq!((entry.agreement_equal, entry.agreement_total), (1, 2));
        assert_eq!(entry.elements, 6);
        let expected_sum: f64 = mine.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).sum();
        assert!((entry.abs_diff_sum - expected_sum).abs() < 1e-12);
        assert!((entry.abs_diff_max - 0.3).abs() < 1e-12);
        assert!((entry.mean_abs_diff().expect("elements") - expected_sum / 6.0).abs() < 1e-12);
    }

    #[test]
    fn integer_outputs_agree_element_by_element() {
        let mut entry = OutputComparison::default();
        compare(&mut entry, Datatype::Int64, &[2], &[0.0, 1.0], &[0.0, 1.0]);
        compare(&mut entry, Datatype::Int64, &[2], &[0.0, 1.0], &[0.0, 2.0]);
        assert_eq!(entry.agreement(), Some(0.75));
        assert_eq!(entry.elements, 0, "integers get no numeric difference");
    }

    #[test]
    fn samples_stay_bounded() {
        let mut entry = OutputComparison::default();
        let values: Vec<f64> = (0..5000).map(f64::from).collect();
        compare(&mut entry, Datatype::Fp32, &[5000], &values, &values);
        assert_eq!(entry.primary_sample.len(), SAMPLE_CAPACITY);
        assert_eq!(entry.shadow_sample.len(), SAMPLE_CAPACITY);
    }
}
