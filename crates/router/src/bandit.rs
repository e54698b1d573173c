//! Traffic shares learnt from feedback (a multi-armed bandit), pure: each arm (a
//! version) has the rewards its answers earned; a strategy turns them into shares,
//! and guardrails bound what any strategy may do.
//!
//! - [`Strategy::Thompson`]: each arm's share is the probability that it is the best,
//!   estimated by drawing from its posterior: Beta(1 + successes, 1 + failures) for
//!   correct/incorrect feedback, a Normal around the mean reward (its standard error as
//!   the spread) for numeric rewards. Arms that are clearly worse fade out; arms that
//!   may still be best keep traffic in proportion.
//! - [`Strategy::EpsilonGreedy`]: the arm with the best mean reward takes `1 - ε` and
//!   every arm shares `ε`.
//! - [`Guardrails`]: fixed shares until enough feedback has arrived (warm-up), a
//!   minimum share for every arm (so a starved arm can still show it got better) and a
//!   maximum share per arm (a version not approved for production).
//!
//! This is the policy's arithmetic, tested by simulation; the gateway's `bandit`
//! module applies it to routes.

use std::collections::BTreeMap;

use rand::Rng;
use rand_distr::{Beta, Distribution, Normal};

/// The kind of reward feedback carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewardKind {
    /// Correct (1) or incorrect (0).
    Binary,
    /// Any number, larger is better (revenue, a score).
    Numeric,
}

/// What an arm's answers have earned so far.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ArmRewards {
    /// Rewards received.
    pub count: u64,
    /// Their sum (for binary rewards, the successes).
    pub sum: f64,
    /// The sum of their squares (numeric rewards' spread).
    pub sum_squares: f64,
}

impl ArmRewards {
    /// Adds one reward.
    pub fn record(&mut self, reward: f64) {
        self.count += 1;
        self.sum += reward;
        self.sum_squares += reward * reward;
    }

    /// The mean reward; `None` before any.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// How shares are chosen from the rewards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Strategy {
    /// Each arm's share is the probability that it is the best, drawn `draws` times
    /// from the posteriors.
    Thompson {
        /// Draws per arm to estimate the probabilities (more: steadier shares).
        draws: usize,
    },
    /// The best mean takes `1 - epsilon`, and `epsilon` is shared by every arm.
    EpsilonGreedy {
        /// The share spread over every arm, from 0 to 1.
        epsilon: f64,
    },
}

/// Bounds on the shares, whatever the strategy says.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Guardrails {
    /// Until this many rewards have arrived (all arms together), the fixed shares
    /// hold.
    pub warmup_rewards: u64,
    /// Every arm's least share, from 0 to 1 (at most an equal split). Shares that keep
    /// every bound stand as they are; otherwise each arm gets this much first and the
    /// strategy's shares spread the rest.
    pub min_share: f64,
    /// Arms' greatest shares, by arm index (e.g. a version not approved).
    pub max_share: BTreeMap<usize, f64>,
}

/// The shares of `arms` (their rewards of `kind`), as `strategy` picks them within
/// `guardrails`; `fixed` are the shares before the warm-up ends (normalised; all
/// equal when they sum to nothing). The result sums to 1.
pub fn shares(
    strategy: Strategy,
    kind: RewardKind,
    guardrails: &Guardrails,
    arms: &[ArmRewards],
    fixed: &[f64],
    rng: &mut impl Rng,
) -> Vec<f64> {
    if arms.is_empty() {
        return Vec::new();
    }
    let rewards: u64 = arms.iter().map(|a| a.count).sum();
    let chosen = if rewards < guardrails.warmup_rewards {
        normalised(fixed, arms.len())
    } else {
        match strategy {
            Strategy::Thompson { draws } => thompson(kind, arms, draws.max(1), rng),
            Strategy::EpsilonGreedy { epsilon } => epsilon_greedy(arms, epsilon.clamp(0.0, 1.0)),
        }
    };
    match within(&chosen, guardrails) {
        true => chosen,
        false => bounded(&chosen, guardrails),
    }
}

/// Whether `shares` already keep every guardrail: then they stand as they are (the
/// configured weights through the warm-up, say), rather than being re-spread.
fn within(shares: &[f64], guardrails: &Guardrails) -> bool {
    let floor = guardrails.min_share.clamp(0.0, 1.0 / shares.len() as f64);
    shares.iter().enumerate().all(|(i, &share)| {
        let cap = guardrails.max_share.get(&i).copied().unwrap_or(1.0);
        share.is_finite() && share >= floor && share <= cap.max(floor)
    })
}

fn normalised(weights: &[f64], arms: usize) -> Vec<f64> {
    let total: f64 = weights
        .iter()
        .take(arms)
        .filter(|w| w.is_finite() && **w > 0.0)
        .sum();
    (0..arms)
        .map(|i| match total > 0.0 {
            true => {
                weights
                    .get(i)
                    .copied()
                    .filter(|w| w.is_finite() && *w > 0.0)
                    .unwrap_or(0.0)
                    / total
            }
            false => 1.0 / arms as f64,
        })
        .collect()
}

/// How often each arm's posterior draw is the largest, out of `draws` rounds.
fn thompson(kind: RewardKind, arms: &[ArmRewards], draws: usize, rng: &mut impl Rng) -> Vec<f64> {
    let mut wins = vec![0u64; arms.len()];
    for _ in 0..draws {
        let mut best = (0, f64::NEG_INFINITY);
        for (i, arm) in arms.iter().enumerate() {
            let draw = posterior_draw(kind, arm, rng);
            if draw > best.1 {
                best = (i, draw);
            }
        }
        wins[best.0] += 1;
    }
    wins.iter().map(|&w| w as f64 / draws as f64).collect()
}

/// What an arm's rewards say its mean reward may be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Posterior {
    /// Correct/incorrect feedback: Beta(alpha, beta), from a uniform prior.
    Beta {
        /// 1 + successes.
        alpha: f64,
        /// 1 + failures.
        beta: f64,
    },
    /// Numeric rewards: a Normal around the mean with its standard error as the
    /// spread (a wide one until the arm has two rewards).
    Normal {
        /// The mean reward (0 before any).
        mean: f64,
        /// The spread.
        sd: f64,
    },
}

impl Posterior {
    /// Its mean.
    pub fn mean(&self) -> f64 {
        match *self {
            Posterior::Beta { alpha, beta } => alpha / (alpha + beta),
            Posterior::Normal { mean, .. } => mean,
        }
    }

    /// Its standard deviation.
    pub fn sd(&self) -> f64 {
        match *self {
            Posterior::Beta { alpha, beta } => {
                let total = alpha + beta;
                (alpha * beta / (total * total * (total + 1.0))).sqrt()
            }
            Posterior::Normal { sd, .. } => sd,
        }
    }
}

/// The posterior of an arm whose rewards are of `kind`.
pub fn posterior(kind: RewardKind, arm: &ArmRewards) -> Posterior {
    match kind {
        RewardKind::Binary => {
            let successes = arm.sum.clamp(0.0, arm.count as f64);
            let failures = arm.count as f64 - successes;
            Posterior::Beta {
                alpha: 1.0 + successes,
                beta: 1.0 + failures,
            }
        }
        RewardKind::Numeric => {
            let n = arm.count as f64;
            let (mean, sd) = match arm.count {
                0 => (0.0, 1.0e6),
                1 => (arm.sum, 1.0e3),
                _ => {
                    let mean = arm.sum / n;
                    let variance = ((arm.sum_squares - n * mean * mean) / (n - 1.0)).max(1.0e-12);
                    (mean, (variance / n).sqrt())
                }
            };
            Posterior::Normal { mean, sd }
        }
    }
}

/// One draw from an arm's posterior.
fn posterior_draw(kind: RewardKind, arm: &ArmRewards, rng: &mut impl Rng) -> f64 {
    match posterior(kind, arm) {
        // Both parameters are at least 1: the distribution always exists.
        Posterior::Beta { alpha, beta } => {
            Beta::new(alpha, beta).map_or(0.5, |beta| beta.sample(rng))
        }
        Posterior::Normal { mean, sd } => Normal::new(mean, sd).map_or(mean, |n| n.sample(rng)),
    }
}

fn epsilon_greedy(arms: &[ArmRewards], epsilon: f64) -> Vec<f64> {
    let explore = epsilon / arms.len() as f64;
    // An arm without rewards counts as the best until it has some.
    let best = arms
        .iter()
        .enumerate()
        .max_by(|a, b| {
            let mean = |arm: &ArmRewards| arm.mean().unwrap_or(f64::INFINITY);
            mean(a.1).total_cmp(&mean(b.1)).then(b.0.cmp(&a.0))
        })
        .map_or(0, |(i, _)| i);
    (0..arms.len())
        .map(|i| explore + if i == best { 1.0 - epsilon } else { 0.0 })
        .collect()
}

/// `shares` brought within the guardrails: every arm first gets the minimum share, and what is
/// left is spread in proportion to `shares`, no arm past its maximum; what a full arm
/// cannot take goes to the others (equally to arms the strategy gave nothing, once the
/// rest are full). When the maximums leave no room for it all, the rest is spread
/// evenly, past them: the shares always sum to 1.
fn bounded(shares: &[f64], guardrails: &Guardrails) -> Vec<f64> {
    let arms = shares.len();
    let floor = guardrails.min_share.clamp(0.0, 1.0 / arms as f64);
    let cap = |i: usize| {
        guardrails
            .max_share
            .get(&i)
            .copied()
            .unwrap_or(1.0)
            .clamp(floor, 1.0)
    };
    let raw: Vec<f64> = shares
        .iter()
        .map(|s| if s.is_finite() { s.max(0.0) } else { 0.0 })
        .collect();
    let mut out = vec![floor; arms];
    let mut open: Vec<bool> = (0..arms).map(|i| cap(i) > floor).collect();
    let mut left = 1.0 - floor * arms as f64;
    // Each pass fills at least one more arm to its maximum, or places everything.
    for _ in 0..=arms {
        if left <= f64::EPSILON {
            break;
        }
        let with_share: Vec<usize> = (0..arms).filter(|&i| open[i] && raw[i] > 0.0).collect();
        let (takers, weight): (Vec<usize>, Box<dyn Fn(usize) -> f64>) = match with_share.is_empty()
        {
            false => (with_share, Box::new(|i| raw[i])),
            true => ((0..arms).filter(|&i| open[i]).collect(), Box::new(|_| 1.0)),
        };
        if takers.is_empty() {
            break;
        }
        let total: f64 = takers.iter().map(|&i| weight(i)).sum();
        let mut given = 0.0;
        let mut filled = false;
        for &i in &takers {
            let wanted = left * weight(i) / total;
            let room = cap(i) - out[i];
            if wanted >= room {
                out[i] = cap(i);
                open[i] = false;
                given += room;
                filled = true;
            } else {
                out[i] += wanted;
                given += wanted;
            }
        }
        left -= given;
        if !filled {
            left = 0.0;
            break;
        }
    }
    if left > f64::EPSILON {
        out.iter_mut()
            .for_each(|share| *share += left / arms as f64);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::SmallRng};

    const THOMPSON: Strategy = Strategy::Thompson { draws: 400 };

    /// `rounds` requests, each sent to an arm drawn from the current shares and
    /// rewarded 1 with the arm's probability in `truth`; shares are recomputed every
    /// `every` rewards, as a gateway would on a timer. Returns the regret (expected
    /// reward lost against always choosing the best arm) and the final shares.
    fn simulate(
        strategy: Option<Strategy>,
        truth: &[f64],
        guardrails: &Guardrails,
        rounds: usize,
        seed: u64,
    ) -> (f64, Vec<f64>) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let best = truth.iter().copied().fold(0.0, f64::max);
        let even = vec![1.0; truth.len()];
        let mut arms = vec![ArmRewards::default(); truth.len()];
        let mut current = normalised(&even, truth.len());
        let mut regret = 0.0;
        for round in 0..rounds {
            if let Some(strategy) = strategy
                && round % 50 == 0
            {
                current = shares(
                    strategy,
                    RewardKind::Binary,
                    guardrails,
                    &arms,
                    &even,
                    &mut rng,
                );
            }
            let mut pick = rng.random::<f64>();
            let arm = current
                .iter()
                .position(|&s| {
                    pick -= s;
                    pick < 0.0
                })
                .unwrap_or(truth.len() - 1);
            regret += best - truth[arm];
            let reward = f64::from(u8::from(rng.random::<f64>() < truth[arm]));
            arms[arm].record(reward);
        }
        (regret, current)
    }

    #[test]
    fn thompson_loses_less_than_a_fixed_split_and_converges_to_the_better_arm() {
        let guardrails = Guardrails {
            warmup_rewards: 100,
            min_share: 0.02,
            ..Guardrails::default()
        };
        for seed in 0..5 {
            let (fixed, _) = simulate(None, &[0.30, 0.40], &guardrails, 4000, seed);
            let (bandit, shares) = simulate(Some(THOMPSON), &[0.30, 0.40], &guardrails, 4000, seed);
            // A 50/50 split loses 0.05 a request: about 200 over 4000.
            assert!(
                bandit < 0.5 * fixed,
                "seed {seed}: regret {bandit} vs fixed {fixed}"
            );
            // Within 4000 rewards the better arm holds at least 90 %.
            assert!(shares[1] >= 0.9, "seed {seed}: shares {shares:?}");
        }
    }

    #[test]
    fn epsilon_greedy_also_beats_a_fixed_split() {
        let guardrails = Guardrails {
            warmup_rewards: 200,
            ..Guardrails::default()
        };
        let greedy = Strategy::EpsilonGreedy { epsilon: 0.1 };
        for seed in 0..5 {
            let (fixed, _) = simulate(None, &[0.30, 0.45], &guardrails, 4000, seed);
            let (bandit, shares) = simulate(Some(greedy), &[0.30, 0.45], &guardrails, 4000, seed);
            assert!(
                bandit < 0.6 * fixed,
                "seed {seed}: regret {bandit} vs fixed {fixed}"
            );
            assert!((shares[1] - 0.95).abs() < 1e-9, "seed {seed}: {shares:?}");
        }
    }

    #[test]
    fn a_broken_arm_is_starved_to_its_minimum_share() {
        let guardrails = Guardrails {
            warmup_rewards: 50,
            min_share: 0.05,
            ..Guardrails::default()
        };
        // Arm 1 fails every request (all errors are incorrect answers).
        let (_, shares) = simulate(Some(THOMPSON), &[0.6, 0.0, 0.5], &guardrails, 3000, 7);
        assert!((shares[1] - 0.05).abs() < 1e-9, "{shares:?}");
    }

    #[test]
    fn a_capped_arm_never_takes_more_than_its_cap_even_when_best() {
        let guardrails = Guardrails {
            warmup_rewards: 0,
            min_share: 0.0,
            max_share: BTreeMap::from([(1, 0.1)]),
        };
        let (_, shares) = simulate(Some(THOMPSON), &[0.2, 0.9], &guardrails, 2000, 3);
        assert!(shares[1] <= 0.1 + 1e-9, "{shares:?}");
        assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn fixed_shares_hold_during_the_warm_up() {
        let guardrails = Guardrails {
            warmup_rewards: 1000,
            ..Guardrails::default()
        };
        let mut arms = [ArmRewards::default(); 2];
        arms[0].record(1.0);
        let mut rng = SmallRng::seed_from_u64(1);
        let got = shares(
            THOMPSON,
            RewardKind::Binary,
            &guardrails,
            &arms,
            &[90.0, 10.0],
            &mut rng,
        );
        assert_eq!(got, vec![0.9, 0.1]);
    }

    #[test]
    fn numeric_rewards_favour_the_higher_mean() {
        let mut arms = [ArmRewards::default(); 2];
        let mut rng = SmallRng::seed_from_u64(5);
        for i in 0..200 {
            let noise = f64::from(i % 7) - 3.0;
            arms[0].record(10.0 + noise);
            arms[1].record(12.0 + noise);
        }
        let got = shares(
            THOMPSON,
            RewardKind::Numeric,
            &Guardrails::default(),
            &arms,
            &[],
            &mut rng,
        );
        assert!(got[1] > 0.99, "{got:?}");
    }

    proptest::proptest! {
        /// Whatever the raw shares and bounds, the result sums to 1 and keeps every
        /// arm at its minimum or more, and at its cap or less when the caps leave room.
        #[test]
        fn bounded_shares_sum_to_one_within_their_bounds(
            raw in proptest::collection::vec(0.0f64..10.0, 1..6),
            min_share in 0.0f64..0.3,
            caps in proptest::collection::btree_map(0usize..6, 0.0f64..1.0, 0..3),
        ) {
            let guardrails = Guardrails { warmup_rewards: 0, min_share, max_share: caps.clone() };
            let out = bounded(&raw, &guardrails);
            let total: f64 = out.iter().sum();
            proptest::prop_assert!((total - 1.0).abs() < 1e-9, "{out:?}");
            let floor = min_share.min(1.0 / raw.len() as f64);
            for (i, share) in out.iter().enumerate() {
                proptest::prop_assert!(*share >= floor - 1e-9, "arm {i}: {out:?}");
            }
            let room: f64 = (0..raw.len()).map(|i| caps.get(&i).copied().unwrap_or(1.0).max(floor)).sum();
            if room >= 1.0 + 1e-9 {
                for (i, share) in out.iter().enumerate() {
                    let cap = caps.get(&i).copied().unwrap_or(1.0).max(floor);
                    proptest::prop_assert!(*share <= cap + 1e-9, "arm {i} over {cap}: {out:?}");
                }
            }
        }
    }
}
