//! Confidence intervals: Wilson for a rate, Student t for a mean.

use statrs::distribution::{ContinuousCDF, StudentsT};

use super::normal_critical;

/// The Wilson score interval for a binomial rate `successes / n` at `confidence`
/// (e.g. 0.95), clamped to [0, 1].
///
/// Unlike the textbook `p ± z·√(p(1-p)/n)` it stays inside [0, 1] and does not
/// collapse to a point when no (or every) request failed. `None` when `n` is 0,
/// `successes > n`, or `confidence` is not strictly between 0 and 1.
pub fn wilson_interval(successes: u64, n: u64, confidence: f64) -> Option<(f64, f64)> {
    if n == 0 || successes > n {
        return None;
    }
    let z = normal_critical(confidence)?;
    let n = n as f64;
    let p = successes as f64 / n;
    let z2 = z * z;
    let denominator = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denominator;
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denominator;
    Some(((center - half).max(0.0), (center + half).min(1.0)))
}

/// Count, mean and sample variance of a set of observations (accuracy 0/1 per
/// request, reward, latency...), enough for [`mean_interval`].
///
/// Gateways that aggregate in a stream can fill the fields themselves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleSummary {
    /// Number of observations.
    pub n: u64,
    /// Their arithmetic mean.
    pub mean: f64,
    /// Their unbiased sample variance (divisor `n - 1`; 0 when `n` is 1).
    pub variance: f64,
}

impl SampleSummary {
    /// Summarises `samples`; `None` when empty or when any value is NaN or infinite.
    pub fn from_samples(samples: &[f64]) -> Option<SampleSummary> {
        if samples.is_empty() || samples.iter().any(|x| !x.is_finite()) {
            return None;
        }
        let n = samples.len() as f64;
        let mean = samples.iter().sum::<f64>() / n;
        // Two passes: summing squared deviations avoids the cancellation of Σx² - n·mean².
        let squares: f64 = samples.iter().map(|x| (x - mean) * (x - mean)).sum();
        let variance = if samples.len() > 1 {
            squares / (n - 1.0)
        } else {
            0.0
        };
        (mean.is_finite() && variance.is_finite()).then_some(SampleSummary {
            n: samples.len() as u64,
            mean,
            variance,
        })
    }
}

/// The Student t confidence interval for the mean: `mean ± t(n-1) · √(variance / n)`.
///
/// `None` when `n < 2` (no spread can be estimated), when the mean or variance is not
/// finite or the variance is negative, or when `confidence` is not strictly between 0
/// and 1. Observations that are all equal give the zero-width interval `(mean, mean)`.
pub fn mean_interval(summary: &SampleSummary, confidence: f64) -> Option<(f64, f64)> {
    let SampleSummary { n, mean, variance } = *summary;
    if n < 2 || !mean.is_finite() || !variance.is_finite() || variance < 0.0 {
        return None;
    }
    let t = t_critical((n - 1) as f64, confidence)?;
    let half = t * (variance / n as f64).sqrt();
    half.is_finite().then_some((mean - half, mean + half))
}

/// The Student t quantile `t` with `P(|T| <= t) = confidence` for `df` degrees of
/// freedom, or `None` when `confidence` is not strictly between 0 and 1.
fn t_critical(df: f64, confidence: f64) -> Option<f64> {
    // statrs inverts the regularised incomplete beta function, which drifts as `df`
    // grows (relative error 1e-8 at 3000 degrees of freedom, 1e-5 at 1e5) and stops
    // converging near 3e7. Past 1000 the Cornish–Fisher expansion around the normal
    // quantile (Abramowitz & Stegun 26.7.5) is accurate to 1e-11 or better.
    const EXPANSION_FROM_DF: f64 = 1000.0;
    let z = normal_critical(confidence)?;
    if df <= EXPANSION_FROM_DF {
        let t = StudentsT::new(0.0, 1.0, df).ok()?;
        return Some(t.inverse_cdf(0.5 + confidence / 2.0));
    }
    let (z2, z3) = (z * z, z * z * z);
    let (z5, z7, z9) = (z3 * z2, z3 * z2 * z2, z3 * z3 * z3);
    let g1 = (z3 + z) / 4.0;
    let g2 = (5.0 * z5 + 16.0 * z3 + 3.0 * z) / 96.0;
    let g3 = (3.0 * z7 + 19.0 * z5 + 17.0 * z3 - 15.0 * z) / 384.0;
    let g4 = (79.0 * z9 + 776.0 * z7 + 1482.0 * z5 - 1920.0 * z3 - 945.0 * z) / 92160.0;
    Some(z + (g1 + (g2 + (g3 + g4 / df) / df) / df) / df)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::assert_close;
    use super::*;

    #[test]
    fn wilson_matches_statsmodels() {
        // python: from statsmodels.stats.proportion import proportion_confint
        // proportion_confint(37, 1000, alpha=0.05, method="wilson")
        let (lo, hi) = wilson_interval(37, 1000, 0.95).expect("valid input");
        assert_close(lo, 0.026961180875554734, 1e-12);
        assert_close(hi, 0.05058239748206931, 1e-12);
        // proportion_confint(3, 20, alpha=0.01, method="wilson")
        let (lo, hi) = wilson_interval(3, 20, 0.99).expect("valid input");
        assert_close(lo, 0.038787060508071625, 1e-12);
        assert_close(hi, 0.43558672026105577, 1e-12);
    }

    #[test]
    fn wilson_stays_informative_at_zero_and_all() {
        // proportion_confint(0, 50, alpha=0.05, method="wilson")
        let (lo, hi) = wilson_interval(0, 50, 0.95).expect("valid input");
        assert_eq!(lo, 0.0);
        assert_close(hi, 0.07134759913335874, 1e-12);
        // proportion_confint(50, 50, alpha=0.05, method="wilson")
        let (lo, hi) = wilson_interval(50, 50, 0.95).expect("valid input");
        assert_close(lo, 0.9286524008666412, 1e-12);
        assert_eq!(hi, 1.0);
    }

    #[test]
    fn wilson_rejects_degenerate_input() {
        assert_eq!(wilson_interval(0, 0, 0.95), None);
        assert_eq!(wilson_interval(5, 4, 0.95), None);
        assert_eq!(wilson_interval(1, 4, 1.0), None);
        assert_eq!(wilson_interval(1, 4, 0.0), None);
        assert_eq!(wilson_interval(1, 4, f64::NAN), None);
    }

    /// 25 rewards in [0, 1], reproducible in Python.
    fn rewards() -> Vec<f64> {
        (0..25).map(|i| ((i * 13) % 17) as f64 / 16.0).collect()
    }

    #[test]
    fn mean_interval_matches_scipy() {
        let summary = SampleSummary::from_samples(&rewards()).expect("finite samples");
        // python: import numpy as np; x = np.array([(i*13 % 17)/16 for i in range(25)])
        // x.mean(), x.var(ddof=1)
        assert_eq!(summary.n, 25);
        assert_close(summary.mean, 0.485, 1e-12);
        assert_close(summary.variance, 0.097421875, 1e-12);
        // from scipy import stats
        // stats.t.interval(0.95, df=len(x)-1, loc=x.mean(), scale=stats.sem(x))
        let (lo, hi) = mean_interval(&summary, 0.95).expect("valid summary");
        assert_close(lo, 0.3561612252774238, 1e-9);
        assert_close(hi, 0.6138387747225762, 1e-9);
        // stats.t.interval(0.9, df=2, loc=10.0, scale=(4.0/3)**0.5)
        let tiny = SampleSummary {
            n: 3,
            mean: 10.0,
            variance: 4.0,
        };
        let (lo, hi) = mean_interval(&tiny, 0.9).expect("valid summary");
        assert_close(lo, 6.628291078305901, 1e-9);
        assert_close(hi, 13.371708921694097, 1e-9);
    }

    #[test]
    fn t_quantile_stays_accurate_with_many_degrees_of_freedom() {
        // python: from scipy import stats; stats.t.ppf(q, df) for each (df, confidence)
        // below, with q = 0.5 + confidence/2.
        let cases = [
            (10.0, 0.95, 2.228138851986274),
            (1000.0, 0.99, 2.580754698065951),
            (1001.0, 0.9, 1.646377292199468),
            (4999.0, 0.95, 1.9604386466615247),
            (1e6, 0.8, 1.281552412129939),
            (1e9, 0.999, 3.2905267412216563),
        ];
        for (df, confidence, expected) in cases {
            let t = t_critical(df, confidence).expect("valid confidence");
            assert_close(t, expected, 1e-10);
        }
    }

    #[test]
    fn mean_interval_degenerate_input() {
        assert_eq!(SampleSummary::from_samples(&[]), None);
        assert_eq!(SampleSummary::from_samples(&[1.0, f64::NAN]), None);
        let one = SampleSummary::from_samples(&[2.5]).expect("one finite sample");
        assert_eq!(mean_interval(&one, 0.95), None);
        let flat = SampleSummary::from_samples(&[3.0; 10]).expect("finite samples");
        assert_eq!(mean_interval(&flat, 0.95), Some((3.0, 3.0)));
        let summary = SampleSummary::from_samples(&rewards()).expect("finite samples");
        assert_eq!(mean_interval(&summary, 1.0), None);
        let negative = SampleSummary {
            n: 10,
            mean: 1.0,
            variance: -1.0,
        };
        assert_eq!(mean_interval(&negative, 0.95), None);
    }
}
