//! Distribution drift between a reference sample and a window of live values, and the
//! correction for testing many features at once: the Population Stability Index, a
//! chi-square test of category frequencies (a classifier's predicted classes), and
//! Benjamini–Hochberg adjusted p-values.

use statrs::distribution::{ChiSquared, ContinuousCDF};

use super::TestResult;

/// The proportion an empty bin counts as in [`population_stability_index`], so a bin
/// one side never fills gives a large but finite term (the usual convention).
pub const PSI_EMPTY_BIN: f64 = 1e-4;

/// The Population Stability Index of `current` against `reference`:
/// `Σ (c_i − r_i) · ln(c_i / r_i)` over `bins` bins whose edges are the reference's
/// quantiles (linear interpolation, NumPy's default), a value on an edge counting in
/// the bin above it, and an empty bin's proportion taken as [`PSI_EMPTY_BIN`]. 0 for
/// the same distribution; by common rule of thumb under 0.1 is stable, 0.1–0.25 a
/// moderate shift, above 0.25 a large one.
///
/// `None` when either sample is empty, any value is NaN or infinite (the quantile
/// edges would be undefined), or `bins` is below 2.
pub fn population_stability_index(reference: &[f64], current: &[f64], bins: usize) -> Option<f64> {
    if reference.is_empty()
        || current.is_empty()
        || bins < 2
        || reference.iter().chain(current).any(|x| !x.is_finite())
    {
        return None;
    }
    let mut sorted = reference.to_vec();
    sorted.sort_by(f64::total_cmp);
    let edges: Vec<f64> = (1..bins)
        .map(|i| quantile(&sorted, i as f64 / bins as f64))
        .collect();
    let counts = |values: &[f64]| {
        let mut counts = vec![0u64; bins];
        for value in values {
            // The number of edges at or below the value: its bin.
            counts[edges.partition_point(|edge| edge <= value)] += 1;
        }
        counts
    };
    category_stability_index(&counts(reference), &counts(current))
}

/// The Population Stability Index of two sets of category counts (the same
/// categories, in the same order; a classifier's predicted classes, or the bins of
/// [`population_stability_index`]), an empty category's proportion taken as
/// [`PSI_EMPTY_BIN`].
///
/// `None` when the two have different lengths or either side has no count.
pub fn category_stability_index(reference: &[u64], current: &[u64]) -> Option<f64> {
    let (n_r, n_c) = (
        reference.iter().sum::<u64>() as f64,
        current.iter().sum::<u64>() as f64,
    );
    if reference.len() != current.len() || n_r == 0.0 || n_c == 0.0 {
        return None;
    }
    Some(
        reference
            .iter()
            .zip(current)
            .map(|(r, c)| {
                let r = (*r as f64 / n_r).max(PSI_EMPTY_BIN);
                let c = (*c as f64 / n_c).max(PSI_EMPTY_BIN);
                (c - r) * (c / r).ln()
            })
            .sum(),
    )
}

/// The `q` quantile of `sorted` (not empty) by linear interpolation between order
/// statistics (NumPy's default method).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * q;
    let low = h.floor() as usize;
    let high = (low + 1).min(sorted.len() - 1);
    sorted[low] + (h - low as f64) * (sorted[high] - sorted[low])
}

/// Pearson's chi-square test that two sets of category counts (the same categories,
/// in the same order) come from one distribution: the 2×k contingency table without
/// continuity correction, categories empty on both sides left out. What SciPy's
/// `chi2_contingency([reference, current], correction=False)` computes.
///
/// `None` when the two have different lengths, either side has no count, or fewer
/// than two categories are seen.
pub fn chi_square_homogeneity(reference: &[u64], current: &[u64]) -> Option<TestResult> {
    if reference.len() != current.len() {
        return None;
    }
    let columns: Vec<(f64, f64)> = reference
        .iter()
        .zip(current)
        .filter(|(r, c)| **r > 0 || **c > 0)
        .map(|(r, c)| (*r as f64, *c as f64))
        .collect();
    let (n_r, n_c) = columns
        .iter()
        .fold((0.0, 0.0), |(a, b), (r, c)| (a + r, b + c));
    if columns.len() < 2 || n_r == 0.0 || n_c == 0.0 {
        return None;
    }
    let total = n_r + n_c;
    let statistic: f64 = columns
        .iter()
        .map(|(r, c)| {
            let column = r + c;
            let (e_r, e_c) = (n_r * column / total, n_c * column / total);
            (r - e_r).powi(2) / e_r + (c - e_c).powi(2) / e_c
        })
        .sum();
    let chi2 = ChiSquared::new((columns.len() - 1) as f64).ok()?;
    Some(TestResult {
        statistic,
        p_value: chi2.sf(statistic),
    })
}

/// Benjamini–Hochberg adjusted p-values (the false discovery rate across many
/// features): a feature drifts at level `alpha` when its adjusted p-value is below
/// `alpha`. In the input's order; what SciPy's
/// `false_discovery_control(p, method="bh")` computes. NaN stays NaN and is left out of
/// the ranking.
pub fn benjamini_hochberg(p_values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..p_values.len())
        .filter(|&i| !p_values[i].is_nan())
        .collect();
    order.sort_by(|&a, &b| p_values[a].total_cmp(&p_values[b]));
    let m = order.len() as f64;
    let mut adjusted = vec![f64::NAN; p_values.len()];
    let mut running = 1.0f64;
    // From the largest p down: p·m/rank, kept monotone and at most 1.
    for (rank, &index) in order.iter().enumerate().rev() {
        // `.max(p)`: p·m/m can round below p; the adjusted value never is.
        running = running
            .min(p_values[index] * m / (rank + 1) as f64)
            .max(p_values[index]);
        adjusted[index] = running;
    }
    adjusted
}

#[cfg(test)]
mod tests {
    use super::super::test_support::assert_close;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn psi_matches_numpy() {
        // ref = [0.1*i for i in range(20)]; cur = [0.1*i + 0.5 for i in range(20)]
        // edges = np.quantile(ref, np.linspace(0, 1, 11)[1:-1]); proportions by
        // np.searchsorted(edges, x, side='right'), floored at 1e-4;
        // np.sum((c - r) * np.log(c / r))
        let reference: Vec<f64> = (0..20).map(|i| 0.1 * f64::from(i)).collect();
        let current: Vec<f64> = reference.iter().map(|x| x + 0.5).collect();
        let psi = population_stability_index(&reference, &current, 10).expect("defined");
        assert_close(psi, 1.728_017_605_892_470_3, 1e-12);
        assert_eq!(
            population_stability_index(&reference, &reference, 10),
            Some(0.0)
        );
        // Ties on the edges, 5 bins.
        let reference = [
            1., 1., 1., 2., 2., 3., 4., 5., 5., 5., 6., 7., 8., 9., 9., 9., 9., 10.,
        ];
        let current = [
            1., 2., 2., 2., 3., 3., 3., 4., 4., 4., 5., 9., 10., 10., 11., 12.,
        ];
        let psi = population_stability_index(&reference, &current, 5).expect("defined");
        assert_close(psi, 1.403_423_108_664_430_4, 1e-12);
    }

    #[test]
    fn category_psi_matches_numpy() {
        // r = np.maximum(np.array([30, 50, 20, 0]) / 100, 1e-4); c likewise of
        // [40, 35, 25, 5] / 105; np.sum((c - r) * np.log(c / r))
        let psi = category_stability_index(&[30, 50, 20, 0], &[40, 35, 25, 5]).expect("defined");
        assert_close(psi, 0.386_552_216_607_867_54, 1e-12);
        assert_eq!(category_stability_index(&[1, 2], &[2, 4]), Some(0.0));
        assert_eq!(category_stability_index(&[1, 2], &[0, 0]), None);
        assert_eq!(category_stability_index(&[1], &[1, 2]), None);
    }

    #[test]
    fn psi_is_undefined_without_data() {
        assert_eq!(population_stability_index(&[], &[1.0], 10), None);
        assert_eq!(population_stability_index(&[1.0], &[], 10), None);
        assert_eq!(population_stability_index(&[1.0], &[f64::NAN], 10), None);
        assert_eq!(population_stability_index(&[1.0], &[1.0], 1), None);
        assert_eq!(
            population_stability_index(&[f64::NEG_INFINITY, 1.0, 2.0], &[1.0], 4),
            None
        );
        assert_eq!(
            chi_square_homogeneity(&[u64::MAX, 1], &[u64::MAX, 1]).map(|r| r.statistic),
            Some(0.0)
        );
    }

    #[test]
    fn chi_square_matches_scipy() {
        // scipy.stats.chi2_contingency([[30, 50, 20], [40, 35, 25]], correction=False)
        let result = chi_square_homogeneity(&[30, 50, 20], &[40, 35, 25]).expect("defined");
        assert_close(result.statistic, 4.631_185_807_656_395, 1e-12);
        assert_close(result.p_value, 0.098_707_642_509_992_53, 1e-9);
        // A category empty on both sides is left out: [[30, 20], [40, 25]].
        let result = chi_square_homogeneity(&[30, 0, 20], &[40, 0, 25]).expect("defined");
        assert_close(result.statistic, 0.028_083_028_083_028_025, 1e-9);
        assert_close(result.p_value, 0.866_913_772_832_034_4, 1e-9);
        assert_eq!(chi_square_homogeneity(&[5, 0], &[0, 0]), None);
        assert_eq!(chi_square_homogeneity(&[5, 0], &[3, 0]), None);
        assert_eq!(chi_square_homogeneity(&[5], &[3, 1]), None);
    }

    #[test]
    fn benjamini_hochberg_matches_scipy() {
        // scipy.stats.false_discovery_control([0.01, 0.04, 0.03, 0.005, 0.2, 0.5], method='bh')
        let adjusted = benjamini_hochberg(&[0.01, 0.04, 0.03, 0.005, 0.2, 0.5]);
        let expected = [0.03, 0.06, 0.06, 0.03, 0.24, 0.5];
        for (a, e) in adjusted.iter().zip(expected) {
            assert_close(*a, e, 1e-12);
        }
        let with_nan = benjamini_hochberg(&[0.01, f64::NAN, 0.04]);
        assert!(with_nan[1].is_nan());
        assert_close(with_nan[0], 0.02, 1e-12);
        assert_close(with_nan[2], 0.04, 1e-12);
        assert!(benjamini_hochberg(&[]).is_empty());
    }

    proptest! {
        /// PSI is never negative, and 0 for a sample against itself.
        #[test]
        fn psi_is_a_divergence(
            reference in prop::collection::vec(-1e3..1e3f64, 1..200),
            current in prop::collection::vec(-1e3..1e3f64, 1..200),
            bins in 2usize..20,
        ) {
            let psi = population_stability_index(&reference, &current, bins).expect("defined");
            prop_assert!(psi >= 0.0, "{}", psi);
            prop_assert_eq!(population_stability_index(&reference, &reference, bins), Some(0.0));
        }

        /// Adjusted p-values are at least the raw ones, at most 1, and keep their order.
        #[test]
        fn bh_adjusts_upwards_and_keeps_order(p in prop::collection::vec(0.0..=1.0f64, 1..50)) {
            let adjusted = benjamini_hochberg(&p);
            for (raw, adj) in p.iter().zip(&adjusted) {
                prop_assert!(*adj >= *raw && *adj <= 1.0);
            }
            for i in 0..p.len() {
                for j in 0..p.len() {
                    if p[i] < p[j] {
                        prop_assert!(adjusted[i] <= adjusted[j]);
                    }
                }
            }
        }
    }
}
