//! Progressive rollouts driven by a real gateway on its own traffic: a healthy canary is
//! promoted step by step with no operator action, a failing one is rolled back with the
//! error rates (or, from feedback, the accuracies) as the reason, a shadow on the
//! canary feeds the agreement gates, a plan in the config file starts by itself, and a
//! restarted gateway carries on where it stopped.
mod support;

use std::time::Duration;

use aviary::pb::admin::{RolloutGates, RolloutStatus};
use aviary_gateway::Mode;
use support::{Load, demo_plan, weight_of};

const ROWS: [[f32; 4]; 2] = [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]];

/// A gateway over the test repository with `demo` on version 1 only, judging rollouts
/// every 100 ms; `extra` goes into the config text as is.
fn config(version_2: &str, extra: &str) -> String {
    format!(
        r#"
[repository]
path = "{{models}}"
instances = 2

[rollouts]
evaluate_interval_ms = 100
{extra}

[routes.demo]
versions = [ {{ version = "1", weight = 100 }}, {{ version = "2", weight = 0{version_2} }} ]
"#
    )
}

async fn rollout(gateway: &support::Running) -> RolloutStatus {
    gateway.admin().await.rollout("demo").await
}

async fn weights(gateway: &support::Running) -> Vec<(String, u32)> {
    gateway.admin().await.weights("demo").await
}

/// Two unpinned clients on `gateway`.
async fn load(gateway: &support::Running) -> Load {
    Load::start(&[gateway], 2, &ROWS).await
}

async fn ends(gateway: &support::Running, state: &str) -> bool {
    support::eventually(Duration::from_secs(60), || async {
        rollout(gateway).await.terminal
    })
    .await
        && rollout(gateway).await.state == state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_canary_is_promoted_step_by_step_without_an_operator() {
    let gateway = support::start_gateway(&config("", ""), Mode::Embedded)
        .await
        .expect("gateway starts");
    let load = load(&gateway).await;
    let started = gateway
        .admin()
        .await
        .rollouts()
        .start_rollout(demo_plan(200))
        .await
        .expect("plan is valid")
        .into_inner();
    assert_eq!((started.state.as_str(), started.step), ("progressing", 1));
    assert_eq!(started.canary_weight, 50);

    let promoted = ends(&gateway, "promoted").await;
    let (answered, failures) = load.finish().await;
    let status = rollout(&gateway).await;
    assert!(promoted, "rollout ends promoted: {status:?}");
    assert!(failures.is_empty(), "no request failed: {failures:?}");
    assert!(answered >= 40, "both steps saw traffic: {answered}");
    let weights = weights(&gateway).await;
    assert_eq!(weight_of(&weights, "2"), 100, "{weights:?}");
    assert_eq!(weight_of(&weights, "1"), 0, "{weights:?}");
    assert_eq!(status.canary_weight, 100);

    // Started at step 1, moved to step 2, promoted: one record per step, each with why.
    let path: Vec<(&str, &str, u32)> = status
        .history
        .iter()
        .map(|d| (d.from.as_str(), d.to.as_str(), d.step))
        .collect();
    assert_eq!(
        path,
        [
            ("pending", "progressing", 1),
            ("progressing", "progressing", 2),
            ("progressing", "promoted", 0),
        ],
        "{status:?}"
    );
    assert!(
        status.history.iter().all(|d| !d.reason.is_empty()),
        "{status:?}"
    );
    assert!(status.history[2].reason.contains("promoting"), "{status:?}");
    let canary_requests = status.history[1].numbers.get("canary_requests");
    assert!(
        canary_requests.is_some_and(|&n| n >= 20.0),
        "the step advanced on its canary requests: {:?}",
        status.history[1].numbers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_canary_is_rolled_back_on_its_error_rate() {
    let gateway = support::start_gateway(
        &config(", fault = { error_rate = 1.0 }", ""),
        Mode::Embedded,
    )
    .await
    .expect("gateway starts");
    let load = load(&gateway).await;
    gateway
        .admin()
        .await
        .rollouts()
        .start_rollout(demo_plan(200))
        .await
        .expect("plan is valid");

    let rolled_back = ends(&gateway, "rolled back").await;
    let (answered, failures) = load.finish().await;
    let status = rollout(&gateway).await;
    assert!(rolled_back, "rollout ends rolled back: {status:?}");
    assert_eq!(status.canary_weight, 0);
    let weights = weights(&gateway).await;
    assert_eq!(weight_of(&weights, "2"), 0, "{weights:?}");
    assert_eq!(weight_of(&weights, "1"), 100, "{weights:?}");

    let last = status.history.last().expect("a decision");
    assert_eq!(last.to, "rolled back");
    assert!(last.reason.contains("error rate"), "{}", last.reason);
    assert!(
        last.numbers.get("canary_error_rate") == Some(&1.0),
        "{:?}",
        last.numbers
    );
    assert!(answered > 0, "the baseline kept answering");
    assert!(
        failures.len() >= 20,
        "the canary failed enough to be judged"
    );
    // The canary's own failures, then its breaker failing it fast: the error gate
    // sees both as the canary's.
    for message in &failures {
        assert!(
            (message.contains("injected fault") || message.contains("circuit breaker is open"))
                && message.contains("version \"2\""),
            "only the canary fails: {message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_resumes_the_rollout_at_its_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_file = dir.path().join("rollouts.json");
    let text = config(
        "",
        &format!("state_file = {:?}", state_file.display().to_string()),
    );
    let gateway = support::start_gateway(&text, Mode::Embedded)
        .await
        .expect("gateway starts");
    let started = gateway
        .admin()
        .await
        .rollouts()
        .start_rollout(demo_plan(3_600_000))
        .await
        .expect("plan is valid")
        .into_inner();
    assert_eq!(weight_of(&weights(&gateway).await, "2"), 50);
    gateway.stop().await.expect("gateway stops");
    assert!(state_file.exists(), "the rollout was saved");

    // The new gateway's config routes everything to version 1 again; the saved rollout
    // puts its step's weights back.
    let gateway = support::start_gateway(&text, Mode::Embedded)
        .await
        .expect("gateway restarts");
    let resumed = rollout(&gateway).await;
    assert_eq!(
        (resumed.state.as_str(), resumed.step, resumed.canary_weight),
        ("progressing", 1, 50)
    );
    assert_eq!(resumed.history, started.history);
    let weights = weights(&gateway).await;
    assert_eq!(weight_of(&weights, "2"), 50, "{weights:?}");
    assert_eq!(weight_of(&weights, "1"), 50, "{weights:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_plans_list_every_problem_and_commands_respect_the_state() {
    let gateway = support::start_gateway(&config("", ""), Mode::Embedded)
        .await
        .expect("gateway starts");
    let admin = gateway.admin().await;
    let mut bad = demo_plan(200);
    bad.canary = "7".into();
    bad.steps[1].weight = 90;
    let error = admin
        .rollouts()
        .start_rollout(bad)
        .await
        .expect_err("invalid plan");
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(error.message().contains("canary: version \"7\""), "{error}");
    assert!(error.message().contains("steps[1].weight"), "{error}");

    // The shadow gates need the route's shadow on the canary; demo has none.
    let mut shadow_gate = demo_plan(200);
    shadow_gate.gates = Some(RolloutGates {
        min_shadow_agreement: Some(0.9),
        ..Default::default()
    });
    let error = admin
        .rollouts()
        .start_rollout(shadow_gate)
        .await
        .expect_err("no shadow on the canary");
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(
        error.message().contains("gates.min_shadow_agreement")
            && error.message().contains("routes.demo.shadow.version"),
        "{error}"
    );

    let error = admin
        .rollouts()
        .get_rollout(aviary::pb::admin::GetRolloutRequest {
            model: "demo".into(),
        })
        .await
        .expect_err("no rollout yet");
    assert_eq!(error.code(), tonic::Code::NotFound);

    admin
        .rollouts()
        .start_rollout(demo_plan(3_600_000))
        .await
        .expect("starts");
    let command = |note: &str| aviary::pb::admin::RolloutCommandRequest {
        model: "demo".into(),
        note: note.into(),
    };
    let error = admin
        .rollouts()
        .resume_rollout(command("not paused"))
        .await
        .expect_err("resume needs a pause");
    assert_eq!(error.code(), tonic::Code::FailedPrecondition);
    let aborted = admin
        .rollouts()
        .abort_rollout(command("wrong build"))
        .await
        .expect("abort")
        .into_inner();
    assert_eq!(
        (aborted.state.as_str(), aborted.canary_weight),
        ("aborted", 0)
    );
    assert!(
        aborted
            .history
            .last()
            .is_some_and(|d| d.reason.contains("wrong build")),
        "{aborted:?}"
    );
    assert_eq!(weight_of(&weights(&gateway).await, "2"), 0);

    // `aviary ctl rollout status --watch` returns at once for a finished rollout.
    let args = aviary_cli::ctl::CtlArgs {
        admin: format!("http://{}", gateway.admin_addr.expect("admin")),
        json: false,
        token: None,
        tls: Default::default(),
        command: aviary_cli::ctl::CtlCommand::Rollout {
            command: aviary_cli::ctl::RolloutCommand::Status {
                model: "demo".into(),
                watch: true,
            },
        },
    };
    let printed = aviary_cli::ctl::run(&args).await.expect("ctl status");
    assert!(printed.starts_with("demo: aborted;"), "{printed}");
    assert!(printed.contains("wrong build"), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_with_worse_feedback_is_rolled_back_on_its_accuracy() {
    let gateway = support::start_gateway(&config("", ""), Mode::Embedded)
        .await
        .expect("gateway starts");
    // The baseline is always right; the canary right on one answer in five.
    let load = Load::with_feedback(&gateway, 2, &ROWS, |version, n| {
        version == "1" || n.is_multiple_of(5)
    })
    .await;
    let mut accuracy_plan = demo_plan(200);
    accuracy_plan.gates = Some(RolloutGates {
        max_error_rate_increase: 0.05,
        max_accuracy_drop: Some(0.1),
        ..Default::default()
    });
    gateway
        .admin()
        .await
        .rollouts()
        .start_rollout(accuracy_plan)
        .await
        .expect("the accuracy gate is measured");

    let rolled_back = ends(&gateway, "rolled back").await;
    load.finish_clean().await;
    let status = rollout(&gateway).await;
    assert!(rolled_back, "rollout ends rolled back: {status:?}");
    assert_eq!(weight_of(&weights(&gateway).await, "2"), 0);
    let last = status.history.last().expect("a decision");
    assert!(last.reason.contains("accuracy"), "{}", last.reason);
    assert!(!last.reason.contains("error rate"), "{}", last.reason);
    let canary = last.numbers.get("canary_accuracy").copied();
    assert!(
        canary.is_some_and(|a| a < 0.5),
        "canary accuracy from its feedback: {:?}",
        last.numbers
    );
    assert_eq!(last.numbers.get("baseline_accuracy"), Some(&1.0));
}

/// A gateway whose demo route mirrors every request to version 2, running a rollout of
/// version 2 under load with `gates` until it ends; returns the gateway and the rollout.
async fn shadowed_rollout(gates: RolloutGates) -> (support::Running, RolloutStatus) {
    let shadowed = config("", "") + "shadow = { version = \"2\", percent = 100, queue = 256 }\n";
    let gateway = support::start_gateway(&shadowed, Mode::Embedded)
        .await
        .expect("gateway starts");
    let load = load(&gateway).await;
    let mut shadow_plan = demo_plan(200);
    shadow_plan.gates = Some(gates);
    gateway
        .admin()
        .await
        .rollouts()
        .start_rollout(shadow_plan)
        .await
        .expect("the shadow is the canary");
    let ended = support::eventually(Duration::from_secs(60), || async {
        rollout(&gateway).await.terminal
    })
    .await;
    // Every request is answered while the shadow on the canary feeds the gates.
    let answered = load.finish_clean().await;
    let status = rollout(&gateway).await;
    assert!(ended, "the rollout ends: {status:?}");
    assert!(
        answered >= 20,
        "the gates judged traffic that was answered: {answered}"
    );
    (gateway, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_on_the_canary_feeds_the_agreement_gate() {
    let (gateway, status) = shadowed_rollout(RolloutGates {
        max_error_rate_increase: 0.05,
        min_shadow_agreement: Some(0.9),
        ..Default::default()
    })
    .await;
    // Both test versions pick the same class for these rows.
    assert_eq!(status.state, "promoted", "{status:?}");
    let report = gateway.admin().await.shadow_report("demo").await;
    let most = report
        .outputs
        .iter()
        .max_by_key(|o| o.agreement_total)
        .expect("outputs compared");
    // The same rows every request: the agreement share is the same at any count.
    let advanced = &status.history[1].numbers;
    assert_eq!(
        advanced.get("shadow_agreement"),
        Some(&most.agreement),
        "{advanced:?} vs {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_on_the_canary_feeds_the_distribution_gate() {
    let (_gateway, status) = shadowed_rollout(RolloutGates {
        max_error_rate_increase: 0.05,
        min_distribution_p_value: Some(0.01),
        ..Default::default()
    })
    .await;
    // The versions agree on the class but their probabilities come from different
    // weights: a KS test over many mirrored answers tells them apart.
    assert_eq!(status.state, "rolled back", "{status:?}");
    let last = status.history.last().expect("a decision");
    assert!(
        last.reason.contains("distributions differ"),
        "{}",
        last.reason
    );
    assert!(
        last.numbers
            .get("distribution_p_value")
            .is_some_and(|p| *p < 0.01),
        "{:?}",
        last.numbers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_in_the_config_starts_by_itself_and_is_not_run_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_file = dir.path().join("rollouts.json");
    let text = config(
        "",
        &format!(
            r#"state_file = {:?}

[rollouts.plans.demo]
canary = "2"
baseline = "1"
steps = [ {{ weight = 50, min_duration_ms = 200, min_requests = 20 }}, {{ weight = 100, min_duration_ms = 200, min_requests = 20 }} ]
gates = {{ max_error_rate_increase = 0.05 }}
"#,
            state_file.display().to_string()
        ),
    );
    let gateway = support::start_gateway(&text, Mode::Embedded)
        .await
        .expect("gateway starts");
    assert_eq!(
        weight_of(&weights(&gateway).await, "2"),
        50,
        "step 1 is applied at start"
    );
    let load = load(&gateway).await;
    let promoted = ends(&gateway, "promoted").await;
    load.finish_clean().await;
    let status = rollout(&gateway).await;
    assert!(promoted, "rollout ends promoted: {status:?}");
    assert_eq!(weight_of(&weights(&gateway).await, "2"), 100);
    gateway.stop().await.expect("gateway stops");

    let gateway = support::start_gateway(&text, Mode::Embedded)
        .await
        .expect("gateway restarts");
    let after = rollout(&gateway).await;
    assert_eq!(
        after.state, "promoted",
        "a finished plan is not started again"
    );
    assert_eq!(after.history, status.history);
}

#[test]
fn an_invalid_plan_in_the_config_lists_every_problem() {
    let text = config(
        "",
        r#"
[rollouts.plans.demo]
canary = "9"
baseline = "1"
steps = [ { weight = 50, min_duration_ms = 200, min_requests = 20 }, { weight = 40, min_duration_ms = 200, min_requests = 20 } ]
gates = { max_error_rate_increase = 0.05 }
"#,
    );
    let error = aviary_gateway::config::Config::parse(&text).expect_err("invalid plan");
    assert!(
        error.contains("rollouts.plans.demo.steps[1].weight"),
        "{error}"
    );
    assert!(error.contains("rollouts.plans.demo.canary"), "{error}");
}
