//! Metric snapshots the driver reports, and how the gates judge them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::plan::Gates;

/// What one version did since the current step began (the driver resets it per step).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepMetrics {
    /// Requests answered or failed.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// 99th-percentile latency in microseconds; `None` when not measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p99_us: Option<u64>,
    /// Share of answers that feedback marked correct, 0..=1; `None` without feedback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
}

impl StepMetrics {
    /// Failed share of requests; `None` before the first request.
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors.min(self.requests) as f64 / self.requests as f64)
    }
}

/// A measurement of one feature, e.g. the largest output PSI and where it was.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureValue {
    /// The number.
    pub value: f64,
    /// Where: `output <tensor>/<feature>`.
    pub feature: String,
}

/// What the driver feeds [`Rollout::evaluate`](super::Rollout::evaluate): both versions
/// since the current step began.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSnapshot {
    /// The canary's metrics.
    pub canary: StepMetrics,
    /// The baseline's metrics.
    pub baseline: StepMetrics,
    /// Share of canary answers that agreed with the baseline's on the same inputs, 0..=1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_agreement: Option<f64>,
    /// p-value of a two-sample test that canary and baseline outputs share one distribution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distribution_p_value: Option<f64>,
    /// The largest PSI of a canary output feature against the baseline's over the same
    /// recent traffic; `None` before both have enough outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_drift_psi: Option<FeatureValue>,
    /// The smallest adjusted p-value of the same comparisons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_ks_p_value: Option<FeatureValue>,
    /// Input features of either version drifting from their reference, in words;
    /// `None` before every input feature of both has a verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_drift: Option<Vec<String>>,
}

/// The gates' verdict on one snapshot.
#[derive(Debug, Default)]
pub(super) struct Judgement {
    /// Why each failing gate fails.
    pub(super) failures: Vec<String>,
    /// Why each configured gate without evidence cannot pass yet.
    pub(super) missing: Vec<String>,
    /// The numbers behind the verdicts; finite values only, so they persist as JSON.
    pub(super) numbers: BTreeMap<String, f64>,
}

impl Judgement {
    fn number(&mut self, name: &str, value: f64) {
        if value.is_finite() {
            self.numbers.insert(name.to_owned(), value);
        }
    }
}

/// Judges `snapshot` against `gates`, comparing the canary with `baseline`.
///
/// `baseline` is usually `snapshot.baseline`; once the baseline has no traffic (the
/// 100% step) it is what the baseline did in an earlier step, which `baseline_name`
/// then says.
pub(super) fn judge(
    gates: &Gates,
    snapshot: &MetricsSnapshot,
    baseline: &StepMetrics,
    baseline_name: &str,
) -> Judgement {
    let canary = &snapshot.canary;
    let mut out = Judgement::default();

    out.number("canary_requests", canary.requests as f64);
    out.number("canary_errors", canary.errors as f64);
    out.number("baseline_requests", baseline.requests as f64);
    out.number("baseline_errors", baseline.errors as f64);
    out.number("max_error_rate_increase", gates.max_error_rate_increase);
    match (canary.error_rate(), baseline.error_rate()) {
        (Some(c), Some(b)) => {
            out.number("canary_error_rate", c);
            out.number("baseline_error_rate", b);
            let max = gates.max_error_rate_increase;
            if c > b + max {
                out.failures.push(format!(
                    "canary error rate {c:.3} exceeds {baseline_name} {b:.3} + {max:.3}"
                ));
            }
        }
        (None, _) => out.missing.push("no canary requests yet".to_owned()),
        (_, None) => out
            .missing
            .push("no baseline requests to compare the error rate with".to_owned()),
    }

    if let Some(max) = gates.max_latency_ratio {
        out.number("max_latency_ratio", max);
        match (canary.latency_p99_us, baseline.latency_p99_us) {
            (Some(c), Some(b)) => {
                // A baseline p99 of 0 µs is a rounding artefact; 1 µs keeps the ratio finite.
                let ratio = c as f64 / b.max(1) as f64;
                out.number("canary_latency_p99_us", c as f64);
                out.number("baseline_latency_p99_us", b as f64);
                out.number("latency_ratio", ratio);
                if ratio > max {
                    out.failures.push(format!(
                        "canary p99 latency {c} µs is {ratio:.2}x {baseline_name} p99 {b} µs, above {max}x"
                    ));
                }
            }
            _ => out
                .missing
                .push("p99 latency not reported for both versions".to_owned()),
        }
    }

    if let Some(max_drop) = gates.max_accuracy_drop {
        out.number("max_accuracy_drop", max_drop);
        match (finite(canary.accuracy), finite(baseline.accuracy)) {
            (Some(c), Some(b)) => {
                out.number("canary_accuracy", c);
                out.number("baseline_accuracy", b);
                if b - c > max_drop {
                    out.failures.push(format!(
                        "canary accuracy {c:.3} is below {baseline_name} {b:.3} - {max_drop:.3}"
                    ));
                }
            }
            _ => out
                .missing
                .push("accuracy feedback not reported for both versions".to_owned()),
        }
    }

    if let Some(min) = gates.min_shadow_agreement {
        out.number("min_shadow_agreement", min);
        match finite(snapshot.shadow_agreement) {
            Some(agreement) => {
                out.number("shadow_agreement", agreement);
                if agreement < min {
                    out.failures.push(format!(
                        "canary agrees with the baseline on {agreement:.3} of compared answers, below {min:.3}"
                    ));
                }
            }
            None => out.missing.push("shadow agreement not reported".to_owned()),
        }
    }

    if let Some(min) = gates.min_distribution_p_value {
        out.number("min_distribution_p_value", min);
        match finite(snapshot.distribution_p_value) {
            Some(p) => {
                out.number("distribution_p_value", p);
                if p < min {
                    out.failures.push(format!(
                        "canary and baseline output distributions differ: p-value {p:.4} is below {min}"
                    ));
                }
            }
            None => out
                .missing
                .push("output distribution test not reported".to_owned()),
        }
    }

    judge_output_drift(gates, snapshot, &mut out);
    out
}

/// The output-drift gates: the canary's outputs against the baseline's.
fn judge_output_drift(gates: &Gates, snapshot: &MetricsSnapshot, out: &mut Judgement) {
    if gates.pause_on_input_drift && snapshot.input_drift.is_none() {
        out.missing.push(
            "input drift not measured yet (both versions' cards need [drift], and every input feature a verdict)"
                .to_owned(),
        );
    }
    let measured = |value: &Option<FeatureValue>| {
        value
            .as_ref()
            .filter(|v| v.value.is_finite())
            .map(|v| (v.value, v.feature.clone()))
    };
    if let Some(max) = gates.max_output_drift_psi {
        out.number("max_output_drift_psi", max);
        match measured(&snapshot.output_drift_psi) {
            Some((psi, feature)) => {
                out.number("output_drift_psi", psi);
                if psi > max {
                    out.failures.push(format!(
                        "canary outputs drift from the baseline's: PSI {psi:.3} on {feature} is above {max}"
                    ));
                }
            }
            None => out.missing.push(
                "output drift not measured yet (both versions' cards need [drift], and every output feature min_samples values in both windows)"
                    .to_owned(),
            ),
        }
    }
    if let Some(min) = gates.min_output_ks_p {
        out.number("min_output_ks_p", min);
        match measured(&snapshot.output_ks_p_value) {
            Some((p, feature)) => {
                out.number("output_ks_p_value", p);
                if p < min {
                    out.failures.push(format!(
                        "canary outputs drift from the baseline's: p-value {p:.4} on {feature} is below {min}"
                    ));
                }
            }
            None => out.missing.push(
                "output distribution comparison not measured yet (both versions' cards need [drift], and every output feature min_samples values in both windows)"
                    .to_owned(),
            ),
        }
    }
}

/// A metric the driver could not compute (NaN, infinite) counts as not reported.
fn finite(value: Option<f64>) -> Option<f64> {
    value.filter(|v| v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(requests: u64, errors: u64) -> StepMetrics {
        StepMetrics {
            requests,
            errors,
            ..StepMetrics::default()
        }
    }

    fn snapshot(canary: StepMetrics, baseline: StepMetrics) -> MetricsSnapshot {
        MetricsSnapshot {
            canary,
            baseline,
            ..MetricsSnapshot::default()
        }
    }

    #[test]
    fn error_rate_is_compared_with_the_baseline_plus_the_allowance() {
        let gates = Gates::error_rate(0.01);
        let s = snapshot(metrics(1000, 20), metrics(1000, 10));
        let ok = judge(&gates, &s, &s.baseline, "baseline");
        assert!(ok.failures.is_empty() && ok.missing.is_empty(), "{ok:?}");
        assert_eq!(ok.numbers["canary_error_rate"], 0.02);

        let s = snapshot(metrics(1000, 21), metrics(1000, 10));
        let bad = judge(&gates, &s, &s.baseline, "baseline");
        assert_eq!(
            bad.failures,
            ["canary error rate 0.021 exceeds baseline 0.010 + 0.010"]
        );
    }

    #[test]
    fn errors_beyond_requests_count_as_a_full_error_rate() {
        assert_eq!(metrics(10, 50).error_rate(), Some(1.0));
        assert_eq!(metrics(0, 5).error_rate(), None);
    }

    #[test]
    fn configured_gates_without_metrics_are_missing_not_passed() {
        let gates = Gates {
            max_latency_ratio: Some(1.2),
            max_accuracy_drop: Some(0.02),
            min_shadow_agreement: Some(0.95),
            min_distribution_p_value: Some(0.01),
            ..Gates::error_rate(0.01)
        };
        let mut s = snapshot(metrics(100, 0), metrics(100, 0));
        s.canary.accuracy = Some(f64::NAN);
        s.baseline.accuracy = Some(0.9);
        let j = judge(&gates, &s, &s.baseline, "baseline");
        assert!(j.failures.is_empty());
        assert_eq!(j.missing.len(), 4, "{:?}", j.missing);
        assert!(j.numbers.values().all(|v| v.is_finite()));
    }

    #[test]
    fn a_zero_baseline_latency_keeps_the_ratio_finite() {
        let gates = Gates {
            max_latency_ratio: Some(2.0),
            ..Gates::error_rate(0.01)
        };
        let mut s = snapshot(metrics(100, 0), metrics(100, 0));
        s.canary.latency_p99_us = Some(3);
        s.baseline.latency_p99_us = Some(0);
        let j = judge(&gates, &s, &s.baseline, "baseline");
        assert_eq!(j.numbers["latency_ratio"], 3.0);
        assert_eq!(j.failures.len(), 1);
    }
}
