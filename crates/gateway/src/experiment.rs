//! A/B experiment reports: each variant's counts, latency, accuracy and reward from
//! [`Metrics`], and every variant compared with a baseline by the tests in
//! [`aviary_router::stats`].

use aviary::pb::admin::{
    ExperimentReport, Interval, Significance, VariantComparison, VariantReport,
};
use aviary_router::stats::{self, TestResult};

use crate::metrics::{Experiment, Metrics};

/// Confidence level of every interval in the report.
pub const CONFIDENCE: f64 = 0.95;

/// Mixing scale of the accuracy mSPRT: a difference of about five points of accuracy is
/// what an experiment is usually run to find.
pub const MSPRT_TAU: f64 = 0.05;

/// The report of `model` over `versions` (routed ones first, then any others seen),
/// compared with `baseline`, or with the version that served the most requests (the
/// first on a tie) when `baseline` is `None`. `Err` names the baseline when it is not
/// one of the versions.
pub fn report(
    metrics: &Metrics,
    model: &str,
    versions: &[String],
    baseline: Option<&str>,
) -> Result<ExperimentReport, String> {
    let experiments: Vec<(&str, Experiment)> = versions
        .iter()
        .map(|v| (v.as_str(), metrics.experiment(model, v)))
        .collect();
    let baseline = match baseline {
        Some(b) => experiments
            .iter()
            .position(|(v, _)| *v == b)
            .ok_or_else(|| format!("baseline \"{b}\" is not a variant of model \"{model}\""))?,
        None => {
            let mut best = 0;
            for (i, (_, e)) in experiments.iter().enumerate() {
                if e.total.requests > experiments[best].1.total.requests {
                    best = i;
                }
            }
            best
        }
    };
    let comparisons = match experiments.get(baseline) {
        Some((_, base)) => experiments
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != baseline)
            .map(|(_, (version, e))| compare(version, e, base))
            .collect(),
        None => Vec::new(),
    };
    Ok(ExperimentReport {
        model: model.to_owned(),
        baseline: experiments
            .get(baseline)
            .map(|(v, _)| (*v).to_owned())
            .unwrap_or_default(),
        variants: experiments.iter().map(|(v, e)| variant(v, e)).collect(),
        comparisons,
        bandit: None,
    })
}

fn variant(version: &str, e: &Experiment) -> VariantReport {
    let total = &e.total;
    let measured = total.requests > 0 && !total.latency_us.is_empty();
    let quantile = |q: f64| measured.then(|| total.latency_us.value_at_quantile(q));
    let o = &e.outcomes;
    let reward = o.reward_summary();
    VariantReport {
        version: version.to_owned(),
        requests: total.requests,
        errors: total.errors,
        error_rate: (total.requests > 0).then(|| total.errors as f64 / total.requests as f64),
        latency_p50_us: quantile(0.5),
        latency_p90_us: quantile(0.9),
        latency_p99_us: quantile(0.99),
        feedback: o.feedback,
        labelled: o.labelled,
        correct: o.correct,
        accuracy: (o.labelled > 0).then(|| o.correct as f64 / o.labelled as f64),
        accuracy_interval: stats::wilson_interval(o.correct, o.labelled, CONFIDENCE).map(interval),
        rewards: o.rewards,
        mean_reward: reward.map(|s| s.mean),
        reward_interval: reward
            .and_then(|s| stats::mean_interval(&s, CONFIDENCE))
            .map(interval),
        latency_sample_size: e.latency_sample_us.len() as u64,
    }
}

/// `e` (the variant, side A of every test) against `base`.
fn compare(version: &str, e: &Experiment, base: &Experiment) -> VariantComparison {
    let (o, b) = (&e.outcomes, &base.outcomes);
    VariantComparison {
        version: version.to_owned(),
        error_rate: stats::two_proportion_z_test(
            e.total.errors,
            e.total.requests,
            base.total.errors,
            base.total.requests,
        )
        .map(significance),
        latency: stats::mann_whitney_u(&e.latency_sample_us, &base.latency_sample_us)
            .map(significance),
        accuracy: stats::two_proportion_z_test(o.correct, o.labelled, b.correct, b.labelled)
            .map(significance),
        accuracy_msprt_p: stats::msprt_two_proportions(
            o.correct, o.labelled, b.correct, b.labelled, MSPRT_TAU,
        ),
    }
}

fn interval((low, high): (f64, f64)) -> Interval {
    Interval { low, high }
}

fn significance(t: TestResult) -> Significance {
    Significance {
        statistic: t.statistic,
        p_value: t.p_value,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::metrics::Outcome;

    fn versions() -> Vec<String> {
        vec!["1".into(), "2".into()]
    }

    #[test]
    fn no_traffic_gives_zero_counts_and_no_tests() {
        let report = report(&Metrics::default(), "demo", &versions(), None).expect("report");
        assert_eq!(report.baseline, "1");
        assert!(report.variants.iter().all(|v| v.requests == 0
            && v.error_rate.is_none()
            && v.latency_p99_us.is_none()
            && v.accuracy.is_none()
            && v.accuracy_interval.is_none()));
        let c = &report.comparisons[0];
        assert_eq!(c.version, "2");
        assert!(c.error_rate.is_none() && c.latency.is_none() && c.accuracy.is_none());
        assert!(c.accuracy_msprt_p.is_none());
    }

    #[test]
    fn the_busiest_version_is_the_default_baseline_and_an_unknown_one_is_refused() {
        let metrics = Metrics::default();
        for _ in 0..3 {
            metrics.record("demo", "2", true, Duration::from_millis(1));
        }
        metrics.record("demo", "1", false, Duration::from_millis(1));
        let r = report(&metrics, "demo", &versions(), None).expect("report");
        assert_eq!(
            (r.baseline.as_str(), r.comparisons[0].version.as_str()),
            ("2", "1")
        );
        assert_eq!(r.variants[0].error_rate, Some(1.0));
        let r = report(&metrics, "demo", &versions(), Some("1")).expect("report");
        assert_eq!(r.comparisons[0].version, "2");
        let error = report(&metrics, "demo", &versions(), Some("9")).expect_err("unknown");
        assert!(error.contains("\"9\""), "{error}");
    }

    #[test]
    fn rewards_get_a_mean_and_a_t_interval() {
        let metrics = Metrics::default();
        for reward in [1.0, 2.0, 3.0] {
            metrics.record_outcome("demo", "1", Outcome::Reward(reward));
        }
        let r = report(&metrics, "demo", &versions(), None).expect("report");
        let v = &r.variants[0];
        assert_eq!((v.rewards, v.feedback, v.labelled), (3, 3, 0));
        assert_eq!(v.mean_reward, Some(2.0));
        let summary = stats::SampleSummary::from_samples(&[1.0, 2.0, 3.0]).expect("finite");
        let (low, high) = stats::mean_interval(&summary, CONFIDENCE).expect("interval");
        let got = v.reward_interval.expect("interval");
        assert!((got.low - low).abs() < 1e-12 && (got.high - high).abs() < 1e-12);
    }
}
