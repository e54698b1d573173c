//! The request path under faults, as users run it: real `aviary` processes on
//! 127.0.0.1 port 0. A hung worker costs its callers only their deadline and never
//! the other version's; a worker drops a request whose deadline passed in its queue; a
//! slow version refuses its excess at once; a failing version trips its breaker and
//! recovers; a canary whose worker is gone does not take the gateway out of service.

mod support;

use std::time::{Duration, Instant};

use aviary::pb::inference::{ModelInferRequest, ModelStatisticsRequest};
use serde_json::Value;
use support::*;
use tonic::Code;

/// `demo` 1 on `v1` at 90 and 2 on `v2` at 10, remote, with `limits` for the route.
fn remote_config(v1: &str, v2: &str, limits: &str) -> String {
    format!(
        "[routes.demo]\nversions = [ {{ version = \"1\", weight = 90, endpoint = \"{v1}\" }}, \
         {{ version = \"2\", weight = 10, endpoint = \"{v2}\" }} ]\n\
         [routes.demo.limits]\n{limits}\n"
    )
}

/// One demo request pinned to `version` with the client deadline `timeout`.
fn pinned(version: &str, timeout: Option<Duration>) -> tonic::Request<ModelInferRequest> {
    let mut request = tonic::Request::new(ModelInferRequest {
        model_version: version.into(),
        ..demo_request()
    });
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    request
}

/// The code of one pinned demo request through `addr` (`Ok` for an answer).
fn outcome(
    runtime: &tokio::runtime::Runtime,
    addr: &str,
    version: &str,
    timeout: Option<Duration>,
) -> Code {
    status(runtime, addr, version, timeout).code()
}

/// The status of one pinned demo request through `addr` (OK for an answer).
fn status(
    runtime: &tokio::runtime::Runtime,
    addr: &str,
    version: &str,
    timeout: Option<Duration>,
) -> tonic::Status {
    runtime.block_on(async {
        let mut client = client(connect(addr).await);
        let call = client.model_infer(pinned(version, timeout));
        // Hang protection only: every call here must end by itself.
        match tokio::time::timeout(COMMAND_DEADLINE, call).await {
            Ok(Ok(_)) => tonic::Status::ok(""),
            Ok(Err(status)) => status,
            Err(_) => panic!("a call to version {version} hung"),
        }
    })
}

/// What `ctl routes --json` says of `model` at `version`: (health, breaker).
fn version_state(gateway: &Served, model: &str, version: &str) -> (String, String) {
    let entry = gateway.route_entry(model, version);
    let text = |field: &str| entry[field].as_str().unwrap_or_default().to_owned();
    (text("health"), text("breaker"))
}

fn serving(runtime: &tokio::runtime::Runtime, addr: &str) -> bool {
    runtime.block_on(async {
        let mut health = tonic_health::pb::health_client::HealthClient::new(connect(addr).await);
        health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .is_ok_and(|r| r.into_inner().status == 1)
    })
}

#[test]
fn a_hung_worker_costs_its_callers_their_deadline_and_nothing_else() {
    let models = repo_root().join("tests/models");
    let (_w1, v1) = start_worker(&models);
    let (w2, v2) = start_worker(&models);
    // The breaker stays out of the way: this is about deadlines. The deadline is the
    // route's (the hung caller sends none): a client's own grpc-timeout is enforced by
    // its tonic channel too, which may answer CANCELLED a moment before the gateway's
    // DEADLINE_EXCEEDED arrives, and the point here is what the gateway answers.
    let gateway = Served::gateway(
        &remote_config(
            &v1,
            &v2,
            "breaker_failures = 1000
timeout_ms = 1000",
        ),
        &[],
    );
    let runtime = runtime();
    assert!(
        eventually(CONFIG_DEADLINE, || serving(&runtime, &gateway.addr)),
        "the gateway becomes ready"
    );

    sigstop(&w2);
    let hung = std::thread::scope(|scope| {
        let hung = scope.spawn(|| {
            let started = Instant::now();
            (
                status(&runtime, &gateway.addr, "2", None),
                started.elapsed(),
            )
        });
        // Meanwhile the other version answers as always.
        for _ in 0..20 {
            assert_eq!(
                outcome(&runtime, &gateway.addr, "1", Some(Duration::from_secs(5))),
                Code::Ok
            );
        }
        hung.join().expect("client thread")
    });
    let (hung, waited) = hung;
    assert_eq!(
        hung.code(),
        Code::DeadlineExceeded,
        "the hung version's caller gets its deadline: {hung:?}"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "answered at the route's 1 s deadline, not before and not much after: {waited:?}"
    );
    assert!(
        eventually(CONFIG_DEADLINE, || version_state(&gateway, "demo", "2").0
            == "down"),
        "the readiness check marks the hung worker's version down: {:#}",
        gateway.routes()
    );
    assert_eq!(version_state(&gateway, "demo", "1").0, "up");
    assert!(
        serving(&runtime, &gateway.addr),
        "one version down does not take the gateway out of service"
    );

    sigcont(&w2);
    assert!(
        eventually(CONFIG_DEADLINE, || outcome(
            &runtime,
            &gateway.addr,
            "2",
            Some(Duration::from_secs(5))
        ) == Code::Ok),
        "the version recovers with its worker"
    );
}

#[test]
fn a_worker_drops_a_request_whose_deadline_passed_in_its_queue() {
    // One session: a second request waits for the first.
    let (_worker, addr) = start_worker_with(&repo_root().join("tests/slow-models"), 1);
    let runtime = runtime();
    let executions = || {
        runtime.block_on(async {
            client(connect(&addr).await)
                .model_statistics(ModelStatisticsRequest {
                    name: "slow".into(),
                    version: "1".into(),
                })
                .await
                .expect("statistics")
                .into_inner()
                .model_stats
                .iter()
                .map(|s| s.execution_count)
                .sum::<u64>()
        })
    };
    let before = executions();
    // One session: the first request runs, the second waits for it.
    let busy = slow_requests_in_flight(&runtime, &addr, 2);
    let expired = runtime.block_on(async {
        let mut request = tonic::Request::new(slow_request());
        request.set_timeout(Duration::from_millis(50));
        client(connect(&addr).await).model_infer(request).await
    });
    let code = expired
        .expect_err("its deadline passed in the queue")
        .code();
    assert!(
        matches!(code, Code::DeadlineExceeded | Code::Cancelled),
        "{code:?}"
    );
    for call in busy {
        runtime
            .block_on(call)
            .expect("task")
            .expect("the requests without a deadline are answered");
    }
    assert_eq!(
        executions() - before,
        2,
        "the expired request never reached ONNX Runtime"
    );
}

/// `n` slow requests at once: how many were answered, and the refusals.
fn burst(served: &Served, n: usize) -> (usize, Vec<tonic::Status>) {
    let runtime = runtime();
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let addr = served.addr.clone();
            runtime.spawn(async move {
                client(connect(&addr).await)
                    .model_infer(slow_request())
                    .await
            })
        })
        .collect();
    let (mut answered, mut refused) = (0, Vec::new());
    for call in calls {
        match runtime.block_on(call).expect("task") {
            Ok(_) => answered += 1,
            Err(status) => refused.push(status),
        }
    }
    (answered, refused)
}

#[test]
fn excess_load_on_a_slow_version_is_refused_at_once() {
    let config = format!(
        "{}[routes.slow.limits]\nmax_in_flight = 2\nmax_queue = 2\n",
        slow_config()
    );
    let served = Served::start(&config, &[]);
    let (answered, refused) = burst(&served, 24);
    assert!(
        answered >= 4,
        "two in flight and two waiting are answered: {answered}"
    );
    assert!(
        !refused.is_empty(),
        "24 at once on 4 places: some are refused"
    );
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status
                .message()
                .contains("model \"slow\" version \"1\" is at its limit"),
            "{status:?}"
        );
    }
}

#[test]
fn limits_set_through_the_admin_api_take_effect_and_show() {
    let served = Served::start(&slow_config(), &[]);
    let (answered, refused) = burst(&served, 12);
    assert_eq!(
        (answered, refused.len()),
        (12, 0),
        "the default limits admit 12 at once: {refused:?}"
    );

    let refused_change = served
        .ctl(&[
            "set-limits",
            "slow",
            "--version",
            "1",
            "--max-in-flight",
            "0",
        ])
        .failed();
    assert!(
        refused_change.stderr.contains("InvalidArgument")
            && refused_change
                .stderr
                .contains("routes.slow.versions[0].limits.max_in_flight"),
        "{refused_change:#?}"
    );
    let set = served
        .ctl(&[
            "set-limits",
            "slow",
            "--version",
            "1",
            "--max-in-flight",
            "1",
            "--max-queue",
            "1",
        ])
        .ok();
    assert!(
        set.stdout.contains("limits of slow version 1 set"),
        "{set:#?}"
    );

    let (answered, refused) = burst(&served, 12);
    assert!(answered >= 2, "one in flight and one waiting: {answered}");
    assert!(!refused.is_empty(), "12 at once on 2 places");
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    }
    let routes = served.routes();
    let version = &routes["routes"][0]["versions"][0];
    assert_eq!(version["limits"]["max_in_flight"], 1, "{routes}");
    assert_eq!(version["limits"]["max_queue"], 1, "{routes}");
    assert_eq!(
        version["limits"]["timeout_ms"], 30_000,
        "what it did not name keeps its default: {routes}"
    );
    assert_eq!(
        version["shed"],
        refused.len(),
        "every refusal is counted: {routes}"
    );
    let table = served.ctl(&["routes"]).ok();
    assert!(
        table.stdout.contains("1+1 30s/300s")
            && table.stdout.contains(&format!("shed {}", refused.len())),
        "{table:#?}"
    );
}

#[test]
fn a_failing_version_trips_its_breaker_and_recovers() {
    let failing = demo_config().replace(
        "{ version = \"2\", weight = 10 }",
        "{ version = \"2\", weight = 10, fault = { error_rate = 1.0 } }",
    );
    let config =
        format!("{failing}\n[routes.demo.limits]\nbreaker_failures = 3\nbreaker_open_ms = 200\n");
    let served = Served::start(&config, &[]);
    let runtime = runtime();
    for _ in 0..3 {
        assert_eq!(outcome(&runtime, &served.addr, "2", None), Code::Internal);
    }
    assert_eq!(
        outcome(&runtime, &served.addr, "2", None),
        Code::Unavailable,
        "the open breaker fails the call fast"
    );
    assert_eq!(version_state(&served, "demo", "2").1, "open");
    assert_eq!(
        outcome(&runtime, &served.addr, "1", None),
        Code::Ok,
        "the other version is fine"
    );

    // The fault is fixed: after the open period a probe goes through and closes it.
    let fixed = config.replace(", fault = { error_rate = 1.0 }", "");
    std::fs::write(served.dir.path().join("next.toml"), fixed).expect("write");
    std::fs::rename(served.dir.path().join("next.toml"), &served.config).expect("rename");
    assert!(
        eventually(CONFIG_DEADLINE, || outcome(
            &runtime,
            &served.addr,
            "2",
            None
        ) == Code::Ok),
        "the version recovers"
    );
    assert_eq!(version_state(&served, "demo", "2").1, "closed");
}

#[test]
fn a_gateway_with_a_canary_endpoint_down_becomes_ready_for_the_rest() {
    let models = repo_root().join("tests/models");
    let (_w1, v1) = start_worker(&models);
    // Nothing listens on port 1: the canary's worker is down from the start.
    let gateway = Served::gateway(&remote_config(&v1, "http://127.0.0.1:1", ""), &[]);
    let runtime = runtime();
    assert!(
        eventually(CONFIG_DEADLINE, || serving(&runtime, &gateway.addr)),
        "ready while version 1 can serve: {:#}",
        gateway.routes()
    );
    assert_eq!(version_state(&gateway, "demo", "2").0, "down");
    assert_eq!(
        outcome(&runtime, &gateway.addr, "2", None),
        Code::Unavailable
    );
    assert_eq!(outcome(&runtime, &gateway.addr, "1", None), Code::Ok);
}

#[test]
fn a_killed_replica_costs_no_request_and_rejoins_when_back() {
    let models = repo_root().join("tests/models");
    let (w1, a) = start_worker(&models);
    let (_w2, b) = start_worker(&models);
    let config = format!(
        "[routes.demo]\nversions = [ {{ version = \"1\", weight = 100, endpoints = [\"{a}\", \"{b}\"] }} ]\n"
    );
    let gateway = Served::gateway(&config, &[]);
    let runtime = runtime();
    assert!(
        eventually(CONFIG_DEADLINE, || serving(&runtime, &gateway.addr)),
        "the gateway becomes ready"
    );
    let traffic = Traffic::start(&[&gateway.addr, &gateway.addr]);
    let served = |worker: &str| runtime.block_on(successes(worker, "1"));
    assert!(
        eventually(CONFIG_DEADLINE, || served(&a) > 0 && served(&b) > 0),
        "both replicas serve"
    );

    // Killed mid-traffic: its calls in flight are retried on the other replica.
    sigkill(&w1);
    let port = a.rsplit(':').next().expect("a port").to_owned();
    let before = served(&b);
    assert!(
        eventually(CONFIG_DEADLINE, || served(&b) >= before + 200),
        "the other replica takes the traffic"
    );
    let routes = gateway.routes();
    let version = &routes["routes"][0]["versions"][0];
    assert!(
        version["ejections"].as_u64() >= Some(1),
        "the killed replica's ejection is counted: {routes}"
    );

    // Back on the same address: probed, and let back in.
    drop(w1);
    let mut back = Process::spawn(
        &[
            "worker",
            "--repo",
            models.to_str().expect("utf-8 path"),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--instances",
            "2",
        ],
        &[],
    );
    back.wait_listening();
    assert!(
        eventually(CONFIG_DEADLINE, || served(&a) > 0),
        "the restarted replica rejoins"
    );
    let (answered, failures) = traffic.stop();
    assert!(failures.is_empty(), "no request failed: {failures:?}");
    assert!(answered.contains_key("1"), "{answered:?}");
}

#[test]
fn with_every_replica_down_retries_stay_within_the_budget() {
    // Two replicas that refuse connections (ports 1 and 9 on loopback have no
    // listener); a breaker that never opens, so every call reaches the replicas.
    let config = "[routes.demo]\nversions = [ { version = \"1\", weight = 1, \
                  endpoints = [\"http://127.0.0.1:1\", \"http://127.0.0.1:9\"] } ]\n\
                  limits = { breaker_failures = 1000000 }\n";
    let gateway = Served::gateway(config, &[]);
    let runtime = runtime();
    const CALLS: usize = 300;
    for _ in 0..CALLS {
        let code = outcome(&runtime, &gateway.addr, "1", Some(Duration::from_secs(2)));
        assert_eq!(code, Code::Unavailable);
    }
    let version = gateway.route_entry("demo", "1");
    let retries = version["retries"].as_u64().unwrap_or(0);
    // Without a budget each call would take 3 attempts: 600 retries. The budget has
    // no successes to earn from, only its floor: 10 a second kept over 10 s.
    assert!(
        (1..=110).contains(&retries),
        "{retries} retries for {CALLS} failing calls: {version}"
    );
}

/// An embedded demo whose canary, version 2, fails every call, in a rollout plan
/// whose error gate rolls it back; `stand_in` is the route's setting that answers for
/// it (a fallback or the default prediction).
fn failing_canary_config(stand_in: &str) -> String {
    let models = repo_root().join("deploy/local/models");
    format!(
        r#"
[repository]
path = "{models}"
instances = 2

[routes.demo]
versions = [ {{ version = "1", weight = 100 }}, {{ version = "2", weight = 0, fault = {{ error_rate = 1.0 }} }} ]
{stand_in}

[rollouts]
evaluate_interval_ms = 100

[rollouts.plans.demo]
canary = "2"
baseline = "1"
steps = [ {{ weight = 50, min_duration_ms = 60000, min_requests = 20 }}, {{ weight = 100, min_duration_ms = 0, min_requests = 20 }} ]
gates = {{ max_error_rate_increase = 0.05 }}
"#,
        models = models.display()
    )
}

/// Under traffic, the rollout sees the canary's own failures and rolls it back while
/// no client sees an error; the answers by version.
fn rolled_back_without_client_errors(served: &Served) -> std::collections::BTreeMap<String, u64> {
    let traffic = Traffic::start(&[&served.addr]);
    assert!(
        eventually(CONFIG_DEADLINE, || served
            .ctl(&["rollout", "status", "demo", "--json"])
            .json()["state"]
            == "rolled back"),
        "the canary is rolled back: {:#}",
        served.ctl(&["rollout", "status", "demo", "--json"]).json()
    );
    let (answered, failures) = traffic.stop();
    assert!(
        failures.is_empty(),
        "no client saw the canary fail: {failures:?}"
    );
    answered
}

#[test]
fn a_failing_canary_is_served_by_its_fallback_and_still_rolled_back() {
    let served = Served::start(
        &failing_canary_config("fallback = { version = \"1\" }"),
        &[],
    );
    let runtime = runtime();

    // A request pinned to the failing canary: answered by version 1, and it says so.
    let response = runtime.block_on(async {
        client(connect(&served.addr).await)
            .model_infer(pinned("2", None))
            .await
            .expect("the fallback answers")
    });
    let fallback_for = response
        .metadata()
        .get("x-aviary-fallback-for")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let response = response.into_inner();
    assert_eq!(response.model_version, "1");
    assert_eq!(fallback_for.as_deref(), Some("demo/2"));
    assert!(response.parameters.contains_key("aviary_fallback_for"));

    let answered = rolled_back_without_client_errors(&served);
    assert_eq!(
        answered.keys().map(String::as_str).collect::<Vec<_>>(),
        ["1"],
        "every answer came from version 1: {answered:?}"
    );
    let routes = served.routes();
    let canary = routes["routes"][0]["versions"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["version"] == "2"))
        .cloned()
        .unwrap_or(Value::Null);
    assert!(canary["fallbacks"].as_u64() > Some(0), "{routes:#}");
}

/// Asserts `response` is demo's default prediction (the model card's: equal
/// probabilities, label -1) standing in for `failed`, for one row.
fn assert_demo_default(
    response: tonic::Response<aviary::pb::inference::ModelInferResponse>,
    failed: &str,
) {
    let header = response
        .metadata()
        .get("x-aviary-default-for")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    assert_eq!(header.as_deref(), Some(failed));
    let response = response.into_inner();
    assert!(response.parameters.contains_key("aviary_default_for"));
    let outputs: Vec<(&str, &str, &[i64])> = response
        .outputs
        .iter()
        .map(|o| (o.name.as_str(), o.datatype.as_str(), o.shape.as_slice()))
        .collect();
    assert_eq!(
        outputs,
        [
            ("probabilities", "FP32", &[1, 3][..]),
            ("label", "INT64", &[1][..])
        ]
    );
    assert_eq!(
        response.raw_output_contents[0],
        aviary::tensor::to_raw(&[0.3333f32, 0.3333, 0.3334])
    );
    assert_eq!(
        response.raw_output_contents[1],
        aviary::tensor::to_raw(&[-1i64])
    );
}

#[test]
fn a_failing_canary_answered_with_its_default_prediction_is_still_rolled_back() {
    let served = Served::start(&failing_canary_config("default_prediction = true"), &[]);
    assert!(
        eventually(
            CONFIG_DEADLINE,
            || served.route_entry("demo", "2")["default_ready"] == true
        ),
        "the gateway holds the canary's default: {}",
        served.route_entry("demo", "2")
    );
    let runtime = runtime();
    let response = runtime.block_on(async {
        client(connect(&served.addr).await)
            .model_infer(pinned("2", None))
            .await
            .expect("the default answers")
    });
    assert_eq!(response.get_ref().model_version, "2");
    assert_demo_default(response, "demo/2");

    rolled_back_without_client_errors(&served);
    let canary = served.route_entry("demo", "2");
    assert!(canary["defaults"].as_u64() > Some(0), "{canary}");
    let table = served.ctl(&["routes"]).ok();
    assert!(table.stdout.contains("defaulted"), "{table:#?}");
}

#[test]
fn a_default_prediction_answers_when_the_worker_is_gone_and_only_where_a_card_states_one() {
    let models = repo_root().join("tests/models");
    let (worker, endpoint) = start_worker(&models);
    let config = format!(
        "[routes.demo]\nversions = [ {{ version = \"1\", weight = 1, endpoint = \"{endpoint}\" }} ]\n\
         default_prediction = true\n\
         [routes.fixed]\nversions = [ {{ version = \"1\", weight = 1, endpoint = \"{endpoint}\" }} ]\n\
         default_prediction = true\n"
    );
    let gateway = Served::gateway(&config, &[]);
    assert!(
        eventually(
            CONFIG_DEADLINE,
            || gateway.route_entry("demo", "1")["default_ready"] == true
        ),
        "fetched from the remote worker: {}",
        gateway.route_entry("demo", "1")
    );
    assert_eq!(
        gateway.route_entry("fixed", "1")["default_ready"],
        false,
        "fixed has no model card: no default"
    );

    sigkill(&worker);
    let runtime = runtime();
    let response = runtime.block_on(async {
        client(connect(&gateway.addr).await)
            .model_infer(pinned("1", Some(Duration::from_secs(5))))
            .await
            .expect("the default answers for the dead worker")
    });
    assert_demo_default(response, "demo/1");
    let fixed = runtime.block_on(async {
        let values = [1f32, 2., 3., 4., 5., 6.];
        let request = ModelInferRequest {
            model_name: "fixed".into(),
            inputs: vec![
                aviary::pb::inference::model_infer_request::InferInputTensor {
                    name: "x".into(),
                    datatype: "FP32".into(),
                    shape: vec![2, 3],
                    ..Default::default()
                },
            ],
            raw_input_contents: vec![aviary::tensor::to_raw(&values).into()],
            ..Default::default()
        };
        client(connect(&gateway.addr).await)
            .model_infer(request)
            .await
            .expect_err("nothing stands in for fixed")
    });
    assert_eq!(fixed.code(), Code::Unavailable, "{fixed:?}");
}

#[test]
fn finally_failed_requests_are_kept_across_a_restart_and_replayed() {
    let failing = demo_config().replace(
        "{ version = \"2\", weight = 10 }",
        "{ version = \"2\", weight = 10, fault = { error_rate = 1.0 } }",
    );
    let config =
        format!("{failing}dead_letters = true\n\n[dead_letters]\nfolder = \"{{dir}}/dead\"\n");
    let mut served = Served::start(&config, &[]);
    let runtime = runtime();
    for _ in 0..3 {
        assert_eq!(outcome(&runtime, &served.addr, "2", None), Code::Internal);
    }
    assert_eq!(outcome(&runtime, &served.addr, "1", None), Code::Ok);
    let kept = |served: &Served| {
        served.ctl(&["dlq", "list", "--json"]).json()["letters"]
            .as_array()
            .map_or(0, Vec::len)
    };
    assert!(
        eventually(CONFIG_DEADLINE, || kept(&served) == 3),
        "the three failed requests are kept: {:#}",
        served.ctl(&["dlq", "list", "--json"]).json()
    );
    let listed = served.ctl(&["dlq", "list", "--json"]).json();
    assert_eq!(listed["letters"][0]["version"], "2", "{listed:#}");
    assert_eq!(
        listed["letters"][0]["code"],
        Code::Internal as i32,
        "{listed:#}"
    );

    served.restart();
    assert_eq!(kept(&served), 3, "the letters survive a restart");

    // Replayed to the healthy version: answered, and gone from the queue.
    let replayed = served
        .ctl(&["dlq", "replay", "demo", "--version", "1", "--json"])
        .json();
    let outcomes = replayed["outcomes"].as_array().cloned().unwrap_or_default();
    assert_eq!(outcomes.len(), 3, "{replayed:#}");
    assert!(outcomes.iter().all(|o| o["ok"] == true), "{replayed:#}");
    assert_eq!(kept(&served), 0);
}
