//! Bandit routes: a route whose weights a policy learns from feedback
//! (`routes.<model>.bandit`) instead of keeping the configured ones.
//!
//! The arms are the versions the route weights; the configured weights hold through a
//! warm-up, then [`aviary_router::bandit`] turns each arm's feedback (from the
//! `Feedback` RPC, counted in [`Metrics`](crate::metrics::Metrics)) into shares,
//! a failed request counting as the worst reward (incorrect, or `error_reward`),
//! within guardrails: a minimum share per arm, and with `[registry]` the canary cap as
//! the maximum of an arm not approved.
//!
//! - this file: the setting ([`BanditConfig`]), its checks, and the pure steps from
//!   feedback to weights ([`plan`]).
//! - [`driver`]: the driver that replans every bandit route when due over a target (a
//!   gateway's own routes, through [`Control`](crate::control::Control)), and the
//!   gateway's bandit state reports read.
//! - [`fleet`]: the controller's target: many gateways' feedback summed, one policy.
//! - [`assignments`]: sticky users kept on the version they were first given while
//!   the shares move.

pub mod assignments;
pub mod driver;
pub mod fleet;

use aviary_router::bandit::{self, ArmRewards, Guardrails, RewardKind, Strategy};
use rand::Rng;
use serde::Deserialize;

use crate::{config::RouteConfig, metrics::Outcomes};

/// Draws per Thompson update: the shares' estimate then wobbles by under a point.
pub const THOMPSON_DRAWS: usize = 10_000;
/// Weights are shares in basis points.
pub const WEIGHT_SCALE: u32 = 10_000;
/// Moves smaller than this (in basis points, on every arm) are not published: they are
/// sampling noise, and every publication is a new routing generation.
pub const MIN_MOVE: u32 = 100;
/// The shortest `interval_ms`.
pub const MIN_INTERVAL_MS: u64 = 100;
/// ε when an epsilon-greedy policy sets none.
pub const DEFAULT_EPSILON: f64 = 0.1;

/// How a route's policy chooses shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyName {
    /// Each arm's share is the probability that it is the best.
    Thompson,
    /// The best mean reward takes `1 - epsilon`; every arm shares `epsilon`.
    EpsilonGreedy,
}

/// Which feedback counts as the reward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RewardName {
    /// Feedback saying correct (1) or incorrect (0).
    Correct,
    /// Numeric rewards (revenue, a score); larger is better.
    Numeric,
}

/// `routes.<model>.bandit`: the route's weights are learnt from feedback.
///
/// ```toml
/// bandit = { strategy = "thompson", reward = "correct", warmup = 200, min_share = 0.05 }
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BanditConfig {
    /// `thompson` or `epsilon-greedy`.
    pub strategy: StrategyName,
    /// `correct` or `numeric`.
    pub reward: RewardName,
    /// Rewards (all arms together) before the policy moves off the configured weights.
    #[serde(default = "default_warmup")]
    pub warmup: u64,
    /// Every arm's least share, 0 to an equal split.
    #[serde(default = "default_min_share")]
    pub min_share: f64,
    /// Epsilon-greedy's exploration share, 0 to 1 (default 0.1).
    #[serde(default)]
    pub epsilon: Option<f64>,
    /// How often the shares are recomputed, in milliseconds (default 10000).
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Seeds the policy's random draws, for a reproducible run; absent: from entropy.
    #[serde(default)]
    pub seed: Option<u64>,
    /// With `reward = "numeric"`, the reward a failed request counts as (default 0);
    /// with `correct`, a failed request counts as incorrect.
    #[serde(default)]
    pub error_reward: Option<f64>,
}

fn default_warmup() -> u64 {
    100
}

fn default_min_share() -> f64 {
    0.05
}

fn default_interval_ms() -> u64 {
    10_000
}

impl BanditConfig {
    /// The router's strategy for this setting.
    pub fn strategy(&self) -> Strategy {
        match self.strategy {
            StrategyName::Thompson => Strategy::Thompson {
                draws: THOMPSON_DRAWS,
            },
            StrategyName::EpsilonGreedy => Strategy::EpsilonGreedy {
                epsilon: self.epsilon.unwrap_or(DEFAULT_EPSILON),
            },
        }
    }

    /// The kind of reward it learns from.
    pub fn kind(&self) -> RewardKind {
        match self.reward {
            RewardName::Correct => RewardKind::Binary,
            RewardName::Numeric => RewardKind::Numeric,
        }
    }

    /// `thompson` or `epsilon-greedy`, as configured.
    pub fn strategy_name(&self) -> &'static str {
        match self.strategy {
            StrategyName::Thompson => "thompson",
            StrategyName::EpsilonGreedy => "epsilon-greedy",
        }
    }

    /// `correct` or `numeric`, as configured.
    pub fn reward_name(&self) -> &'static str {
        match self.reward {
            RewardName::Correct => "correct",
            RewardName::Numeric => "numeric",
        }
    }
}

/// What is wrong with `routes.<model>.bandit`, each with its path.
pub fn problems(model: &str, route: &RouteConfig) -> Vec<String> {
    let Some(bandit) = &route.bandit else {
        return Vec::new();
    };
    let path = format!("routes.{model}.bandit");
    let mut problems = Vec::new();
    let arms = route.versions.iter().filter(|v| v.weight > 0).count();
    if arms < 2 {
        problems.push(format!(
            "{path}: the arms are the versions with weight, and the route weights {arms}; \
             give at least two versions a weight"
        ));
    }
    let equal = 1.0 / arms.max(1) as f64;
    if !(bandit.min_share.is_finite() && (0.0..=equal).contains(&bandit.min_share)) {
        problems.push(format!(
            "{path}.min_share: {} must be between 0 and an equal share of the {arms} arms ({equal:.4})",
            bandit.min_share
        ));
    }
    match (bandit.strategy, bandit.epsilon) {
        (StrategyName::Thompson, Some(_)) => problems.push(format!(
            "{path}.epsilon: only strategy = \"epsilon-greedy\" uses it"
        )),
        (StrategyName::EpsilonGreedy, Some(e)) if !(e.is_finite() && (0.0..=1.0).contains(&e)) => {
            problems.push(format!("{path}.epsilon: {e} is not between 0 and 1"));
        }
        _ => {}
    }
    match (bandit.reward, bandit.error_reward) {
        (RewardName::Correct, Some(_)) => problems.push(format!(
            "{path}.error_reward: only reward = \"numeric\" uses it (a failed request counts as incorrect)"
        )),
        (RewardName::Numeric, Some(r)) if !r.is_finite() => {
            problems.push(format!("{path}.error_reward: {r} is not a finite number"));
        }
        _ => {}
    }
    if bandit.interval_ms < MIN_INTERVAL_MS {
        problems.push(format!(
            "{path}.interval_ms: {} is below the least, {MIN_INTERVAL_MS}",
            bandit.interval_ms
        ));
    }
    problems
}

/// A variant's feedback and failed requests as the rewards `config` learns from:
/// correct answers out of those labelled and failed, or the numeric rewards (their sum
/// and sum of squares rebuilt from the running mean and squared deviations) with each
/// failure as `error_reward`. A version that fails every request is so the worst arm,
/// not one nobody gave feedback on.
pub fn arm_rewards(config: &BanditConfig, outcomes: &Outcomes, errors: u64) -> ArmRewards {
    match config.kind() {
        RewardKind::Binary => ArmRewards {
            count: outcomes.labelled + errors,
            sum: outcomes.correct as f64,
            sum_squares: outcomes.correct as f64,
        },
        RewardKind::Numeric => {
            let n = outcomes.rewards as f64;
            let failed = config.error_reward.unwrap_or(0.0);
            ArmRewards {
                count: outcomes.rewards + errors,
                sum: outcomes.reward_mean * n + errors as f64 * failed,
                sum_squares: outcomes.reward_m2
                    + n * outcomes.reward_mean * outcomes.reward_mean
                    + errors as f64 * failed * failed,
            }
        }
    }
}

/// One arm as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Arm {
    /// The version.
    pub version: String,
    /// Its configured weight: its share during the warm-up.
    pub configured: u32,
    /// Its feedback so far.
    pub rewards: ArmRewards,
    /// Its greatest share (a version not approved, under `[registry]`); `None`: none.
    pub max_share: Option<f64>,
}

/// The shares a policy chose, and the weights that carry them.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Each arm's share, in the arms' order.
    pub shares: Vec<f64>,
    /// Each arm's weight, out of [`WEIGHT_SCALE`]; empty when no arm may take
    /// traffic.
    pub weights: Vec<(String, u32)>,
    /// Rewards counted, all arms together.
    pub rewards: u64,
    /// Whether the configured weights still hold.
    pub warming_up: bool,
    /// The least share in force: the configured one, lowered to the smallest cap.
    pub floor: f64,
}

/// The shares `config`'s policy gives `arms`. An arm whose maximum share is 0 (not
/// approved, with a canary cap of 0) is no arm: it gets nothing and the others share
/// the traffic; the minimum share never passes the smallest maximum, so the
/// guardrails never contradict each other.
pub fn plan(config: &BanditConfig, arms: &[Arm], rng: &mut impl Rng) -> Plan {
    let playing: Vec<usize> = (0..arms.len())
        .filter(|&i| arms[i].max_share.is_none_or(|m| m > 0.0))
        .collect();
    let smallest_cap = playing
        .iter()
        .filter_map(|&i| arms[i].max_share)
        .fold(1.0, f64::min);
    let floor = config.min_share.min(smallest_cap);
    let guardrails = Guardrails {
        warmup_rewards: config.warmup,
        min_share: floor,
        max_share: playing
            .iter()
            .enumerate()
            .filter_map(|(slot, &i)| arms[i].max_share.map(|m| (slot, m)))
            .collect(),
    };
    let rewards: Vec<ArmRewards> = playing.iter().map(|&i| arms[i].rewards).collect();
    let fixed: Vec<f64> = playing
        .iter()
        .map(|&i| f64::from(arms[i].configured))
        .collect();
    let chosen = bandit::shares(
        config.strategy(),
        config.kind(),
        &guardrails,
        &rewards,
        &fixed,
        rng,
    );
    let mut shares = vec![0.0; arms.len()];
    for (slot, &i) in playing.iter().enumerate() {
        shares[i] = chosen[slot];
    }
    let caps: Vec<Option<f64>> = arms.iter().map(|a| a.max_share).collect();
    // No arm may take traffic (none approved, at a cap of 0): no weights to give.
    let weights = match playing.is_empty() {
        true => Vec::new(),
        false => weights_of(&shares, &caps),
    };
    let total: u64 = rewards.iter().map(|r| r.count).sum();
    Plan {
        weights: arms
            .iter()
            .zip(weights)
            .map(|(arm, w)| (arm.version.clone(), w))
            .collect(),
        shares,
        rewards: total,
        warming_up: total < config.warmup,
        floor,
    }
}

/// Shares as weights out of [`WEIGHT_SCALE`]: each floored, so none passes its share
/// (nor so its cap); what flooring leaves goes to the largest share with room for it
/// under its cap (`caps`, by arm), else to the largest (the registry then refuses
/// weights no arm could carry, and the report says so).
pub fn weights_of(shares: &[f64], caps: &[Option<f64>]) -> Vec<u32> {
    let scale = f64::from(WEIGHT_SCALE);
    let mut weights: Vec<u32> = shares
        .iter()
        .map(|s| (s.clamp(0.0, 1.0) * scale).floor() as u32)
        .collect();
    let left = WEIGHT_SCALE.saturating_sub(weights.iter().sum());
    let room = |i: usize| match caps.get(i).copied().flatten() {
        None => true,
        Some(cap) => f64::from(weights[i] + left) <= (cap * scale).floor(),
    };
    let largest = |with_room: bool| {
        (0..shares.len())
            .filter(|&i| !with_room || room(i))
            .max_by(|&a, &b| shares[a].total_cmp(&shares[b]).then(b.cmp(&a)))
    };
    if let Some(i) = largest(true).or_else(|| largest(false)) {
        weights[i] += left;
    }
    weights
}

/// Whether `next` moves some arm by [`MIN_MOVE`] or more from `current` (or names
/// other versions).
pub fn moved(current: &[(String, u32)], next: &[(String, u32)]) -> bool {
    current.len() != next.len()
        || current
            .iter()
            .zip(next)
            .any(|((cv, cw), (nv, nw))| cv != nv || cw.abs_diff(*nw) >= MIN_MOVE)
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    fn config(strategy: StrategyName) -> BanditConfig {
        BanditConfig {
            strategy,
            reward: RewardName::Correct,
            warmup: 10,
            min_share: 0.1,
            epsilon: None,
            interval_ms: 1000,
            seed: Some(7),
            error_reward: None,
        }
    }

    fn arm(version: &str, correct: u64, labelled: u64, max_share: Option<f64>) -> Arm {
        Arm {
            version: version.to_owned(),
            configured: 50,
            rewards: ArmRewards {
                count: labelled,
                sum: correct as f64,
                sum_squares: correct as f64,
            },
            max_share,
        }
    }

    fn route(weights: &[u32], bandit: BanditConfig) -> RouteConfig {
        let versions: Vec<String> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| format!("{{ version = \"{}\", weight = {w} }}", i + 1))
            .collect();
        let text = format!("versions = [{}]", versions.join(", "));
        RouteConfig {
            bandit: Some(bandit),
            ..toml::from_str(&text).expect("a route")
        }
    }

    #[test]
    fn problems_name_their_field() {
        let mut bad = config(StrategyName::Thompson);
        bad.min_share = 0.6;
        bad.epsilon = Some(0.2);
        bad.interval_ms = 10;
        let found = problems("m", &route(&[50, 50, 0], bad));
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].starts_with("routes.m.bandit.min_share: 0.6"));
        assert!(found[1].starts_with("routes.m.bandit.epsilon: only"));
        assert!(found[2].starts_with("routes.m.bandit.interval_ms: 10"));
        let one_arm = problems("m", &route(&[100, 0], config(StrategyName::Thompson)));
        assert!(one_arm[0].contains("weights 1"), "{one_arm:?}");
        let mut greedy = config(StrategyName::EpsilonGreedy);
        greedy.epsilon = Some(1.5);
        let wide = problems("m", &route(&[1, 1], greedy));
        assert_eq!(
            wide,
            ["routes.m.bandit.epsilon: 1.5 is not between 0 and 1"]
        );
        let mut labelled = config(StrategyName::Thompson);
        labelled.error_reward = Some(0.0);
        let found = problems("m", &route(&[1, 1], labelled));
        assert!(
            found[0].starts_with("routes.m.bandit.error_reward: only"),
            "{found:?}"
        );
        assert!(problems("m", &route(&[1, 1], config(StrategyName::Thompson))).is_empty());
    }

    #[test]
    fn numeric_rewards_are_rebuilt_from_the_running_moments() {
        let outcomes = Outcomes {
            rewards: 4,
            reward_mean: 2.5,
            // Rewards 1, 2, 3, 4: squared deviations from 2.5 sum to 5.
            reward_m2: 5.0,
            ..Outcomes::default()
        };
        let mut numeric = config(StrategyName::Thompson);
        numeric.reward = RewardName::Numeric;
        let arm = arm_rewards(&numeric, &outcomes, 0);
        assert_eq!(arm.count, 4);
        assert!((arm.sum - 10.0).abs() < 1e-9);
        assert!((arm.sum_squares - 30.0).abs() < 1e-9);
        // Two failures at an error reward of -1.
        numeric.error_reward = Some(-1.0);
        let arm = arm_rewards(&numeric, &outcomes, 2);
        assert_eq!(arm.count, 6);
        assert!((arm.sum - 8.0).abs() < 1e-9);
        assert!((arm.sum_squares - 32.0).abs() < 1e-9);
        let labelled = Outcomes {
            labelled: 10,
            correct: 7,
            ..Outcomes::default()
        };
        let arm = arm_rewards(&config(StrategyName::Thompson), &labelled, 3);
        assert_eq!(
            (arm.count, arm.sum),
            (13, 7.0),
            "failures count as incorrect"
        );
    }

    #[test]
    fn the_warm_up_keeps_the_configured_weights() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut arms = [arm("1", 0, 3, None), arm("2", 3, 3, None)];
        arms[0].configured = 90;
        arms[1].configured = 10;
        let plan = plan(&config(StrategyName::Thompson), &arms, &mut rng);
        assert!(plan.warming_up);
        assert_eq!(
            plan.weights,
            [("1".to_owned(), 9000), ("2".to_owned(), 1000)]
        );
    }

    #[test]
    fn after_the_warm_up_the_better_arm_takes_the_most_within_the_minimum() {
        let mut rng = StdRng::seed_from_u64(1);
        let arms = [arm("1", 20, 100, None), arm("2", 80, 100, None)];
        let plan = plan(&config(StrategyName::Thompson), &arms, &mut rng);
        assert!(!plan.warming_up);
        assert_eq!(
            plan.weights,
            [("1".to_owned(), 1000), ("2".to_owned(), 9000)]
        );
    }

    #[test]
    fn an_arm_capped_at_zero_gets_nothing_and_a_capped_one_stays_under_its_cap() {
        let mut rng = StdRng::seed_from_u64(1);
        let arms = [
            arm("1", 10, 100, None),
            arm("2", 90, 100, Some(0.0)),
            arm("3", 90, 100, Some(0.25)),
        ];
        let plan = plan(&config(StrategyName::Thompson), &arms, &mut rng);
        let weights: Vec<u32> = plan.weights.iter().map(|(_, w)| *w).collect();
        assert_eq!(weights[1], 0);
        assert!(weights[2] <= 2500, "{weights:?}");
        assert_eq!(weights.iter().sum::<u32>(), WEIGHT_SCALE);
        assert!(weights[0] >= 7500, "{weights:?}");
    }

    #[test]
    fn flooring_leftovers_go_to_the_largest_uncapped_share() {
        let third = 1.0 / 3.0;
        assert_eq!(
            weights_of(&[third, third, third], &[Some(third), None, Some(third)]),
            [3333, 3334, 3333]
        );
        assert_eq!(
            weights_of(&[0.5, 0.5], &[Some(0.5), Some(0.5)]),
            [5000, 5000]
        );
        assert_eq!(weights_of(&[0.0, 0.0], &[None, None]), [10000, 0]);
        // Every arm capped: the leftover goes where the cap leaves room.
        assert_eq!(
            weights_of(
                &[0.34, 0.31995, 0.34005],
                &[Some(0.34), Some(0.34), Some(0.34)]
            ),
            [3400, 3200, 3400]
        );
    }

    #[test]
    fn only_moves_of_a_point_or_more_count() {
        let w = |a: u32, b: u32| vec![("1".to_owned(), a), ("2".to_owned(), b)];
        assert!(!moved(&w(5000, 5000), &w(5099, 4901)));
        assert!(moved(&w(5000, 5000), &w(5100, 4900)));
        assert!(moved(&w(5000, 5000), &[("1".to_owned(), 10000)]));
    }
}
