//! Per-variant request metrics: requests, errors and latency of every (model, version)
//! the front routed to, both since start-up and since the variant's step window was
//! last reset (a rollout step's evidence, see [`crate::rollouts`]); and, for A/B
//! experiment reports, the outcomes that feedback reported for the variant and a
//! bounded uniform sample of its latencies (a rank test needs values, which the
//! histogram does not keep).
//!
//! Recording takes a read lock on the variant map (a write lock only the first time a
//! variant is seen) and one short mutex per variant, so requests on different versions
//! never contend, and it cannot fail a request.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use aviary_router::{DecisionReason, rollout::StepMetrics, stats::SampleSummary};
use hdrhistogram::Histogram;

/// Largest latency the histograms track exactly, in microseconds (slower requests are
/// counted at this value).
const MAX_LATENCY_US: u64 = 60_000_000;

/// Requests, errors and latency over some span of time.
#[derive(Debug, Clone)]
pub struct Window {
    /// Requests routed to the variant, answered or failed.
    pub requests: u64,
    /// Requests that failed after routing.
    pub errors: u64,
    /// Latency of every request, in microseconds.
    pub latency_us: Histogram<u64>,
    /// Feedback in the window that said correct or incorrect (the accuracy gate's evidence).
    pub labelled: u64,
    /// Of those, the ones that said correct.
    pub correct: u64,
}

impl Default for Window {
    fn default() -> Window {
        Window::new()
    }
}

impl Window {
    /// An empty window.
    pub fn new() -> Window {
        // Bounds are constants that hdrhistogram accepts (1 <= low, high >= 2 * low,
        // sigfig <= 5), so this cannot fail.
        let latency_us = Histogram::new_with_bounds(1, MAX_LATENCY_US, 2)
            .expect("constant histogram bounds are valid");
        Window {
            requests: 0,
            errors: 0,
            latency_us,
            labelled: 0,
            correct: 0,
        }
    }

    fn record(&mut self, ok: bool, latency: Duration) {
        self.requests += 1;
        if !ok {
            self.errors += 1;
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us
            .saturating_record(us.clamp(1, MAX_LATENCY_US));
    }

    fn record_outcome(&mut self, outcome: Outcome) {
        if let Outcome::Correct(correct) = outcome {
            self.labelled += 1;
            self.correct += u64::from(correct);
        }
    }

    /// The latency histogram's non-empty buckets as (highest value in µs, count): what
    /// another process needs to add this window into its own with [`Window::add`].
    pub fn latency_buckets(&self) -> Vec<(u64, u64)> {
        self.latency_us
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect()
    }

    /// Adds another window's counts and latency buckets to this one (a controller
    /// summing the step windows of many gateways).
    pub fn add(
        &mut self,
        requests: u64,
        errors: u64,
        buckets: &[(u64, u64)],
        labelled: u64,
        correct: u64,
    ) {
        self.requests += requests;
        self.errors += errors;
        self.labelled += labelled;
        self.correct += correct;
        for &(us, count) in buckets {
            self.latency_us
                .saturating_record_n(us.clamp(1, MAX_LATENCY_US), count);
        }
    }

    /// What the rollout gates read: counts, the 99th-percentile latency, and the share
    /// of labelled feedback that said correct (`None` without labelled feedback).
    pub fn step_metrics(&self) -> StepMetrics {
        StepMetrics {
            requests: self.requests,
            errors: self.errors,
            latency_p99_us: (!self.latency_us.is_empty())
                .then(|| self.latency_us.value_at_quantile(0.99)),
            accuracy: (self.labelled > 0).then(|| self.correct as f64 / self.labelled as f64),
        }
    }
}

/// Latencies kept per variant for rank tests; enough for Mann–Whitney to detect small
/// shifts, small enough to sort on every report.
pub const LATENCY_SAMPLE_SIZE: usize = 2_000;

/// Ground truth reported after the prediction, accumulated per variant since start-up.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Outcomes {
    /// Every feedback received, boolean or numeric.
    pub feedback: u64,
    /// Feedback that said correct or incorrect.
    pub labelled: u64,
    /// Of those, the ones that said correct.
    pub correct: u64,
    /// Numeric rewards received.
    pub rewards: u64,
    /// Their running mean (Welford: no cancellation, unlike a sum of squares).
    pub reward_mean: f64,
    /// Their running sum of squared deviations from the mean.
    pub reward_m2: f64,
}

/// One piece of feedback on a prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// The prediction was right or wrong.
    Correct(bool),
    /// The prediction earned this reward (finite).
    Reward(f64),
}

impl Outcomes {
    fn record(&mut self, outcome: Outcome) {
        self.feedback += 1;
        match outcome {
            Outcome::Correct(correct) => {
                self.labelled += 1;
                self.correct += u64::from(correct);
            }
            Outcome::Reward(reward) => {
                self.rewards += 1;
                let delta = reward - self.reward_mean;
                self.reward_mean += delta / self.rewards as f64;
                self.reward_m2 += delta * (reward - self.reward_mean);
            }
        }
    }

    /// Count, mean and sample variance of the rewards, for a t interval; `None` when
    /// there are none.
    pub fn reward_summary(&self) -> Option<SampleSummary> {
        (self.rewards > 0).then(|| SampleSummary {
            n: self.rewards,
            mean: self.reward_mean,
            variance: if self.rewards > 1 {
                self.reward_m2 / (self.rewards - 1) as f64
            } else {
                0.0
            },
        })
    }
}

/// A uniform random sample of at most [`LATENCY_SAMPLE_SIZE`] latencies (reservoir
/// sampling, Algorithm R), in microseconds.
#[derive(Debug, Clone, Default)]
struct Reservoir {
    seen: u64,
    samples: Vec<f64>,
}

impl Reservoir {
    fn record(&mut self, us: f64) {
        self.seen += 1;
        if self.samples.len() < LATENCY_SAMPLE_SIZE {
            self.samples.push(us);
            return;
        }
        let slot = rand::random_range(0..self.seen);
        if let Some(kept) = usize::try_from(slot)
            .ok()
            .and_then(|i| self.samples.get_mut(i))
        {
            *kept = us;
        }
    }
}

/// What an experiment report reads of one variant: everything since start-up.
#[derive(Debug, Clone)]
pub struct Experiment {
    /// Requests, errors and latency histogram.
    pub total: Window,
    /// Feedback received.
    pub outcomes: Outcomes,
    /// A uniform sample of the latencies, in microseconds.
    pub latency_sample_us: Vec<f64>,
}

#[derive(Debug)]
struct Variant {
    total: Window,
    step: Window,
    outcomes: Outcomes,
    latencies: Reservoir,
    /// Calls this version failed that something else then answered.
    stand_ins: StandIns,
    /// What the prediction cache did for its requests.
    cache: CacheCounts,
    /// Its calls by the gRPC code they ended with (indexed by the code's number).
    codes: [u64; CODES],
    /// Its calls by why the router chose it (indexed as [`REASONS`]).
    reasons: [u64; 5],
}

/// Why the router chose a version, in the order `Variant::reasons` counts them.
const REASONS: [DecisionReason; 5] = [
    DecisionReason::Pinned,
    DecisionReason::Rule(0),
    DecisionReason::Sticky,
    DecisionReason::Weighted,
    DecisionReason::Sequence,
];

fn reason_index(reason: DecisionReason) -> usize {
    match reason {
        DecisionReason::Pinned => 0,
        DecisionReason::Rule(_) => 1,
        DecisionReason::Sticky => 2,
        DecisionReason::Weighted => 3,
        DecisionReason::Sequence => 4,
    }
}

/// gRPC status codes: 0 (OK) to 16 (UNAUTHENTICATED).
const CODES: usize = 17;

/// One variant's counters as `/metrics` shows them (see [`crate::exposition`]).
#[derive(Debug, Clone)]
pub struct VariantCounts {
    /// The model.
    pub model: String,
    /// The version.
    pub version: String,
    /// Calls by the gRPC code they ended with.
    pub codes: Vec<(tonic::Code, u64)>,
    /// Calls by why the router chose the version (`pinned`, `rule`, `sticky`,
    /// `weighted`).
    pub reasons: Vec<(&'static str, u64)>,
    /// Latency of every call since start-up.
    pub latency_us: Histogram<u64>,
    /// Calls it failed that something else answered.
    pub stand_ins: StandIns,
    /// What the prediction cache did for its requests.
    pub cache: CacheCounts,
    /// The feedback reported on its predictions (experiments).
    pub outcomes: Outcomes,
}

/// What the prediction cache did for a version's requests. A hit is counted here only,
/// not as a request of the version: its error rate and latency (what rollouts judge)
/// stay those of real inferences.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounts {
    /// Answered from the cache (either tier).
    pub hits: u64,
    /// Of those, answered from the shared Redis tier.
    pub redis_hits: u64,
    /// Looked up and not found: the version ran.
    pub misses: u64,
    /// Redis look-ups and writes skipped or given up (Redis down, slow or failing).
    pub bypasses: u64,
}

/// One thing the prediction cache did for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheEvent {
    /// Answered from this process's cache.
    Hit,
    /// Answered from the shared Redis tier.
    RedisHit,
    /// Not found: the version ran.
    Miss,
    /// A Redis look-up or write was skipped or given up.
    Bypass,
}

/// What answered the calls a version failed, apart from its own outcomes (so its
/// error rate stays its own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StandIns {
    /// Answered by the route's fallback.
    pub fallbacks: u64,
    /// Answered with the version's default prediction.
    pub defaults: u64,
}

/// What stood in for a version that failed a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StandIn {
    /// The route's fallback answered.
    Fallback,
    /// The version's default prediction answered.
    Default,
}

/// One model's variants by version.
type Versions = HashMap<String, Arc<Mutex<Variant>>>;

/// Metrics of every variant, keyed by model then version.
#[derive(Debug, Default)]
pub struct Metrics {
    variants: RwLock<HashMap<String, Versions>>,
}

impl Metrics {
    /// Counts one request of `model` on `version` that succeeded or not and took `latency`.
    pub fn record(&self, model: &str, version: &str, ok: bool, latency: Duration) {
        let variant = self.variant(model, version);
        let mut variant = variant.lock().unwrap_or_else(PoisonError::into_inner);
        variant.total.record(ok, latency);
        variant.step.record(ok, latency);
        variant.latencies.record(latency.as_secs_f64() * 1e6);
    }

    /// Counts one call of `model` on `version` that ended with `code` and took
    /// `latency`: [`Metrics::record`], and the count by code `/metrics` shows.
    pub fn record_call(
        &self,
        model: &str,
        version: &str,
        reason: DecisionReason,
        code: tonic::Code,
        latency: Duration,
    ) {
        let variant = self.variant(model, version);
        let mut variant = variant.lock().unwrap_or_else(PoisonError::into_inner);
        let ok = code == tonic::Code::Ok;
        variant.total.record(ok, latency);
        variant.step.record(ok, latency);
        variant.latencies.record(latency.as_secs_f64() * 1e6);
        if let Some(count) = variant.codes.get_mut(code as usize) {
            *count += 1;
        }
        variant.reasons[reason_index(reason)] += 1;
    }

    /// Every variant's counters, sorted by model and version.
    pub fn counts(&self) -> Vec<VariantCounts> {
        let variants = self.variants.read().unwrap_or_else(PoisonError::into_inner);
        let mut counts: Vec<VariantCounts> = variants
            .iter()
            .flat_map(|(model, versions)| {
                versions.iter().map(move |(version, variant)| {
                    let variant = variant.lock().unwrap_or_else(PoisonError::into_inner);
                    VariantCounts {
                        model: model.clone(),
                        version: version.clone(),
                        codes: (0..CODES)
                            .filter(|&i| variant.codes[i] > 0)
                            .map(|i| (tonic::Code::from(i as i32), variant.codes[i]))
                            .collect(),
                        reasons: REASONS
                            .iter()
                            .zip(variant.reasons)
                            .filter(|(_, count)| *count > 0)
                            .map(|(reason, count)| (reason.as_str(), count))
                            .collect(),
                        latency_us: variant.total.latency_us.clone(),
                        stand_ins: variant.stand_ins,
                        cache: variant.cache,
                        outcomes: variant.outcomes,
                    }
                })
            })
            .collect();
        counts.sort_by(|a, b| (&a.model, &a.version).cmp(&(&b.model, &b.version)));
        counts
    }

    /// Counts a call `model` at `version` failed (recorded with [`Metrics::record`])
    /// that `stand_in` then answered.
    pub fn record_stand_in(&self, model: &str, version: &str, stand_in: StandIn) {
        let variant = self.variant(model, version);
        let mut variant = variant.lock().unwrap_or_else(PoisonError::into_inner);
        match stand_in {
            StandIn::Fallback => variant.stand_ins.fallbacks += 1,
            StandIn::Default => variant.stand_ins.defaults += 1,
        }
    }

    /// What answered the calls of `model` at `version` that it failed.
    pub fn stand_ins(&self, model: &str, version: &str) -> StandIns {
        let variants = self.variants.read().unwrap_or_else(PoisonError::into_inner);
        variants
            .get(model)
            .and_then(|versions| versions.get(version))
            .map_or_else(StandIns::default, |v| {
                v.lock().unwrap_or_else(PoisonError::into_inner).stand_ins
            })
    }

    /// Counts what the prediction cache did for a request of `model` at `version`.
    pub fn record_cache(&self, model: &str, version: &str, event: CacheEvent) {
        let variant = self.variant(model, version);
        let mut variant = variant.lock().unwrap_or_else(PoisonError::into_inner);
        let counts = &mut variant.cache;
        match event {
            CacheEvent::Hit => counts.hits += 1,
            CacheEvent::RedisHit => {
                counts.hits += 1;
                counts.redis_hits += 1;
            }
            CacheEvent::Miss => counts.misses += 1,
            CacheEvent::Bypass => counts.bypasses += 1,
        }
    }

    /// What the prediction cache did for the requests of `model` at `version`.
    pub fn cache_counts(&self, model: &str, version: &str) -> CacheCounts {
        let variants = self.variants.read().unwrap_or_else(PoisonError::into_inner);
        variants
            .get(model)
            .and_then(|versions| versions.get(version))
            .map_or_else(CacheCounts::default, |v| {
                v.lock().unwrap_or_else(PoisonError::into_inner).cache
            })
    }

    /// Counts feedback on a prediction of `model` at `version`; returns the variant's
    /// feedback count after it. Feedback counts in the step window it arrives in, not
    /// the one its prediction was made in: a step's accuracy is what was reported
    /// during the step.
    pub fn record_outcome(&self, model: &str, version: &str, outcome: Outcome) -> u64 {
        let variant = self.variant(model, version);
        let mut variant = variant.lock().unwrap_or_else(PoisonError::into_inner);
        variant.outcomes.record(outcome);
        variant.total.record_outcome(outcome);
        variant.step.record_outcome(outcome);
        variant.outcomes.feedback
    }

    /// Versions of `model` that requests or feedback were recorded for.
    pub fn versions(&self, model: &str) -> Vec<String> {
        let variants = self.variants.read().unwrap_or_else(PoisonError::into_inner);
        let mut versions: Vec<String> = variants
            .get(model)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        versions.sort();
        versions
    }

    /// Everything an experiment report needs of a variant; empty for one never seen.
    pub fn experiment(&self, model: &str, version: &str) -> Experiment {
        let variants = self.variants.read().unwrap_or_else(PoisonError::into_inner);
        match variants.get(model).and_then(|m| m.get(version)) {
            Some(variant) => {
                let variant = variant.lock().unwrap_or_else(PoisonError::into_inner);
                Experiment {
                    total: variant.total.clone(),
                    outcomes: variant.outcomes,
                    latency_sample_us: variant.latencies.samples.clone(),
                }
            }
            None => Experiment {
                total: Window::new(),
                outcomes: Outcomes::default(),
                latency_sample_us: Vec::new(),
            },
        }
    }

    /// The feedback a variant received and the calls it failed itself (INTERNAL,
    /// UNAVAILABLE, UNKNOWN, DATA_LOSS: not refused input, shed load or a client's
    /// deadline), since start-up (none for one never seen).
    pub fn outcomes_and_failures(&self, model: &str, version: &str) -> (Outcomes, u64) {
        const FAILURES: [tonic::Code; 4] = [
            tonic::Code::Internal,
            tonic::Code::Unavailable,
            tonic::Code::Unknown,
            tonic::Code::DataLoss,
        ];
        let variants = self.variants.read().unwrap_or_else(PoisonError::into_inner);
        variants
            .get(model)
            .and_then(|m| m.get(version))
            .map(|variant| {
                let variant = variant.lock().unwrap_or_else(PoisonError::into_inner);
                let failed = FAILURES
                    .iter()
                    .filter_map(|&code| variant.codes.get(code as usize))
                    .sum();
                (variant.outcomes, failed)
            })
            .unwrap_or_default()
    }

    /// Everything since start-up; an empty window for a variant never seen.
    pub fn total(&self, model: &str, version: &str) -> Window {
        self.read(model, version, |v| v.total.clone())
    }

    /// Everything since the last [`Metrics::reset_step`] of this variant.
    pub fn step(&self, model: &str, version: &str) -> Window {
        self.read(model, version, |v| v.step.clone())
    }

    /// Starts the variant's step window from zero; totals are kept.
    pub fn reset_step(&self, model: &str, version: &str) {
        let variant = self.variant(model, version);
        variant.lock().unwrap_or_else(PoisonError::into_inner).step = Window::new();
    }

    fn read(&self, model: &str, version: &str, f: impl FnOnce(&Variant) -> Window) -> Window {
        let variants = self.variants.read().unwrap_or_else(PoisonError::into_inner);
        match variants.get(model).and_then(|m| m.get(version)) {
            Some(variant) => f(&variant.lock().unwrap_or_else(PoisonError::into_inner)),
            None => Window::new(),
        }
    }

    fn variant(&self, model: &str, version: &str) -> Arc<Mutex<Variant>> {
        if let Some(found) = self
            .variants
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(model)
            .and_then(|m| m.get(version))
        {
            return Arc::clone(found);
        }
        let mut variants = self
            .variants
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            variants
                .entry(model.to_owned())
                .or_default()
                .entry(version.to_owned())
                .or_insert_with(|| {
                    Arc::new(Mutex::new(Variant {
                        total: Window::new(),
                        step: Window::new(),
                        outcomes: Outcomes::default(),
                        latencies: Reservoir::default(),
                        stand_ins: StandIns::default(),
                        cache: CacheCounts::default(),
                        codes: [0; CODES],
                        reasons: [0; REASONS.len()],
                    }))
                }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resetting_the_step_window_keeps_totals_and_other_variants() {
        let metrics = Metrics::default();
        for i in 0..10 {
            metrics.record("demo", "2", i % 5 != 0, Duration::from_millis(3));
        }
        metrics.record("demo", "1", true, Duration::from_millis(1));
        let step = metrics.step("demo", "2").step_metrics();
        assert_eq!((step.requests, step.errors), (10, 2));
        let p99 = step.latency_p99_us.expect("latency measured");
        assert!((2_900..=3_100).contains(&p99), "p99 {p99} µs");

        metrics.reset_step("demo", "2");
        let step = metrics.step("demo", "2").step_metrics();
        assert_eq!(
            (step.requests, step.errors, step.latency_p99_us),
            (0, 0, None)
        );
        let total = metrics.total("demo", "2");
        assert_eq!((total.requests, total.errors), (10, 2));
        assert_eq!(metrics.step("demo", "1").requests, 1);

        metrics.record("demo", "2", false, Duration::from_millis(1));
        let step = metrics.step("demo", "2").step_metrics();
        assert_eq!((step.requests, step.errors), (1, 1));
        assert_eq!(metrics.total("demo", "2").requests, 11);
    }

    #[test]
    fn step_accuracy_counts_labelled_feedback_since_the_reset() {
        let metrics = Metrics::default();
        assert_eq!(metrics.step("demo", "2").step_metrics().accuracy, None);
        metrics.record_outcome("demo", "2", Outcome::Reward(1.0));
        assert_eq!(metrics.step("demo", "2").step_metrics().accuracy, None);
        for correct in [true, false, false, false] {
            metrics.record_outcome("demo", "2", Outcome::Correct(correct));
        }
        assert_eq!(
            metrics.step("demo", "2").step_metrics().accuracy,
            Some(0.25)
        );

        metrics.reset_step("demo", "2");
        assert_eq!(metrics.step("demo", "2").step_metrics().accuracy, None);
        metrics.record_outcome("demo", "2", Outcome::Correct(true));
        assert_eq!(metrics.step("demo", "2").step_metrics().accuracy, Some(1.0));
        assert_eq!(metrics.total("demo", "2").labelled, 5);
    }

    #[test]
    fn outcomes_accumulate_counts_and_reward_moments() {
        let metrics = Metrics::default();
        for correct in [true, true, false] {
            metrics.record_outcome("demo", "1", Outcome::Correct(correct));
        }
        for reward in [1.0, 2.0, 4.0] {
            metrics.record_outcome("demo", "1", Outcome::Reward(reward));
        }
        let outcomes = metrics.experiment("demo", "1").outcomes;
        assert_eq!(
            (outcomes.feedback, outcomes.labelled, outcomes.correct),
            (6, 3, 2)
        );
        let summary = outcomes.reward_summary().expect("rewards recorded");
        let direct = SampleSummary::from_samples(&[1.0, 2.0, 4.0]).expect("finite");
        assert_eq!(summary.n, 3);
        assert!((summary.mean - direct.mean).abs() < 1e-12);
        assert!((summary.variance - direct.variance).abs() < 1e-12);
        assert_eq!(
            metrics.experiment("demo", "2").outcomes,
            Outcomes::default()
        );
    }

    #[test]
    fn the_latency_sample_is_bounded_and_keeps_every_value_until_full() {
        let metrics = Metrics::default();
        for ms in 0..10 {
            metrics.record("demo", "1", true, Duration::from_millis(ms));
        }
        let sample = metrics.experiment("demo", "1").latency_sample_us;
        assert_eq!(sample.len(), 10);
        assert_eq!(sample[9], 9_000.0);
        for _ in 0..LATENCY_SAMPLE_SIZE * 2 {
            metrics.record("demo", "1", true, Duration::from_millis(1));
        }
        let experiment = metrics.experiment("demo", "1");
        assert_eq!(experiment.latency_sample_us.len(), LATENCY_SAMPLE_SIZE);
        assert_eq!(
            experiment.total.requests,
            10 + 2 * LATENCY_SAMPLE_SIZE as u64
        );
    }

    #[test]
    fn windows_added_from_buckets_keep_counts_and_percentiles() {
        let (a, b) = (Metrics::default(), Metrics::default());
        for i in 0..100 {
            a.record("demo", "2", i != 0, Duration::from_millis(2));
            b.record(
                "demo",
                "2",
                true,
                Duration::from_millis(if i < 50 { 2 } else { 40 }),
            );
        }
        let mut sum = Window::new();
        for window in [a.step("demo", "2"), b.step("demo", "2")] {
            sum.add(
                window.requests,
                window.errors,
                &window.latency_buckets(),
                0,
                0,
            );
        }
        let step = sum.step_metrics();
        assert_eq!((step.requests, step.errors), (200, 1));
        let p99 = step.latency_p99_us.expect("latency measured");
        assert!((39_000..=41_000).contains(&p99), "p99 {p99} µs");
        let p50 = sum.latency_us.value_at_quantile(0.5);
        assert!((1_900..=2_100).contains(&p50), "p50 {p50} µs");
    }

    #[test]
    fn unseen_variants_read_as_empty() {
        let metrics = Metrics::default();
        assert_eq!(
            metrics.step("x", "1").step_metrics(),
            StepMetrics::default()
        );
        metrics.reset_step("x", "1");
        assert_eq!(metrics.total("x", "1").requests, 0);
    }
}
