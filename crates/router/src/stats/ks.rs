//! The two-sample Kolmogorov–Smirnov test: do two sets of model outputs come from the
//! same distribution?

use super::{TestResult, kolmogorov::kolmogorov_sf};

/// Two-sample Kolmogorov–Smirnov test, two-sided, with the asymptotic p-value.
///
/// The statistic `D` is the largest distance between the empirical distribution
/// functions of `a` and `b`. Its p-value is `P(D_n > D)` for the one-sample
/// Kolmogorov distribution at `n = round(n_a·n_b / (n_a + n_b))` (half to even), which
/// is what SciPy's `ks_2samp(a, b, method="asymp")` computes.
///
/// `None` when either sample is empty, any value is NaN, or both samples hold a single
/// value each (`n` rounds to 0 and the distribution is undefined). Identical samples
/// give `D = 0` and `p = 1`.
pub fn ks_two_sample(a: &[f64], b: &[f64]) -> Option<TestResult> {
    if a.is_empty() || b.is_empty() || a.iter().chain(b).any(|x| x.is_nan()) {
        return None;
    }
    let (n_a, n_b) = (a.len() as f64, b.len() as f64);
    let effective = (n_a * n_b / (n_a + n_b)).round_ties_even();
    if effective < 1.0 {
        return None;
    }
    let statistic = ks_statistic(a, b);
    Some(TestResult {
        statistic,
        p_value: kolmogorov_sf(effective as u64, statistic),
    })
}

/// `max |F_a(x) - F_b(x)|` over every observed `x`; samples must be free of NaN.
fn ks_statistic(a: &[f64], b: &[f64]) -> f64 {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (n_a, n_b) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j) = (0, 0);
    let mut d: f64 = 0.0;
    // Walk the merged order; at each distinct value step past every copy of it in both
    // samples before comparing, so ties never open a spurious gap.
    while i < a.len() && j < b.len() {
        let x = if a[i] <= b[j] { a[i] } else { b[j] };
        while i < a.len() && a[i] == x {
            i += 1;
        }
        while j < b.len() && b[j] == x {
            j += 1;
        }
        d = d.max((i as f64 / n_a - j as f64 / n_b).abs());
    }
    // Past the end of one sample the gap only closes, so the maximum is already found.
    d
}

#[cfg(test)]
mod tests {
    use super::super::test_support::assert_close;
    use super::*;

    /// Deterministic samples spread over [shift, shift + scale), reproducible in Python.
    fn spread(n: usize, step: usize, modulus: usize, scale: f64, shift: f64) -> Vec<f64> {
        (0..n)
            .map(|i| ((i * step) % modulus) as f64 / modulus as f64 * scale + shift)
            .collect()
    }

    fn a(n: usize) -> Vec<f64> {
        spread(n, 7919, 1009, 1.0, 0.0)
    }

    fn b(n: usize, scale: f64, shift: f64) -> Vec<f64> {
        spread(n, 7907, 1013, scale, shift)
    }

    #[test]
    fn matches_scipy_ks_2samp_asymp() {
        // python: import numpy as np; from scipy.stats import ks_2samp
        // a = lambda n: [((i*7919) % 1009)/1009*1.0 + 0.0 for i in range(n)]
        // b = lambda n, scale, shift: [((j*7907) % 1013)/1013*scale + shift for j in range(n)]
        // ks_2samp(a(n_a), b(n_b, scale, shift), method="asymp") for each row:
        // (n_a, n_b, scale, shift, statistic, p-value)
        let cases = [
            (8, 10, 1.0, 0.3, 0.375, 0.51953125),
            (60, 80, 1.0, 0.05, 0.09999999999999998, 0.8525202451245393),
            (60, 80, 1.0, 0.15, 0.19999999999999996, 0.1143969263143817),
            (60, 80, 1.0, 0.3, 0.35, 0.0003150065838537298),
            (60, 80, 0.5, 0.6, 0.6041666666666667, 2.03708642208554e-12),
            (
                1000,
                1500,
                1.0,
                0.03,
                0.035333333333333335,
                0.4322184078004965,
            ),
            (
                1000,
                1500,
                1.0,
                0.08,
                0.08500000000000008,
                0.0003208976481628283,
            ),
            (
                1000,
                1500,
                0.9,
                0.0,
                0.09999999999999998,
                1.1239700624505063e-05,
            ),
        ];
        for (n_a, n_b, scale, shift, statistic, p_value) in cases {
            let t = ks_two_sample(&a(n_a), &b(n_b, scale, shift)).expect("valid samples");
            assert_eq!(t.statistic, statistic, "D for {n_a}/{n_b} shift {shift}");
            assert_close(t.p_value, p_value, 1e-9);
        }
    }

    #[test]
    fn ties_within_and_across_samples() {
        let x = [1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 5.0, 5.0];
        let y = [1.0, 2.0, 2.0, 4.0, 4.0, 5.0, 6.0];
        // python: ks_2samp([1,1,2,2,2,3,5,5], [1,2,2,4,4,5,6], method="asymp")
        let t = ks_two_sample(&x, &y).expect("valid samples");
        assert_eq!(t.statistic, 0.32142857142857145);
        assert_close(t.p_value, 0.7019601207830071, 1e-9);
    }

    #[test]
    fn degenerate_samples() {
        assert_eq!(ks_two_sample(&[], &[1.0]), None);
        assert_eq!(ks_two_sample(&[1.0], &[f64::NAN]), None);
        assert_eq!(ks_two_sample(&[1.0], &[2.0]), None);
        let same = ks_two_sample(&[3.0; 20], &[3.0; 30]).expect("valid samples");
        assert_eq!((same.statistic, same.p_value), (0.0, 1.0));
        let apart = ks_two_sample(&[0.0; 20], &[1.0; 30]).expect("valid samples");
        assert_eq!(apart.statistic, 1.0);
        assert!(apart.p_value < 1e-10);
    }
}
