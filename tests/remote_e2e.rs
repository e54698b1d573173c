//! End to end through a remote-only gateway (`aviary gateway`): every routed version
//! runs on a standalone worker server reached over gRPC. Real servers on 127.0.0.1:0,
//! real gRPC clients.
mod support;

use std::collections::BTreeMap;

use aviary::{
    pb::inference::{ModelStatisticsRequest, ServerLiveRequest},
    tensor,
};
use aviary_gateway::{Mode, front::VARIANT_HEADER};
use support::{Client, READINESS_DEADLINE, health_status, model_ready, server_ready};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// The input row every test sends; versions 1 and 2 answer it differently.
const ROW: [f32; 4] = [5.1, 3.5, 1.4, 0.2];

/// A remote-only route for `demo`: version 1 on `v1` with weight `w1`, version 2 on
/// `v2` with weight `w2`.
fn demo_route(v1: &str, w1: u32, v2: &str, w2: u32) -> String {
    format!(
        "[routes.demo]\nversions = [ {{ version = \"1\", weight = {w1}, endpoint = \"{v1}\" }}, \
         {{ version = \"2\", weight = {w2}, endpoint = \"{v2}\" }} ]\n"
    )
}

async fn start_remote_gateway(config: &str) -> support::Running {
    match support::start_gateway(config, Mode::RemoteOnly).await {
        Ok(gateway) => gateway,
        Err(error) => panic!("remote-only gateway should start: {error}"),
    }
}

/// What one version answers for [`ROW`].
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    probabilities: Vec<f32>,
    label: Vec<i64>,
}

impl Answer {
    fn of(response: &aviary::pb::inference::ModelInferResponse) -> Answer {
        Answer {
            probabilities: support::output::<f32>(response, "probabilities"),
            label: support::output::<i64>(response, "label"),
        }
    }

    fn matches(&self, other: &Answer) -> bool {
        self.label == other.label
            && self.probabilities.len() == other.probabilities.len()
            && self
                .probabilities
                .iter()
                .zip(&other.probabilities)
                .all(|(a, b)| (a - b).abs() <= 1e-6)
    }
}

/// Pins each version once through `client` and returns its answer to [`ROW`].
async fn expected_answers(client: &mut Client) -> BTreeMap<String, Answer> {
    let mut answers = BTreeMap::new();
    for version in ["1", "2"] {
        let response = client
            .model_infer(support::demo_request(&[ROW], version))
            .await
            .unwrap_or_else(|s| panic!("pinned version {version} should answer: {s:?}"))
            .into_inner();
        assert_eq!(
            response.model_version, version,
            "pinned version is honoured"
        );
        let answer = Answer::of(&response);
        assert_eq!(answer.probabilities.len(), 3, "one row of 3 probabilities");
        assert_eq!(answer.label.len(), 1, "one label");
        answers.insert(version.to_owned(), answer);
    }
    // Without this the per-version output check below could not tell versions apart.
    let max_difference = answers["1"]
        .probabilities
        .iter()
        .zip(&answers["2"].probabilities)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        max_difference > 1e-3,
        "versions 1 and 2 must answer {ROW:?} differently: {answers:?}"
    );
    answers
}

/// The worker's success count for `demo` at `version` (0 when it reports none).
async fn successes(worker: &support::Running, version: &str) -> u64 {
    let mut client = worker.client().await;
    let stats = client
        .model_statistics(ModelStatisticsRequest {
            name: "demo".into(),
            version: version.into(),
        })
        .await
        .unwrap_or_else(|s| panic!("worker statistics for demo {version}: {s:?}"))
        .into_inner();
    stats
        .model_stats
        .iter()
        .filter(|s| s.name == "demo" && s.version == version)
        .filter_map(|s| s.inference_stats.as_ref()?.success.as_ref())
        .map(|d| d.count)
        .sum()
}

/// Sends `n` pinned or unpinned requests from one task; every one must succeed.
async fn send(gateway: &support::Running, version: &str, n: usize) -> BTreeMap<String, u64> {
    let mut client = gateway.client().await;
    let mut served = BTreeMap::new();
    for _ in 0..n {
        let response = support::infer(&mut client, support::demo_request(&[ROW], version)).await;
        *served.entry(response.model_version).or_default() += 1;
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_through_one_remote_worker() {
    const TASKS: usize = 8;
    const PER_TASK: usize = 250;
    const TOTAL: usize = TASKS * PER_TASK;

    let worker = support::start_worker(&support::test_models()).await;
    let gateway = start_remote_gateway(&demo_route(&worker.url(), 90, &worker.url(), 10)).await;
    let mut client = gateway.client().await;
    let expected = expected_answers(&mut client).await;

    let mut tasks = Vec::with_capacity(TASKS);
    for task in 0..TASKS {
        let mut client = client.clone();
        let expected = expected.clone();
        tasks.push(tokio::spawn(async move {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            let mut failures: Vec<String> = Vec::new();
            for i in 0..PER_TASK {
                let mut request = support::demo_request(&[ROW], "");
                request.id = format!("task-{task}-req-{i}");
                let response = match client.model_infer(request).await {
                    Ok(response) => response,
                    Err(status) => {
                        failures.push(format!("task {task} request {i}: {status:?}"));
                        continue;
                    }
                };
                let header = response
                    .metadata()
                    .get(VARIANT_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let response = response.into_inner();
                let version = response.model_version.clone();
                if header.as_deref() != Some(version.as_str()) {
                    failures.push(format!(
                        "task {task} request {i}: {VARIANT_HEADER} {header:?} but model_version {version:?}"
                    ));
                }
                match expected.get(&version) {
                    None => failures.push(format!(
                        "task {task} request {i}: version {version:?} is not routed"
                    )),
                    Some(answer) if !answer.matches(&Answer::of(&response)) => {
                        failures.push(format!(
                            "task {task} request {i}: version {version} answered {:?}, expected {answer:?}",
                            Answer::of(&response)
                        ));
                    }
                    Some(_) => {}
                }
                if response.id != format!("task-{task}-req-{i}") {
                    failures.push(format!(
                        "task {task} request {i}: response id {:?}",
                        response.id
                    ));
                }
                *counts.entry(version).or_default() += 1;
            }
            (counts, failures)
        }));
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for task in tasks {
        let (c, f) = task.await.expect("request task does not panic");
        c.into_iter()
            .for_each(|(v, n)| *counts.entry(v).or_default() += n);
        failures.extend(f);
    }
    assert!(
        failures.is_empty(),
        "{} of {TOTAL} requests failed; first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(counts.values().sum::<usize>(), TOTAL, "{counts:?}");
    let ones = counts.get("1").copied().unwrap_or(0);
    let twos = counts.get("2").copied().unwrap_or(0);
    assert_eq!(
        ones + twos,
        TOTAL,
        "only versions 1 and 2 answer: {counts:?}"
    );
    // Binomial share of version 1 over n = 2000 at p = 0.9: sd = sqrt(0.9 * 0.1 / 2000)
    // ≈ 0.67 pp, so ±3.5 pp is about 5.2 sigma (a false failure about once in 5 million runs).
    let share = ones as f64 / TOTAL as f64;
    assert!(
        (share - 0.90).abs() <= 0.035,
        "version 1 share {:.2}% is not 90% ± 3.5 pp: {counts:?}",
        share * 100.0
    );

    gateway.stop().await.expect("gateway stops cleanly");
    worker.stop().await.expect("worker stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_on_two_workers_reach_their_own_worker() {
    let a = support::start_worker(&support::test_models()).await;
    let b = support::start_worker(&support::test_models()).await;
    let gateway = start_remote_gateway(&demo_route(&a.url(), 50, &b.url(), 50)).await;

    // Pinned to version 1: only worker A's version 1 counts them.
    let before = (successes(&a, "1").await, successes(&b, "1").await);
    assert_eq!(send(&gateway, "1", 20).await.get("1"), Some(&20));
    assert_eq!(successes(&a, "1").await, before.0 + 20, "worker A ran v1");
    assert_eq!(successes(&b, "1").await, before.1, "worker B never runs v1");

    // Pinned to version 2: only worker B's version 2 counts them.
    let before = (successes(&a, "2").await, successes(&b, "2").await);
    assert_eq!(send(&gateway, "2", 20).await.get("2"), Some(&20));
    assert_eq!(successes(&b, "2").await, before.1 + 20, "worker B ran v2");
    assert_eq!(successes(&a, "2").await, before.0, "worker A never runs v2");

    // Unpinned at 50/50: both workers get traffic (P(one gets none of 200) = 2^-199),
    // and each request is counted by exactly the worker of the version that answered.
    let before = (successes(&a, "1").await, successes(&b, "2").await);
    let served = send(&gateway, "", 200).await;
    let ones = served.get("1").copied().unwrap_or(0);
    let twos = served.get("2").copied().unwrap_or(0);
    assert_eq!(ones + twos, 200, "only versions 1 and 2 answer: {served:?}");
    assert!(ones > 0 && twos > 0, "both versions answer: {served:?}");
    assert_eq!(
        successes(&a, "1").await,
        before.0 + ones,
        "worker A ran every v1"
    );
    assert_eq!(
        successes(&b, "2").await,
        before.1 + twos,
        "worker B ran every v2"
    );
    assert_eq!(successes(&a, "2").await, 0, "worker A never runs v2");
    assert_eq!(successes(&b, "1").await, 0, "worker B never runs v1");

    // The gateway's statistics come from the worker behind each version.
    let stats = gateway
        .client()
        .await
        .model_statistics(ModelStatisticsRequest {
            name: "demo".into(),
            version: String::new(),
        })
        .await
        .expect("gateway statistics")
        .into_inner();
    let by_version: BTreeMap<String, u64> = stats
        .model_stats
        .iter()
        .map(|s| {
            let count = s
                .inference_stats
                .as_ref()
                .and_then(|i| i.success.as_ref())
                .map_or(0, |d| d.count);
            (s.version.clone(), count)
        })
        .collect();
    assert_eq!(
        by_version,
        BTreeMap::from([
            ("1".to_owned(), successes(&a, "1").await),
            ("2".to_owned(), successes(&b, "2").await),
        ])
    );

    gateway.stop().await.expect("gateway stops cleanly");
    a.stop().await.expect("worker A stops cleanly");
    b.stop().await.expect("worker B stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_pass_through_with_their_code_and_message() {
    let worker = support::start_worker(&support::test_models()).await;
    let gateway = start_remote_gateway(&demo_route(&worker.url(), 90, &worker.url(), 10)).await;
    let mut client = gateway.client().await;
    let mut direct = worker.client().await;

    let mut unknown_model = support::demo_request(&[ROW], "");
    unknown_model.model_name = "nosuch".into();
    let status = client
        .model_infer(unknown_model)
        .await
        .expect_err("unknown model is refused");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("nosuch"), "{status:?}");

    let status = client
        .model_infer(support::demo_request(&[ROW], "9"))
        .await
        .expect_err("unknown version is refused");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().contains("'demo' version 9 is not found"),
        "{status:?}"
    );

    let mut wrong_shape = support::demo_request(&[ROW], "1");
    wrong_shape.inputs[0].shape = vec![1, 5];
    wrong_shape.raw_input_contents = vec![tensor::to_raw(&[5.1f32, 3.5, 1.4, 0.2, 9.9]).into()];

    let mut wrong_datatype = support::demo_request(&[ROW], "1");
    wrong_datatype.inputs[0].datatype = "FP64".into();
    wrong_datatype.raw_input_contents = vec![tensor::to_raw(&[5.1f64, 3.5, 1.4, 0.2]).into()];

    for (what, request) in [
        ("shape [1,5]", wrong_shape),
        ("datatype FP64", wrong_datatype),
    ] {
        let worker_status: tonic::Status = direct
            .model_infer(request.clone())
            .await
            .expect_err("the worker refuses it");
        let status = client
            .model_infer(request.clone())
            .await
            .expect_err("the gateway refuses it");
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains("input \"input\""),
            "{what}: message names the input: {status:?}"
        );
        assert_eq!(
            (status.code(), status.message()),
            (worker_status.code(), worker_status.message()),
            "{what}: the worker's status passes through unchanged"
        );
        // Unpinned, whichever version is picked refuses it the same way.
        let mut unpinned = request;
        unpinned.model_version = String::new();
        let status = client
            .model_infer(unpinned)
            .await
            .expect_err("the gateway refuses it unpinned");
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains("input \"input\""),
            "{what}: {status:?}"
        );
    }

    gateway.stop().await.expect("gateway stops cleanly");
    worker.stop().await.expect("worker stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_config_and_readiness_through_the_gateway() {
    let worker = support::start_worker(&support::test_models()).await;
    let gateway = start_remote_gateway(&demo_route(&worker.url(), 90, &worker.url(), 10)).await;
    let mut client = gateway.client().await;

    let metadata = support::model_metadata(&mut client, "demo", "").await;
    assert_eq!(metadata.name, "demo");
    assert_eq!(metadata.versions, ["1", "2"]);
    let inputs: Vec<(&str, &str, &[i64])> = metadata
        .inputs
        .iter()
        .map(|t| (t.name.as_str(), t.datatype.as_str(), t.shape.as_slice()))
        .collect();
    assert_eq!(inputs, [("input", "FP32", &[-1i64, 4][..])]);

    let config = support::model_config(&mut client, "demo", "").await;
    assert_eq!(config.name, "demo");
    assert_eq!(config.platform, "onnxruntime_onnx");

    let ready = support::eventually(READINESS_DEADLINE, || {
        let mut client = client.clone();
        async move { server_ready(&mut client).await }
    })
    .await;
    assert!(
        ready,
        "ServerReady turns true once the worker's versions are ready"
    );
    for version in ["", "1", "2"] {
        assert!(
            model_ready(&mut client, "demo", version).await,
            "demo version {version:?} is ready"
        );
    }
    assert!(
        !model_ready(&mut client, "nosuch", "").await,
        "an unknown model is not ready"
    );
    assert_eq!(
        health_status(gateway.channel().await).await,
        Some(ServingStatus::Serving)
    );

    gateway.stop().await.expect("gateway stops cleanly");
    worker.stop().await.expect("worker stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_down_makes_the_gateway_unavailable_but_alive() {
    let worker = support::start_worker(&support::test_models()).await;
    let worker_url = worker.url();
    let gateway = start_remote_gateway(&demo_route(&worker_url, 90, &worker_url, 10)).await;
    let mut client = gateway.client().await;
    let ready = support::eventually(READINESS_DEADLINE, || {
        let mut client = client.clone();
        async move { server_ready(&mut client).await }
    })
    .await;
    assert!(ready, "gateway becomes ready while the worker is up");
    client
        .model_infer(support::demo_request(&[ROW], ""))
        .await
        .expect("infer works while the worker is up");

    worker.stop().await.expect("worker stops cleanly");

    let status = client
        .model_infer(support::demo_request(&[ROW], ""))
        .await
        .expect_err("no worker, no answer");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(&worker_url),
        "message names the worker: {status:?}"
    );

    let not_ready = support::eventually(READINESS_DEADLINE, || {
        let mut client = client.clone();
        async move { !server_ready(&mut client).await }
    })
    .await;
    assert!(not_ready, "ServerReady turns false when the worker is gone");
    assert!(
        !model_ready(&mut client, "demo", "").await,
        "demo is not ready without its worker"
    );
    let channel = gateway.channel().await;
    let not_serving = support::eventually(READINESS_DEADLINE, || {
        let channel = channel.clone();
        async move { health_status(channel).await == Some(ServingStatus::NotServing) }
    })
    .await;
    assert!(not_serving, "gRPC health turns NOT_SERVING");

    let live = client
        .server_live(ServerLiveRequest {})
        .await
        .expect("the gateway still answers")
        .into_inner()
        .live;
    assert!(live, "the gateway process keeps running");
    let status = client
        .model_infer(support::demo_request(&[ROW], "2"))
        .await
        .expect_err("still no worker");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    gateway.stop().await.expect("gateway stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configs_are_rejected_at_start_naming_the_field() {
    let no_endpoint = "[routes.demo]\nversions = [ { version = \"1\", weight = 1 } ]\n";
    let error = support::rejected_at_start(no_endpoint, Mode::RemoteOnly).await;
    assert!(
        error.contains("routes.demo.versions[0].endpoint"),
        "error names the field: {error}"
    );

    let unknown_version = "[repository]\npath = \"{models}\"\ninstances = 1\n\n\
        [routes.demo]\nversions = [ { version = \"1\", weight = 90 }, { version = \"7\", weight = 10 } ]\n";
    let error = support::rejected_at_start(unknown_version, Mode::Embedded).await;
    assert!(
        error.contains("routes.demo.versions[1]"),
        "error names the field: {error}"
    );
    assert!(error.contains("\"7\""), "error names the version: {error}");
}
