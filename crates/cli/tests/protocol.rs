//! Conformance with what Triton and KServe clients expect of the inference port, seen
//! from a plain gRPC client: the codes of a client's own deadline, and sequences kept
//! on one version while the weights move.

mod support;

use aviary::pb::inference::{InferParameter, ModelInferRequest, infer_parameter::ParameterChoice};
use prost::Message;
use support::*;
use tonic::{Code, Status};

/// Sends `request` to `addr` over a bare HTTP/2 stream with `grpc-timeout: timeout`
/// and returns the status the server answers. No client-side timer runs (tonic's and
/// gRPC C-core's channels enforce `grpc-timeout` themselves), so this is the server's
/// own answer.
async fn server_status(addr: &str, request: &ModelInferRequest, timeout: &str) -> Status {
    let addr = addr.trim_start_matches("http://");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let head = http::Request::post(format!(
        "http://{addr}/inference.GRPCInferenceService/ModelInfer"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-timeout", timeout)
    .body(())
    .expect("request head");
    let (response, mut body) = client.send_request(head, false).expect("send");
    let message = request.encode_to_vec();
    let mut frame = vec![0];
    frame.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(&message);
    body.send_data(frame.into(), true).expect("send body");
    let (head, mut body) = response.await.expect("response").into_parts();
    if let Some(status) = Status::from_header_map(&head.headers) {
        return status;
    }
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body
        .trailers()
        .await
        .expect("trailers")
        .expect("a gRPC answer ends with trailers");
    Status::from_header_map(&trailers).expect("grpc-status")
}

/// Every code the server at `addr` answers to slow requests whose `grpc-timeout`
/// passes while they wait or run: 1 to 40 ms, all sent at once.
fn codes_of_expired_calls(addr: &str) -> Vec<(u64, Code, String)> {
    runtime().block_on(async {
        let calls: Vec<_> = (1..=40u64)
            .map(|ms| {
                let addr = addr.to_owned();
                tokio::spawn(async move {
                    let status = server_status(&addr, &slow_request(), &format!("{ms}m")).await;
                    (ms, status.code(), status.message().to_owned())
                })
            })
            .collect();
        let mut codes = Vec::new();
        for call in calls {
            codes.push(call.await.expect("call task"));
        }
        codes
    })
}

#[test]
fn a_client_deadline_that_passes_is_deadline_exceeded_never_cancelled() {
    let (_worker, worker) = start_worker_with(&repo_root().join("tests/slow-models"), 1);
    let gateway = Served::start(&slow_config(), &[]);
    for (server, addr) in [
        ("worker", worker.as_str()),
        ("gateway", gateway.addr.as_str()),
    ] {
        let codes = codes_of_expired_calls(addr);
        let wrong: Vec<_> = codes
            .iter()
            .filter(|(_, code, _)| *code != Code::DeadlineExceeded)
            .collect();
        assert!(
            wrong.is_empty(),
            "{server}: every expired call is DEADLINE_EXCEEDED (grpc-timeout ms, code, message): {wrong:?}"
        );
    }
    // A deadline long enough is served.
    let status = runtime().block_on(server_status(&gateway.addr, &slow_request(), "20S"));
    assert_eq!(status.code(), Code::Ok, "{status:?}");
}

/// A demo request in sequence `id`, with its start and end flags.
fn in_sequence(id: u64, start: bool, end: bool) -> ModelInferRequest {
    let mut request = demo_rows("", &[[5.1, 3.5, 1.4, 0.2]]);
    let flag = |on: bool| InferParameter {
        parameter_choice: Some(ParameterChoice::BoolParam(on)),
    };
    request.parameters = [
        (
            "sequence_id".to_owned(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Uint64Param(id)),
            },
        ),
        ("sequence_start".to_owned(), flag(start)),
        ("sequence_end".to_owned(), flag(end)),
    ]
    .into();
    request
}

fn demo_gateway(weights: &str) -> Served {
    let models = repo_root().join("tests/models");
    Served::start(
        &format!(
            "[repository]\npath = \"{}\"\ninstances = 2\n\n[routes.demo]\nversions = [ {weights} ]\n",
            models.display()
        ),
        &[],
    )
}

/// 200 sequences of 5 requests, started at weights 90/10; the weights move to 10/90
/// after every sequence's second request. Every sequence is answered by one version
/// from start to end, and sequences started after the move follow the new weights.
#[test]
fn sequences_stay_on_their_version_while_the_weights_move() {
    const SEQUENCES: u64 = 200;
    let served = demo_gateway(r#"{ version = "1", weight = 90 }, { version = "2", weight = 10 }"#);
    let runtime = runtime();
    let channel = runtime.block_on(connect(&served.addr));
    let (halfway_tx, halfway) = std::sync::mpsc::channel::<()>();
    let (moved_tx, moved) = tokio::sync::watch::channel(false);
    let sequences: Vec<_> = (1..=SEQUENCES)
        .map(|id| {
            let mut client = client(channel.clone());
            let halfway_tx = halfway_tx.clone();
            let mut moved = moved.clone();
            runtime.spawn(async move {
                let mut versions = Vec::new();
                for step in 0..5 {
                    if step == 2 {
                        halfway_tx.send(()).expect("the test waits");
                        moved.wait_for(|moved| *moved).await.expect("moved");
                    }
                    let request = in_sequence(id, step == 0, step == 4);
                    let response = client
                        .model_infer(request)
                        .await
                        .unwrap_or_else(|s| panic!("sequence {id} step {step}: {s:?}"))
                        .into_inner();
                    versions.push(response.model_version);
                }
                versions
            })
        })
        .collect();
    drop(halfway_tx);
    for _ in 0..SEQUENCES {
        halfway.recv().expect("every sequence reaches halfway");
    }
    served.ctl(&["set-weights", "demo", "1=10", "2=90"]).ok();
    moved_tx.send(true).expect("sequences wait");
    let mut started_on = std::collections::BTreeMap::<String, u64>::new();
    for (id, sequence) in sequences.into_iter().enumerate() {
        let versions = runtime.block_on(sequence).expect("sequence task");
        assert!(
            versions.iter().all(|v| *v == versions[0]),
            "sequence {} was split across versions: {versions:?}",
            id + 1
        );
        *started_on.entry(versions[0].clone()).or_default() += 1;
    }
    assert!(
        started_on.get("1").copied().unwrap_or(0) > SEQUENCES / 2,
        "started at 90/10: {started_on:?}"
    );
    // New sequences follow the new weights.
    let mut after = std::collections::BTreeMap::<String, u64>::new();
    runtime.block_on(async {
        let mut client = client(channel.clone());
        for id in 1000..1050 {
            let response = client
                .model_infer(in_sequence(id, true, true))
                .await
                .expect("a one-request sequence")
                .into_inner();
            *after.entry(response.model_version).or_default() += 1;
        }
    });
    assert!(
        after.get("2").copied().unwrap_or(0) > 25,
        "after the move, 10/90: {after:?}"
    );
}

#[test]
fn sequence_requests_that_cannot_be_served_as_asked_are_refused() {
    let served = demo_gateway(r#"{ version = "1", weight = 1 }, { version = "2", weight = 1 }"#);
    let (_worker, worker) = start_worker_with(&repo_root().join("tests/models"), 1);
    let runtime = runtime();
    let refusal = |addr: &str, request: ModelInferRequest| {
        runtime.block_on(async {
            client(connect(addr).await)
                .model_infer(request)
                .await
                .expect_err("refused")
        })
    };
    // A continuation the gateway holds no start for, in Triton's words.
    let status = refusal(&served.addr, in_sequence(77, false, false));
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with(
            "inference request for sequence 77 to model 'demo' must specify the START flag"
        ),
        "{status:?}"
    );
    // After its end, a sequence is gone.
    runtime.block_on(async {
        let mut client = client(connect(&served.addr).await);
        for (start, end) in [(true, false), (false, true)] {
            client
                .model_infer(in_sequence(5, start, end))
                .await
                .expect("served");
        }
    });
    assert_eq!(
        refusal(&served.addr, in_sequence(5, false, false)).code(),
        Code::InvalidArgument
    );
    // A pin that disagrees with the sequence's version.
    let version = runtime.block_on(async {
        client(connect(&served.addr).await)
            .model_infer(in_sequence(6, true, false))
            .await
            .expect("started")
            .into_inner()
            .model_version
    });
    let mut other = in_sequence(6, false, false);
    other.model_version = if version == "1" { "2" } else { "1" }.into();
    let status = refusal(&served.addr, other);
    assert!(
        status
            .message()
            .contains(&format!("is on version {version}")),
        "{status:?}"
    );
    // A model whose card does not take sequences (`fixed` has no `sequences = true`).
    let mut typed = in_sequence(8, true, false);
    typed.model_name = "fixed".into();
    typed.model_version = "1".into();
    let status = refusal(&worker, typed);
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("does not take sequences"),
        "{status:?}"
    );
}

/// `tests/warmup-models/reshape` (fails on an all-zero `shape`) three times, as
/// `default` (no card), `sampled` (card samples) and `unwarmed` (`warmup = "off"`).
fn warmup_repository(dir: &std::path::Path) -> std::path::PathBuf {
    let model = repo_root().join("tests/warmup-models/reshape/1/model.onnx");
    let cards = [
        ("default", None),
        (
            "sampled",
            Some(
                "[warmup.inputs.data]\nshape = [4]\nvalues = [1.0, 2.0, 3.0, 4.0]\n\n\
                 [warmup.inputs.shape]\nshape = [2]\nvalues = [2, 2]\n",
            ),
        ),
        ("unwarmed", Some("warmup = \"off\"\n")),
    ];
    for (name, card) in cards {
        let folder = dir.join(name).join("1");
        std::fs::create_dir_all(&folder).expect("version folder");
        std::fs::copy(&model, folder.join("model.onnx")).expect("model file");
        if let Some(card) = card {
            std::fs::write(folder.join("model.toml"), card).expect("card");
        }
    }
    dir.to_owned()
}

#[test]
fn warm_up_is_declared_by_the_card_and_a_failed_one_says_why() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_worker, addr) = start_worker_with(&warmup_repository(dir.path()), 1);
    let runtime = runtime();
    let index = runtime.block_on(async {
        client(connect(&addr).await)
            .repository_index(aviary::pb::inference::RepositoryIndexRequest::default())
            .await
            .expect("index")
            .into_inner()
            .models
    });
    let state = |name: &str| {
        let entry = index
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} in {index:?}"));
        (entry.state.clone(), entry.reason.clone())
    };
    let (default_state, reason) = state("default");
    assert_eq!(default_state, "UNAVAILABLE", "{reason}");
    assert!(
        reason.contains("warm-up on zero-filled inputs (the default; declare sample inputs")
            && reason.contains("failed: ")
            && reason.contains("Reshape"),
        "the reason says which warm-up failed, how to declare another, and ONNX Runtime's words: {reason}"
    );
    assert_eq!(state("sampled").0, "READY");
    assert_eq!(state("unwarmed").0, "READY");
    // Both serve.
    for model in ["sampled", "unwarmed"] {
        let response = runtime.block_on(async {
            let request = ModelInferRequest {
                model_name: model.into(),
                inputs: vec![
                    aviary::pb::inference::model_infer_request::InferInputTensor {
                        name: "data".into(),
                        datatype: "FP32".into(),
                        shape: vec![4],
                        ..Default::default()
                    },
                    aviary::pb::inference::model_infer_request::InferInputTensor {
                        name: "shape".into(),
                        datatype: "INT64".into(),
                        shape: vec![2],
                        ..Default::default()
                    },
                ],
                raw_input_contents: vec![
                    aviary::tensor::to_raw(&[1f32, 2.0, 3.0, 4.0]).into(),
                    aviary::tensor::to_raw(&[1i64, 4]).into(),
                ],
                ..Default::default()
            };
            client(connect(&addr).await)
                .model_infer(request)
                .await
                .unwrap_or_else(|s| panic!("{model}: {s:?}"))
                .into_inner()
        });
        assert_eq!(response.outputs[0].shape, vec![1, 4], "{model}");
    }
}

/// A standalone worker reads shared-memory inputs and writes shared-memory outputs
/// itself (tritonclient's test covers the gateway).
#[test]
fn a_worker_serves_system_shared_memory() {
    use aviary::pb::inference::{
        SystemSharedMemoryRegisterRequest, model_infer_request::InferRequestedOutputTensor,
    };
    let (_worker, addr) = start_worker_with(&repo_root().join("tests/models"), 1);
    let name = format!("aviary-protocol-{}", std::process::id());
    let path = std::path::Path::new("/dev/shm").join(&name);
    let row: Vec<u8> = aviary::tensor::to_raw(&[5.1f32, 3.5, 1.4, 0.2]);
    let mut contents = row.clone();
    contents.resize(64, 0);
    std::fs::write(&path, &contents).expect("a shared memory object");
    let region = |name: &str, offset: i64, size: i64| {
        [
            (
                "shared_memory_region",
                ParameterChoice::StringParam(name.into()),
            ),
            ("shared_memory_offset", ParameterChoice::Int64Param(offset)),
            ("shared_memory_byte_size", ParameterChoice::Int64Param(size)),
        ]
        .into_iter()
        .map(|(k, v)| {
            (
                k.to_owned(),
                InferParameter {
                    parameter_choice: Some(v),
                },
            )
        })
        .collect()
    };
    let (answer, direct) = runtime().block_on(async {
        let mut client = client(connect(&addr).await);
        client
            .system_shared_memory_register(SystemSharedMemoryRegisterRequest {
                name: "r".into(),
                key: format!("/{name}"),
                offset: 0,
                byte_size: 64,
            })
            .await
            .expect("registered");
        let mut request = demo_rows("1", &[[5.1, 3.5, 1.4, 0.2]]);
        let direct = client
            .model_infer(request.clone())
            .await
            .expect("served")
            .into_inner();
        request.raw_input_contents.clear();
        request.inputs[0].parameters = region("r", 0, 16);
        request.outputs = vec![InferRequestedOutputTensor {
            name: "probabilities".into(),
            parameters: region("r", 32, 12),
        }];
        let answer = client
            .model_infer(request)
            .await
            .expect("served from shared memory")
            .into_inner();
        (answer, direct)
    });
    let written = std::fs::read(&path).expect("read back");
    let _ = std::fs::remove_file(&path);
    assert!(answer.raw_output_contents.iter().all(|raw| raw.is_empty()));
    let index = direct
        .outputs
        .iter()
        .position(|o| o.name == "probabilities")
        .expect("probabilities");
    assert_eq!(&written[32..44], &direct.raw_output_contents[index][..]);
}

/// A route that routes by a request parameter consumes it: neither its version's
/// worker nor its fallback's sees it (they would refuse a parameter they do not know).
#[test]
fn routing_parameters_never_reach_a_worker_not_even_the_fallbacks() {
    let models = repo_root().join("tests/models");
    let served = Served::start(
        &format!(
            "[repository]\npath = \"{}\"\ninstances = 1\n\n\
             [routes.demo]\nsticky = {{ parameter = \"user\" }}\n\
             fallback = {{ version = \"1\" }}\n\
             versions = [ {{ version = \"2\", weight = 1, fault = {{ error_rate = 1.0 }} }}, \
             {{ version = \"1\", weight = 0 }} ]\n",
            models.display()
        ),
        &[],
    );
    let response = runtime().block_on(async {
        let mut request = demo_rows("", &[[5.1, 3.5, 1.4, 0.2]]);
        request.parameters.insert(
            "user".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam("alice".into())),
            },
        );
        client(connect(&served.addr).await)
            .model_infer(request)
            .await
            .expect("the fallback answers")
            .into_inner()
    });
    assert_eq!(response.model_version, "1", "{response:?}");
    assert!(
        response.parameters.contains_key("aviary_fallback_for"),
        "{:?}",
        response.parameters
    );
}
