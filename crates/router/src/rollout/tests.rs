//! The state machine driven end to end with a simulated clock.

use proptest::prelude::*;

use super::*;

const MINUTE: u64 = 60_000;

fn plan() -> RolloutPlan {
    RolloutPlan {
        model: "iris".into(),
        baseline: "1".into(),
        canary: "2".into(),
        steps: [5, 25, 50, 100]
            .into_iter()
            .map(|weight| Step {
                weight,
                min_duration_ms: MINUTE,
                min_requests: 100,
            })
            .collect(),
        gates: Gates {
            max_latency_ratio: Some(1.5),
            ..Gates::error_rate(0.01)
        },
    }
}

fn version(requests: u64, errors: u64, p99_us: u64) -> StepMetrics {
    StepMetrics {
        requests,
        errors,
        latency_p99_us: Some(p99_us),
        accuracy: None,
    }
}

/// Canary and baseline both at 0.5% errors and 10 ms p99; the baseline has no traffic at 100%.
fn healthy(canary_requests: u64, canary_weight: u32) -> MetricsSnapshot {
    let baseline = if canary_weight < 100 {
        version(1000, 5, 10_000)
    } else {
        StepMetrics::default()
    };
    MetricsSnapshot {
        canary: version(canary_requests, canary_requests / 200, 10_000),
        baseline,
        ..MetricsSnapshot::default()
    }
}

fn started(plan: RolloutPlan) -> Rollout {
    let mut rollout = Rollout::new(plan).expect("valid plan");
    rollout.start(0).expect("pending rollout starts");
    rollout
}

fn set_weights(canary: u32) -> Action {
    Action::SetWeights {
        canary_weight: canary,
        baseline_weight: 100 - canary,
    }
}

fn step_of(rollout: &Rollout) -> Option<usize> {
    match rollout.state() {
        RolloutState::Progressing { step, .. } | RolloutState::Paused { step, .. } => Some(*step),
        _ => None,
    }
}

/// Drives the current step to completion: one evaluation too early, one when it is due.
fn pass_step(rollout: &mut Rollout, step_started_ms: u64) -> (u64, Vec<Action>) {
    let weight = rollout.canary_weight().expect("running");
    let early = rollout.evaluate(step_started_ms + MINUTE / 2, &healthy(500, weight));
    assert_eq!(early, [], "advanced before the minimum duration");
    let due = step_started_ms + MINUTE;
    (due, rollout.evaluate(due, &healthy(500, weight)))
}

#[test]
fn healthy_canary_promotes_through_every_step() {
    let mut rollout = Rollout::new(plan()).expect("valid plan");
    assert_eq!(rollout.canary_weight(), None);
    assert_eq!(
        rollout.start(0),
        Ok(vec![set_weights(5), Action::ResetStepMetrics])
    );

    let mut now = 0;
    let mut applied = vec![5];
    for _ in 0..4 {
        let (due, actions) = pass_step(&mut rollout, now);
        now = due;
        match actions.first() {
            Some(Action::SetWeights { canary_weight, .. }) => applied.push(*canary_weight),
            other => panic!("expected new weights, got {other:?}"),
        }
    }
    assert_eq!(applied, [5, 25, 50, 100, 100]);
    assert_eq!(rollout.state(), &RolloutState::Promoted);
    assert_eq!(rollout.canary_weight(), Some(100));

    // The start, then one decision per step.
    let history = rollout.history();
    assert_eq!(history.len(), 5);
    for (i, record) in history[1..].iter().enumerate() {
        assert!(
            record.reason.starts_with(&format!("step {}/4", i + 1)),
            "{}",
            record.reason
        );
        assert_eq!(record.numbers["step"], (i + 1) as f64);
        assert_eq!(record.numbers["canary_requests"], 500.0);
        assert_eq!(record.numbers["elapsed_ms"], MINUTE as f64);
        assert!(record.numbers.contains_key("latency_ratio"));
    }
    assert_eq!(history[4].to, RolloutState::Promoted);
    assert!(history[4].reason.ends_with("promoting the canary"));
    // At 100% the canary is still judged, against the baseline as it was at 50%.
    assert_eq!(history[4].numbers["baseline_requests"], 1000.0);
    assert_eq!(rollout.evaluate(now + MINUTE, &healthy(500, 100)), []);
}

#[test]
fn error_rate_regression_rolls_back_within_one_evaluation() {
    let mut rollout = started(plan());
    let mut bad = healthy(60, 5);
    bad.canary.errors = 5;
    bad.baseline.errors = 10;
    // Long before the step's minimum duration and requests.
    assert_eq!(rollout.evaluate(1_000, &bad), [set_weights(0)]);
    let RolloutState::RolledBack { reason } = rollout.state() else {
        panic!("expected a rollback, got {:?}", rollout.state());
    };
    assert_eq!(
        reason,
        "gate failed at step 1/4 (canary 5%): canary error rate 0.083 exceeds baseline 0.010 + 0.010"
    );
    let record = rollout.history().last().expect("recorded");
    assert_eq!(record.actions, [set_weights(0)]);
    assert_eq!(record.numbers["canary_requests"], 60.0);
    assert!((record.numbers["canary_error_rate"] - 5.0 / 60.0).abs() < 1e-12);
    assert_eq!(record.numbers["baseline_error_rate"], 0.01);
    assert_eq!(record.numbers["max_error_rate_increase"], 0.01);

    // Terminal: nothing moves it any more.
    assert_eq!(rollout.evaluate(10 * MINUTE, &healthy(500, 5)), []);
    assert_eq!(rollout.canary_weight(), Some(0));
    assert!(rollout.resume(10 * MINUTE, "").is_err());
}

#[test]
fn a_few_unlucky_requests_hold_the_step_instead_of_rolling_back() {
    let mut rollout = started(plan());
    let mut one_error = healthy(1, 5);
    one_error.canary.errors = 1;
    assert_eq!(rollout.evaluate(2 * MINUTE, &one_error), []);
    assert_eq!(step_of(&rollout), Some(0));
    let waiting = rollout.waiting_for(2 * MINUTE, &one_error);
    assert!(
        waiting[0].contains("too little evidence to roll back: 1 of 20 canary requests"),
        "{waiting:?}"
    );

    one_error.canary.requests = 20;
    one_error.canary.errors = 2;
    assert_eq!(rollout.evaluate(2 * MINUTE, &one_error), [set_weights(0)]);
}

#[test]
fn latency_regression_rolls_back() {
    let mut rollout = started(plan());
    let (now, _) = pass_step(&mut rollout, 0);
    let mut slow = healthy(40, 25);
    slow.canary.latency_p99_us = Some(30_000);
    assert_eq!(rollout.evaluate(now + 1_000, &slow), [set_weights(0)]);
    let record = rollout.history().last().expect("recorded");
    assert_eq!(record.numbers["latency_ratio"], 3.0);
    assert_eq!(record.numbers["max_latency_ratio"], 1.5);
    assert!(
        record
            .reason
            .contains("canary p99 latency 30000 µs is 3.00x baseline p99 10000 µs, above 1.5x"),
        "{}",
        record.reason
    );
}

#[test]
fn too_little_traffic_waits_and_no_traffic_never_promotes() {
    let mut rollout = started(plan());
    let short = healthy(99, 5);
    assert_eq!(rollout.evaluate(10 * MINUTE, &short), []);
    assert_eq!(
        rollout.waiting_for(10 * MINUTE, &short),
        ["99 of 100 canary requests"]
    );

    let mut no_baseline = healthy(500, 5);
    no_baseline.baseline = StepMetrics::default();
    assert_eq!(rollout.evaluate(10 * MINUTE, &no_baseline), []);
    assert!(
        rollout
            .waiting_for(10 * MINUTE, &no_baseline)
            .contains(&"no baseline requests in this step".to_owned())
    );

    let nothing = MetricsSnapshot::default();
    for day in 1..=30 {
        assert_eq!(rollout.evaluate(day * 24 * 60 * MINUTE, &nothing), []);
    }
    assert_eq!(step_of(&rollout), Some(0));
    assert_eq!(rollout.history().len(), 1);
}

#[test]
fn a_clock_that_went_backwards_does_not_advance() {
    let mut rollout = Rollout::new(plan()).expect("valid plan");
    rollout.start(10 * MINUTE).expect("starts");
    assert_eq!(rollout.evaluate(0, &healthy(500, 5)), []);
    assert_eq!(step_of(&rollout), Some(0));
}

#[test]
fn pause_blocks_advancing_and_resume_restarts_the_step() {
    let mut rollout = started(plan());
    assert_eq!(rollout.pause(10_000, "checking dashboards"), Ok(vec![]));
    assert_eq!(rollout.evaluate(5 * MINUTE, &healthy(500, 5)), []);
    assert_eq!(
        rollout.waiting_for(5 * MINUTE, &healthy(500, 5)),
        ["paused (see the last decision); resume to go on"]
    );
    assert_eq!(
        rollout.history().last().map(|r| r.reason.as_str()),
        Some("paused at step 1/4 (canary 5%) by operator: checking dashboards")
    );

    let resumed_at = 6 * MINUTE;
    assert_eq!(
        rollout.resume(resumed_at, ""),
        Ok(vec![set_weights(5), Action::ResetStepMetrics])
    );
    let (_, actions) = pass_step(&mut rollout, resumed_at);
    assert_eq!(actions, [set_weights(25), Action::ResetStepMetrics]);
    assert_eq!(step_of(&rollout), Some(1));
}

#[test]
fn a_paused_rollout_still_rolls_back_on_a_failed_gate() {
    let mut rollout = started(plan());
    rollout
        .pause(1_000, "")
        .expect("progressing rollout pauses");
    let mut bad = healthy(100, 5);
    bad.canary.errors = 50;
    assert_eq!(rollout.evaluate(2_000, &bad), [set_weights(0)]);
    assert!(matches!(rollout.state(), RolloutState::RolledBack { .. }));
}

#[test]
fn abort_returns_all_traffic_to_the_baseline_and_is_terminal() {
    let mut rollout = started(plan());
    let (now, _) = pass_step(&mut rollout, 0);
    assert_eq!(
        rollout.abort(now + 1, "wrong model"),
        Ok(vec![set_weights(0)])
    );
    assert_eq!(
        rollout.state(),
        &RolloutState::Aborted {
            reason: "aborted by operator: wrong model".into()
        }
    );
    assert_eq!(rollout.evaluate(now + 10 * MINUTE, &healthy(500, 25)), []);
    let err = rollout.promote_now(now + 2, "").expect_err("terminal");
    assert_eq!(
        err.to_string(),
        r#"cannot promote the rollout of model "iris": it is aborted"#
    );
    assert!(rollout.pause(now + 2, "").is_err());
    assert!(rollout.abort(now + 2, "").is_err());
    assert!(rollout.start(now + 2).is_err());
}

#[test]
fn promote_now_gives_the_canary_all_traffic() {
    let mut rollout = started(plan());
    assert_eq!(rollout.promote_now(5_000, ""), Ok(vec![set_weights(100)]));
    assert_eq!(rollout.state(), &RolloutState::Promoted);
    let record = rollout.history().last().expect("recorded");
    assert_eq!(
        record.from,
        RolloutState::Progressing {
            step: 0,
            step_started_ms: 0
        }
    );
    assert_eq!(record.reason, "promoted by operator");
    assert_eq!(record.numbers["canary_weight"], 5.0);
}

#[test]
fn commands_that_do_not_fit_the_state_are_refused() {
    let mut rollout = Rollout::new(plan()).expect("valid plan");
    assert_eq!(rollout.evaluate(MINUTE, &healthy(500, 5)), []);
    let err = rollout.pause(0, "").expect_err("pending");
    assert_eq!(err.command, "pause");
    assert_eq!(err.state, "pending");
    assert!(rollout.resume(0, "").is_err());
    rollout.start(0).expect("starts");
    assert!(rollout.start(1).is_err());
    assert!(rollout.resume(1, "").is_err());
    assert_eq!(rollout.history().len(), 1);
}

#[test]
fn a_persisted_rollout_resumes_where_it_was() {
    let mut rollout = started(plan());
    let (now, _) = pass_step(&mut rollout, 0);
    let (now, _) = pass_step(&mut rollout, now);
    assert_eq!(step_of(&rollout), Some(2));

    let saved = toml::to_string(&rollout).expect("serializes");
    let mut restored: Rollout = toml::from_str(&saved).expect("deserializes");
    assert_eq!(restored, rollout);
    assert_eq!(restored.canary_weight(), Some(50));

    let (now, actions) = pass_step(&mut restored, now);
    assert_eq!(actions, [set_weights(100), Action::ResetStepMetrics]);
    let (_, actions) = pass_step(&mut restored, now);
    assert_eq!(actions, [set_weights(100)]);
    assert_eq!(restored.state(), &RolloutState::Promoted);
    assert_eq!(restored.history().len(), 5);
}

#[test]
fn a_corrupt_state_file_is_rejected_with_paths() {
    let mut rollout = started(plan());
    rollout.pause(1, "").expect("pauses");
    let saved = toml::to_string(&rollout).expect("serializes");
    let corrupt = saved
        .replace("step = 0", "step = 7")
        .replace("weight = 25", "weight = 75");
    assert_ne!(corrupt, saved);
    let err = toml::from_str::<Rollout>(&corrupt).expect_err("invalid");
    let text = err.to_string();
    assert!(text.contains("plan.steps[2].weight"), "{text}");
    assert!(
        text.contains("state.step: step index 7 does not exist; the plan has 4 steps"),
        "{text}"
    );
}

#[test]
fn the_full_traffic_step_is_judged_against_the_baseline_of_the_step_before() {
    let mut rollout = started(plan());
    let mut now = 0;
    for _ in 0..3 {
        now = pass_step(&mut rollout, now).0;
    }
    assert_eq!(rollout.canary_weight(), Some(100));
    let mut worse = healthy(100, 100);
    worse.canary.errors = 5;
    assert_eq!(rollout.evaluate(now + 1_000, &worse), [set_weights(0)]);
    let record = rollout.history().last().expect("recorded");
    assert!(
        record
            .reason
            .contains("canary error rate 0.050 exceeds baseline (as in step 3) 0.005 + 0.010"),
        "{}",
        record.reason
    );
}

#[test]
fn accuracy_gate_rolls_back_a_worse_canary_and_waits_for_feedback() {
    let mut plan = plan();
    plan.gates.max_accuracy_drop = Some(0.02);
    let mut rollout = started(plan);

    // No feedback yet: everything else is in, but the step holds.
    assert_eq!(rollout.evaluate(MINUTE, &healthy(500, 5)), []);
    assert_eq!(
        rollout.waiting_for(MINUTE, &healthy(500, 5)),
        ["accuracy feedback not reported for both versions"]
    );

    let mut fine = healthy(500, 5);
    fine.canary.accuracy = Some(0.92);
    fine.baseline.accuracy = Some(0.93);
    assert_eq!(
        rollout.evaluate(MINUTE, &fine),
        [set_weights(25), Action::ResetStepMetrics]
    );

    let mut worse = healthy(50, 25);
    worse.canary.accuracy = Some(0.85);
    worse.baseline.accuracy = Some(0.93);
    assert_eq!(rollout.evaluate(MINUTE + 1, &worse), [set_weights(0)]);
    let record = rollout.history().last().expect("recorded");
    assert_eq!(record.numbers["canary_accuracy"], 0.85);
    assert!(
        record
            .reason
            .contains("canary accuracy 0.850 is below baseline 0.930 - 0.020")
    );
}

#[test]
fn shadow_agreement_and_distribution_gates_apply_when_configured() {
    let mut plan = plan();
    plan.gates.min_shadow_agreement = Some(0.95);
    plan.gates.min_distribution_p_value = Some(0.01);

    let mut rollout = started(plan.clone());
    let mut agreeing = healthy(500, 5);
    agreeing.shadow_agreement = Some(0.99);
    assert_eq!(
        rollout.waiting_for(MINUTE, &agreeing),
        ["output distribution test not reported"]
    );
    agreeing.distribution_p_value = Some(0.4);
    assert_eq!(
        rollout.evaluate(MINUTE, &agreeing),
        [set_weights(25), Action::ResetStepMetrics]
    );

    let mut disagreeing = healthy(100, 25);
    disagreeing.shadow_agreement = Some(0.80);
    disagreeing.distribution_p_value = Some(0.4);
    assert_eq!(rollout.evaluate(MINUTE + 1, &disagreeing), [set_weights(0)]);
    assert!(
        rollout
            .history()
            .last()
            .expect("recorded")
            .reason
            .contains("canary agrees with the baseline on 0.800 of compared answers, below 0.950")
    );

    let mut rollout = started(plan);
    let mut shifted = healthy(100, 5);
    shifted.shadow_agreement = Some(0.99);
    shifted.distribution_p_value = Some(0.001);
    assert_eq!(rollout.evaluate(1, &shifted), [set_weights(0)]);
    assert_eq!(
        rollout.history().last().expect("recorded").numbers["distribution_p_value"],
        0.001
    );
}

fn at(value: f64, feature: &str) -> Option<FeatureValue> {
    Some(FeatureValue {
        value,
        feature: feature.into(),
    })
}

#[test]
fn output_drift_gates_roll_back_a_canary_whose_outputs_move() {
    let mut plan = plan();
    plan.gates.max_output_drift_psi = Some(0.2);
    plan.gates.min_output_ks_p = Some(0.01);

    let mut rollout = started(plan.clone());
    let mut alike = healthy(500, 5);
    assert_eq!(
        rollout.waiting_for(MINUTE, &alike).len(),
        2,
        "neither comparison measured yet holds the step"
    );
    alike.output_drift_psi = at(0.03, "output probabilities/column 0");
    alike.output_ks_p_value = at(0.4, "output label/predicted class");
    assert_eq!(
        rollout.evaluate(MINUTE, &alike),
        [set_weights(25), Action::ResetStepMetrics]
    );

    let mut moved = healthy(100, 25);
    moved.output_drift_psi = at(0.61, "output probabilities/column 0");
    moved.output_ks_p_value = at(1e-7, "output probabilities/column 0");
    assert_eq!(rollout.evaluate(MINUTE + 1, &moved), [set_weights(0)]);
    let record = rollout.history().last().expect("recorded");
    assert!(matches!(rollout.state(), RolloutState::RolledBack { .. }));
    assert_eq!(
        record.reason,
        "gate failed at step 2/4 (canary 25%): canary outputs drift from the baseline's: \
         PSI 0.610 on output probabilities/column 0 is above 0.2; canary outputs drift from \
         the baseline's: p-value 0.0000 on output probabilities/column 0 is below 0.01"
    );
    assert_eq!(record.numbers["output_drift_psi"], 0.61);
    assert_eq!(record.numbers["output_ks_p_value"], 1e-7);
    assert_eq!(record.numbers["max_output_drift_psi"], 0.2);
}

#[test]
fn input_drift_pauses_instead_of_promoting_when_asked() {
    let mut drifting = healthy(500, 5);
    drifting.input_drift = Some(vec!["canary input/petal_width: PSI 0.700".into()]);

    // Not asked: input drift alone changes nothing.
    let mut rollout = started(plan());
    assert_eq!(
        rollout.evaluate(MINUTE, &drifting),
        [set_weights(25), Action::ResetStepMetrics]
    );

    let mut plan = plan();
    plan.gates.pause_on_input_drift = true;
    // Not measured yet: the step holds, it does not count as no drift.
    let mut rollout = started(plan.clone());
    let unmeasured = healthy(500, 5);
    assert_eq!(rollout.evaluate(MINUTE, &unmeasured), []);
    assert_eq!(
        rollout.waiting_for(MINUTE, &unmeasured),
        [
            "input drift not measured yet (both versions' cards need [drift], and every input feature a verdict)"
        ]
    );
    let mut steady = unmeasured.clone();
    steady.input_drift = Some(Vec::new());
    assert_eq!(
        rollout.evaluate(MINUTE, &steady),
        [set_weights(25), Action::ResetStepMetrics]
    );

    let mut rollout = started(plan);
    assert_eq!(rollout.evaluate(MINUTE, &drifting), []);
    assert!(matches!(
        rollout.state(),
        RolloutState::Paused { step: 0, .. }
    ));
    let record = rollout.history().last().expect("recorded");
    assert_eq!(
        record.reason,
        "paused at step 1/4 (canary 5%): input drift makes the comparison unreliable: \
         canary input/petal_width: PSI 0.700"
    );
    assert_eq!(record.numbers["input_drift_features"], 1.0);
    // Paused, it stays paused, and a failed gate still rolls back.
    assert_eq!(rollout.evaluate(MINUTE + 1, &drifting), []);
    assert_eq!(rollout.history().len(), 2);
    let mut failing = drifting.clone();
    failing.canary.errors = 400;
    assert_eq!(rollout.evaluate(MINUTE + 2, &failing), [set_weights(0)]);
}

#[test]
fn an_invalid_plan_never_becomes_a_rollout() {
    let mut bad = plan();
    bad.steps.clear();
    bad.canary = "1".into();
    let err = Rollout::new(bad).expect_err("invalid");
    assert_eq!(err.errors().len(), 2);
}

#[derive(Debug, Clone)]
enum Op {
    Start,
    Evaluate(Box<MetricsSnapshot>),
    Pause,
    Resume,
    PromoteNow,
    Abort,
}

fn any_plan() -> impl Strategy<Value = RolloutPlan> {
    (
        proptest::collection::btree_set(1u32..100, 1..4),
        0u64..5_000,
        1u64..200,
        proptest::option::of(0.5f64..3.0),
        proptest::option::of(0.0f64..0.2),
        proptest::option::of(0.5f64..1.0),
        proptest::option::of(0.001f64..0.2),
        1u64..50,
        (
            proptest::option::of(0.01f64..2.0),
            proptest::option::of(0.001f64..0.5),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                weights,
                min_duration_ms,
                min_requests,
                latency,
                accuracy,
                agreement,
                p,
                sample,
                (max_psi, min_output_p, pause_on_input_drift),
            )| {
                let mut plan = plan();
                plan.steps = weights
                    .into_iter()
                    .chain([100])
                    .map(|weight| Step {
                        weight,
                        min_duration_ms,
                        min_requests,
                    })
                    .collect();
                plan.gates = Gates {
                    max_latency_ratio: latency,
                    max_accuracy_drop: accuracy,
                    min_shadow_agreement: agreement,
                    min_distribution_p_value: p,
                    min_requests_for_rollback: sample,
                    max_output_drift_psi: max_psi,
                    min_output_ks_p: min_output_p,
                    pause_on_input_drift,
                    ..Gates::error_rate(0.01)
                };
                plan
            },
        )
}

fn any_version() -> impl Strategy<Value = StepMetrics> {
    (
        prop_oneof![Just(0u64), 0u64..2_000, any::<u64>()],
        prop_oneof![Just(0u64), 0u64..50, any::<u64>()],
        proptest::option::of(any::<u64>()),
        proptest::option::of(prop_oneof![0.0f64..=1.0, any::<f64>()]),
    )
        .prop_map(|(requests, errors, latency_p99_us, accuracy)| StepMetrics {
            requests,
            errors,
            latency_p99_us,
            accuracy,
        })
}

fn any_op() -> impl Strategy<Value = Op> {
    let snapshot = (
        any_version(),
        any_version(),
        proptest::option::of(prop_oneof![0.0f64..=1.0, any::<f64>()]),
        proptest::option::of(prop_oneof![0.0f64..=1.0, any::<f64>()]),
        (
            proptest::option::of(prop_oneof![0.0f64..=3.0, any::<f64>()]),
            proptest::option::of(prop_oneof![0.0f64..=1.0, any::<f64>()]),
            proptest::option::of(any::<bool>()),
        ),
    )
        .prop_map(
            |(canary, baseline, shadow_agreement, distribution_p_value, (psi, p, drifting))| {
                MetricsSnapshot {
                    canary,
                    baseline,
                    shadow_agreement,
                    distribution_p_value,
                    output_drift_psi: psi.and_then(|v| at(v, "output y/column 0")),
                    output_ks_p_value: p.and_then(|v| at(v, "output y/column 0")),
                    input_drift: drifting.map(|drifting| match drifting {
                        true => vec!["canary input x/column 0: PSI 1.000".to_owned()],
                        false => Vec::new(),
                    }),
                }
            },
        );
    prop_oneof![
        1 => Just(Op::Start),
        12 => snapshot.prop_map(|s| Op::Evaluate(Box::new(s))),
        1 => Just(Op::Pause),
        1 => Just(Op::Resume),
        1 => Just(Op::PromoteNow),
        1 => Just(Op::Abort),
    ]
}

fn apply(rollout: &mut Rollout, now: u64, op: &Op) -> Vec<Action> {
    match op {
        Op::Start => rollout.start(now),
        Op::Evaluate(snapshot) => Ok(rollout.evaluate(now, snapshot)),
        Op::Pause => rollout.pause(now, ""),
        Op::Resume => rollout.resume(now, ""),
        Op::PromoteNow => rollout.promote_now(now, ""),
        Op::Abort => rollout.abort(now, ""),
    }
    .unwrap_or_default()
}

proptest! {
    #[test]
    fn weights_stay_in_range_and_terminal_states_stick(
        plan in any_plan(),
        ops in proptest::collection::vec((any::<u64>(), any_op()), 1..40),
    ) {
        let mut rollout = Rollout::new(plan).expect("generated plans are valid");
        for (now, op) in &ops {
            let was_terminal = rollout.state().clone();
            let history_before = rollout.history().len();
            let actions = apply(&mut rollout, *now, op);
            for action in &actions {
                if let Action::SetWeights { canary_weight, baseline_weight } = action {
                    prop_assert!(*canary_weight <= 100);
                    prop_assert_eq!(canary_weight + baseline_weight, 100);
                }
            }
            if was_terminal.is_terminal() {
                prop_assert_eq!(rollout.state(), &was_terminal);
                prop_assert!(actions.is_empty());
            }
            // Actions only ever come with a recorded decision whose numbers persist as JSON.
            if !actions.is_empty() {
                prop_assert_eq!(rollout.history().len(), history_before + 1);
            }
            for record in rollout.history() {
                prop_assert!(record.numbers.values().all(|v| v.is_finite()));
            }
        }
    }

    #[test]
    fn no_canary_traffic_never_promotes(
        plan in any_plan(),
        steps in proptest::collection::vec((0u64..10_000_000, any_version()), 1..40),
    ) {
        let mut rollout = Rollout::new(plan).expect("generated plans are valid");
        rollout.start(0).expect("starts");
        let mut now = 0u64;
        for (dt, baseline) in steps {
            now += dt;
            let snapshot = MetricsSnapshot { baseline, ..MetricsSnapshot::default() };
            prop_assert_eq!(rollout.evaluate(now, &snapshot), Vec::<Action>::new());
        }
        prop_assert_eq!(step_of(&rollout), Some(0));
    }
}
