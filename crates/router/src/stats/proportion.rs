//! Fixed-sample tests for a difference of two rates (error rate, success rate).

use statrs::distribution::{ChiSquared, ContinuousCDF};

use super::{TestResult, normal_two_sided_p};

/// Rates and pooled rate of two binomial samples, or `None` when a sample is empty or
/// claims more successes than trials.
fn rates(s_a: u64, n_a: u64, s_b: u64, n_b: u64) -> Option<[f64; 5]> {
    if n_a == 0 || n_b == 0 || s_a > n_a || s_b > n_b {
        return None;
    }
    let (s_a, n_a, s_b, n_b) = (s_a as f64, n_a as f64, s_b as f64, n_b as f64);
    Some([s_a / n_a, s_b / n_b, (s_a + s_b) / (n_a + n_b), n_a, n_b])
}

/// Pooled two-proportion z-test of `s_a / n_a` against `s_b / n_b`, two-sided.
///
/// The statistic is `z = (p_a - p_b) / √(p(1-p)(1/n_a + 1/n_b))` with `p` the pooled
/// rate, so it is positive when A's rate is higher. This is statsmodels'
/// `proportions_ztest` with its defaults. `None` when either sample is empty, a count
/// exceeds its total, or the pooled rate is 0 or 1 (both samples all successes or all
/// failures: there is no variance to test against).
pub fn two_proportion_z_test(s_a: u64, n_a: u64, s_b: u64, n_b: u64) -> Option<TestResult> {
    let [p_a, p_b, pooled, n_a, n_b] = rates(s_a, n_a, s_b, n_b)?;
    let variance = pooled * (1.0 - pooled) * (1.0 / n_a + 1.0 / n_b);
    if variance <= 0.0 {
        return None;
    }
    let z = (p_a - p_b) / variance.sqrt();
    Some(TestResult {
        statistic: z,
        p_value: normal_two_sided_p(z),
    })
}

/// Pearson's chi-square test of independence on the 2×2 table
/// `[[s_a, n_a - s_a], [s_b, n_b - s_b]]`, without Yates' continuity correction, one
/// degree of freedom.
///
/// Without the correction the statistic equals the square of
/// [`two_proportion_z_test`]'s and the p-value is the same; it is here for reports that
/// speak in chi-square. `None` in the same cases as the z-test (an expected cell count
/// would be zero).
pub fn chi_square_2x2(s_a: u64, n_a: u64, s_b: u64, n_b: u64) -> Option<TestResult> {
    let [_, _, pooled, n_a, n_b] = rates(s_a, n_a, s_b, n_b)?;
    if pooled <= 0.0 || pooled >= 1.0 {
        return None;
    }
    let (s_a, s_b) = (s_a as f64, s_b as f64);
    let cells = [
        (s_a, n_a * pooled),
        (n_a - s_a, n_a * (1.0 - pooled)),
        (s_b, n_b * pooled),
        (n_b - s_b, n_b * (1.0 - pooled)),
    ];
    let statistic: f64 = cells
        .iter()
        .map(|(observed, expected)| (observed - expected).powi(2) / expected)
        .sum();
    let chi2 = ChiSquared::new(1.0).ok()?;
    Some(TestResult {
        statistic,
        p_value: chi2.sf(statistic).clamp(0.0, 1.0),
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::assert_close;
    use super::*;

    #[test]
    fn z_test_matches_statsmodels() {
        // python: from statsmodels.stats.proportion import proportions_ztest
        // proportions_ztest([120, 150], [2000, 2100])
        let t = two_proportion_z_test(120, 2000, 150, 2100).expect("valid counts");
        assert_close(t.statistic, -1.4747800411431655, 1e-12);
        assert_close(t.p_value, 0.14027168882592367, 1e-9);
        // proportions_ztest([30, 9], [400, 410])
        let t = two_proportion_z_test(30, 400, 9, 410).expect("valid counts");
        assert_close(t.statistic, 3.5259840669255547, 1e-12);
        assert_close(t.p_value, 0.00042191235122202725, 1e-9);
    }

    #[test]
    fn chi_square_matches_scipy_and_equals_z_squared() {
        // python: from scipy.stats import chi2_contingency
        // chi2_contingency([[120, 1880], [150, 1950]], correction=False)[:2]
        let chi = chi_square_2x2(120, 2000, 150, 2100).expect("valid counts");
        assert_close(chi.statistic, 2.1749761697542427, 1e-12);
        assert_close(chi.p_value, 0.1402716888259189, 1e-9);
        for (s_a, n_a, s_b, n_b) in [(120, 2000, 150, 2100), (30, 400, 9, 410), (1, 3, 2, 2)] {
            let z = two_proportion_z_test(s_a, n_a, s_b, n_b).expect("valid counts");
            let chi = chi_square_2x2(s_a, n_a, s_b, n_b).expect("valid counts");
            assert_close(chi.statistic, z.statistic * z.statistic, 1e-12);
            assert_close(chi.p_value, z.p_value, 1e-9);
        }
    }

    #[test]
    fn degenerate_counts_have_no_test() {
        for (s_a, n_a, s_b, n_b) in [(0, 0, 1, 10), (11, 10, 1, 10), (0, 10, 0, 20), (5, 5, 7, 7)] {
            assert_eq!(two_proportion_z_test(s_a, n_a, s_b, n_b), None);
            assert_eq!(chi_square_2x2(s_a, n_a, s_b, n_b), None);
        }
        let same = two_proportion_z_test(5, 50, 10, 100).expect("valid counts");
        assert_eq!(same.statistic, 0.0);
        assert_eq!(same.p_value, 1.0);
    }
}
