//! An always-valid p-value for a difference of two rates, so a canary report may be
//! read after every batch of requests without inflating false positives.
//!
//! A fixed-sample p-value (the z-test) is only valid at one pre-planned sample size:
//! checking it after every batch and stopping at the first `p < α` rejects a true null
//! far more often than `α` (about 25% with 20 looks at α = 5%). The mixture sequential
//! probability ratio test (mSPRT) of Johari, Pekelis and Walsh, "Always Valid
//! Inference: Continuous Monitoring of A/B Tests" (arXiv 1512.04922; applied in
//! Johari, Koomen, Pekelis and Walsh, "Peeking at A/B Tests", KDD 2017) instead gives a
//! p-value process with `P(p_n <= α for some n) <= α` under the null. For rates the
//! variance is estimated from the data, so the guarantee holds as samples grow (as in
//! the paper's treatment of binary outcomes); the simulation in the tests shows it at
//! a few thousand requests.

/// Always-valid p-value of the normal-mixture mSPRT for `H0: rate_a = rate_b`, from the
/// counts so far, with mixing scale `tau` (> 0).
///
/// With `Δ̂ = s_a/n_a - s_b/n_b` and `V` its variance under the null (pooled rate `p`:
/// `V = p(1-p)(1/n_a + 1/n_b)`), and a `N(0, τ²)` prior on the true difference, the
/// likelihood ratio of the mixture against the null is, in closed form,
///
/// ```text
/// Λ = √(V / (V + τ²)) · exp(τ² Δ̂² / (2 V (V + τ²)))
/// ```
///
/// and `p = min(1, 1/Λ)`. This is one look; the sequence of looks is kept always-valid
/// by taking the running minimum ([`SequentialTest`]). Choose `tau` near the size of
/// difference worth detecting (e.g. 0.01 for one percentage point of error rate):
/// far larger or smaller only costs power, never validity.
///
/// `None` when a sample is empty, a count exceeds its total, `tau` is not a positive
/// finite number, or the pooled rate is 0 or 1 (no variance: both arms identical).
pub fn msprt_two_proportions(s_a: u64, n_a: u64, s_b: u64, n_b: u64, tau: f64) -> Option<f64> {
    if !(tau.is_finite() && tau > 0.0) || n_a == 0 || n_b == 0 || s_a > n_a || s_b > n_b {
        return None;
    }
    let (s_a, n_a, s_b, n_b) = (s_a as f64, n_a as f64, s_b as f64, n_b as f64);
    let pooled = (s_a + s_b) / (n_a + n_b);
    let v = pooled * (1.0 - pooled) * (1.0 / n_a + 1.0 / n_b);
    if v <= 0.0 {
        return None;
    }
    let delta = s_a / n_a - s_b / n_b;
    let tau2 = tau * tau;
    // ln Λ, so that a decisive difference underflows p to 0 instead of overflowing Λ.
    let log_lambda = 0.5 * (v / (v + tau2)).ln() + tau2 * delta * delta / (2.0 * v * (v + tau2));
    Some((-log_lambda).exp().clamp(0.0, 1.0))
}

/// The always-valid p-value of one running experiment, updated at each look.
///
/// Feed it the cumulative counts at every look; the p-value it reports is the minimum
/// over all looks so far, which is itself always valid and never goes back up, so a
/// dashboard can act on it whenever it is read.
#[derive(Debug, Clone, PartialEq)]
pub struct SequentialTest {
    tau: f64,
    p_value: f64,
    looks: u64,
}

impl SequentialTest {
    /// A test with mixing scale `tau` (see [`msprt_two_proportions`]); `None` unless
    /// `tau` is positive and finite.
    pub fn new(tau: f64) -> Option<SequentialTest> {
        (tau.is_finite() && tau > 0.0).then_some(SequentialTest {
            tau,
            p_value: 1.0,
            looks: 0,
        })
    }

    /// Records a look at the cumulative counts and returns the running p-value. A look
    /// with no defined p-value (no traffic yet, no variance) counts but changes nothing.
    pub fn observe(&mut self, s_a: u64, n_a: u64, s_b: u64, n_b: u64) -> f64 {
        self.looks += 1;
        if let Some(p) = msprt_two_proportions(s_a, n_a, s_b, n_b, self.tau) {
            self.p_value = self.p_value.min(p);
        }
        self.p_value
    }

    /// The always-valid p-value: the smallest seen at any look (1 before any).
    pub fn p_value(&self) -> f64 {
        self.p_value
    }

    /// Whether the null (equal rates) is rejected at level `alpha`.
    pub fn rejects(&self, alpha: f64) -> bool {
        self.p_value <= alpha
    }

    /// How many looks have been recorded.
    pub fn looks(&self) -> u64 {
        self.looks
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::assert_close;
    use super::*;
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    /// The fixed-sample z-test p-value, read at every look for contrast.
    fn naive_z_p(s_a: u64, n_a: u64, s_b: u64, n_b: u64) -> Option<f64> {
        super::super::two_proportion_z_test(s_a, n_a, s_b, n_b).map(|t| t.p_value)
    }

    #[test]
    fn closed_form_matches_numerical_mixture() {
        // The mixture likelihood ratio integrated numerically, independent of the closed
        // form. For (s_a, n_a, s_b, n_b, tau):
        // python: import numpy as np; from scipy import integrate, stats
        // pa, pb, p = s_a/n_a, s_b/n_b, (s_a+s_b)/(n_a+n_b); V = p*(1-p)*(1/n_a+1/n_b); d = pa-pb
        // 1/integrate.quad(lambda t: stats.norm.pdf(d, t, V**.5)/stats.norm.pdf(d, 0, V**.5)*stats.norm.pdf(t, 0, tau), -1, 1, points=[0, d], epsabs=0, epsrel=1e-13, limit=200)[0]
        let cases = [
            (120, 2000, 165, 2000, 0.02, 0.09965396846577058),
            (120, 2000, 160, 2100, 0.02, 0.4390919151974233),
            (30, 400, 9, 410, 0.05, 0.011610234218238811),
            (530, 5000, 450, 5000, 0.01, 0.13489742456309),
        ];
        for (s_a, n_a, s_b, n_b, tau, expected) in cases {
            let p = msprt_two_proportions(s_a, n_a, s_b, n_b, tau).expect("valid counts");
            assert_close(p, expected, 1e-9);
        }
    }

    #[test]
    fn large_true_difference_is_detected() {
        // 10% vs 15% error rate with 4000 requests per arm.
        let p = msprt_two_proportions(400, 4000, 600, 4000, 0.05).expect("valid counts");
        assert!(p < 1e-6, "p = {p}");
        // And with a small sample the same rates are not yet conclusive.
        let p = msprt_two_proportions(4, 40, 6, 40, 0.05).expect("valid counts");
        assert!(p > 0.5, "p = {p}");
    }

    #[test]
    fn always_valid_p_is_more_conservative_than_the_fixed_sample_p() {
        for (s_a, n_a, s_b, n_b) in [
            (120, 2000, 150, 2100),
            (30, 400, 9, 410),
            (50, 100, 40, 100),
        ] {
            let fixed = naive_z_p(s_a, n_a, s_b, n_b).expect("valid counts");
            let sequential = msprt_two_proportions(s_a, n_a, s_b, n_b, 0.05).expect("valid");
            assert!(sequential >= fixed, "{sequential} < {fixed}");
        }
    }

    #[test]
    fn degenerate_input() {
        assert_eq!(msprt_two_proportions(0, 0, 1, 10, 0.1), None);
        assert_eq!(msprt_two_proportions(11, 10, 1, 10, 0.1), None);
        assert_eq!(msprt_two_proportions(0, 10, 0, 10, 0.1), None);
        assert_eq!(msprt_two_proportions(1, 10, 1, 10, 0.0), None);
        assert_eq!(msprt_two_proportions(1, 10, 1, 10, f64::NAN), None);
        assert_eq!(msprt_two_proportions(1, 10, 1, 10, f64::INFINITY), None);
        assert_eq!(SequentialTest::new(-1.0), None);
    }

    #[test]
    fn running_p_never_rises() {
        let mut test = SequentialTest::new(0.05).expect("valid tau");
        assert_eq!(test.p_value(), 1.0);
        assert_eq!(test.observe(0, 0, 0, 0), 1.0);
        let strong = test.observe(30, 400, 9, 410);
        // The difference then vanishes; the record of the earlier look stays.
        let later = test.observe(60, 1000, 59, 1000);
        assert_eq!(later, strong);
        assert_eq!(test.looks(), 3);
        assert!(test.rejects(strong) && !test.rejects(strong / 2.0));
    }

    /// Runs `experiments` A/A (or A/B) experiments with `looks` looks of `batch`
    /// requests per arm each; returns the share in which the always-valid p and the
    /// naive z-test p ever fell to `alpha` or below.
    fn simulate(rate_a: f64, rate_b: f64, experiments: u32, looks: u32, alpha: f64) -> (f64, f64) {
        const BATCH: u64 = 200;
        let mut rng = SmallRng::seed_from_u64(0x5eed_a71a);
        let (mut sequential_hits, mut naive_hits) = (0, 0);
        for _ in 0..experiments {
            let mut test = SequentialTest::new(0.02).expect("valid tau");
            let (mut s_a, mut s_b, mut n) = (0, 0, 0);
            let mut naive_rejected = false;
            for _ in 0..looks {
                s_a += (0..BATCH).filter(|_| rng.random_bool(rate_a)).count() as u64;
                s_b += (0..BATCH).filter(|_| rng.random_bool(rate_b)).count() as u64;
                n += BATCH;
                test.observe(s_a, n, s_b, n);
                naive_rejected |= naive_z_p(s_a, n, s_b, n).is_some_and(|p| p <= alpha);
            }
            sequential_hits += u32::from(test.rejects(alpha));
            naive_hits += u32::from(naive_rejected);
        }
        let share = |hits: u32| f64::from(hits) / f64::from(experiments);
        (share(sequential_hits), share(naive_hits))
    }

    #[test]
    fn peeking_under_the_null_keeps_false_positives_at_alpha() {
        let (sequential, naive) = simulate(0.1, 0.1, 200, 20, 0.05);
        // 200 experiments: a true 5% rate has a standard error of 1.5%, so 8% would be
        // two standard errors above it.
        assert!(
            sequential <= 0.08,
            "always-valid false positive rate {sequential}"
        );
        // Peeking at a fixed-sample test 20 times rejects far more often than 5%.
        assert!(naive >= 0.15, "naive peeking false positive rate {naive}");
    }

    #[test]
    fn peeking_under_an_alternative_still_finds_the_difference() {
        let (sequential, _) = simulate(0.10, 0.13, 100, 20, 0.05);
        assert!(sequential >= 0.8, "always-valid power {sequential}");
    }
}
