//! The worker's metrics on `/metrics` (Triton's `nv_inference_*` as Aviary names
//! them): read from each version's statistics and the repository index when scraped.
//! Names and labels are listed in `docs/metrics.md`.

use std::sync::Arc;

use aviary::pb::inference::{ModelStatistics, StatisticDuration};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use crate::Worker;

/// The worker's collector.
#[derive(Debug)]
pub struct WorkerCollector {
    worker: Arc<Worker>,
}

impl WorkerCollector {
    /// A collector over `worker`'s statistics and repository.
    pub fn new(worker: Arc<Worker>) -> WorkerCollector {
        WorkerCollector { worker }
    }
}

/// A duration's count, and its total in seconds.
fn of(duration: Option<&StatisticDuration>) -> (u64, f64) {
    duration.map_or((0, 0.0), |d| (d.count, d.ns as f64 / 1e9))
}

impl Collector for WorkerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let statistics = self.worker.statistics("", "").unwrap_or_default();
        encode_statistics(&mut encoder, &statistics)?;
        encode_versions(&mut encoder, &self.worker)?;
        encode_lifecycle(&mut encoder, &self.worker)
    }
}

fn encode_statistics(
    encoder: &mut DescriptorEncoder<'_>,
    statistics: &[ModelStatistics],
) -> Result<(), std::fmt::Error> {
    let labels = |s: &ModelStatistics| [("model", s.name.clone()), ("version", s.version.clone())];
    let mut family = encoder.encode_descriptor(
        "aviary_worker_requests",
        "Inference requests a model version ran, by outcome.",
        None,
        MetricType::Counter,
    )?;
    for s in statistics {
        let stats = s.inference_stats.unwrap_or_default();
        for (outcome, duration) in [("success", &stats.success), ("failure", &stats.fail)] {
            let [model, version] = labels(s);
            let labels = [model, version, ("outcome", outcome.to_owned())];
            ConstCounter::new(of(duration.as_ref()).0).encode(family.encode_family(&labels)?)?;
        }
    }
    let mut family = encoder.encode_descriptor(
        "aviary_worker_inferences",
        "Inferences run: each row of a request's batch dimension counts once.",
        None,
        MetricType::Counter,
    )?;
    for s in statistics {
        ConstCounter::new(s.inference_count).encode(family.encode_family(&labels(s))?)?;
    }
    let mut family = encoder.encode_descriptor(
        "aviary_worker_executions",
        "ONNX Runtime runs: a dynamic batch of several requests is one.",
        None,
        MetricType::Counter,
    )?;
    for s in statistics {
        ConstCounter::new(s.execution_count).encode(family.encode_family(&labels(s))?)?;
    }
    let mut family = encoder.encode_descriptor(
        "aviary_worker_queue_seconds",
        "Time successful requests waited for a session or a batch, summed.",
        None,
        MetricType::Counter,
    )?;
    for s in statistics {
        let stats = s.inference_stats.unwrap_or_default();
        ConstCounter::new(of(stats.queue.as_ref()).1).encode(family.encode_family(&labels(s))?)?;
    }
    let mut family = encoder.encode_descriptor(
        "aviary_worker_compute_seconds",
        "Time successful requests spent in decoding inputs (input), in ONNX Runtime \
         (infer) and in encoding outputs (output), summed.",
        None,
        MetricType::Counter,
    )?;
    for s in statistics {
        let stats = s.inference_stats.unwrap_or_default();
        for (phase, duration) in [
            ("input", &stats.compute_input),
            ("infer", &stats.compute_infer),
            ("output", &stats.compute_output),
        ] {
            let [model, version] = labels(s);
            let labels = [model, version, ("phase", phase.to_owned())];
            ConstCounter::new(of(duration.as_ref()).1).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

fn encode_versions(
    encoder: &mut DescriptorEncoder<'_>,
    worker: &Worker,
) -> Result<(), std::fmt::Error> {
    let index = worker.index(false);
    let mut family = encoder.encode_descriptor(
        "aviary_model_version_ready",
        "1 while a version in the repository is loaded and serving, else 0.",
        None,
        MetricType::Gauge,
    )?;
    for entry in &index {
        let labels = [
            ("model", entry.name.as_str()),
            ("version", entry.version.as_str()),
        ];
        let ready = i64::from(entry.state == "READY");
        ConstGauge::new(ready).encode(family.encode_family(&labels)?)?;
    }
    let mut family = encoder.encode_descriptor(
        "aviary_model_version_load_failed",
        "1 for a version whose last load or reload failed (a running copy may still \
         serve it); versions without a failure are not listed.",
        None,
        MetricType::Gauge,
    )?;
    for (model, version, _reason) in worker.failed_loads() {
        let labels = [("model", model), ("version", version.to_string())];
        ConstGauge::new(1).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn encode_lifecycle(
    encoder: &mut DescriptorEncoder<'_>,
    worker: &Worker,
) -> Result<(), std::fmt::Error> {
    let totals = worker.lifecycle_totals();
    let mut family = encoder.encode_descriptor(
        "aviary_model_loads",
        "Model version loads (`kind` load: a new version; reload: a new copy of a \
         running one), by outcome.",
        None,
        MetricType::Counter,
    )?;
    for (kind, outcome, count) in [
        ("load", "success", totals.loads),
        ("load", "failure", totals.failed_loads),
        ("reload", "success", totals.reloads),
        ("reload", "failure", totals.failed_reloads),
    ] {
        let labels = [("kind", kind), ("outcome", outcome)];
        ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
    }
    let unloads = ConstCounter::new(totals.unloads);
    unloads.encode(encoder.encode_descriptor(
        "aviary_model_unloads",
        "Model versions unloaded, asked for or gone from the repository.",
        None,
        unloads.metric_type(),
    )?)?;
    let seconds = ConstCounter::new(totals.load_seconds);
    seconds.encode(encoder.encode_descriptor(
        "aviary_model_load_seconds",
        "Time successful loads and reloads took (file, sessions, warm-up), summed.",
        None,
        seconds.metric_type(),
    )?)
}
