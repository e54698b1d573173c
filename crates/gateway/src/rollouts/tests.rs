//! The driver's logic against a fake target: what it sends where, when it retries,
//! and what it keeps across a restart. The same driver runs a gateway's rollouts and
//! the controller's, so these cover both.

use std::sync::Mutex;

use aviary_router::rollout::{Gates, Step};

use super::*;

/// A target that records the weights it is given and serves set evidence.
#[derive(Debug, Default)]
struct Fake {
    /// (canary weight, held) of every successful `set_weights`.
    weights: Mutex<Vec<(u32, bool)>>,
    /// How many `set_weights` calls fail before they succeed again.
    failures_left: Mutex<usize>,
    /// What `snapshot` returns.
    evidence: Mutex<MetricsSnapshot>,
    /// What `check` returns.
    problems: Vec<String>,
    /// `reset_step` calls.
    resets: Mutex<usize>,
}

impl Fake {
    fn weights(&self) -> Vec<(u32, bool)> {
        self.weights.lock().expect("lock").clone()
    }

    fn serve(&self, canary_requests: u64, canary_errors: u64) {
        let mut evidence = self.evidence.lock().expect("lock");
        evidence.canary = StepMetrics {
            requests: canary_requests,
            errors: canary_errors,
            ..StepMetrics::default()
        };
        evidence.baseline = StepMetrics {
            requests: 100,
            ..StepMetrics::default()
        };
    }
}

impl Target for Fake {
    async fn check(&self, _: &RolloutPlan) -> Vec<String> {
        self.problems.clone()
    }

    async fn snapshot(&self, _: &RolloutPlan) -> MetricsSnapshot {
        self.evidence.lock().expect("lock").clone()
    }

    async fn set_weights(
        &self,
        _: &RolloutPlan,
        weights: RolloutWeights,
        held: bool,
    ) -> Result<(), GatewayError> {
        assert_eq!(weights.canary_weight + weights.baseline_weight, 100);
        let mut failures = self.failures_left.lock().expect("lock");
        if *failures > 0 {
            *failures -= 1;
            return Err(GatewayError::Unreachable("gateway down".into()));
        }
        self.weights
            .lock()
            .expect("lock")
            .push((weights.canary_weight, held));
        Ok(())
    }

    async fn reset_step(&self, _: &RolloutPlan) -> Result<(), GatewayError> {
        *self.resets.lock().expect("lock") += 1;
        Ok(())
    }
}

fn plan(steps: &[u32]) -> RolloutPlan {
    RolloutPlan {
        model: "demo".into(),
        baseline: "1".into(),
        canary: "2".into(),
        steps: steps
            .iter()
            .map(|&weight| Step {
                weight,
                min_duration_ms: 0,
                min_requests: 10,
            })
            .collect(),
        gates: Gates::error_rate(0.05),
    }
}

async fn driver(target: Fake, state_file: Option<PathBuf>) -> Driver<Fake> {
    Driver::open(target, state_file).await.expect("opens")
}

#[tokio::test]
async fn a_rollout_holds_each_step_and_ends_with_weights_of_its_own() {
    let driver = driver(Fake::default(), None).await;
    let status = driver.start(plan(&[20, 100])).await.expect("starts");
    assert_eq!(status.rollout.canary_weight(), Some(20));
    assert_eq!(driver.target().weights(), [(20, true)]);

    driver.evaluate().await;
    assert_eq!(
        driver.target().weights(),
        [(20, true), (20, true)],
        "without evidence the step holds (and its weights are sent again)"
    );
    driver.target().serve(10, 0);
    driver.evaluate().await;
    driver.evaluate().await;
    let last = driver.status("demo").await.expect("status");
    assert_eq!(last.rollout.state().label(), "promoted");
    let weights = driver.target().weights();
    assert_eq!(
        weights.last(),
        Some(&(100, false)),
        "the final weights are the route's own: {weights:?}"
    );
    assert!(
        weights.contains(&(100, true)),
        "step 2 was held: {weights:?}"
    );
    let sent = weights.len();
    driver.evaluate().await;
    assert_eq!(
        driver.target().weights().len(),
        sent,
        "a finished rollout sends nothing more"
    );
}

#[tokio::test]
async fn a_failing_canary_rolls_back_to_the_baseline() {
    let driver = driver(Fake::default(), None).await;
    driver.start(plan(&[20, 100])).await.expect("starts");
    driver.target().serve(20, 20);
    driver.evaluate().await;
    let status = driver.status("demo").await.expect("status");
    assert_eq!(status.rollout.state().label(), "rolled back");
    assert_eq!(driver.target().weights().last(), Some(&(0, false)));
}

#[tokio::test]
async fn final_weights_that_did_not_arrive_are_sent_again_each_round() {
    let driver = driver(Fake::default(), None).await;
    driver.start(plan(&[50, 100])).await.expect("starts");
    *driver.target().failures_left.lock().expect("lock") = 2;
    driver
        .command("demo", Command::Abort, "test")
        .await
        .expect_err("the abort's weights did not arrive");
    driver.evaluate().await;
    assert_eq!(driver.target().weights(), [(50, true)], "still failing");
    driver.evaluate().await;
    assert_eq!(driver.target().weights(), [(50, true), (0, false)]);
    driver.evaluate().await;
    assert_eq!(driver.target().weights().len(), 2, "sent once it arrived");
}

#[tokio::test]
async fn a_plan_the_target_cannot_run_is_refused_with_every_problem() {
    let target = Fake {
        problems: vec!["canary: version \"2\" is not routable".into()],
        ..Fake::default()
    };
    let driver = driver(target, None).await;
    let mut bad = plan(&[50, 40]);
    bad.baseline = String::new();
    let Err(GatewayError::InvalidRollout(problems)) = driver.start(bad).await else {
        panic!("refused");
    };
    assert_eq!(
        problems.len(),
        4,
        "the target's and every one of the plan's: {problems:?}"
    );
    assert!(driver.target().weights().is_empty(), "nothing was applied");
    assert!(matches!(
        driver.status("demo").await,
        Err(GatewayError::NoRollout { .. })
    ));
}

#[tokio::test]
async fn a_reopened_driver_resumes_from_its_state_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state_file = dir.path().join("rollouts.json");
    let first = driver(Fake::default(), Some(state_file.clone())).await;
    first.start(plan(&[20, 100])).await.expect("starts");
    first
        .command("demo", Command::Pause, "hold it")
        .await
        .expect("pauses");
    drop(first);

    let resumed = driver(Fake::default(), Some(state_file)).await;
    assert_eq!(
        resumed.target().weights(),
        [(20, true)],
        "the saved step's weights are held again before the driver is used"
    );
    let status = resumed.status("demo").await.expect("status");
    assert_eq!(status.rollout.state().label(), "paused");
    assert_eq!(
        resumed
            .start(plan(&[50, 100]))
            .await
            .err()
            .map(|e| e.to_string()),
        Some(
            "model \"demo\" already has a rollout (paused to version \"2\"); abort it first".into()
        )
    );
}

#[tokio::test]
async fn configured_plans_start_once() {
    let driver = driver(Fake::default(), None).await;
    let config = |steps: &[u32]| {
        let plan = plan(steps);
        BTreeMap::from([(
            "demo".to_owned(),
            PlanConfig {
                baseline: plan.baseline,
                canary: plan.canary,
                steps: plan.steps,
                gates: plan.gates,
            },
        )])
    };
    assert!(
        driver
            .start_plans(&config(&[20, 100]))
            .await
            .expect("starts")
            .is_empty()
    );
    assert!(
        driver
            .start_plans(&config(&[20, 100]))
            .await
            .expect("same plan")
            .is_empty(),
        "the running plan is not started again"
    );
    let notes = driver
        .start_plans(&config(&[50, 100]))
        .await
        .expect("a note, not an error");
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].starts_with("rollouts.plans.demo: not started"),
        "{notes:?}"
    );
    assert_eq!(driver.target().weights(), [(20, true)]);
}

#[tokio::test]
async fn final_weights_that_did_not_arrive_before_a_restart_are_sent_after_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state_file = dir.path().join("rollouts.json");
    let first = driver(Fake::default(), Some(state_file.clone())).await;
    first.start(plan(&[50, 100])).await.expect("starts");
    *first.target().failures_left.lock().expect("lock") = 1;
    first
        .command("demo", Command::Promote, "ship it")
        .await
        .expect_err("the promotion's weights did not arrive");
    drop(first);

    let reopened = driver(Fake::default(), Some(state_file.clone())).await;
    assert_eq!(
        reopened.target().weights(),
        [(100, false)],
        "sent again on open"
    );
    reopened.evaluate().await;
    drop(reopened);
    let again = driver(Fake::default(), Some(state_file)).await;
    assert!(
        again.target().weights().is_empty(),
        "once they arrived they are not sent again"
    );
}

#[tokio::test]
async fn a_state_file_of_bare_rollouts_still_loads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state_file = dir.path().join("rollouts.json");
    let mut rollout = Rollout::new(plan(&[50, 100])).expect("valid plan");
    rollout.start(1).expect("starts");
    std::fs::write(&state_file, serde_json::to_vec(&[&rollout]).expect("json")).expect("write");
    let driver = driver(Fake::default(), Some(state_file)).await;
    assert_eq!(driver.target().weights(), [(50, true)]);
}
