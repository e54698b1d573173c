//! The Mann–Whitney U rank test, used for latency (skewed, heavy-tailed data where a
//! t-test on means would be dominated by a few slow requests).

use super::{TestResult, normal_two_sided_p};

/// Mann–Whitney U test of `a` against `b`, two-sided, by the normal approximation with
/// tie correction and **without** continuity correction.
///
/// The statistic is `U` of `a`: the number of pairs `(x in a, y in b)` with `x > y`,
/// ties counting one half (average ranks), so it is above `n_a·n_b/2` when `a` tends
/// to be larger. Then
/// `z = (U - n_a·n_b/2) / √(n_a·n_b/12 · ((n+1) - Σ(t³-t)/(n(n-1))))`, with `t` the size
/// of each group of tied values, and `p = 2·P(Z > |z|)`. This equals SciPy's
/// `mannwhitneyu(a, b, use_continuity=False, method="asymptotic")`; the approximation
/// is good once both samples have more than about 20 values, which any latency
/// comparison worth reporting has.
///
/// `None` when either sample is empty, any value is NaN, or every value in both
/// samples is equal (no ranking information).
pub fn mann_whitney_u(a: &[f64], b: &[f64]) -> Option<TestResult> {
    if a.is_empty() || b.is_empty() || a.iter().chain(b).any(|x| x.is_nan()) {
        return None;
    }
    // (value, from a?) sorted by value; ties are resolved below by average ranks.
    let mut all: Vec<(f64, bool)> = a
        .iter()
        .map(|&x| (x, true))
        .chain(b.iter().map(|&y| (y, false)))
        .collect();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));

    let mut rank_sum_a = 0.0;
    let mut tie_term = 0.0;
    let mut start = 0;
    while start < all.len() {
        let value = all[start].0;
        // `==` rather than total_cmp so that -0.0 and 0.0 tie, as they do in SciPy.
        let end = start + all[start..].iter().take_while(|x| x.0 == value).count();
        let t = (end - start) as f64;
        // Ranks start + 1 ..= end share their average.
        let average_rank = (start + 1 + end) as f64 / 2.0;
        let in_a = all[start..end].iter().filter(|x| x.1).count() as f64;
        rank_sum_a += average_rank * in_a;
        tie_term += t * t * t - t;
        start = end;
    }

    let (n_a, n_b) = (a.len() as f64, b.len() as f64);
    let n = n_a + n_b;
    let u = rank_sum_a - n_a * (n_a + 1.0) / 2.0;
    let variance = n_a * n_b / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0)));
    if variance <= 0.0 || variance.is_nan() {
        return None;
    }
    let z = (u - n_a * n_b / 2.0) / variance.sqrt();
    Some(TestResult {
        statistic: u,
        p_value: normal_two_sided_p(z),
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::assert_close;
    use super::*;

    /// Latencies in whole milliseconds with many ties, reproducible in Python.
    fn latencies(n: usize, step: usize, modulus: usize, offset: f64) -> Vec<f64> {
        (0..n)
            .map(|i| ((i * step) % modulus) as f64 + offset)
            .collect()
    }

    #[test]
    fn matches_scipy_with_ties() {
        let a = latencies(40, 37, 23, 10.0);
        let b = latencies(55, 41, 29, 12.0);
        // python: from scipy.stats import mannwhitneyu
        // a = [(i*37 % 23) + 10.0 for i in range(40)]; b = [(i*41 % 29) + 12.0 for i in range(55)]
        // mannwhitneyu(a, b, use_continuity=False, method="asymptotic")
        let t = mann_whitney_u(&a, &b).expect("valid samples");
        assert_close(t.statistic, 720.0, 1e-12);
        assert_close(t.p_value, 0.0041559792920023274, 1e-9);
        // mannwhitneyu(b, a, use_continuity=False, method="asymptotic")
        let t = mann_whitney_u(&b, &a).expect("valid samples");
        assert_close(t.statistic, 1480.0, 1e-12);
        assert_close(t.p_value, 0.0041559792920023274, 1e-9);
    }

    #[test]
    fn matches_scipy_on_a_clear_shift() {
        let a = latencies(30, 7, 31, 0.25);
        let b = latencies(35, 11, 37, 9.5);
        // python: a = [(i*7 % 31) + 0.25 for i in range(30)]; b = [(i*11 % 37) + 9.5 for i in range(35)]
        // mannwhitneyu(a, b, use_continuity=False, method="asymptotic")
        let t = mann_whitney_u(&a, &b).expect("valid samples");
        assert_close(t.statistic, 210.0, 1e-12);
        assert_close(t.p_value, 3.396718517977363e-05, 1e-9);
    }

    #[test]
    fn degenerate_samples() {
        assert_eq!(mann_whitney_u(&[], &[1.0]), None);
        assert_eq!(mann_whitney_u(&[1.0], &[]), None);
        assert_eq!(mann_whitney_u(&[1.0, f64::NAN], &[2.0]), None);
        assert_eq!(mann_whitney_u(&[4.0; 5], &[4.0; 7]), None);
        // Signed zeros are the same latency.
        assert_eq!(mann_whitney_u(&[0.0, 0.0], &[-0.0, -0.0]), None);
    }
}
