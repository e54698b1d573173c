//! Statistics for A/B experiments, canary analysis and shadow comparison.
//!
//! Everything here is a pure function of counts or samples the gateway has already
//! collected. Degenerate input (no observations, a success count above its total, a
//! NaN, samples with no spread, a confidence level outside (0, 1)) yields `None`
//! rather than a number that looks like evidence; the exceptions are documented on
//! each function. Distribution functions come from `statrs`.
//!
//! Every fixed-sample test is checked in its unit tests against reference values from
//! SciPy / statsmodels, each recorded with the Python line that produced it.
//!
//! - `interval`: [`wilson_interval`] for rates, [`mean_interval`] (Student t) for
//!   accuracy or mean reward, and [`SampleSummary`] to feed it.
//! - `proportion`: [`two_proportion_z_test`] and [`chi_square_2x2`] for error or
//!   success rates.
//! - `rank`: [`mann_whitney_u`] for latency.
//! - `ks`: [`ks_two_sample`] for shadow output distributions; `kolmogorov` holds the
//!   distribution of its statistic.
//! - `sequential`: [`msprt_two_proportions`] and [`SequentialTest`], an always-valid
//!   p-value that may be read after every batch without inflating false positives.
//! - `drift`: [`population_stability_index`], [`category_stability_index`] and
//!   [`chi_square_homogeneity`] for a live window against a reference, and
//!   [`benjamini_hochberg`] across many features.

mod drift;
mod interval;
mod kolmogorov;
mod ks;
mod proportion;
mod rank;
mod sequential;

pub use drift::{
    PSI_EMPTY_BIN, benjamini_hochberg, category_stability_index, chi_square_homogeneity,
    population_stability_index, quantile,
};
pub use interval::{SampleSummary, mean_interval, wilson_interval};
pub use ks::ks_two_sample;
pub use proportion::{chi_square_2x2, two_proportion_z_test};
pub use rank::mann_whitney_u;
pub use sequential::{SequentialTest, msprt_two_proportions};

use statrs::{
    distribution::{ContinuousCDF, Normal},
    function::erf::erfc_inv,
};

/// The outcome of a significance test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TestResult {
    /// The test statistic (its meaning is documented on each test).
    pub statistic: f64,
    /// The two-sided p-value, in [0, 1].
    pub p_value: f64,
}

/// Two-sided p-value of a standard normal statistic: `2 * P(Z > |z|)`.
fn normal_two_sided_p(z: f64) -> f64 {
    (2.0 * Normal::standard().sf(z.abs())).min(1.0)
}

/// The standard normal quantile `z` with `P(|Z| <= z) = confidence`, or `None` when
/// `confidence` is not strictly between 0 and 1.
fn normal_critical(confidence: f64) -> Option<f64> {
    if !(confidence > 0.0 && confidence < 1.0) {
        return None;
    }
    // Φ⁻¹(1 - α/2) = √2 · erfc⁻¹(α), which keeps full precision for small α.
    Some(std::f64::consts::SQRT_2 * erfc_inv(1.0 - confidence))
}

#[cfg(test)]
mod test_support {
    /// Asserts `actual` is within `rel` relative error of `expected`.
    #[track_caller]
    pub(super) fn assert_close(actual: f64, expected: f64, rel: f64) {
        let err = (actual - expected).abs() / expected.abs().max(f64::MIN_POSITIVE);
        assert!(
            err <= rel,
            "expected {expected:e}, got {actual:e} (relative error {err:e} > {rel:e})"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_sample() -> impl Strategy<Value = Vec<f64>> {
        let value = prop_oneof![
            8 => -1e3..1e3f64,
            2 => (0u8..5).prop_map(f64::from),
            1 => Just(f64::NAN),
            1 => Just(f64::INFINITY),
            1 => Just(f64::NEG_INFINITY),
            1 => Just(0.0),
        ];
        prop::collection::vec(value, 0..40)
    }

    fn any_count() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..50, Just(0), Just(u64::MAX), 0u64..1_000_000]
    }

    fn valid(t: Option<TestResult>) -> bool {
        t.is_none_or(|t| (0.0..=1.0).contains(&t.p_value) && !t.statistic.is_nan())
    }

    proptest! {
        #[test]
        fn sample_tests_never_panic_and_p_is_a_probability(a in any_sample(), b in any_sample()) {
            let (u_ab, u_ba) = (mann_whitney_u(&a, &b), mann_whitney_u(&b, &a));
            prop_assert!(valid(u_ab));
            if let (Some(ab), Some(ba)) = (u_ab, u_ba) {
                prop_assert_eq!(ab.statistic + ba.statistic, (a.len() * b.len()) as f64);
                prop_assert!((ab.p_value - ba.p_value).abs() < 1e-12);
            }
            let ks = ks_two_sample(&a, &b);
            prop_assert!(valid(ks));
            prop_assert_eq!(ks, ks_two_sample(&b, &a));
            if let Some(s) = SampleSummary::from_samples(&a)
                && let Some((lo, hi)) = mean_interval(&s, 0.95)
            {
                prop_assert!(lo <= s.mean && s.mean <= hi);
            }
        }

        #[test]
        fn count_tests_never_panic_and_p_is_a_probability(
            s_a in any_count(), n_a in any_count(), s_b in any_count(), n_b in any_count(),
            confidence in prop_oneof![0.0..1.0f64, Just(f64::NAN), Just(1.0), Just(-1.0)],
            tau in prop_oneof![1e-4..1.0f64, Just(0.0), Just(f64::NAN), Just(f64::INFINITY)],
        ) {
            prop_assert!(valid(two_proportion_z_test(s_a, n_a, s_b, n_b)));
            prop_assert!(valid(chi_square_2x2(s_a, n_a, s_b, n_b)));
            if let Some(p) = msprt_two_proportions(s_a, n_a, s_b, n_b, tau) {
                prop_assert!((0.0..=1.0).contains(&p));
            }
            let summary = SampleSummary { n: n_a, mean: s_a as f64, variance: n_b as f64 };
            if let Some((lo, hi)) = mean_interval(&summary, confidence) {
                prop_assert!(lo <= summary.mean && summary.mean <= hi);
            }
            if let Some((lo, hi)) = wilson_interval(s_a, n_a, confidence) {
                let rate = s_a as f64 / n_a as f64;
                prop_assert!(0.0 <= lo && lo <= rate + 1e-12 && rate <= hi + 1e-12 && hi <= 1.0);
            }
        }
    }
}
