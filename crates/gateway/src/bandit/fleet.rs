//! Bandit routes across many gateways: `aviary controller` reads every gateway's
//! feedback (`Fleet.GetBanditFeedback`), sums each arm's rewards, runs one policy per
//! route, and sends its weights and report to every gateway (`Fleet.SetBanditWeights`).
//! The messages' conversions to and from the gateway's own types live here too.
//!
//! A gateway that does not answer is logged and left out of that round. Gateways are
//! expected to share the route's setting (one config for the fleet): the first
//! gateway's (in address order) is used; an arm's greatest share is the smallest any
//! gateway sets (the strictest registry).

use std::sync::Arc;

use aviary::pb::admin::{
    BanditArmFeedback, BanditArmWeight, BanditFeedback, BanditFeedbackRequest, BanditReport,
    BanditSetting, BanditWeights,
};
use aviary_router::bandit::ArmRewards;

use super::{
    Arm, BanditConfig, RewardName, StrategyName,
    driver::{BanditInput, BanditTarget},
};
use crate::{GatewayError, control::BanditApplied, rollouts::RemoteGateways};

/// `config` as the Fleet service sends it.
pub fn setting_message(config: &BanditConfig) -> BanditSetting {
    BanditSetting {
        strategy: config.strategy_name().to_owned(),
        reward: config.reward_name().to_owned(),
        warmup: config.warmup,
        min_share: config.min_share,
        epsilon: config.epsilon,
        interval_ms: config.interval_ms,
        seed: config.seed,
        error_reward: config.error_reward,
    }
}

/// The setting a gateway sent; `Err` names what is not one.
pub fn setting_of(message: &BanditSetting) -> Result<BanditConfig, String> {
    let strategy = match message.strategy.as_str() {
        "thompson" => StrategyName::Thompson,
        "epsilon-greedy" => StrategyName::EpsilonGreedy,
        other => {
            return Err(format!(
                "strategy \"{other}\" is not thompson or epsilon-greedy"
            ));
        }
    };
    let reward = match message.reward.as_str() {
        "correct" => RewardName::Correct,
        "numeric" => RewardName::Numeric,
        other => return Err(format!("reward \"{other}\" is not correct or numeric")),
    };
    Ok(BanditConfig {
        strategy,
        reward,
        warmup: message.warmup,
        min_share: message.min_share,
        epsilon: message.epsilon,
        interval_ms: message.interval_ms,
        seed: message.seed,
        error_reward: message.error_reward,
    })
}

/// A gateway's bandit route as the Fleet service sends it.
pub fn feedback_message(input: &BanditInput) -> BanditFeedback {
    BanditFeedback {
        model: input.model.clone(),
        setting: Some(setting_message(&input.config)),
        arms: input
            .arms
            .iter()
            .map(|arm| BanditArmFeedback {
                version: arm.version.clone(),
                configured_weight: arm.configured,
                count: arm.rewards.count,
                sum: arm.rewards.sum,
                sum_squares: arm.rewards.sum_squares,
                max_share: arm.max_share,
            })
            .collect(),
    }
}

/// Adds one gateway's bandit routes to `merged`: a route seen first starts with this
/// gateway's setting and arms; later gateways' rewards are added arm by arm (an arm
/// only they have is left out) and their caps tighten the arms'.
pub fn merge(merged: &mut Vec<BanditInput>, routes: Vec<BanditFeedback>) -> Result<(), String> {
    for route in routes {
        let setting = route
            .setting
            .as_ref()
            .ok_or_else(|| format!("route {} has no setting", route.model))?;
        let config = setting_of(setting).map_err(|e| format!("route {}: {e}", route.model))?;
        let Some(known) = merged.iter_mut().find(|m| m.model == route.model) else {
            merged.push(BanditInput {
                model: route.model,
                config,
                arms: route
                    .arms
                    .into_iter()
                    .map(|a| Arm {
                        version: a.version,
                        configured: a.configured_weight,
                        rewards: ArmRewards {
                            count: a.count,
                            sum: a.sum,
                            sum_squares: a.sum_squares,
                        },
                        max_share: a.max_share,
                    })
                    .collect(),
            });
            continue;
        };
        if known.config != config {
            tracing::warn!(
                model = known.model,
                "gateways differ in the route's bandit setting; the first gateway's is used"
            );
        }
        for arm in route.arms {
            let Some(kept) = known.arms.iter_mut().find(|k| k.version == arm.version) else {
                continue;
            };
            kept.rewards.count += arm.count;
            kept.rewards.sum += arm.sum;
            kept.rewards.sum_squares += arm.sum_squares;
            kept.max_share = match (kept.max_share, arm.max_share) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    }
    Ok(())
}

/// Many gateways' bandit routes, as `aviary controller` drives them.
#[derive(Debug, Clone)]
pub struct FleetBandits {
    gateways: Arc<RemoteGateways>,
}

impl FleetBandits {
    /// Over the gateways `gateways` reaches.
    pub fn new(gateways: Arc<RemoteGateways>) -> FleetBandits {
        FleetBandits { gateways }
    }
}

impl BanditTarget for FleetBandits {
    async fn inputs(&self) -> Vec<BanditInput> {
        let mut merged = Vec::new();
        for address in self.gateways.addresses().await {
            let answer = match self.gateways.fleet(&address) {
                Ok(mut client) => client
                    .get_bandit_feedback(BanditFeedbackRequest {})
                    .await
                    .map(|r| r.into_inner().routes)
                    .map_err(|status| status.message().to_owned()),
                Err(error) => Err(error),
            };
            if let Err(error) = answer.and_then(|routes| merge(&mut merged, routes)) {
                tracing::warn!(
                    gateway = address,
                    error,
                    "cannot read the gateway's bandit feedback"
                );
            }
        }
        merged
    }

    async fn apply(
        &self,
        model: &str,
        weights: Vec<(String, u32)>,
        report: BanditReport,
    ) -> Result<BanditApplied, GatewayError> {
        let message = BanditWeights {
            model: model.to_owned(),
            weights: weights
                .into_iter()
                .map(|(version, weight)| BanditArmWeight { version, weight })
                .collect(),
            report: Some(report),
        };
        let (mut applied, mut failed) = (0, Vec::new());
        for address in self.gateways.addresses().await {
            let answer = match self.gateways.fleet(&address) {
                Ok(mut client) => client
                    .set_bandit_weights(message.clone())
                    .await
                    .map_err(|status| status.message().to_owned()),
                Err(error) => Err(error),
            };
            match answer {
                Ok(_) => applied += 1,
                Err(error) => {
                    tracing::warn!(
                        gateway = address,
                        model,
                        error,
                        "a gateway refused the bandit's weights"
                    );
                    failed.push(format!("{address}: {error}"));
                }
            }
        }
        match applied {
            0 => Err(GatewayError::Refused(format!(
                "no gateway took the weights of {model}: {}",
                failed.join("; ")
            ))),
            _ => Ok(BanditApplied::Published(0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(model: &str, arms: &[(&str, u64, f64, Option<f64>)]) -> BanditFeedback {
        let config = BanditConfig {
            strategy: StrategyName::Thompson,
            reward: RewardName::Correct,
            warmup: 10,
            min_share: 0.05,
            epsilon: None,
            interval_ms: 100,
            seed: Some(1),
            error_reward: None,
        };
        BanditFeedback {
            model: model.into(),
            setting: Some(setting_message(&config)),
            arms: arms
                .iter()
                .map(|&(version, count, sum, max_share)| BanditArmFeedback {
                    version: version.into(),
                    configured_weight: 50,
                    count,
                    sum,
                    sum_squares: sum,
                    max_share,
                })
                .collect(),
        }
    }

    #[test]
    fn gateways_feedback_adds_up_arm_by_arm_and_the_strictest_cap_holds() {
        let mut merged = Vec::new();
        merge(
            &mut merged,
            vec![route(
                "m",
                &[("1", 10, 9.0, None), ("2", 4, 1.0, Some(0.2))],
            )],
        )
        .expect("valid");
        merge(
            &mut merged,
            vec![
                route(
                    "m",
                    &[
                        ("1", 5, 5.0, None),
                        ("2", 6, 0.0, Some(0.1)),
                        ("3", 7, 7.0, None),
                    ],
                ),
                route("n", &[("a", 1, 1.0, None)]),
            ],
        )
        .expect("valid");
        assert_eq!(merged.len(), 2);
        let m = &merged[0];
        let counts: Vec<(&str, u64, f64, Option<f64>)> = m
            .arms
            .iter()
            .map(|a| {
                (
                    a.version.as_str(),
                    a.rewards.count,
                    a.rewards.sum,
                    a.max_share,
                )
            })
            .collect();
        assert_eq!(counts, [("1", 15, 14.0, None), ("2", 10, 1.0, Some(0.1))]);
        assert_eq!(merged[1].model, "n");
    }

    #[test]
    fn a_setting_round_trips_and_unknown_names_are_refused() {
        let mut config = setting_of(&route("m", &[]).setting.expect("setting")).expect("valid");
        config.strategy = StrategyName::EpsilonGreedy;
        config.epsilon = Some(0.2);
        assert_eq!(setting_of(&setting_message(&config)), Ok(config));
        let mut bad = route("m", &[]).setting.expect("setting");
        bad.strategy = "ucb".into();
        assert!(setting_of(&bad).is_err_and(|e| e.contains("\"ucb\"")));
    }
}
