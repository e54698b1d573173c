//! What operators do to running `aviary` processes: a remote-only gateway in front of
//! worker processes (one killed mid-load), Triton's repository RPCs under load, admin
//! loads of names that are not names, SIGTERM with streams mid-conversation, and the
//! config file deleted and restored. Real processes on 127.0.0.1 port 0.

mod support;

use std::{collections::BTreeMap, time::Duration};

use aviary::pb::{
    admin::{VersionRequest, models_client::ModelsClient},
    inference::{
        ModelInferRequest, ModelInferResponse, ModelStreamInferResponse,
        RepositoryModelLoadRequest, RepositoryModelUnloadRequest,
    },
};
use support::*;
use tonic::Code;

/// Upper bound for one request through a gateway whose worker died (hang protection:
/// a request to a dead worker must fail, not wait).
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// `demo` 1 on `v1` and 2 on `v2`, remote, at 50/50.
fn remote_config(v1: &str, v2: &str) -> String {
    format!(
        "[routes.demo]\nversions = [ {{ version = \"1\", weight = 50, endpoint = \"{v1}\" }}, \
         {{ version = \"2\", weight = 50, endpoint = \"{v2}\" }} ]\n"
    )
}

#[test]
fn a_remote_gateway_splits_between_two_worker_processes() {
    let models = repo_root().join("tests/models");
    let (_a, a) = start_worker(&models);
    let (_b, b) = start_worker(&models);
    let gateway = Served::gateway(&remote_config(&a, &b), &[]);
    assert_eq!(
        route_of(&gateway.routes(), "demo"),
        pairs(&[("1", 50), ("2", 50)])
    );

    let served = infer_versions(&gateway.addr, None, 200);
    let (ones, twos) = (served["1"], served["2"]);
    // 200 requests at 50/50: P(one version gets none) = 2^-199.
    assert_eq!(ones + twos, 200, "only versions 1 and 2 answer: {served:?}");
    assert!(ones > 0 && twos > 0, "both versions answer: {served:?}");

    // Each request ran on the worker its version names, and only there.
    let runtime = runtime();
    runtime.block_on(async {
        assert_eq!(successes(&a, "1").await, ones, "worker A ran every v1");
        assert_eq!(successes(&b, "2").await, twos, "worker B ran every v2");
        assert_eq!(successes(&a, "2").await, 0, "worker A never runs v2");
        assert_eq!(successes(&b, "1").await, 0, "worker B never runs v1");
    });
}

/// A remote-only gateway over workers A (demo 1) and B (demo 2), both serving load;
/// B is then killed with SIGKILL. Returns the gateway, worker A's process and address,
/// and what the load saw across the kill.
fn kill_a_worker_under_load() -> (Served, Process, Seen) {
    let models = repo_root().join("tests/models");
    let (a_process, a) = start_worker(&models);
    let (b_process, b) = start_worker(&models);
    let gateway = Served::gateway(&remote_config(&a, &b), &[]);
    let traffic = Traffic::start(&[&gateway.addr, &gateway.addr]);
    let runtime = runtime();
    assert!(
        eventually(START_DEADLINE, || runtime.block_on(async {
            successes(&a, "1").await > 0 && successes(&b, "2").await > 0
        })),
        "load flows through both workers before the kill"
    );
    sigkill(&b_process);
    drop(b_process);
    // Some load after the kill too.
    let after = runtime.block_on(async { successes(&a, "1").await }) + 20;
    assert!(
        eventually(START_DEADLINE, || runtime
            .block_on(async { successes(&a, "1").await >= after })),
        "worker A keeps getting load after the kill"
    );
    (gateway, a_process, traffic.stop())
}

#[test]
fn a_worker_killed_mid_load_fails_its_version_fast_and_the_other_keeps_serving() {
    let (gateway, _a, (answered, _)) = kill_a_worker_under_load();
    assert!(answered.get("1").is_some_and(|&n| n > 0), "{answered:?}");

    let runtime = runtime();
    runtime.block_on(async {
        let mut client = client(connect(&gateway.addr).await);
        for i in 0..5 {
            let status =
                tokio::time::timeout(REQUEST_DEADLINE, client.model_infer(pinned_demo("2")))
                    .await
                    .unwrap_or_else(|_| panic!("request {i} to the dead worker hangs"))
                    .expect_err("the dead worker's version cannot answer");
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        }
        for i in 0..20 {
            let response =
                tokio::time::timeout(REQUEST_DEADLINE, client.model_infer(pinned_demo("1")))
                    .await
                    .unwrap_or_else(|_| panic!("request {i} to the live worker hangs"))
                    .unwrap_or_else(|s| panic!("the live worker's version answers: {s:?}"));
            assert_eq!(response.into_inner().model_version, "1");
        }
    });
    // Unpinned load after the kill: version 1 answers, version 2 fails UNAVAILABLE.
    let traffic = Traffic::start(&[&gateway.addr]);
    assert!(
        eventually(START_DEADLINE, || infer_versions(
            &gateway.addr,
            Some("1"),
            1
        )
        .contains_key("1")),
        "version 1 answers"
    );
    let (answered, failures) = traffic.stop();
    assert!(answered.get("1").is_some_and(|&n| n > 0), "{answered:?}");
    assert!(!answered.contains_key("2"), "{answered:?}");
    for failure in &failures {
        assert!(
            failure.starts_with("Unavailable"),
            "requests fail only as UNAVAILABLE: {failure}"
        );
    }
    assert!(
        gateway.ctl(&["routes"]).ok().stdout.contains("demo"),
        "the gateway still answers its admin API"
    );
}

#[test]
fn requests_in_flight_to_a_killed_worker_fail_unavailable() {
    let (_gateway, _a, (answered, failures)) = kill_a_worker_under_load();
    assert!(answered.get("1").is_some_and(|&n| n > 0), "{answered:?}");
    for failure in &failures {
        assert!(
            failure.starts_with("Unavailable"),
            "requests fail only as UNAVAILABLE: {failure}"
        );
    }
}

/// A demo request pinned to `version`.
fn pinned_demo(version: &str) -> ModelInferRequest {
    let mut request = demo_request();
    request.model_version = version.into();
    request
}

/// The demo deployment with Triton's model control on.
fn explicit_demo_config() -> String {
    demo_config().replace("[server]\n", "[server]\nmodel_control = \"explicit\"\n")
}

/// Triton's RepositoryModelUnload of `model`, with the `force` parameter when asked.
fn unload_request(model: &str, force: bool) -> RepositoryModelUnloadRequest {
    use aviary::pb::inference::{ModelRepositoryParameter, model_repository_parameter};
    let parameters = force
        .then(|| {
            (
                "force".to_owned(),
                ModelRepositoryParameter {
                    parameter_choice: Some(model_repository_parameter::ParameterChoice::BoolParam(
                        true,
                    )),
                },
            )
        })
        .into_iter()
        .collect();
    RepositoryModelUnloadRequest {
        model_name: model.into(),
        parameters,
        ..Default::default()
    }
}

#[test]
fn model_control_is_off_on_inference_ports_by_default_and_a_weighted_model_keeps_serving() {
    let served = Served::demo();
    let (_worker, worker_addr) = start_worker(&repo_root().join("deploy/local/models"));
    let runtime = runtime();
    for addr in [&served.addr, &worker_addr] {
        let (unload, load) = runtime.block_on(async {
            let mut client = client(connect(addr).await);
            let unload = client
                .repository_model_unload(unload_request("demo", true))
                .await
                .expect_err("unload refused");
            let load = client
                .repository_model_load(RepositoryModelLoadRequest {
                    model_name: "demo".into(),
                    ..Default::default()
                })
                .await
                .expect_err("load refused");
            (unload, load)
        });
        for (status, rpc) in [
            (unload, "RepositoryModelUnload"),
            (load, "RepositoryModelLoad"),
        ] {
            assert_eq!(status.code(), Code::Unavailable, "{addr}: {status:?}");
            assert!(
                status.message().contains(rpc) && status.message().contains("model_control"),
                "{addr}: the message says what is off and how to turn it on: {status:?}"
            );
        }
    }
    // Nothing changed: the split still answers, on both.
    assert_eq!(
        route_of(&served.routes(), "demo"),
        pairs(&[("1", 90), ("2", 10)])
    );
    assert_eq!(
        infer_versions(&served.addr, None, 50).values().sum::<u64>(),
        50
    );
    assert_eq!(
        infer_versions(&worker_addr, Some("2"), 5)
            .values()
            .sum::<u64>(),
        5
    );

    // Explicit: an unload of a model with weight is refused unless forced.
    let explicit = Served::start(&explicit_demo_config(), &[]);
    let refused = runtime.block_on(async {
        client(connect(&explicit.addr).await)
            .repository_model_unload(unload_request("demo", false))
            .await
            .expect_err("a weighted model is not unloaded")
    });
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    // Names that would leave the repository are refused in this mode too.
    for name in ["../x", "/etc", "a/b", "x\0y"] {
        let status = runtime.block_on(async {
            client(connect(&explicit.addr).await)
                .repository_model_load(RepositoryModelLoadRequest {
                    model_name: name.into(),
                    ..Default::default()
                })
                .await
                .expect_err("refused")
        });
        assert_eq!(status.code(), Code::InvalidArgument, "{name:?}: {status:?}");
    }
    assert!(
        refused.message().contains("1 (90), 2 (10)") && refused.message().contains("force"),
        "{refused:?}"
    );
    assert_eq!(
        infer_versions(&explicit.addr, None, 50)
            .values()
            .sum::<u64>(),
        50
    );
}

#[test]
fn triton_repository_unload_and_load_of_a_weighted_model_under_load() {
    let served = Served::start(&explicit_demo_config(), &[]);
    let runtime = runtime();
    let mut repository = runtime.block_on(async { client(connect(&served.addr).await) });
    let traffic = Traffic::start(&[&served.addr, &served.addr]);
    assert!(
        eventually(START_DEADLINE, || !infer_versions(&served.addr, None, 1)
            .is_empty()),
        "demo answers before the unload"
    );

    runtime
        .block_on(repository.repository_model_unload(unload_request("demo", true)))
        .expect("RepositoryModelUnload demo, forced");
    assert_eq!(
        route_of(&served.routes(), "demo"),
        None,
        "the unloaded model leaves the routes"
    );
    let gone = infer_demo(&served.addr, &[]).failed();
    assert!(gone.stderr.contains("NotFound"), "{gone:#?}");

    runtime
        .block_on(
            repository.repository_model_load(RepositoryModelLoadRequest {
                model_name: "demo".into(),
                ..Default::default()
            }),
        )
        .expect("RepositoryModelLoad demo");
    // Loaded again, the model gets the config file's route back.
    assert_eq!(
        route_of(&served.routes(), "demo"),
        pairs(&[("1", 90), ("2", 10)])
    );
    let (answered, failures) = traffic.stop();
    assert!(!answered.is_empty(), "the load was answered");
    for failure in &failures {
        assert!(
            failure.starts_with("NotFound"),
            "while demo is unloaded requests are NOT_FOUND, nothing else: {failure}"
        );
    }

    // Loaded again, every request is answered, pinned or split 90/10.
    let after = Traffic::start(&[&served.addr]);
    let split = infer_versions(&served.addr, None, 200);
    assert_eq!(split.values().sum::<u64>(), 200, "{split:?}");
    // P(version 1 never answers at 90 %) = 0.1^200.
    assert!(split.get("1").copied().unwrap_or(0) > 0, "{split:?}");
    assert_eq!(
        infer_versions(&served.addr, Some("1"), 5),
        BTreeMap::from([("1".to_owned(), 5)])
    );
    let (answered, failures) = after.stop();
    assert!(
        failures.is_empty(),
        "no request fails once demo is back: {failures:?}"
    );
    assert!(answered.contains_key("1"), "{answered:?}");
}

#[test]
fn admin_load_refuses_paths_and_nul_naming_the_field() {
    let served = Served::demo();
    let runtime = runtime();
    let cases = [
        ("../x", "1", "model"),
        ("demo", "../x", "version"),
        ("/etc", "1", "model"),
        ("demo", "/tmp/1", "version"),
        ("de\0mo", "1", "model"),
        ("demo", "1\0", "version"),
    ];
    let mut wrong = Vec::new();
    runtime.block_on(async {
        let mut models = ModelsClient::new(connect(&served.admin).await);
        for (model, version, field) in cases {
            let result = models
                .load_version(VersionRequest {
                    model: model.into(),
                    version: version.into(),
                })
                .await;
            match result {
                Err(status)
                    if matches!(status.code(), Code::InvalidArgument | Code::NotFound)
                        && status.message().contains(field) => {}
                other => wrong.push(format!("load {model:?} {version:?}: {other:?}")),
            }
        }
    });
    assert!(
        wrong.is_empty(),
        "refused with INVALID_ARGUMENT or NOT_FOUND naming the field:\n{}",
        wrong.join("\n")
    );
    // Nothing outside the repository was loaded.
    let list = served.ctl(&["models", "--json"]).json();
    let listed = list["versions"].as_array().expect("versions").len();
    assert_eq!(listed, 3, "{list:#}");
}

/// `n` slow requests for a ModelStreamInfer stream.
fn slow_messages(n: usize) -> Vec<ModelInferRequest> {
    (0..n)
        .map(|i| {
            let mut request = slow_request();
            request.id = format!("stream-{i}");
            request
        })
        .collect()
}

/// The answer of a stream message, which must not be an error.
fn answer(message: ModelStreamInferResponse) -> ModelInferResponse {
    assert_eq!(message.error_message, "", "the message is answered");
    message.infer_response.expect("an answer")
}

#[test]
fn sigterm_answers_the_messages_in_flight_on_open_streams_then_exits_zero() {
    const MESSAGES: usize = 3;
    let mut served = Served::start(&slow_config(), &["--grace-period", "30"]);
    let runtime = runtime();
    let reference = slow_reference(&runtime, &served.addr);

    // Two streams, each with MESSAGES slow messages sent. One has half-closed its side
    // (it will send no more); the other stays open until it has every answer, as a
    // client in mid-conversation does. Each has one answer back when SIGTERM comes, so
    // the stream is live and its later messages are in flight.
    let (streams, open) = runtime.block_on(async {
        let mut streams = Vec::new();
        let (open_tx, open_rx) = tokio::sync::mpsc::channel(MESSAGES);
        for message in slow_messages(MESSAGES) {
            open_tx.send(message).await.expect("queue a message");
        }
        let half_closed = futures::stream::iter(slow_messages(MESSAGES));
        let mut first = client(connect(&served.addr).await);
        let mut second = client(connect(&served.addr).await);
        streams.push(
            first
                .model_stream_infer(half_closed)
                .await
                .expect("stream opens")
                .into_inner(),
        );
        streams.push(
            second
                .model_stream_infer(futures::stream::unfold(open_rx, |mut rx| async move {
                    rx.recv().await.map(|message| (message, rx))
                }))
                .await
                .expect("stream opens")
                .into_inner(),
        );
        let mut answers = vec![Vec::new(), Vec::new()];
        for (stream, answers) in streams.iter_mut().zip(&mut answers) {
            let message = stream
                .message()
                .await
                .expect("the stream is healthy")
                .expect("a first answer");
            answers.push(answer(message));
        }
        ((streams, answers), open_tx)
    });
    let (mut streams, mut answers) = streams;

    sigterm(&served.server);

    runtime.block_on(async {
        for (stream, answers) in streams.iter_mut().zip(&mut answers) {
            while answers.len() < MESSAGES {
                let message = tokio::time::timeout(Duration::from_secs(60), stream.message())
                    .await
                    .expect("an answer within 60 s")
                    .unwrap_or_else(|s| panic!("the stream failed while draining: {s:?}"))
                    .expect("every message in flight is answered before the stream ends");
                answers.push(answer(message));
            }
        }
    });
    assert!(
        served.server.exited().is_none(),
        "the server waits for the stream its client keeps open"
    );
    drop(open);
    runtime.block_on(async {
        for stream in &mut streams {
            let end = tokio::time::timeout(Duration::from_secs(30), stream.message())
                .await
                .expect("the stream ends once the client is done");
            assert!(matches!(end, Ok(None)), "the stream ends cleanly: {end:?}");
        }
    });
    for (s, answers) in answers.iter().enumerate() {
        for (i, response) in answers.iter().enumerate() {
            assert_eq!(
                response.id,
                format!("stream-{i}"),
                "stream {s} answers in order"
            );
            assert_eq!(
                slow_output(response),
                reference,
                "stream {s} message {i} in full"
            );
        }
    }

    let status = served.server.wait_exit(Duration::from_secs(30));
    let stderr = served.server.take_stderr();
    assert_eq!(status.code(), Some(0), "serve exits 0; stderr:\n{stderr}");
    assert!(
        !stderr.contains("grace period over"),
        "the streams finished within the grace period; stderr:\n{stderr}"
    );
}

#[test]
fn a_deleted_config_file_keeps_the_routes_and_its_restored_weights_apply() {
    let served = Served::demo();
    let before = served.route_table();
    let generation = before["generation"].as_u64().expect("generation");
    let status_before = served.ctl(&["config-status", "--json"]).json();
    let traffic = Traffic::start(&[&served.addr]);

    std::fs::remove_file(&served.config).expect("delete the config file");
    // The watcher notices: the status says the file cannot be read, and the routes
    // and the last good config's status stay.
    let noticed = eventually(CONFIG_DEADLINE, || {
        served.ctl(&["config-status", "--json"]).json()["unreadable"]
            .as_str()
            .is_some_and(|why| why.starts_with("cannot read the file"))
    });
    assert!(noticed, "the watcher read the missing file");
    assert_eq!(
        served.route_table(),
        before,
        "the routes stay while the file is gone"
    );
    let status = served.ctl(&["config-status", "--json"]).json();
    for field in ["path", "applied_at_ms", "errors", "notes"] {
        assert_eq!(status[field], status_before[field], "{status:#}");
    }
    let text = served.ctl(&["config-status"]).ok().stdout;
    assert!(!text.contains("REJECTED"), "{text}");
    assert!(
        text.contains("the last good config keeps serving"),
        "{text}"
    );

    let restored = demo_config()
        .replace("weight = 90", "weight = 0")
        .replace("weight = 10", "weight = 100");
    std::fs::write(&served.config, restored).expect("restore the config file");
    let applied = eventually(CONFIG_DEADLINE, || {
        route_of(&served.routes(), "demo") == pairs(&[("1", 0), ("2", 100)])
    });
    assert!(applied, "the restored weights apply: {:#}", served.routes());
    assert_eq!(
        served.routes()["generation"].as_u64(),
        Some(generation + 1),
        "the restored file is the only change published since the deletion"
    );
    assert_eq!(
        infer_versions(&served.addr, None, 20),
        BTreeMap::from([("2".to_owned(), 20)])
    );
    let (answered, failures) = traffic.stop();
    assert!(failures.is_empty(), "no request failed: {failures:?}");
    assert!(!answered.is_empty(), "the traffic was answered");
    let status = served.ctl(&["config-status", "--json"]).json();
    assert_eq!(status["unreadable"], "", "readable again: {status:#}");
}
