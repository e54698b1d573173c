//! The rollout plan as configured: versions, weight steps and gates, and its validation.

use serde::{Deserialize, Serialize};

use crate::error::{ValidationError, ValidationErrors};

/// How one model moves its traffic from `baseline` to `canary`.
///
/// In TOML:
///
/// ```toml
/// model = "iris"
/// baseline = "1"
/// canary = "2"
/// steps = [
///     { weight = 5, min_duration_ms = 600000, min_requests = 500 },
///     { weight = 25, min_duration_ms = 600000, min_requests = 2000 },
///     { weight = 50, min_duration_ms = 600000, min_requests = 4000 },
///     { weight = 100, min_duration_ms = 1800000, min_requests = 10000 },
/// ]
/// gates = { max_error_rate_increase = 0.01, max_latency_ratio = 1.2 }
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutPlan {
    /// The model whose route the rollout drives.
    pub model: String,
    /// The version serving today; it gets `100 - weight` of the traffic.
    pub baseline: String,
    /// The version being rolled out; it gets each step's `weight`.
    pub canary: String,
    /// Canary weights in order; strictly increasing, the last one 100.
    pub steps: Vec<Step>,
    /// What the canary must keep to within, compared with the baseline, to go on.
    pub gates: Gates,
}

/// One step of a rollout: a canary weight held until enough evidence has been seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// The canary's share of traffic in percent, 1..=100; the baseline gets the rest.
    pub weight: u32,
    /// How long the step lasts at least, in milliseconds.
    pub min_duration_ms: u64,
    /// How many canary requests the step needs at least; at least 1, so no evidence never advances.
    pub min_requests: u64,
}

/// Limits the canary must keep to over a step, most relative to the baseline.
///
/// A configured gate whose metric has not been reported holds the step: it never
/// counts as passed.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    /// Largest allowed canary error rate minus baseline error rate (absolute, e.g. 0.01).
    pub max_error_rate_increase: f64,
    /// Largest allowed canary p99 latency divided by the baseline's, e.g. 1.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency_ratio: Option<f64>,
    /// Largest allowed baseline accuracy minus canary accuracy, from feedback (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_accuracy_drop: Option<f64>,
    /// Smallest allowed share of canary answers that agree with the baseline's, 0..=1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_shadow_agreement: Option<f64>,
    /// Smallest allowed p-value of the test that canary and baseline outputs share a distribution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_distribution_p_value: Option<f64>,
    /// Largest allowed PSI of a canary output feature (or of its predicted classes)
    /// against the baseline's over the same recent traffic, from both versions' drift
    /// tracking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_drift_psi: Option<f64>,
    /// Smallest allowed p-value (KS; chi-square for predicted classes; adjusted across
    /// the outputs) of a canary output feature against the baseline's, the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_output_ks_p: Option<f64>,
    /// Pause the rollout, with the drifting features in its history, when either
    /// version's inputs drift from their reference: traffic unlike what the versions
    /// were checked on makes the comparison unreliable.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pause_on_input_drift: bool,
    /// Canary requests a step needs before a failed gate rolls back; fewer only hold the step.
    ///
    /// Without it, one error in the first canary request would be a 100% error rate.
    #[serde(default = "default_min_requests_for_rollback")]
    pub min_requests_for_rollback: u64,
}

fn default_min_requests_for_rollback() -> u64 {
    20
}

impl Gates {
    /// Only the error-rate gate, with the default rollback sample.
    pub fn error_rate(max_error_rate_increase: f64) -> Self {
        Self {
            max_error_rate_increase,
            max_latency_ratio: None,
            max_accuracy_drop: None,
            min_shadow_agreement: None,
            min_distribution_p_value: None,
            max_output_drift_psi: None,
            min_output_ks_p: None,
            pause_on_input_drift: false,
            min_requests_for_rollback: default_min_requests_for_rollback(),
        }
    }
}

impl Gates {
    /// The data gates the plan sets, by field name: they read the versions' drift
    /// tracking, which not every driver can.
    pub fn data_gates(&self) -> Vec<&'static str> {
        [
            ("max_output_drift_psi", self.max_output_drift_psi.is_some()),
            ("min_output_ks_p", self.min_output_ks_p.is_some()),
            ("pause_on_input_drift", self.pause_on_input_drift),
        ]
        .into_iter()
        .filter_map(|(field, set)| set.then_some(field))
        .collect()
    }
}

impl RolloutPlan {
    /// Checks the plan, reporting every problem with its path relative to the plan
    /// (`steps[1].weight`, `gates.max_latency_ratio`).
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = Vec::new();
        self.check(&mut errors);
        ValidationErrors::from_vec(errors).map_or(Ok(()), Err)
    }

    pub(super) fn check(&self, errors: &mut Vec<ValidationError>) {
        if self.model.is_empty() {
            report(errors, "model", "model name is empty");
        }
        if self.baseline.is_empty() {
            report(errors, "baseline", "baseline version is empty");
        }
        if self.canary.is_empty() {
            report(errors, "canary", "canary version is empty");
        } else if self.canary == self.baseline {
            report(
                errors,
                "canary",
                format!(
                    "canary and baseline are both version {:?}; a rollout needs two versions",
                    self.canary
                ),
            );
        }
        self.check_steps(errors);
        self.gates.check(errors);
    }

    fn check_steps(&self, errors: &mut Vec<ValidationError>) {
        let Some(last) = self.steps.last() else {
            report(
                errors,
                "steps",
                "no steps listed; at least one step ending at weight 100 is needed",
            );
            return;
        };
        let mut previous: Option<u32> = None;
        for (i, step) in self.steps.iter().enumerate() {
            let path = format!("steps[{i}].weight");
            if step.weight == 0 || step.weight > 100 {
                report(
                    errors,
                    &path,
                    format!("weight {} is outside 1..=100", step.weight),
                );
            } else if let Some(before) = previous.filter(|&before| step.weight <= before) {
                report(
                    errors,
                    &path,
                    format!(
                        "weight {} does not exceed the previous step's {before}; weights must strictly increase",
                        step.weight
                    ),
                );
            }
            previous = Some(step.weight);
            if step.min_requests == 0 {
                report(
                    errors,
                    &format!("steps[{i}].min_requests"),
                    "min_requests is 0; a step needs at least 1 canary request, so no evidence never advances",
                );
            }
        }
        if last.weight != 100 {
            report(
                errors,
                &format!("steps[{}].weight", self.steps.len() - 1),
                format!(
                    "the last step has weight {}; it must be 100 to promote the canary",
                    last.weight
                ),
            );
        }
        if self.steps.first().is_some_and(|first| first.weight >= 100) {
            report(
                errors,
                "steps[0].weight",
                "the first step must leave the baseline some traffic, so the canary can be compared with it",
            );
        }
    }
}

impl Gates {
    fn check(&self, errors: &mut Vec<ValidationError>) {
        let mut bounded = |path: &str, value: f64, range: &str, ok: fn(f64) -> bool| {
            if !value.is_finite() || !ok(value) {
                report(
                    errors,
                    &format!("gates.{path}"),
                    format!("{value} is outside {range}"),
                );
            }
        };
        bounded(
            "max_error_rate_increase",
            self.max_error_rate_increase,
            "0..=1",
            |v| (0.0..=1.0).contains(&v),
        );
        if let Some(ratio) = self.max_latency_ratio {
            bounded("max_latency_ratio", ratio, "a positive ratio", |v| v > 0.0);
        }
        if let Some(drop) = self.max_accuracy_drop {
            bounded("max_accuracy_drop", drop, "0..=1", |v| {
                (0.0..=1.0).contains(&v)
            });
        }
        if let Some(agreement) = self.min_shadow_agreement {
            bounded("min_shadow_agreement", agreement, "0..=1", |v| {
                (0.0..=1.0).contains(&v)
            });
        }
        if let Some(p) = self.min_distribution_p_value {
            bounded("min_distribution_p_value", p, "0 < p < 1", |v| {
                v > 0.0 && v < 1.0
            });
        }
        if let Some(psi) = self.max_output_drift_psi {
            bounded("max_output_drift_psi", psi, "a positive PSI", |v| v > 0.0);
        }
        if let Some(p) = self.min_output_ks_p {
            bounded("min_output_ks_p", p, "0 < p < 1", |v| v > 0.0 && v < 1.0);
        }
        if self.min_requests_for_rollback == 0 {
            report(
                errors,
                "gates.min_requests_for_rollback",
                "min_requests_for_rollback is 0; a gate needs at least 1 canary request to fail",
            );
        }
    }
}

fn report(errors: &mut Vec<ValidationError>, path: &str, message: impl Into<String>) {
    errors.push(ValidationError {
        path: path.to_owned(),
        message: message.into(),
    });
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use proptest::prelude::*;

    fn plan() -> RolloutPlan {
        RolloutPlan {
            model: "iris".into(),
            baseline: "1".into(),
            canary: "2".into(),
            steps: [5, 25, 50, 100]
                .into_iter()
                .map(|weight| Step {
                    weight,
                    min_duration_ms: 60_000,
                    min_requests: 100,
                })
                .collect(),
            gates: Gates::error_rate(0.01),
        }
    }

    fn paths(plan: &RolloutPlan) -> Vec<String> {
        match plan.validate() {
            Ok(()) => Vec::new(),
            Err(errors) => errors.into_iter().map(|e| e.path).collect(),
        }
    }

    #[test]
    fn a_sound_plan_validates() {
        assert_eq!(plan().validate(), Ok(()));
    }

    #[test]
    fn validation_lists_every_problem_with_its_path() {
        let mut bad = plan();
        bad.model = String::new();
        bad.canary = "1".into();
        bad.steps[1].weight = 5;
        bad.steps[2].min_requests = 0;
        bad.steps[3].weight = 90;
        bad.gates.max_error_rate_increase = f64::NAN;
        bad.gates.max_latency_ratio = Some(0.0);
        bad.gates.max_accuracy_drop = Some(1.5);
        bad.gates.min_shadow_agreement = Some(-0.1);
        bad.gates.min_distribution_p_value = Some(1.0);
        bad.gates.min_requests_for_rollback = 0;
        let errors = bad.validate().expect_err("many problems");
        let listed: Vec<&str> = errors.errors().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            listed,
            [
                "model",
                "canary",
                "steps[1].weight",
                "steps[2].min_requests",
                "steps[3].weight",
                "gates.max_error_rate_increase",
                "gates.max_latency_ratio",
                "gates.max_accuracy_drop",
                "gates.min_shadow_agreement",
                "gates.min_distribution_p_value",
                "gates.min_requests_for_rollback",
            ]
        );
        let text = errors.to_string();
        assert!(
            text.contains(r#"canary: canary and baseline are both version "1""#),
            "{text}"
        );
        assert!(
            text.contains("steps[1].weight: weight 5 does not exceed the previous step's 5"),
            "{text}"
        );
        assert!(
            text.contains("steps[3].weight: the last step has weight 90"),
            "{text}"
        );
    }

    #[test]
    fn steps_must_exist_stay_in_range_and_start_below_full_traffic() {
        let mut none = plan();
        none.steps.clear();
        assert_eq!(paths(&none), ["steps"]);

        let mut all_at_once = plan();
        all_at_once.steps = vec![all_at_once.steps[3]];
        assert_eq!(paths(&all_at_once), ["steps[0].weight"]);

        let mut out_of_range = plan();
        out_of_range.steps[0].weight = 0;
        out_of_range.steps[3].weight = 101;
        assert_eq!(
            paths(&out_of_range),
            ["steps[0].weight", "steps[3].weight", "steps[3].weight"]
        );
    }

    #[test]
    fn empty_versions_are_reported_once_each() {
        let mut bad = plan();
        bad.baseline = String::new();
        bad.canary = String::new();
        assert_eq!(paths(&bad), ["baseline", "canary"]);
    }

    #[test]
    fn toml_plan_parses_with_defaults_and_rejects_unknown_fields() {
        let parsed: RolloutPlan = toml::from_str(
            r#"
            model = "iris"
            baseline = "1"
            canary = "2"
            steps = [{ weight = 10, min_duration_ms = 1000, min_requests = 5 },
                     { weight = 100, min_duration_ms = 1000, min_requests = 5 }]
            gates = { max_error_rate_increase = 0.02, max_latency_ratio = 1.5 }
            "#,
        )
        .expect("valid plan");
        assert_eq!(parsed.gates.min_requests_for_rollback, 20);
        assert_eq!(parsed.gates.max_latency_ratio, Some(1.5));
        assert_eq!(parsed.validate(), Ok(()));

        let typo = toml::from_str::<RolloutPlan>(
            r#"
            model = "iris"
            baseline = "1"
            canary = "2"
            steps = [{ weight = 100, min_duration_ms = 1000, min_request = 5 }]
            gates = { max_error_rate_increase = 0.02 }
            "#,
        );
        assert!(typo.is_err());
    }

    /// The paths `validate` must report for `plan()` with these fields changed: an
    /// oracle written from the rules, independent of `check`'s code.
    fn expected_paths(p: &RolloutPlan) -> BTreeSet<String> {
        let mut paths = BTreeSet::new();
        if p.canary.is_empty() || p.canary == p.baseline {
            paths.insert("canary".to_owned());
        }
        match (p.steps.first(), p.steps.last()) {
            (Some(first), Some(last)) => {
                for (i, step) in p.steps.iter().enumerate() {
                    let out_of_range = !(1..=100).contains(&step.weight);
                    let not_increasing = i > 0 && step.weight <= p.steps[i - 1].weight;
                    if out_of_range || not_increasing {
                        paths.insert(format!("steps[{i}].weight"));
                    }
                    if step.min_requests == 0 {
                        paths.insert(format!("steps[{i}].min_requests"));
                    }
                }
                if last.weight != 100 {
                    paths.insert(format!("steps[{}].weight", p.steps.len() - 1));
                }
                if first.weight >= 100 {
                    paths.insert("steps[0].weight".to_owned());
                }
            }
            _ => {
                paths.insert("steps".to_owned());
            }
        }
        let increase = p.gates.max_error_rate_increase;
        if !(0.0..=1.0).contains(&increase) {
            paths.insert("gates.max_error_rate_increase".to_owned());
        }
        if p.gates
            .max_latency_ratio
            .is_some_and(|r| !r.is_finite() || r <= 0.0)
        {
            paths.insert("gates.max_latency_ratio".to_owned());
        }
        paths
    }

    /// Step weights: anything, small ones near the edges, and sound ladders.
    fn weights() -> impl Strategy<Value = Vec<u32>> {
        prop_oneof![
            proptest::collection::vec(any::<u32>(), 0..6),
            proptest::collection::vec(0u32..=101, 0..6),
            proptest::collection::btree_set(1u32..100, 0..5).prop_map(|set| {
                let mut ladder: Vec<u32> = set.into_iter().collect();
                ladder.push(100);
                ladder
            }),
        ]
    }

    proptest! {
        // Never write regression files next to the sources.
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn validation_reports_exactly_the_broken_rules(
            weights in weights(),
            requests in prop_oneof![Just(0u64), 1u64..1000, any::<u64>()],
            increase in prop_oneof![0.0f64..=1.0, any::<f64>()],
            ratio in proptest::option::of(prop_oneof![0.5f64..3.0, any::<f64>()]),
            canary in "[12]?",
        ) {
            let mut p = plan();
            p.canary = canary;
            p.steps = weights
                .into_iter()
                .map(|weight| Step { weight, min_duration_ms: 0, min_requests: requests })
                .collect();
            p.gates.max_error_rate_increase = increase;
            p.gates.max_latency_ratio = ratio;
            let expected = expected_paths(&p);
            match p.validate() {
                Ok(()) => prop_assert!(
                    expected.is_empty(),
                    "accepted, but these rules are broken: {:?}",
                    expected
                ),
                Err(errors) => {
                    let reported: BTreeSet<String> =
                        errors.errors().iter().map(|e| e.path.clone()).collect();
                    prop_assert_eq!(reported, expected);
                    prop_assert!(
                        errors.errors().iter().all(|e| !e.message.is_empty()),
                        "every problem says what is wrong: {}",
                        errors
                    );
                }
            }
        }
    }
}
