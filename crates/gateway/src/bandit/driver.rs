//! The bandit driver: replans each bandit route when its interval is due, applies the
//! weights through [`Control`], and keeps the last plan for experiment reports.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aviary::pb::admin::{BanditArm, BanditReport};
use aviary_router::bandit::posterior;
use rand::{SeedableRng, rngs::StdRng};
use tokio::sync::watch;

use super::{Arm, BanditConfig, Plan, arm_rewards, assignments::Assignments, plan};
use crate::{
    control::{BanditApplied, Control},
    metrics::Metrics,
};

/// How often the driver looks for routes that are due.
const TICK: Duration = Duration::from_millis(50);

/// One bandit route's policy between updates.
#[derive(Debug)]
struct Policy {
    config: BanditConfig,
    /// Seeded from the config's `seed`, so a seeded run draws the same shares.
    rng: StdRng,
    due: Instant,
    report: BanditReport,
}

impl Policy {
    fn new(config: &BanditConfig, now: Instant) -> Policy {
        let rng = match config.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_rng(&mut rand::rng()),
        };
        Policy {
            config: config.clone(),
            rng,
            due: now,
            report: BanditReport {
                strategy: config.strategy_name().to_owned(),
                reward: config.reward_name().to_owned(),
                warmup: config.warmup,
                warming_up: true,
                min_share: config.min_share,
                ..BanditReport::default()
            },
        }
    }
}

/// Every bandit route's policy, and the sticky users they placed.
#[derive(Debug, Default)]
pub struct Bandits {
    policies: Mutex<BTreeMap<String, Policy>>,
    assignments: Assignments,
}

impl Bandits {
    /// Sticky users' versions on bandit routes.
    pub fn assignments(&self) -> &Assignments {
        &self.assignments
    }

    /// `model`'s policy as last updated; `None` when its route is not a bandit.
    pub fn report(&self, model: &str) -> Option<BanditReport> {
        self.policies().get(model).map(|p| p.report.clone())
    }

    fn policies(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Policy>> {
        self.policies.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replans every bandit route whose interval is due and applies its weights.
    pub async fn update(&self, control: &Control, metrics: &Metrics) {
        let routes = control.bandit_routes().await;
        let now = Instant::now();
        let due: Vec<_> = {
            let mut policies = self.policies();
            let gone: Vec<String> = policies
                .keys()
                .filter(|model| !routes.iter().any(|r| &r.model == *model))
                .cloned()
                .collect();
            for model in gone {
                policies.remove(&model);
                self.assignments.forget(&model);
            }
            routes
                .into_iter()
                .filter(|route| {
                    let policy = policies
                        .entry(route.model.clone())
                        .or_insert_with(|| Policy::new(&route.config, now));
                    if policy.config != route.config {
                        *policy = Policy::new(&route.config, now);
                    }
                    policy.due <= now
                })
                .collect()
        };
        for route in due {
            let arms: Vec<Arm> = route
                .arms
                .iter()
                .map(|(version, configured)| {
                    let (outcomes, errors) = metrics.outcomes_and_errors(&route.model, version);
                    Arm {
                        version: version.clone(),
                        configured: *configured,
                        rewards: arm_rewards(&route.config, &outcomes, errors),
                        max_share: control.arm_cap(&route.model, version),
                    }
                })
                .collect();
            let Some(plan) = self.policies().get_mut(&route.model).map(|policy| {
                policy.due = now + Duration::from_millis(policy.config.interval_ms);
                plan(&policy.config, &arms, &mut policy.rng)
            }) else {
                continue;
            };
            let not_applied = match control
                .set_bandit_weights(&route.model, plan.weights.clone())
                .await
            {
                Ok(BanditApplied::Published(_) | BanditApplied::Unchanged) => String::new(),
                Ok(BanditApplied::Held) => "a running rollout holds the weights".to_owned(),
                Err(error) => {
                    tracing::warn!(model = route.model, %error, "the bandit's weights were refused");
                    error.to_string()
                }
            };
            if let Some(policy) = self.policies().get_mut(&route.model) {
                policy.report = report(&policy.config, &arms, &plan, not_applied);
            }
        }
    }
}

/// What an experiment report shows of a plan.
fn report(config: &BanditConfig, arms: &[Arm], plan: &Plan, not_applied: String) -> BanditReport {
    let kind = config.kind();
    BanditReport {
        strategy: config.strategy_name().to_owned(),
        reward: config.reward_name().to_owned(),
        warmup: config.warmup,
        rewards: plan.rewards,
        warming_up: plan.warming_up,
        min_share: config.min_share,
        arms: arms
            .iter()
            .zip(&plan.shares)
            .map(|(arm, &share)| {
                let posterior = posterior(kind, &arm.rewards);
                let (alpha, beta) = match posterior {
                    aviary_router::bandit::Posterior::Beta { alpha, beta } => (alpha, beta),
                    aviary_router::bandit::Posterior::Normal { .. } => (0.0, 0.0),
                };
                BanditArm {
                    version: arm.version.clone(),
                    share,
                    rewards: arm.rewards.count,
                    mean_reward: arm.rewards.mean(),
                    posterior_alpha: alpha,
                    posterior_beta: beta,
                    posterior_mean: posterior.mean(),
                    posterior_sd: posterior.sd(),
                    max_share: arm.max_share,
                }
            })
            .collect(),
        updated_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        not_applied,
    }
}

/// Updates the bandit routes of `control` until `stop` turns true.
pub async fn run(control: Arc<Control>, metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        control.bandits().update(&control, &metrics).await;
    }
}
