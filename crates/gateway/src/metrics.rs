//! Per-variant request metrics: requests, errors and latency of every (model, version)
//! the front routed to, both since start-up and since the variant's step window was
//! last reset (a rollout step's evidence, see [`crate::rollouts`]).
//!
//! Recording takes a read lock on the variant map (a write lock only the first time a
//! variant is seen) and one short mutex per variant, so requests on different versions
//! never contend, and it cannot fail a request.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use aviary_router::rollout::StepMetrics;
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
}

impl Window {
    fn new() -> Window {
        // Bounds are constants that hdrhistogram accepts (1 <= low, high >= 2 * low,
        // sigfig <= 5), so this cannot fail.
        let latency_us = Histogram::new_with_bounds(1, MAX_LATENCY_US, 2)
            .expect("constant histogram bounds are valid");
        Window {
            requests: 0,
            errors: 0,
            latency_us,
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

    /// What the rollout gates read: counts and the 99th-percentile latency.
    pub fn step_metrics(&self) -> StepMetrics {
        StepMetrics {
            requests: self.requests,
            errors: self.errors,
            latency_p99_us: (!self.latency_us.is_empty())
                .then(|| self.latency_us.value_at_quantile(0.99)),
            accuracy: None,
        }
    }
}

#[derive(Debug)]
struct Variant {
    total: Window,
    step: Window,
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
