//! The worker's metrics on `/metrics` (Triton's `nv_inference_*` as Aviary names
//! them): read from each version's statistics and the repository index when scraped.
//! Names and labels are listed in `docs/metrics.md`.

use std::sync::Arc;

use aviary::metrics::{Labels, encode_counters, encode_gauges, encode_histograms};
use aviary::pb::inference::{ModelStatistics, StatisticDuration};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::counter::ConstCounter,
};

use crate::{Worker, catalog::VersionDurations};

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
        encode_durations(&mut encoder, &self.worker)?;
        encode_versions(&mut encoder, &self.worker)?;
        encode_input_violations(&mut encoder, &self.worker)?;
        encode_drift(&mut encoder, &self.worker)?;
        encode_lifecycle(&mut encoder, &self.worker)
    }
}

/// The labels of a version's samples, plus `extra`.
fn labels(s: &ModelStatistics, extra: Option<(&'static str, &str)>) -> Labels {
    let mut labels = vec![("model", s.name.clone()), ("version", s.version.clone())];
    labels.extend(extra.map(|(name, value)| (name, value.to_owned())));
    labels
}

fn encode_durations(
    encoder: &mut DescriptorEncoder<'_>,
    worker: &Worker,
) -> Result<(), std::fmt::Error> {
    let durations = worker.durations();
    let labels =
        |d: &VersionDurations| vec![("model", d.model.clone()), ("version", d.version.clone())];
    encode_histograms(
        encoder,
        "aviary_worker_queue_duration_seconds",
        "Time a successful request waited for a session or a dynamic batch.",
        durations.iter().map(|d| (labels(d), d.queue.clone())),
    )?;
    encode_histograms(
        encoder,
        "aviary_worker_compute_duration_seconds",
        "Time a successful request spent building its ONNX Runtime inputs, in the run \
         (a dynamic batch's whole run) and encoding its outputs.",
        durations.iter().map(|d| (labels(d), d.compute.clone())),
    )?;
    encode_gauges(
        encoder,
        "aviary_model_version_memory_bytes",
        "How much the process's resident memory grew while the running copy of a \
         version loaded: its size in memory, roughly.",
        durations.iter().filter_map(|d| {
            let bytes = i64::try_from(d.memory_bytes?).unwrap_or(i64::MAX);
            Some((labels(d), bytes))
        }),
    )
}

/// Each tracked feature's drift, tested when scraped.
fn encode_drift(
    encoder: &mut DescriptorEncoder<'_>,
    worker: &Worker,
) -> Result<(), std::fmt::Error> {
    let reports = worker.drift();
    let labels = |model: &str, version: &str, f: &crate::drift::FeatureDrift| {
        vec![
            ("model", model.to_owned()),
            ("version", version.to_owned()),
            ("side", f.side.to_owned()),
            ("tensor", f.tensor.clone()),
            ("feature", f.feature.clone()),
        ]
    };
    let each = |value: fn(&crate::drift::FeatureDrift) -> Option<f64>| {
        reports.iter().flat_map(move |(model, version, features)| {
            features
                .iter()
                .filter_map(move |f| Some((labels(model, version, f), value(f)?)))
        })
    };
    encode_gauges(
        encoder,
        "aviary_drift_p_value",
        "p-value of a feature's recent window against its reference (two-sample \
         Kolmogorov-Smirnov; chi-square for a classifier output's predicted classes), \
         Benjamini-Hochberg adjusted across the version's tests.",
        each(|f| f.adjusted_p_value),
    )?;
    encode_gauges(
        encoder,
        "aviary_drift_psi",
        "Population Stability Index of a feature's recent window against its reference.",
        each(|f| f.psi),
    )?;
    encode_gauges(
        encoder,
        "aviary_drift_window_outliers",
        "Values in a feature's recent window outside its outlier bounds (the reference's \
         0.1 and 99.9 percentiles, or the range the input rules declare in flag mode).",
        each(|f| f.outliers.map(|n| n as f64)),
    )?;
    encode_counters(
        encoder,
        "aviary_drift_outliers",
        "Values of a feature outside its outlier bounds since its reference was complete.",
        reports.iter().flat_map(|(model, version, features)| {
            features
                .iter()
                .filter_map(move |f| Some((labels(model, version, f), f.outliers_total?)))
        }),
    )?;
    encode_gauges(
        encoder,
        "aviary_drift",
        "1 while a feature drifts (adjusted p below the card's alpha, or PSI above its \
         max_psi), 0 while it does not; absent before both sides hold min_samples values.",
        each(|f| match f.verdict {
            "drift" => Some(1.0),
            "ok" => Some(0.0),
            _ => None,
        }),
    )
}

fn encode_input_violations(
    encoder: &mut DescriptorEncoder<'_>,
    worker: &Worker,
) -> Result<(), std::fmt::Error> {
    encode_counters(
        encoder,
        "aviary_input_violations",
        "Values that broke a rule of the version's model card ([input_rules]), by input, \
         feature and rule; in reject mode each refused its request, in flag mode it was \
         served.",
        worker.input_violations().into_iter().map(|v| {
            let labels = vec![
                ("model", v.model),
                ("version", v.version),
                ("input", v.input),
                ("feature", v.feature),
                ("rule", v.rule.to_owned()),
            ];
            (labels, v.count)
        }),
    )
}

fn encode_statistics(
    encoder: &mut DescriptorEncoder<'_>,
    statistics: &[ModelStatistics],
) -> Result<(), std::fmt::Error> {
    encode_counters(
        encoder,
        "aviary_worker_requests",
        "Inference requests a model version ran, by outcome.",
        statistics.iter().flat_map(|s| {
            let stats = s.inference_stats.unwrap_or_default();
            [("success", stats.success), ("failure", stats.fail)]
                .map(|(outcome, d)| (labels(s, Some(("outcome", outcome))), of(d.as_ref()).0))
        }),
    )?;
    encode_counters(
        encoder,
        "aviary_worker_inferences",
        "Inferences run: each row of a request's batch dimension counts once.",
        statistics
            .iter()
            .map(|s| (labels(s, None), s.inference_count)),
    )?;
    encode_counters(
        encoder,
        "aviary_worker_executions",
        "ONNX Runtime runs: a dynamic batch of several requests is one.",
        statistics
            .iter()
            .map(|s| (labels(s, None), s.execution_count)),
    )?;
    encode_counters(
        encoder,
        "aviary_worker_queue_seconds",
        "Time successful requests waited for a session or a batch, summed.",
        statistics.iter().map(|s| {
            let stats = s.inference_stats.unwrap_or_default();
            (labels(s, None), of(stats.queue.as_ref()).1)
        }),
    )?;
    encode_counters(
        encoder,
        "aviary_worker_compute_seconds",
        "Time successful requests spent in decoding inputs (input), in ONNX Runtime \
         (infer) and in encoding outputs (output), summed.",
        statistics.iter().flat_map(|s| {
            let stats = s.inference_stats.unwrap_or_default();
            [
                ("input", stats.compute_input),
                ("infer", stats.compute_infer),
                ("output", stats.compute_output),
            ]
            .map(|(phase, d)| (labels(s, Some(("phase", phase))), of(d.as_ref()).1))
        }),
    )
}

fn encode_versions(
    encoder: &mut DescriptorEncoder<'_>,
    worker: &Worker,
) -> Result<(), std::fmt::Error> {
    encode_gauges(
        encoder,
        "aviary_model_version_ready",
        "1 while a version in the repository is loaded and serving, else 0.",
        worker.index(false).into_iter().map(|entry| {
            let ready = i64::from(entry.state == "READY");
            (
                vec![("model", entry.name), ("version", entry.version)],
                ready,
            )
        }),
    )?;
    encode_gauges(
        encoder,
        "aviary_model_version_load_failed",
        "1 for a version whose last load or reload failed (a running copy may still \
         serve it); versions without a failure are not listed.",
        worker
            .failed_loads()
            .into_iter()
            .map(|(model, version, _reason)| {
                (vec![("model", model), ("version", version.to_string())], 1)
            }),
    )
}

fn encode_lifecycle(
    encoder: &mut DescriptorEncoder<'_>,
    worker: &Worker,
) -> Result<(), std::fmt::Error> {
    let totals = worker.lifecycle_totals();
    encode_counters(
        encoder,
        "aviary_model_loads",
        "Model version loads (`kind` load: a new version; reload: a new copy of a \
         running one), by outcome.",
        [
            ("load", "success", totals.loads),
            ("load", "failure", totals.failed_loads),
            ("reload", "success", totals.reloads),
            ("reload", "failure", totals.failed_reloads),
        ]
        .map(|(kind, outcome, count)| {
            (
                vec![("kind", kind.to_owned()), ("outcome", outcome.to_owned())],
                count,
            )
        }),
    )?;
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
