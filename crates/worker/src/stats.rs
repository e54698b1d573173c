//! Per-version inference statistics (Triton's `ModelStatistics`), kept with atomics so
//! recording never takes a lock on the request path.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use aviary::{
    metrics::{DurationHistogram, HistogramSnapshot},
    pb::inference::{InferStatistics, ModelStatistics, StatisticDuration},
};

#[derive(Debug, Default)]
struct Counter {
    count: AtomicU64,
    ns: AtomicU64,
}

impl Counter {
    fn add(&self, elapsed: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn snapshot(&self) -> StatisticDuration {
        StatisticDuration {
            count: self.count.load(Ordering::Relaxed),
            ns: self.ns.load(Ordering::Relaxed),
        }
    }
}

/// Cumulative counters of one model version.
#[derive(Debug, Default)]
pub struct VersionStats {
    success: Counter,
    fail: Counter,
    queue: Counter,
    compute_input: Counter,
    compute_infer: Counter,
    compute_output: Counter,
    inference_count: AtomicU64,
    execution_count: AtomicU64,
    last_inference_ms: AtomicU64,
    expired: AtomicU64,
    /// Per successful request, for `/metrics` (Triton reports only the sums above).
    queue_durations: DurationHistogram,
    compute_durations: DurationHistogram,
}

/// Time spent in each phase of one successful request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Waiting for a free session.
    pub queue: Duration,
    /// Building ONNX Runtime tensors from the request.
    pub compute_input: Duration,
    /// Running the session.
    pub compute_infer: Duration,
    /// Encoding outputs.
    pub compute_output: Duration,
    /// Runs of the model this request counts for: 1, or 0 for the requests of a
    /// dynamic batch after its first (the batch ran once).
    pub executions: u64,
}

impl VersionStats {
    /// Records a successful request that carried `batch` inferences.
    pub fn record_success(&self, total: Duration, timings: Timings, batch: u64) {
        self.success.add(total);
        self.queue.add(timings.queue);
        self.compute_input.add(timings.compute_input);
        self.compute_infer.add(timings.compute_infer);
        self.compute_output.add(timings.compute_output);
        self.queue_durations.record(timings.queue);
        self.compute_durations
            .record(timings.compute_input + timings.compute_infer + timings.compute_output);
        self.inference_count.fetch_add(batch, Ordering::Relaxed);
        self.execution_count
            .fetch_add(timings.executions, Ordering::Relaxed);
        self.touch();
    }

    /// Records a request dropped before it ran because its deadline passed while it
    /// waited for a session (a failure in Triton's terms).
    pub fn record_expired(&self, total: Duration) {
        self.expired.fetch_add(1, Ordering::Relaxed);
        self.record_failure(total);
    }

    /// Requests dropped unrun because their deadline passed in the queue.
    pub fn expired(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
    }

    /// Records a failed request (validation or runtime).
    pub fn record_failure(&self, total: Duration) {
        self.fail.add(total);
        self.touch();
    }

    fn touch(&self) {
        self.last_inference_ms
            .store(aviary::unix_ms(SystemTime::now()), Ordering::Relaxed);
    }

    /// Successful requests' queue and compute (input, run, output) times.
    pub fn durations(&self) -> (HistogramSnapshot, HistogramSnapshot) {
        (
            self.queue_durations.snapshot(),
            self.compute_durations.snapshot(),
        )
    }

    /// The protocol message for this version.
    pub fn snapshot(&self, model: &str, version: &str) -> ModelStatistics {
        ModelStatistics {
            name: model.to_owned(),
            version: version.to_owned(),
            last_inference: self.last_inference_ms.load(Ordering::Relaxed),
            inference_count: self.inference_count.load(Ordering::Relaxed),
            execution_count: self.execution_count.load(Ordering::Relaxed),
            inference_stats: Some(InferStatistics {
                success: Some(self.success.snapshot()),
                fail: Some(self.fail.snapshot()),
                queue: Some(self.queue.snapshot()),
                compute_input: Some(self.compute_input.snapshot()),
                compute_infer: Some(self.compute_infer.snapshot()),
                compute_output: Some(self.compute_output.snapshot()),
                cache_hit: None,
                cache_miss: None,
            }),
            batch_stats: Vec::new(),
        }
    }
}
