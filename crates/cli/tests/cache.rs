//! The prediction cache through the real `aviary` binary: repeated requests are
//! answered from the cache without reaching the worker, versions never share answers,
//! a version swapped under load never serves the old model's answers, gateways share
//! answers through a real `redis-server`, and a Redis that is down or hung costs
//! requests nothing but the bypasses counted.

mod support;

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aviary::{
    pb::inference::{
        ModelInferRequest, ModelInferResponse,
        grpc_inference_service_client::GrpcInferenceServiceClient,
        infer_parameter::ParameterChoice,
    },
    tensor,
};
use redis::Commands;
use serde_json::Value;
use support::{redis_server::RedisServer, *};
use tonic::transport::Channel;

/// A demo request for the row `values`.
fn request_of(values: [f32; 4], version: Option<&str>) -> ModelInferRequest {
    let mut request = demo_request();
    request.raw_input_contents = vec![tensor::to_raw(&values).into()];
    request.model_version = version.unwrap_or_default().to_owned();
    request
}

/// An answer's outputs: names and raw bytes.
type Outputs = Vec<(String, Vec<u8>)>;

/// What a response says of the cache (`hit`, `miss`, or empty), its header, and its
/// answer (output names and raw bytes).
struct Answer {
    cache: String,
    header: String,
    id: String,
    version: String,
    outputs: Outputs,
    parameters: Vec<String>,
}

async fn ask(
    client: &mut GrpcInferenceServiceClient<Channel>,
    request: ModelInferRequest,
) -> Answer {
    let response = client
        .model_infer(request)
        .await
        .expect("the gateway answers");
    let header = response
        .metadata()
        .get("x-aviary-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let response: ModelInferResponse = response.into_inner();
    let cache = match response
        .parameters
        .get("aviary_cache")
        .and_then(|p| p.parameter_choice.as_ref())
    {
        Some(ParameterChoice::StringParam(value)) => value.clone(),
        _ => String::new(),
    };
    Answer {
        cache,
        header,
        id: response.id,
        version: response.model_version,
        outputs: response
            .outputs
            .iter()
            .map(|o| o.name.clone())
            .zip(response.raw_output_contents.iter().map(|b| b.to_vec()))
            .collect(),
        parameters: response.parameters.keys().cloned().collect(),
    }
}

/// The version's cache counters in a `ctl routes --json` report.
fn counters(served: &Served, version: &str) -> Value {
    let entry = served.route_entry("demo", version);
    assert!(!entry.is_null(), "demo {version} in {:#}", served.routes());
    entry
}

fn count(counters: &Value, name: &str) -> u64 {
    counters[name].as_u64().unwrap_or(0)
}

/// An embedded demo route over `repository` (versions 1 and 2, unpinned traffic to 1)
/// with the cache on, and `extra` appended.
fn embedded_config(repository: &Path, extra: &str) -> String {
    format!(
        "[repository]\npath = \"{}\"\ninstances = 1\nintra_op_threads = 1\ninter_op_threads = 1\n\n\
         [routes.demo]\nversions = [ {{ version = \"1\", weight = 1 }}, {{ version = \"2\", weight = 0 }} ]\n\
         cache = {{ ttl_ms = 60000 }}\n\n{extra}",
        repository.display()
    )
}

fn models() -> std::path::PathBuf {
    repo_root().join("tests/models")
}

#[test]
fn repeated_requests_are_answered_from_the_cache_without_reaching_the_worker() {
    let (_worker, endpoint) = start_worker(&models());
    let config = format!(
        "[routes.demo]\nversions = [ {{ version = \"1\", weight = 1, endpoint = \"{endpoint}\" }} ]\n\
         cache = {{ ttl_ms = 60000 }}\n"
    );
    let served = Served::gateway(&config, &[]);
    runtime().block_on(async {
        let mut client = client(connect(&served.addr).await);
        let mut first = request_of([5.1, 3.5, 1.4, 0.2], None);
        first.id = "first".into();
        let miss = ask(&mut client, first).await;
        assert_eq!(
            (miss.cache.as_str(), miss.header.as_str()),
            ("miss", "miss")
        );
        assert_eq!(successes(&endpoint, "1").await, 1);
        // The worker's fingerprint parameter stays between the worker and the gateway.
        assert!(
            !miss
                .parameters
                .iter()
                .any(|p| p == "aviary_model_fingerprint"),
            "{:?}",
            miss.parameters
        );
        for n in 0..5 {
            let mut again = request_of([5.1, 3.5, 1.4, 0.2], None);
            again.id = format!("again-{n}");
            let hit = ask(&mut client, again).await;
            assert_eq!((hit.cache.as_str(), hit.header.as_str()), ("hit", "hit"));
            assert_eq!(
                hit.id,
                format!("again-{n}"),
                "a hit answers with the request's id"
            );
            assert_eq!(hit.version, "1");
            assert_eq!(hit.outputs, miss.outputs);
        }
        assert_eq!(
            successes(&endpoint, "1").await,
            1,
            "hits never reach the worker"
        );
        let other = ask(&mut client, request_of([6.7, 3.0, 5.2, 2.3], None)).await;
        assert_eq!(other.cache, "miss", "other inputs are another key");
        assert_ne!(other.outputs, miss.outputs);
        assert_eq!(successes(&endpoint, "1").await, 2);
    });
    let version = counters(&served, "1");
    assert_eq!(count(&version, "cache_hits"), 5, "{version:#}");
    assert_eq!(count(&version, "cache_misses"), 2, "{version:#}");
    let table = served.ctl(&["routes"]).ok().stdout;
    assert!(table.contains("cache hit 5, cache miss 2"), "{table}");
}

#[test]
fn versions_never_share_answers() {
    let served = Served::start(&embedded_config(&models(), ""), &[]);
    runtime().block_on(async {
        let mut client = client(connect(&served.addr).await);
        let row = [5.9, 3.0, 4.2, 1.5];
        let one = ask(&mut client, request_of(row, Some("1"))).await;
        assert_eq!(one.cache, "miss");
        assert_eq!(
            ask(&mut client, request_of(row, Some("1"))).await.cache,
            "hit"
        );
        let two = ask(&mut client, request_of(row, Some("2"))).await;
        assert_eq!((two.cache.as_str(), two.version.as_str()), ("miss", "2"));
        assert_ne!(two.outputs, one.outputs, "the versions answer differently");
        let two_again = ask(&mut client, request_of(row, Some("2"))).await;
        assert_eq!(two_again.cache, "hit");
        assert_eq!(two_again.outputs, two.outputs);
        // Unpinned traffic resolves to version 1: its answer, from its entries.
        let unpinned = ask(&mut client, request_of(row, None)).await;
        assert_eq!(
            (unpinned.cache.as_str(), unpinned.version.as_str()),
            ("hit", "1")
        );
        assert_eq!(unpinned.outputs, one.outputs);
    });
}

#[test]
fn a_version_swapped_under_load_never_serves_the_old_models_answers() {
    let repository = copy_of_demo();
    let served = Served::start(&embedded_config(repository.path(), ""), &[]);
    let row = [6.1, 2.8, 4.7, 1.2];
    let (old, new) = runtime().block_on(async {
        let mut client = client(connect(&served.addr).await);
        let old = ask(&mut client, request_of(row, Some("1"))).await.outputs;
        let new = ask(&mut client, request_of(row, Some("2"))).await.outputs;
        (old, new)
    });
    assert_ne!(old, new, "demo 1 and 2 answer this row differently");
    // Load: clients asking version 1 the same row, noting every answer after the swap.
    let swapped = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let after: Arc<Mutex<Vec<(String, Outputs)>>> = Arc::default();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (addr, swapped, stop, after) = (
                served.addr.clone(),
                Arc::clone(&swapped),
                Arc::clone(&stop),
                Arc::clone(&after),
            );
            std::thread::spawn(move || {
                runtime().block_on(async {
                    let mut client = client(connect(&addr).await);
                    let started = Instant::now();
                    let mut answers = 0u64;
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < LOAD_LIMIT {
                        // Read before the request is sent: an answer counts as "after"
                        // only if the swap was done before it was asked.
                        let asked_after = swapped.load(Ordering::SeqCst);
                        let answer = ask(&mut client, request_of(row, Some("1"))).await;
                        answers += 1;
                        if asked_after {
                            after
                                .lock()
                                .expect("answers")
                                .push((answer.cache, answer.outputs));
                        }
                    }
                    answers
                })
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    swap_in_demo_2(repository.path());
    served.ctl(&["reload", "demo", "1"]).ok();
    swapped.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let sent: u64 = clients.into_iter().map(|c| c.join().expect("client")).sum();
    let after = after.lock().expect("answers");
    assert!(
        after.len() > 10,
        "load ran after the swap ({} answers of {sent})",
        after.len()
    );
    for (cache, outputs) in after.iter() {
        assert_eq!(
            outputs, &new,
            "an answer asked after the swap ({cache}) is the new model's"
        );
    }
    assert!(
        after.iter().any(|(cache, _)| cache == "hit"),
        "the new model's answers are cached in turn"
    );
}

#[test]
fn a_remote_version_swapped_under_a_hot_cache_serves_the_new_model_within_the_refresh() {
    let repository = copy_of_demo();
    // The swap is Triton's RepositoryModelLoad on the worker's port.
    let (_worker, endpoint) =
        start_worker_args(repository.path(), 2, &["--model-control", "explicit"]);
    let config = format!(
        "[routes.demo]\nversions = [ {{ version = \"1\", weight = 1, endpoint = \"{endpoint}\" }} ]\n\
         cache = {{ ttl_ms = 600000 }}\n"
    );
    let served = Served::gateway(&config, &[]);
    let row = [6.1, 2.8, 4.7, 1.2];
    runtime().block_on(async {
        let mut worker = client(connect(&endpoint).await);
        let mut client = client(connect(&served.addr).await);
        let old = ask(&mut client, request_of(row, None)).await.outputs;
        let new = ask(&mut worker, request_of(row, Some("2"))).await.outputs;
        assert_ne!(old, new);
        assert_eq!(ask(&mut client, request_of(row, None)).await.cache, "hit");
        swap_in_demo_2(repository.path());
        worker
            .repository_model_load(aviary::pb::inference::RepositoryModelLoadRequest {
                model_name: "demo".into(),
                ..Default::default()
            })
            .await
            .expect("the worker reloads demo");
        // Every request hits until the gateway sees the new fingerprint (ModelConfig is
        // polled every 2 s); from then on only the new model answers.
        let swapped = Instant::now();
        let mut seen_new = None;
        while swapped.elapsed() < Duration::from_secs(6) {
            let answer = ask(&mut client, request_of(row, None)).await;
            match seen_new {
                None if answer.outputs == new => seen_new = Some(swapped.elapsed()),
                None => assert_eq!(answer.outputs, old),
                Some(_) => assert_eq!(answer.outputs, new, "an old answer after a new one"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = seen_new.expect("the new model answers");
        assert!(
            took < Duration::from_secs(4),
            "the swap showed after {took:?}"
        );
    });
}

/// A temporary repository with demo 1 and 2 copied from the test models.
fn copy_of_demo() -> tempfile::TempDir {
    let repository = tempfile::tempdir().expect("temp dir");
    for version in ["1", "2"] {
        let folder = repository.path().join("demo").join(version);
        std::fs::create_dir_all(&folder).expect("version folder");
        std::fs::copy(
            models().join("demo").join(version).join("model.onnx"),
            folder.join("model.onnx"),
        )
        .expect("copy the model");
    }
    repository
}

/// Demo 2's weights replace demo 1's file in `repository` (a rename: a new file, as
/// deploys do).
fn swap_in_demo_2(repository: &Path) {
    let target = repository.join("demo/1/model.onnx");
    let staged = repository.join("demo/1/model.onnx.new");
    std::fs::copy(models().join("demo/2/model.onnx"), &staged).expect("stage the new weights");
    std::fs::rename(&staged, &target).expect("swap the model file");
}

/// An embedded gateway over the test models with the Redis tier at `url`, each Redis
/// call given `timeout_ms`.
fn with_redis(url: &str, timeout_ms: u64, extra: &str) -> Served {
    let tier = format!(
        "[cache]\nredis = {{ url = \"{url}\", timeout_ms = {timeout_ms}, key_prefix = \"test:cache:\" }}\n{extra}"
    );
    Served::start(&embedded_config(&models(), &tier), &[])
}

#[test]
fn gateways_share_answers_through_redis() {
    let redis = RedisServer::start(None);
    // Time enough for Redis on a loaded machine: this test is about sharing.
    let first = with_redis(&redis.url, 2_000, "");
    let second = with_redis(&redis.url, 2_000, "");
    let row = [5.0, 3.4, 1.5, 0.2];
    let filled = runtime().block_on(async {
        let mut client = client(connect(&first.addr).await);
        ask(&mut client, request_of(row, None)).await
    });
    assert_eq!(filled.cache, "miss");
    let mut connection = redis.connection();
    assert!(
        eventually(Duration::from_secs(10), || {
            connection
                .keys::<_, Vec<String>>("test:cache:*")
                .is_ok_and(|keys| keys.len() == 1)
        }),
        "the first gateway stores its answer in Redis"
    );
    runtime().block_on(async {
        let mut client = client(connect(&second.addr).await);
        let shared = ask(&mut client, request_of(row, None)).await;
        assert_eq!(
            (shared.cache.as_str(), shared.header.as_str()),
            ("hit", "hit")
        );
        assert_eq!(shared.outputs, filled.outputs);
        // Now held by the second gateway itself.
        assert_eq!(ask(&mut client, request_of(row, None)).await.cache, "hit");
    });
    let version = counters(&second, "1");
    assert_eq!(count(&version, "cache_hits"), 2, "{version:#}");
    assert_eq!(count(&version, "cache_redis_hits"), 1, "{version:#}");
    assert_eq!(count(&version, "cache_misses"), 0, "{version:#}");
}

#[test]
fn a_redis_down_or_hung_costs_requests_nothing() {
    let redis = RedisServer::start(None);
    let served = with_redis(&redis.url, 20, "");
    let rt = runtime();
    let mut client = rt.block_on(async { client(connect(&served.addr).await) });
    // Every request is another row: each one misses and asks Redis.
    let mut row = 0u16;
    let mut asked = |client: &mut GrpcInferenceServiceClient<Channel>| {
        row += 1;
        let values = [4.0 + f32::from(row) / 100.0, 3.0, 1.5, 0.2];
        let started = Instant::now();
        let answer = rt.block_on(ask(client, request_of(values, None)));
        (answer, started.elapsed())
    };
    let (answer, _) = asked(&mut client);
    assert_eq!(answer.cache, "miss");
    redis.signal("-STOP");
    for _ in 0..20 {
        let (answer, took) = asked(&mut client);
        assert_eq!(answer.cache, "miss");
        assert!(
            took < Duration::from_secs(1),
            "a request took {took:?} with Redis hung"
        );
    }
    let hung = count(&counters(&served, "1"), "cache_bypasses");
    assert!(hung > 0, "bypasses are counted");
    redis.signal("-CONT");
    drop(redis);
    for _ in 0..20 {
        let (answer, took) = asked(&mut client);
        assert_eq!(answer.cache, "miss");
        assert!(
            took < Duration::from_secs(1),
            "a request took {took:?} with Redis down"
        );
    }
    assert!(count(&counters(&served, "1"), "cache_bypasses") > hung);
    // The in-process tier still serves.
    let row = [9.0, 9.0, 9.0, 9.0];
    let first = rt.block_on(ask(&mut client, request_of(row, None)));
    let again = rt.block_on(ask(&mut client, request_of(row, None)));
    assert_eq!(
        (first.cache.as_str(), again.cache.as_str()),
        ("miss", "hit")
    );
}
