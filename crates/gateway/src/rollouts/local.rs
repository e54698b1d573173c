//! The rollout target of one gateway: its own step metrics, shadow comparisons and
//! routes.

use std::sync::Arc;

use aviary_router::{
    RouteTable,
    rollout::{FeatureValue, MetricsSnapshot, RolloutPlan},
};
use aviary_worker::drift::FeatureDrift;

use super::{Target, holding};
use crate::{
    GatewayError,
    control::{Control, RolloutWeights},
    metrics::Metrics,
};

/// This gateway, as the place a rollout reads its evidence from and applies its
/// decisions to.
#[derive(Debug, Clone)]
pub struct LocalGateway {
    control: Arc<Control>,
    metrics: Arc<Metrics>,
}

impl LocalGateway {
    /// The gateway whose routes `control` changes and whose requests `metrics` counts.
    pub fn new(control: Arc<Control>, metrics: Arc<Metrics>) -> LocalGateway {
        LocalGateway { control, metrics }
    }

    /// Agreement and KS p-value from the model's mirror when its shadow is the canary;
    /// `None`s otherwise or before the first comparison (which holds the step).
    ///
    /// A model may have several outputs; the gate reads the one with the most compared
    /// pairs, the best-supported figure (for a classifier, its label or probabilities).
    /// The mirror counts since it started, not since the step did: a route keeps one
    /// mirror across weight changes, and its samples cannot be split by step.
    fn shadow_evidence(&self, plan: &RolloutPlan) -> (Option<f64>, Option<f64>) {
        let routing = self.control.routing().load_full();
        let Some(mirror) = routing
            .mirror(&plan.model)
            .filter(|m| m.config().version == plan.canary)
        else {
            return (None, None);
        };
        let report = mirror.report();
        let Some(output) = report.outputs.values().max_by_key(|o| o.agreement_total) else {
            return (None, None);
        };
        let p_value =
            aviary_router::stats::ks_two_sample(&output.primary_sample, &output.shadow_sample)
                .map(|test| test.p_value);
        (output.agreement(), p_value)
    }

    /// A version's drift tracking in the embedded worker, if it has any.
    fn tracker(
        &self,
        model: &str,
        version: &str,
    ) -> Option<Arc<aviary_worker::model::LoadedModel>> {
        let loaded = self.control.worker()?.slot(model, version).ok()?.current();
        loaded.drift.is_some().then_some(loaded)
    }

    /// The data gates' evidence, measured only when the plan has such a gate: the
    /// largest PSI and smallest adjusted p-value of the canary's outputs against the
    /// baseline's (both windows: the most recent outputs of each), and either version's
    /// drifting inputs. Evidence with a gap (a version without tracking, a feature
    /// without enough values on a side) is left out, so the gate holds: what cannot be
    /// measured never passes.
    fn drift_evidence(&self, plan: &RolloutPlan, snapshot: &mut MetricsSnapshot) {
        let gates = &plan.gates;
        let versions = [("canary", &plan.canary), ("baseline", &plan.baseline)]
            .map(|(role, version)| (role, self.tracker(&plan.model, version)));
        if gates.pause_on_input_drift {
            snapshot.input_drift = drifting_inputs(&versions);
        }
        if gates.max_output_drift_psi.is_none() && gates.min_output_ks_p.is_none() {
            return;
        }
        let [(_, Some(canary)), (_, Some(baseline))] = &versions else {
            return;
        };
        let (Some(canary), Some(baseline)) = (&canary.drift, &baseline.drift) else {
            return;
        };
        let compared = canary.compare_outputs(baseline);
        if compared.is_empty() || compared.iter().any(|f| f.verdict == "insufficient") {
            return;
        }
        let at = |f: &FeatureDrift, value: f64| FeatureValue {
            value,
            feature: f.name(),
        };
        snapshot.output_drift_psi = compared
            .iter()
            .filter_map(|f| Some(at(f, f.psi?)))
            .max_by(|a, b| a.value.total_cmp(&b.value));
        snapshot.output_ks_p_value = compared
            .iter()
            .filter_map(|f| Some(at(f, f.adjusted_p_value?)))
            .min_by(|a, b| a.value.total_cmp(&b.value));
    }

    /// Why the plan could never finish here: with `[registry]`, a canary that is not
    /// approved cannot take a step past the canary cap (approve it first, or end the
    /// plan at the cap).
    fn unapproved(&self, plan: &RolloutPlan) -> Vec<String> {
        let (Some(stage), Some(registry)) = (
            self.control.stage(&plan.model, &plan.canary),
            self.control.registry(),
        ) else {
            return Vec::new();
        };
        crate::registry::plan_past_cap(plan, stage.stage, registry.cap_percent())
            .into_iter()
            .collect()
    }

    /// Why the plan's data gates could never be measured here: no embedded worker, a
    /// version the route sends to remote workers, or one loaded without `[drift]`.
    fn undriftable(&self, plan: &RolloutPlan) -> Vec<String> {
        let mut problems = Vec::new();
        for field in plan.gates.data_gates() {
            if self.control.worker().is_none() {
                problems.push(format!(
                    "gates.{field}: needs the versions' drift tracking, which only a gateway with an embedded worker (aviary serve) reads; remove this gate"
                ));
                continue;
            }
            let routing = self.control.routing().load_full();
            let remote = |version: &str| {
                routing.routes.get(&plan.model).is_some_and(|route| {
                    route
                        .versions
                        .iter()
                        .any(|v| v.version == version && !v.endpoints.is_empty())
                })
            };
            for version in [&plan.canary, &plan.baseline] {
                if remote(version) {
                    problems.push(format!(
                        "gates.{field}: version \"{version}\" of model \"{}\" runs on remote workers, whose drift tracking this gateway does not read; remove this gate",
                        plan.model
                    ));
                } else if self.tracker(&plan.model, version).is_none() {
                    problems.push(format!(
                        "gates.{field}: version \"{version}\" of model \"{}\" is not loaded with drift tracking; add [drift] to its model.toml or remove this gate",
                        plan.model
                    ));
                }
            }
        }
        problems
    }
}

/// Every drifting input feature of `versions` in words; `None` while a version has no
/// tracking or an input feature has no verdict yet.
fn drifting_inputs(
    versions: &[(&str, Option<Arc<aviary_worker::model::LoadedModel>>); 2],
) -> Option<Vec<String>> {
    let mut drifting = Vec::new();
    for (role, loaded) in versions {
        let report = loaded.as_ref()?.drift.as_ref()?.report();
        let inputs = report.iter().filter(|f| f.side == "input");
        if inputs.clone().any(|f| f.verdict == "insufficient") {
            return None;
        }
        drifting.extend(
            inputs
                .filter(|f| f.drifts())
                .map(|f| format!("{role} {}: {}", f.name(), f.figures())),
        );
    }
    Some(drifting)
}

impl Target for LocalGateway {
    async fn check(&self, plan: &RolloutPlan) -> Vec<String> {
        let routing = self.control.routing().load_full();
        let shadow = routing
            .mirror(&plan.model)
            .map(|m| m.config().version.as_str());
        let mut problems = plan_problems(plan, &routing.table, shadow);
        problems.extend(self.undriftable(plan));
        problems
    }

    async fn preconditions(&self, plan: &RolloutPlan) -> Vec<String> {
        let model = &plan.model;
        let mut problems = self.unapproved(plan);
        if let Some(route) = self.control.routing().load().routes.get(model)
            && route.bandit.is_some()
        {
            problems.push(format!(
                "routes.{model}.bandit: the weights of model \"{model}\" are learnt by its bandit \
                 policy; remove the bandit from the config file to roll out a version"
            ));
        }
        problems
    }

    async fn snapshot(&self, plan: &RolloutPlan) -> MetricsSnapshot {
        let (shadow_agreement, distribution_p_value) = self.shadow_evidence(plan);
        let mut snapshot = MetricsSnapshot {
            canary: self.metrics.step(&plan.model, &plan.canary).step_metrics(),
            baseline: self
                .metrics
                .step(&plan.model, &plan.baseline)
                .step_metrics(),
            shadow_agreement,
            distribution_p_value,
            ..MetricsSnapshot::default()
        };
        self.drift_evidence(plan, &mut snapshot);
        snapshot
    }

    async fn set_weights(
        &self,
        plan: &RolloutPlan,
        weights: RolloutWeights,
        held: bool,
    ) -> Result<(), GatewayError> {
        let before = self.control.routing().load().generation;
        let generation = self
            .control
            .set_rollout_weights(&plan.model, weights.clone(), holding(held, None))
            .await?;
        if generation != before {
            tracing::info!(
                model = plan.model,
                canary = weights.canary,
                canary_weight = weights.canary_weight,
                baseline = weights.baseline,
                baseline_weight = weights.baseline_weight,
                held,
                generation,
                "rollout weights applied"
            );
        }
        Ok(())
    }

    async fn reset_step(&self, plan: &RolloutPlan) -> Result<(), GatewayError> {
        self.metrics.reset_step(&plan.model, &plan.canary);
        self.metrics.reset_step(&plan.model, &plan.baseline);
        Ok(())
    }
}

/// Every reason `plan` cannot run on the routes of `table`, where `shadow` is the
/// version the model's route mirrors: a version it names that is not routable, or a
/// gate that needs the canary shadowed when it is not. Pure: `aviary check-config`
/// asks it of a file's plans.
pub fn plan_problems(plan: &RolloutPlan, table: &RouteTable, shadow: Option<&str>) -> Vec<String> {
    let mut problems = routable_problems(plan, table);
    problems.extend(unmeasured_gates(plan, shadow));
    problems
}

/// Every reason the plan's versions cannot carry a rollout on the routes of `table`.
fn routable_problems(plan: &RolloutPlan, table: &RouteTable) -> Vec<String> {
    let Some(route) = table.route(&plan.model) else {
        return vec![format!("model: no route for model \"{}\"", plan.model)];
    };
    let routable: Vec<&str> = route.versions().map(|(v, _)| v).collect();
    [("canary", &plan.canary), ("baseline", &plan.baseline)]
        .into_iter()
        .filter(|(_, version)| !version.is_empty() && !routable.contains(&version.as_str()))
        .map(|(field, version)| {
            format!(
                "{field}: version \"{version}\" is not a routable version of model \"{}\" (routable: {})",
                plan.model,
                routable.join(", ")
            )
        })
        .collect()
}

/// The plan's gates that read shadow comparisons when the route does not shadow the
/// canary: they could never be measured, so the rollout would hold forever.
fn unmeasured_gates(plan: &RolloutPlan, shadow: Option<&str>) -> Vec<String> {
    if shadow == Some(plan.canary.as_str()) {
        return Vec::new();
    }
    let gates = &plan.gates;
    [
        ("min_shadow_agreement", gates.min_shadow_agreement.is_some()),
        ("min_distribution_p_value", gates.min_distribution_p_value.is_some()),
    ]
    .into_iter()
    .filter(|(_, set)| *set)
    .map(|(field, _)| {
        format!(
            "gates.{field}: needs the canary's answers compared with the baseline's, but route \"{}\" {}; \
             set routes.{}.shadow.version = \"{}\" (with the canary at weight 0 in the config) or remove this gate",
            plan.model,
            match shadow {
                Some(version) => format!("shadows version \"{version}\", not the canary"),
                None => "has no shadow".to_owned(),
            },
            plan.model,
            plan.canary
        )
    })
    .collect()
}
