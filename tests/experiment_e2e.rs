//! A/B experiment reports through a real gateway: pinned traffic on two versions,
//! ground truth sent through the Feedback RPC, and a report whose numbers are exactly
//! what `aviary_router::stats` computes from the same counts.
mod support;

use aviary::pb::admin::{
    ExperimentReport, ExperimentReportRequest, FeedbackRequest, feedback_request::Outcome,
};
use aviary_router::stats;

const ROWS: [[f32; 4]; 1] = [[5.1, 3.5, 1.4, 0.2]];

const ROUTES: &str = r#"
[routes.demo]
versions = [ { version = "1", weight = 50 }, { version = "2", weight = 50 } ]
"#;

async fn get_report(gateway: &support::Running, baseline: &str) -> ExperimentReport {
    gateway
        .admin()
        .await
        .experiments()
        .get_experiment_report(ExperimentReportRequest {
            model: "demo".into(),
            baseline: baseline.into(),
        })
        .await
        .expect("demo is routed")
        .into_inner()
}

fn feedback(version: &str, id: usize, outcome: Option<Outcome>) -> FeedbackRequest {
    FeedbackRequest {
        request_id: format!("req-{version}-{id}"),
        model: "demo".into(),
        version: version.into(),
        outcome,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_numbers_equal_the_statistics_of_the_same_counts() {
    let gateway = support::start_embedded(ROUTES).await;

    let empty = get_report(&gateway, "").await;
    assert_eq!(empty.baseline, "1");
    let versions: Vec<&str> = empty.variants.iter().map(|v| v.version.as_str()).collect();
    assert_eq!(versions, ["1", "2"]);
    for v in &empty.variants {
        assert_eq!(
            (v.requests, v.errors, v.feedback, v.latency_sample_size),
            (0, 0, 0, 0)
        );
        assert!(v.error_rate.is_none() && v.accuracy.is_none() && v.latency_p50_us.is_none());
    }
    assert_eq!(empty.comparisons.len(), 1);
    let c = &empty.comparisons[0];
    assert!(c.error_rate.is_none() && c.latency.is_none() && c.accuracy.is_none());
    assert!(c.accuracy_msprt_p.is_none());

    let mut client = gateway.client().await;
    for version in ["1", "2"] {
        for _ in 0..100 {
            let response = client
                .model_infer(support::demo_request(&ROWS, version))
                .await
                .expect("pinned request answers")
                .into_inner();
            assert_eq!(response.model_version, version);
        }
    }

    let admin = gateway.admin().await;
    for (version, correct) in [("1", 80), ("2", 60)] {
        for i in 0..100 {
            let outcome = Some(Outcome::Correct(i < correct));
            let response = admin
                .experiments()
                .feedback(feedback(version, i, outcome))
                .await
                .expect("feedback on a routed version is accepted")
                .into_inner();
            assert_eq!(response.feedback, i as u64 + 1);
        }
    }

    let report = get_report(&gateway, "").await;
    assert_eq!(
        report.baseline, "1",
        "a tie on requests goes to the first version"
    );
    for (v, correct) in report.variants.iter().zip([80u64, 60]) {
        assert_eq!((v.requests, v.errors), (100, 0), "version {}", v.version);
        assert_eq!(v.error_rate, Some(0.0));
        assert_eq!((v.feedback, v.labelled, v.correct), (100, 100, correct));
        assert_eq!(v.accuracy, Some(correct as f64 / 100.0));
        let (low, high) = stats::wilson_interval(correct, 100, 0.95).expect("interval");
        let got = v
            .accuracy_interval
            .expect("labelled feedback gives an interval");
        assert_eq!((got.low, got.high), (low, high));
        assert_eq!(v.latency_sample_size, 100);
        let (p50, p99) = (
            v.latency_p50_us.expect("measured"),
            v.latency_p99_us.expect("measured"),
        );
        assert!(0 < p50 && p50 <= p99);
        assert!(v.mean_reward.is_none() && v.reward_interval.is_none());
    }

    assert_eq!(report.comparisons.len(), 1);
    let c = &report.comparisons[0];
    assert_eq!(c.version, "2");
    let z = stats::two_proportion_z_test(60, 100, 80, 100).expect("rates differ");
    let accuracy = c.accuracy.expect("both versions have labelled feedback");
    assert_eq!(
        (accuracy.statistic, accuracy.p_value),
        (z.statistic, z.p_value)
    );
    assert!(accuracy.statistic < 0.0, "version 2 is less accurate");
    assert_eq!(
        c.accuracy_msprt_p,
        stats::msprt_two_proportions(60, 100, 80, 100, 0.05)
    );
    assert!(
        c.error_rate.is_none(),
        "no errors on either side: nothing to test"
    );
    let latency = c.latency.expect("both versions have latency samples");
    assert!((0.0..=1.0).contains(&latency.p_value));

    // Naming the baseline turns the comparison around.
    let flipped = get_report(&gateway, "2").await;
    assert_eq!(flipped.comparisons[0].version, "1");
    let z = stats::two_proportion_z_test(80, 100, 60, 100).expect("rates differ");
    assert_eq!(
        flipped.comparisons[0].accuracy.map(|t| t.p_value),
        Some(z.p_value)
    );

    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_needs_a_known_variant_and_an_outcome() {
    let gateway = support::start_embedded(ROUTES).await;
    let admin = gateway.admin().await;

    let unknown = admin
        .experiments()
        .feedback(feedback("9", 0, Some(Outcome::Correct(true))))
        .await
        .expect_err("version 9 is not a variant of demo");
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument);
    assert!(unknown.message().contains("\"9\""), "{}", unknown.message());

    let missing = admin
        .experiments()
        .feedback(feedback("1", 0, None))
        .await
        .expect_err("no outcome");
    assert_eq!(missing.code(), tonic::Code::InvalidArgument);

    let response = admin
        .experiments()
        .feedback(feedback("2", 0, Some(Outcome::Reward(2.5))))
        .await
        .expect("a reward for a routed version")
        .into_inner();
    assert_eq!(response.feedback, 1);
    let report = get_report(&gateway, "").await;
    let v2 = &report.variants[1];
    assert_eq!((v2.feedback, v2.rewards, v2.labelled), (1, 1, 0));
    assert_eq!(v2.mean_reward, Some(2.5));
    assert_eq!(report.variants[0].feedback, 0);

    let bad_baseline = gateway
        .admin()
        .await
        .experiments()
        .get_experiment_report(ExperimentReportRequest {
            model: "demo".into(),
            baseline: "9".into(),
        })
        .await
        .expect_err("9 is not a variant");
    assert_eq!(bad_baseline.code(), tonic::Code::InvalidArgument);

    gateway.stop().await.expect("clean stop");
}
