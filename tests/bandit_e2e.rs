//! Bandit routes through a real gateway: feedback sent with the Feedback RPC moves the
//! weights to the better version, sticky users stay where they were placed, a version
//! that fails every request is starved to its minimum share, and hand changes to the
//! weights are refused while the policy owns them.
mod support;

use std::{collections::BTreeMap, time::Duration};

use aviary::pb::admin::{BanditReport, SetRouteRequest};
use tonic::{Code, Request};

const ROW: [[f32; 4]; 1] = [[5.1, 3.5, 1.4, 0.2]];

/// Demo split 50/50 by a seeded Thompson policy on correct/incorrect feedback,
/// sticky on `x-user-id`; `extra` goes after version 2's weight.
fn routes(extra: &str) -> String {
    routes_with("strategy = \"thompson\"", extra)
}

/// [`routes`] with another `strategy` (and its settings).
fn routes_with(strategy: &str, extra: &str) -> String {
    format!(
        r#"
[routes.demo]
versions = [ {{ version = "1", weight = 50 }}, {{ version = "2", weight = 50{extra} }} ]
sticky = {{ header = "x-user-id" }}
bandit = {{ {strategy}, reward = "correct", warmup = 40, min_share = 0.05, interval_ms = 100, seed = 7 }}
"#
    )
}

type Client = aviary::pb::inference::grpc_inference_service_client::GrpcInferenceServiceClient<
    tonic::transport::Channel,
>;

/// The version that answered `user`'s unpinned request (`None`: it failed).
async fn version_for(client: &mut Client, user: Option<&str>) -> Option<String> {
    let mut request = Request::new(support::demo_request(&ROW, ""));
    if let Some(user) = user {
        request
            .metadata_mut()
            .insert("x-user-id", user.parse().expect("ascii header"));
    }
    client
        .model_infer(request)
        .await
        .ok()
        .map(|r| r.into_inner().model_version)
}

async fn feedback(gateway: &support::Running, version: &str, correct: u32, of: u32) {
    gateway
        .admin()
        .await
        .feedback_on_demo(version, correct, of)
        .await;
}

async fn bandit_report(gateway: &support::Running) -> BanditReport {
    gateway
        .admin()
        .await
        .demo_bandit()
        .await
        .expect("demo's route is a bandit")
}

/// Version 1's share of the route in force.
async fn share_of_1(gateway: &support::Running) -> f64 {
    let weights = gateway.admin().await.weights("demo").await;
    let total: u32 = weights.iter().map(|(_, w)| w).sum();
    let one = weights
        .iter()
        .find(|(v, _)| v == "1")
        .map_or(0, |(_, w)| *w);
    f64::from(one) / f64::from(total.max(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_moves_traffic_to_the_better_version_and_sticky_users_stay() {
    // Epsilon-greedy: the better version takes 0.7 + 0.3 / 2, the other 0.15, so
    // neither is starved and every placed user keeps a version with a share.
    let strategy = "strategy = \"epsilon-greedy\", epsilon = 0.3";
    let gateway = support::start_embedded(&routes_with(strategy, "")).await;
    let mut client = gateway.client().await;

    // Placed during the warm-up, on the configured 50/50.
    let mut placed = BTreeMap::new();
    for i in 0..100 {
        let user = format!("early-{i}");
        let version = version_for(&mut client, Some(&user))
            .await
            .expect("answers");
        placed.insert(user, version);
    }
    let on_2 = placed.values().filter(|v| *v == "2").count();
    assert!((20..=80).contains(&on_2), "about half on 2: {on_2}");
    let warming = bandit_report(&gateway).await;
    assert!(warming.warming_up, "{warming:?}");
    assert_eq!(share_of_1(&gateway).await, 0.5);

    // Version 1 is right 9 times in 10, version 2 once in 10.
    feedback(&gateway, "1", 45, 50).await;
    feedback(&gateway, "2", 5, 50).await;
    // Once the policy has counted all 100 rewards (updates run every 100 ms).
    let moved = support::eventually(Duration::from_secs(20), || async {
        bandit_report(&gateway).await.rewards == 100 && share_of_1(&gateway).await >= 0.85
    })
    .await;
    let report = bandit_report(&gateway).await;
    assert!(moved, "version 1 takes 85 %: {report:?}");
    assert!(!report.warming_up);
    assert_eq!(report.strategy, "epsilon-greedy");
    assert_eq!(report.rewards, 100);
    let arm = |v: &str| {
        report
            .arms
            .iter()
            .find(|a| a.version == v)
            .cloned()
            .expect("an arm")
    };
    assert_eq!(
        (arm("1").posterior_alpha, arm("1").posterior_beta),
        (46.0, 6.0)
    );
    assert_eq!(
        (arm("2").posterior_alpha, arm("2").posterior_beta),
        (6.0, 46.0)
    );
    assert_eq!((arm("1").share, arm("2").share), (0.85, 0.15), "{report:?}");
    assert!(report.not_applied.is_empty(), "{report:?}");

    // Users placed before keep their version, those on 2 too.
    for (user, version) in &placed {
        let now = version_for(&mut client, Some(user)).await.expect("answers");
        assert_eq!(&now, version, "{user} stays on {version}");
    }
    // New users follow the shares.
    let mut new_on_1 = 0;
    for i in 0..100 {
        if version_for(&mut client, Some(&format!("late-{i}")))
            .await
            .as_deref()
            == Some("1")
        {
            new_on_1 += 1;
        }
    }
    assert!(new_on_1 >= 70, "new users mostly on version 1: {new_on_1}");

    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_failing_every_request_is_starved_to_its_minimum_share() {
    let gateway = support::start_embedded(&routes(", fault = { error_rate = 1.0 }")).await;
    let mut client = gateway.client().await;
    // Sticky users; those placed on version 2 get its failures.
    let mut on_2 = Vec::new();
    for i in 0..60 {
        let user = format!("user-{i}");
        if version_for(&mut client, Some(&user)).await.is_none() {
            on_2.push(user);
        }
    }
    let failed = on_2.len() as u64;
    assert!(failed > 0, "version 2 took part of the warm-up and failed");
    // Version 1's answers are right 7 times in 10.
    feedback(&gateway, "1", 28, 40).await;
    let starved = support::eventually(Duration::from_secs(20), || async {
        share_of_1(&gateway).await >= 0.95
    })
    .await;
    let report = bandit_report(&gateway).await;
    assert!(starved, "version 2 down to 5 %: {report:?}");
    let two = report
        .arms
        .iter()
        .find(|a| a.version == "2")
        .expect("arm 2");
    assert_eq!(two.share, 0.05, "exactly the minimum: {report:?}");
    assert_eq!(two.rewards, failed, "each failure counted as incorrect");
    assert_eq!(two.posterior_alpha, 1.0);

    // A starved version keeps no sticky user: they are placed again on the shares.
    let mut answered = 0;
    for user in &on_2 {
        if version_for(&mut client, Some(user)).await.as_deref() == Some("1") {
            answered += 1;
        }
    }
    assert!(
        answered * 10 >= on_2.len() * 7,
        "{answered} of {} users of the failing version moved",
        on_2.len()
    );

    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_changes_to_a_bandits_weights_are_refused() {
    let gateway = support::start_embedded(&routes("")).await;
    let admin = gateway.admin().await;

    let set = admin
        .routes()
        .set_route(SetRouteRequest {
            route: Some(support::route("demo", &[("1", 90), ("2", 10)])),
            expected_generation: None,
        })
        .await
        .expect_err("the policy owns the weights");
    assert_eq!(set.code(), Code::FailedPrecondition, "{set:?}");
    assert!(set.message().contains("routes.demo.bandit"), "{set:?}");
    // The weights in force may be sent back (to change limits, say), the arms in any
    // order.
    admin.set_weights("demo", &[("1", 50), ("2", 50)]).await;
    admin.set_weights("demo", &[("2", 50), ("1", 50)]).await;

    let rollout = admin
        .rollouts()
        .start_rollout(support::demo_plan(200))
        .await
        .expect_err("a rollout would fight the policy");
    assert_eq!(rollout.code(), Code::FailedPrecondition, "{rollout:?}");
    assert!(
        rollout.message().contains("routes.demo.bandit"),
        "{rollout:?}"
    );

    // This gateway plans its bandit itself: a controller's weights are refused.
    let pushed = admin
        .fleet()
        .set_bandit_weights(aviary::pb::admin::BanditWeights {
            model: "demo".into(),
            weights: vec![],
            report: None,
        })
        .await
        .expect_err("not a controlled gateway");
    assert_eq!(pushed.code(), Code::FailedPrecondition, "{pushed:?}");
    assert!(pushed.message().contains("controlled = true"), "{pushed:?}");

    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandit_over_one_arm_is_refused_at_start_naming_the_field() {
    let one_arm = routes("").replace(
        "{ version = \"2\", weight = 50 }",
        "{ version = \"2\", weight = 0 }",
    );
    let config = format!("[repository]\npath = \"{{models}}\"\n{one_arm}");
    let message = support::rejected_at_start(&config, aviary_gateway::Mode::Embedded).await;
    assert!(
        message.contains("routes.demo.bandit: the arms"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arm_not_approved_stays_under_the_canary_cap_until_approved() {
    use aviary::pb::admin::ApproveRequest;
    let dir = tempfile::tempdir().expect("temp dir");
    let models = support::copy_test_models(dir.path());
    // Version 1 is in production; version 2's card states no stage: a candidate.
    let card = models.join("demo/1/model.toml");
    let text = std::fs::read_to_string(&card).expect("card");
    std::fs::write(&card, format!("stage = \"production\"\n{text}")).expect("write card");
    let config = format!(
        "[repository]\npath = \"{}\"\n\n[registry]\ncanary_cap_percent = 10\n{}",
        models.display(),
        routes("")
            .replace("weight = 50 }, {", "weight = 95 }, {")
            .replace(
                "{ version = \"2\", weight = 50 }",
                "{ version = \"2\", weight = 5 }",
            ),
    );
    let gateway = support::start_gateway(&config, aviary_gateway::Mode::Embedded)
        .await
        .expect("the candidate starts under the cap");

    // Version 2 is right every time, version 1 once in 10: the policy would give 2
    // nearly everything, the registry lets it have 10 % (configured: 5 %).
    feedback(&gateway, "2", 20, 20).await;
    feedback(&gateway, "1", 2, 20).await;
    let learnt = support::eventually(Duration::from_secs(20), || async {
        let report = bandit_report(&gateway).await;
        report.rewards == 40 && !report.warming_up
    })
    .await;
    let report = bandit_report(&gateway).await;
    assert!(learnt, "{report:?}");
    let two = report
        .arms
        .iter()
        .find(|a| a.version == "2")
        .expect("arm 2");
    assert_eq!(two.max_share, Some(0.1), "{report:?}");
    assert!(two.share <= 0.1, "{report:?}");
    // The policy's weights (basis points) are in force, 2 held at the cap.
    let weights = gateway.admin().await.weights("demo").await;
    assert_eq!(
        weights,
        [("1".to_owned(), 9000), ("2".to_owned(), 1000)],
        "{report:?}"
    );
    assert!(report.not_applied.is_empty(), "{report:?}");

    gateway
        .admin()
        .await
        .models()
        .approve(ApproveRequest {
            model: "demo".into(),
            version: "2".into(),
            note: "the bandit found it better".into(),
        })
        .await
        .expect("approve");
    let freed = support::eventually(Duration::from_secs(20), || async {
        share_of_1(&gateway).await <= 0.1
    })
    .await;
    let report = bandit_report(&gateway).await;
    assert!(freed, "approved, version 2 takes the most: {report:?}");
    assert_eq!(report.arms[1].max_share, None);

    gateway.stop().await.expect("clean stop");
}
