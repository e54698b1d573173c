//! One `aviary controller` running one rollout for two gateways on their summed stats:
//! both gateways carry the same weights at every step and end promoted together, and a
//! gateway in controlled mode refuses to drive a rollout itself.
mod support;

use std::time::{Duration, Instant};

use aviary::pb::admin::{RolloutPlan, RolloutStatus};
use aviary_gateway::{
    Mode,
    controller::{ControllerOptions, run_controller},
    rollouts::{Driver, Gateways, RemoteGateways},
};
use support::{Admin, Load, weight_of};
use tokio::{net::TcpListener, sync::oneshot};
use tonic::Code;

const ROWS: [[f32; 4]; 1] = [[5.1, 3.5, 1.4, 0.2]];

/// A gateway whose rollouts a controller drives, `demo` on version 1 only.
const CONTROLLED: &str = r#"
[repository]
path = "{models}"
instances = 2

[rollouts]
controlled = true

[routes.demo]
versions = [ { version = "1", weight = 100 }, { version = "2", weight = 0 } ]
"#;

fn plan() -> RolloutPlan {
    support::demo_plan(200)
}

async fn rollout(controller: &mut Admin) -> RolloutStatus {
    controller.rollout("demo").await
}

/// An `aviary controller` of some gateways, judging every 100 ms, on a loopback port
/// of its own.
struct Controller {
    addr: std::net::SocketAddr,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<Result<(), aviary_gateway::GatewayError>>,
}

impl Controller {
    async fn start(gateways: &[&support::Running]) -> Controller {
        let addresses = gateways
            .iter()
            .map(|g| g.admin_addr.expect("admin listener").to_string())
            .collect();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(run_controller(
            Gateways::List(addresses),
            ControllerOptions {
                evaluate_interval: Duration::from_millis(100),
                ..ControllerOptions::default()
            },
            listener,
            None,
            async {
                let _ = stopped.await;
            },
        ));
        Controller { addr, stop, served }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.served
            .await
            .expect("controller task")
            .expect("controller stops cleanly");
    }
}

/// The gateway's weights of versions 2 and 1 for `demo`.
async fn weights(gateway: &mut Admin) -> (u32, u32) {
    let weights = gateway.weights("demo").await;
    assert!(!weights.is_empty(), "demo is routed");
    (weight_of(&weights, "2"), weight_of(&weights, "1"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_controller_moves_two_gateways_through_the_same_steps() {
    let a = support::start_gateway(CONTROLLED, Mode::Embedded)
        .await
        .expect("gateway a starts");
    let b = support::start_gateway(CONTROLLED, Mode::Embedded)
        .await
        .expect("gateway b starts");
    let controller = Controller::start(&[&a, &b]).await;
    let controller_addr = controller.addr;

    let load = Load::start(&[&a, &b], 1, &ROWS).await;
    let mut ctl = Admin::connect(controller_addr).await;
    let (mut admin_a, mut admin_b) = (
        Admin::connect(a.admin_addr.expect("admin")).await,
        Admin::connect(b.admin_addr.expect("admin")).await,
    );
    let started = ctl
        .rollouts()
        .start_rollout(plan())
        .await
        .expect("plan is valid")
        .into_inner();
    assert_eq!(
        (started.state.as_str(), started.canary_weight),
        ("progressing", 50)
    );

    // The controller holds its rollouts while it pushes weights, so when its status
    // reads the same before and after reading both gateways, no change was in flight:
    // both gateways must show that status's weights.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let last = loop {
        let before = rollout(&mut ctl).await;
        let (on_a, on_b) = (weights(&mut admin_a).await, weights(&mut admin_b).await);
        let after = rollout(&mut ctl).await;
        if before.history.len() == after.history.len() {
            let expected = (after.canary_weight, 100 - after.canary_weight);
            assert_eq!(
                on_a, expected,
                "gateway a at {} ({:?})",
                after.state, after.history
            );
            assert_eq!(
                on_b, expected,
                "gateway b at {} ({:?})",
                after.state, after.history
            );
            if seen.last() != Some(&expected.0) {
                seen.push(expected.0);
            }
        }
        if after.terminal || Instant::now() > deadline {
            break after;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (answered, failures) = load.finish().await;

    assert_eq!(last.state, "promoted", "rollout ends promoted: {last:?}");
    assert_eq!(
        seen,
        [50, 100],
        "both gateways went through every step together"
    );
    let steps: Vec<u32> = last.history.iter().map(|d| d.step).collect();
    assert_eq!(
        steps,
        [1, 2, 0],
        "started, advanced, promoted: {:?}",
        last.history
    );
    assert_eq!(weights(&mut admin_a).await, (100, 0));
    assert_eq!(weights(&mut admin_b).await, (100, 0));
    assert!(failures.is_empty(), "no request failed: {failures:?}");
    assert!(answered >= 40, "both steps saw traffic: {answered}");

    controller.stop().await;
    a.stop().await.expect("gateway a stops");
    b.stop().await.expect("gateway b stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controlled_gateway_does_not_serve_rollouts() {
    let gateway = support::start_gateway(CONTROLLED, Mode::Embedded)
        .await
        .expect("gateway starts");
    let refused = gateway
        .admin()
        .await
        .rollouts()
        .start_rollout(plan())
        .await
        .expect_err("the controller drives rollouts");
    assert_eq!(refused.code(), Code::Unimplemented, "{}", refused.message());
    assert_eq!(weights(&mut gateway.admin().await).await, (0, 100));
    gateway.stop().await.expect("gateway stops");
}

/// `--gateways-dns NAME:PORT` resolves the name on every round and drives every address
/// it returns. An IP literal goes through the same lookup without depending on how this
/// machine resolves host names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_name_finds_the_gateways_to_drive() {
    let gateway = support::start_gateway(CONTROLLED, Mode::Embedded)
        .await
        .expect("gateway starts");
    let admin_addr = gateway.admin_addr.expect("admin listener");
    let controller = Driver::open(
        RemoteGateways::new(
            Gateways::Dns(format!("127.0.0.1:{}", admin_addr.port())),
            Duration::from_millis(100),
        ),
        None,
    )
    .await
    .expect("no state file to read");
    let plan = plan();
    let started = controller
        .start(aviary_router::rollout::RolloutPlan {
            model: plan.model.clone(),
            canary: plan.canary.clone(),
            baseline: plan.baseline.clone(),
            steps: plan
                .steps
                .iter()
                .map(|s| aviary_router::rollout::Step {
                    weight: s.weight,
                    min_duration_ms: s.min_duration_ms,
                    min_requests: s.min_requests,
                })
                .collect(),
            gates: aviary_router::rollout::Gates::error_rate(0.05),
        })
        .await
        .expect("the gateway behind the name is found and the plan starts");
    assert_eq!(started.rollout.canary_weight(), Some(50));
    let mut admin = Admin::connect(admin_addr).await;
    assert_eq!(
        weights(&mut admin).await,
        (50, 50),
        "the start weights reached the gateway"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_of_a_canary_a_gateway_has_not_approved_is_refused_at_start() {
    use aviary::pb::admin::ApproveRequest;
    // Gateway a enforces stages (its version 1 is adopted from the file, version 2 is a
    // candidate); gateway b does not.
    let a = support::start_gateway(&format!("{CONTROLLED}\n[registry]\n"), Mode::Embedded)
        .await
        .expect("gateway a starts");
    let b = support::start_gateway(CONTROLLED, Mode::Embedded)
        .await
        .expect("gateway b starts");
    let controller = Controller::start(&[&a, &b]).await;
    let controller_addr = controller.addr;
    let ctl = Admin::connect(controller_addr).await;
    let refused = ctl
        .rollouts()
        .start_rollout(plan())
        .await
        .expect_err("gateway a has not approved version 2");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let gateway_a = a.admin_addr.expect("admin").to_string();
    assert!(
        refused
            .message()
            .contains(&format!("on gateway {gateway_a}"))
            && refused.message().contains("canary 2 is at stage candidate"),
        "{}",
        refused.message()
    );
    assert!(
        !refused
            .message()
            .contains(&b.admin_addr.expect("admin").to_string()),
        "gateway b has no [registry]: {}",
        refused.message()
    );

    Admin::connect(a.admin_addr.expect("admin"))
        .await
        .models()
        .approve(ApproveRequest {
            model: "demo".into(),
            version: "2".into(),
            note: String::new(),
        })
        .await
        .expect("approve on gateway a");
    ctl.rollouts()
        .start_rollout(plan())
        .await
        .expect("approved everywhere it is enforced");

    controller.stop().await;
    a.stop().await.expect("gateway a stops");
    b.stop().await.expect("gateway b stops");
}

/// Controlled gateways with `demo` split 50/50 by a bandit the controller plans.
const CONTROLLED_BANDIT: &str = r#"
[repository]
path = "{models}"
instances = 2

[rollouts]
controlled = true

[routes.demo]
versions = [ { version = "1", weight = 50 }, { version = "2", weight = 50 } ]
bandit = { strategy = "thompson", reward = "correct", warmup = 30, min_share = 0.05, interval_ms = 100, seed = 11 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_controller_plans_a_bandit_on_two_gateways_summed_feedback() {
    let a = support::start_gateway(CONTROLLED_BANDIT, Mode::Embedded)
        .await
        .expect("gateway a starts");
    let b = support::start_gateway(CONTROLLED_BANDIT, Mode::Embedded)
        .await
        .expect("gateway b starts");
    let controller = Controller::start(&[&a, &b]).await;
    let (mut admin_a, mut admin_b) = (a.admin().await, b.admin().await);

    // Each gateway alone has 20 rewards, under the warm-up of 30: only their sum can
    // move the policy. Version 1 is right every time (told to a), 2 never (told to b).
    admin_a.feedback_on_demo("1", 20, 20).await;
    admin_b.feedback_on_demo("2", 0, 20).await;
    let both_moved = support::eventually(Duration::from_secs(30), || {
        let (admin_a, admin_b) = (&admin_a, &admin_b);
        async move {
            let on_a = weight_of(&admin_a.weights("demo").await, "1");
            let on_b = weight_of(&admin_b.weights("demo").await, "1");
            // Once a plan on all 40 rewards reached both (updates every 100 ms).
            let counted = admin_b.demo_bandit().await.is_some_and(|b| b.rewards == 40);
            counted && on_a == on_b && on_a >= 9_000
        }
    })
    .await;
    let (on_a, on_b) = (weights(&mut admin_a).await, weights(&mut admin_b).await);
    assert!(
        both_moved,
        "both gateways give version 1 90 %+: a {on_a:?}, b {on_b:?}"
    );

    for gateway in [&a, &b] {
        let report = gateway
            .admin()
            .await
            .demo_bandit()
            .await
            .expect("the controller's policy");
        assert_eq!(report.rewards, 40, "the fleet's sum: {report:?}");
        assert!(!report.warming_up);
        let posterior: Vec<(f64, f64)> = report
            .arms
            .iter()
            .map(|arm| (arm.posterior_alpha, arm.posterior_beta))
            .collect();
        assert_eq!(posterior, [(21.0, 1.0), (1.0, 21.0)], "{report:?}");
    }

    // Weights a controlled gateway is sent must be its arms', out of 10,000.
    use aviary::pb::admin::{BanditArmWeight, BanditWeights};
    let arm = |version: &str, weight| BanditArmWeight {
        version: version.into(),
        weight,
    };
    for (weights, said) in [
        (vec![arm("1", 10_000)], "are not the route's arms"),
        (vec![arm("1", 5_000), arm("2", 4_000)], "sum to 9000"),
    ] {
        let refused = admin_a
            .fleet()
            .set_bandit_weights(BanditWeights {
                model: "demo".into(),
                weights,
                report: None,
            })
            .await
            .expect_err("bad weights");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains(said), "{refused:?}");
    }

    controller.stop().await;
    a.stop().await.expect("clean stop");
    b.stop().await.expect("clean stop");
}
