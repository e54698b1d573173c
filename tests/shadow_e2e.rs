//! Shadow traffic through a real gateway: mirrors run off the request path, are dropped
//! and counted when the shadow cannot keep up, and the comparison numbers are the ones
//! computed by hand from the two versions' answers.
mod support;

use std::time::Duration;

use aviary::pb::admin::ShadowReport;

/// Upper bound for a mirror to be compared (hang protection only).
const COMPARED_DEADLINE: Duration = Duration::from_secs(20);

const ROWS: [[f32; 4]; 4] = [
    [5.1, 3.5, 1.4, 0.2],
    [6.0, 2.9, 4.5, 1.5],
    [6.3, 3.3, 6.0, 2.5],
    [5.6, 2.8, 4.9, 2.0],
];

async fn report(gateway: &support::Running) -> ShadowReport {
    gateway.admin().await.shadow_report("demo").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comparison_matches_the_hand_computed_numbers() {
    let gateway = support::start_embedded(
        r#"
[routes.demo]
versions = [ { version = "1", weight = 1 }, { version = "2", weight = 0 } ]
shadow = { version = "2", percent = 100, queue = 64 }
"#,
    )
    .await;
    let mut client = gateway.client().await;
    // Version 2 answers pinned requests itself; a request already on the shadow version
    // is not mirrored, so this one adds nothing to the comparison.
    let two = client
        .model_infer(support::demo_request(&ROWS, "2"))
        .await
        .expect("v2")
        .into_inner();
    let requests = 20u64;
    let mut one = None;
    for _ in 0..requests {
        let response = client
            .model_infer(support::demo_request(&ROWS, ""))
            .await
            .expect("primary answers")
            .into_inner();
        assert_eq!(response.model_version, "1");
        one = Some(response);
    }
    let one = one.expect("at least one request");
    let compared = support::eventually(Duration::from_secs(20), || async {
        report(&gateway)
            .await
            .outputs
            .iter()
            .all(|o| o.compared == requests)
            && !report(&gateway).await.outputs.is_empty()
    })
    .await;
    let report = report(&gateway).await;
    assert!(compared, "every mirror compared: {report:?}");
    assert_eq!(
        (report.sent, report.dropped, report.failed),
        (requests, 0, 0)
    );

    let p1 = support::output::<f32>(&one, "probabilities");
    let p2 = support::output::<f32>(&two, "probabilities");
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    };
    let agree = p1
        .chunks(3)
        .zip(p2.chunks(3))
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    let diffs: Vec<f64> = p1
        .iter()
        .zip(&p2)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).abs())
        .collect();
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    let max = diffs.iter().copied().fold(0.0, f64::max);

    let probabilities = report
        .outputs
        .iter()
        .find(|o| o.output == "probabilities")
        .expect("probabilities compared");
    assert_eq!(probabilities.agreement_total, requests * ROWS.len() as u64);
    let expected_agreement = agree as f64 / ROWS.len() as f64;
    assert!(
        (probabilities.agreement - expected_agreement).abs() < 1e-12,
        "{probabilities:?}"
    );
    assert!(
        (probabilities.mean_abs_diff - mean).abs() < 1e-9,
        "{probabilities:?} vs {mean}"
    );
    assert!(
        (probabilities.max_abs_diff - max).abs() < 1e-9,
        "{probabilities:?} vs {max}"
    );
    assert!(
        max > 1e-3,
        "the versions differ, so the comparison means something"
    );
    assert!((0.0..=1.0).contains(&probabilities.ks_statistic));
    assert!((0.0..=1.0).contains(&probabilities.ks_p_value));
    assert_eq!(probabilities.sample_size, requests * p1.len() as u64);

    let label = report
        .outputs
        .iter()
        .find(|o| o.output == "label")
        .expect("label compared");
    let (l1, l2) = (
        support::output::<i64>(&one, "label"),
        support::output::<i64>(&two, "label"),
    );
    let same = l1.iter().zip(&l2).filter(|(a, b)| a == b).count();
    assert_eq!(label.agreement_total, requests * ROWS.len() as u64);
    assert!(
        (label.agreement - same as f64 / ROWS.len() as f64).abs() < 1e-12,
        "{label:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_shadow_never_holds_up_the_primary_and_drops_are_counted() {
    // The shadow takes 30 s per call and may run one at a time with one queued.
    let gateway = support::start_embedded(
        r#"
[routes.demo]
versions = [ { version = "1", weight = 1 } ]
shadow = { version = "2", percent = 100, queue = 1, concurrency = 1, fault = { delay_ms = 30000 } }
"#,
    )
    .await;
    let mut client = gateway.client().await;
    let requests = 20u64;
    for _ in 0..requests {
        let response = client
            .model_infer(support::demo_request(&ROWS, ""))
            .await
            .expect("primary answers");
        assert_eq!(response.into_inner().model_version, "1");
    }
    // All 20 primaries answered while no shadow call has finished: had any primary
    // waited for its mirror, at least one 30 s shadow call would have completed first.
    let report = report(&gateway).await;
    assert!(report.outputs.iter().all(|o| o.compared == 0), "{report:?}");
    assert_eq!(report.sent + report.dropped, requests, "{report:?}");
    // One call running, one job waiting for it, one in the queue: the rest are dropped.
    assert!(report.dropped >= requests - 3, "{report:?}");
    assert_eq!(report.failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_shadows_are_rejected_with_their_paths() {
    let text = r#"[repository]
path = "{models}"
[routes.demo]
versions = [ { version = "1", weight = 1 } ]
shadow = { version = "1", percent = 150, queue = 0 }
"#;
    let error = support::rejected_at_start(text, aviary_gateway::Mode::Embedded).await;
    for path in [
        "routes.demo.shadow.percent",
        "routes.demo.shadow.queue",
        "routes.demo.shadow.version",
    ] {
        assert!(error.contains(path), "{path} missing: {error}");
    }
    let unknown = "[repository]\npath = \"{models}\"\n[routes.demo]\nversions = [ { version = \"1\", weight = 1 } ]\nshadow = { version = \"7\", percent = 10 }\n";
    let error = support::rejected_at_start(unknown, aviary_gateway::Mode::Embedded).await;
    assert!(
        error.contains("routes.demo.shadow.version") && error.contains("\"7\""),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_changes_keep_the_shadow_and_its_comparison() {
    let gateway = support::start_embedded(
        r#"
[routes.demo]
versions = [ { version = "1", weight = 1 }, { version = "2", weight = 0 } ]
shadow = { version = "2", percent = 100 }
"#,
    )
    .await;
    let mut client = gateway.client().await;
    let admin = gateway.admin().await;
    // Every output compared `n` times, and nothing dropped or failed.
    let compared = |n: u64| {
        let admin = admin.clone();
        async move {
            let report = admin.shadow_report("demo").await;
            (report.sent, report.dropped, report.failed) == (n, 0, 0)
                && !report.outputs.is_empty()
                && report.outputs.iter().all(|o| o.compared == n)
        }
    };
    support::infer(&mut client, support::demo_request(&ROWS, "")).await;
    assert!(
        support::eventually(COMPARED_DEADLINE, || compared(1)).await,
        "the first mirror is compared: {:?}",
        report(&gateway).await
    );
    let before = report(&gateway).await;

    admin.set_weights("demo", &[("1", 3), ("2", 0)]).await;
    assert_eq!(
        admin.weights("demo").await,
        support::owned(&[("1", 3), ("2", 0)])
    );
    // The comparison so far survives the change.
    let after_change = report(&gateway).await;
    assert_eq!(after_change.version, "2");
    assert_eq!(
        after_change.outputs, before.outputs,
        "the comparison is kept"
    );

    // The same mirror carries on: the next request is compared on top of the first.
    support::infer(&mut client, support::demo_request(&ROWS, "")).await;
    assert!(
        support::eventually(COMPARED_DEADLINE, || compared(2)).await,
        "the mirror after the change adds to the same comparison: {:?}",
        report(&gateway).await
    );
    let after = report(&gateway).await;
    for (old, new) in before.outputs.iter().zip(&after.outputs) {
        assert_eq!(old.output, new.output);
        assert_eq!(new.agreement_total, 2 * old.agreement_total, "{new:?}");
    }
}
