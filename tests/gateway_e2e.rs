//! End-to-end tests of the gateway's v2 surface: a real embedded gateway over
//! `tests/models` on 127.0.0.1:0, driven by real gRPC clients (inference, health,
//! reflection). Every test asserts what a client of the gateway would see.
mod support;

use std::{collections::BTreeSet, time::Duration};

use aviary::{
    pb::inference::{
        DataType, InferTensorContents, ModelInferRequest, ModelStatisticsRequest,
        RepositoryIndexRequest, ServerLiveRequest, ServerMetadataRequest,
        model_infer_request::InferRequestedOutputTensor, model_metadata_response::TensorMetadata,
    },
    tensor,
};
use prost::Message;
use support::{Client, infer, infer_error, input, request};
use tonic::Code;

/// Route splitting `demo` evenly between its two versions.
const DEMO_BOTH: &str = "[routes.demo]\nversions = [ { version = \"1\", weight = 1 }, { version = \"2\", weight = 1 } ]\n";

/// Inputs whose outputs differ, so a mixed-up response would show.
const ROWS: [[f32; 4]; 4] = [
    [5.1, 3.5, 1.4, 0.2],
    [6.0, 2.9, 4.5, 1.5],
    [6.7, 3.1, 5.6, 2.4],
    [5.7, 2.8, 4.1, 1.3],
];

fn one_row_raw() -> Vec<u8> {
    tensor::to_raw(&ROWS[0])
}

/// A demo request that fails validation (INT64 data for the FP32 input).
fn wrong_datatype(version: &str) -> ModelInferRequest {
    request(
        "demo",
        version,
        vec![input("input", "INT64", &[1, 4])],
        vec![tensor::to_raw(&[1i64, 2, 3, 4])],
    )
}

/// `probabilities` of every row of `ROWS`, pinned to `version`.
async fn pinned_probabilities(client: &mut Client, version: &str) -> Vec<Vec<f32>> {
    let mut all = Vec::new();
    for row in ROWS {
        let response = infer(client, support::demo_request(&[row], version)).await;
        assert_eq!(response.model_version, version);
        all.push(support::output::<f32>(&response, "probabilities"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_follows_the_weights_and_each_version_answers_as_itself() {
    let gateway = support::start_embedded(
        "[routes.demo]\nversions = [ { version = \"1\", weight = 90 }, { version = \"2\", weight = 10 } ]\n",
    )
    .await;
    let mut client = gateway.client().await;
    let expected = [
        pinned_probabilities(&mut client, "1").await,
        pinned_probabilities(&mut client, "2").await,
    ];
    for (i, row) in ROWS.iter().enumerate() {
        assert_ne!(
            expected[0][i], expected[1][i],
            "v1 and v2 must differ on {row:?}, or mixed-up responses would go unnoticed"
        );
    }

    const TOTAL: usize = 10_000;
    const TASKS: usize = 8;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let mut client = client.clone();
        let expected = expected.clone();
        tasks.spawn(async move {
            let mut counts = [0usize; 2];
            for i in (task..TOTAL).step_by(TASKS) {
                let row = i % ROWS.len();
                let response = client
                    .model_infer(support::demo_request(&[ROWS[row]], ""))
                    .await
                    .map_err(|s| format!("request {i} failed: {s:?}"))?;
                let header = response
                    .metadata()
                    .get("x-aviary-variant")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let response = response.into_inner();
                let index = match response.model_version.as_str() {
                    "1" => 0,
                    "2" => 1,
                    other => return Err(format!("request {i} answered by version {other:?}")),
                };
                if header.as_deref() != Some(response.model_version.as_str()) {
                    return Err(format!(
                        "request {i}: x-aviary-variant {header:?} but model_version {:?}",
                        response.model_version
                    ));
                }
                let probabilities = support::output::<f32>(&response, "probabilities");
                if probabilities != expected[index][row] {
                    return Err(format!(
                        "request {i} (version {}): probabilities {probabilities:?}, pinned gives {:?}",
                        response.model_version, expected[index][row]
                    ));
                }
                counts[index] += 1;
            }
            Ok::<_, String>(counts)
        });
    }
    let mut counts = [0usize; 2];
    while let Some(joined) = tasks.join_next().await {
        let task_counts = joined
            .expect("task did not panic")
            .unwrap_or_else(|e| panic!("{e}"));
        counts[0] += task_counts[0];
        counts[1] += task_counts[1];
    }
    assert_eq!(counts[0] + counts[1], TOTAL, "every request succeeded");

    // Binomial standard deviation of a 90/10 share over n = 10,000 is
    // sqrt(0.9 * 0.1 / 10,000) = 0.3 percentage points, so ±1.5 pp is a 5-sigma bound:
    // a correct split fails it about once in 1.7 million runs.
    let share_v1 = counts[0] as f64 / TOTAL as f64 * 100.0;
    let share_v2 = counts[1] as f64 / TOTAL as f64 * 100.0;
    assert!(
        (share_v1 - 90.0).abs() <= 1.5,
        "version 1 got {share_v1:.2}% of traffic, expected 90 ± 1.5"
    );
    assert!(
        (share_v2 - 10.0).abs() <= 1.5,
        "version 2 got {share_v2:.2}% of traffic, expected 10 ± 1.5"
    );
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_resolve_and_unknown_models_or_versions_are_not_found() {
    let gateway = support::start_embedded(
        "[routes.demo]\nversions = [ { version = \"1\", weight = 100 }, { version = \"2\", weight = 0 } ]\n",
    )
    .await;
    let mut client = gateway.client().await;

    for version in ["1", "2"] {
        let response = client
            .model_infer(support::demo_request(&[ROWS[0]], version))
            .await
            .unwrap_or_else(|s| panic!("pinned {version}: {s:?}"));
        let header = response
            .metadata()
            .get("x-aviary-variant")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        assert_eq!(header.as_deref(), Some(version));
        assert_eq!(response.into_inner().model_version, version);
    }
    // The weight-0 version serves pins only: unpinned traffic never reaches it.
    for _ in 0..50 {
        let response = infer(&mut client, support::demo_request(&[ROWS[1]], "")).await;
        assert_eq!(response.model_version, "1");
    }

    let mut ghost = support::demo_request(&[ROWS[0]], "");
    ghost.model_name = "ghost".into();
    let status = infer_error(&mut client, ghost).await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("Request for unknown model: 'ghost' is not found"),
        "Triton's wording: {status:?}"
    );

    let status = infer_error(&mut client, support::demo_request(&[ROWS[0]], "9")).await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("Request for unknown model: 'demo' version 9 is not found"),
        "Triton's wording: {status:?}"
    );
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_invalid_argument_naming_input_and_reason() {
    let gateway = support::start_embedded("").await;
    let mut client = gateway.client().await;
    let reference = infer(&mut client, support::demo_request(&[ROWS[0]], "")).await;
    let fp32 = |shape: &[i64]| vec![input("input", "FP32", shape)];

    let mut unknown_output = support::demo_request(&[ROWS[0]], "");
    unknown_output.outputs = vec![InferRequestedOutputTensor {
        name: "bogus".into(),
        ..Default::default()
    }];
    let mut both = support::demo_request(&[ROWS[0]], "");
    both.inputs[0].contents = Some(InferTensorContents {
        fp32_contents: ROWS[0].to_vec(),
        ..Default::default()
    });
    let mut wrong_field = request("demo", "", fp32(&[1, 4]), vec![]);
    wrong_field.inputs[0].contents = Some(InferTensorContents {
        int64_contents: vec![1, 2, 3, 4],
        ..Default::default()
    });

    let cases: Vec<(&str, ModelInferRequest, &[&str])> = vec![
        (
            "unexpected input name",
            request(
                "demo",
                "",
                vec![input("features", "FP32", &[1, 4])],
                vec![one_row_raw()],
            ),
            &["unexpected inference input 'features' for model 'demo'"],
        ),
        (
            "missing input",
            request("demo", "", vec![], vec![]),
            &["missing input \"input\""],
        ),
        (
            "wrong datatype",
            wrong_datatype(""),
            &["input \"input\"", "expected datatype FP32, got INT64"],
        ),
        (
            "wrong rank",
            request("demo", "", fp32(&[4]), vec![one_row_raw()]),
            &[
                "input \"input\"",
                "expected shape [-1, 4] (rank 2)",
                "(rank 1)",
            ],
        ),
        (
            "wrong fixed dimension (demo)",
            request("demo", "", fp32(&[1, 5]), vec![tensor::to_raw(&[0f32; 5])]),
            &["input \"input\"", "expected shape [-1, 4]", "got [1, 5]"],
        ),
        (
            "wrong fixed dimension (fixed)",
            request(
                "fixed",
                "",
                vec![input("x", "FP32", &[3, 3])],
                vec![tensor::to_raw(&[0f32; 9])],
            ),
            &["input \"x\"", "expected shape [2, 3]", "got [3, 3]"],
        ),
        (
            "negative dimension",
            request("demo", "", fp32(&[-1, 4]), vec![one_row_raw()]),
            &["input \"input\"", "negative dimension -1"],
        ),
        (
            "element count overflow",
            request("demo", "", fp32(&[i64::MAX, 4]), vec![one_row_raw()]),
            &[
                "input \"input\"",
                "more elements than this machine can address",
            ],
        ),
        (
            "raw byte length mismatch",
            request(
                "demo",
                "",
                fp32(&[1, 4]),
                vec![tensor::to_raw(&[1f32, 2., 3.])],
            ),
            &["input \"input\"", "raw contents hold 12 bytes", "needs 16"],
        ),
        (
            "both raw and typed contents",
            both,
            &["input \"input\"", "both contents and raw_input_contents"],
        ),
        (
            "no contents",
            request("demo", "", fp32(&[1, 4]), vec![]),
            &["input \"input\"", "no data"],
        ),
        (
            "raw_input_contents count mismatch",
            request(
                "demo",
                "",
                fp32(&[1, 4]),
                vec![one_row_raw(), one_row_raw()],
            ),
            &["raw_input_contents has 2 entries for 1 inputs"],
        ),
        (
            "malformed BYTES length prefix",
            request(
                "types",
                "",
                vec![input("in_bytes", "BYTES", &[1])],
                vec![vec![9, 0, 0, 0, b'x']],
            ),
            &["input \"in_bytes\"", "length prefix 9", "runs past the end"],
        ),
        (
            "typed contents in the wrong field",
            wrong_field,
            &[
                "input \"input\"",
                "contents.int64_contents is set",
                "contents.fp32_contents",
            ],
        ),
        (
            "unknown requested output",
            unknown_output,
            &["output \"bogus\"", "is not an output of this model"],
        ),
    ];

    for (case, bad, expected) in cases {
        let status = infer_error(&mut client, bad).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
        for part in expected {
            assert!(
                status.message().contains(part),
                "{case}: message {:?} lacks {part:?}",
                status.message()
            );
        }
    }

    let after = infer(&mut client, support::demo_request(&[ROWS[0]], "")).await;
    assert_eq!(after.model_version, reference.model_version);
    assert_eq!(after.outputs, reference.outputs);
    assert_eq!(after.raw_output_contents, reference.raw_output_contents);
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_contents_match_raw_and_requested_outputs_are_the_only_ones_returned() {
    let gateway = support::start_embedded(DEMO_BOTH).await;
    let mut client = gateway.client().await;
    let rows = &ROWS[..3];
    let raw = infer(&mut client, support::demo_request(rows, "1")).await;

    let mut typed = request("demo", "1", vec![input("input", "FP32", &[3, 4])], vec![]);
    typed.inputs[0].contents = Some(InferTensorContents {
        fp32_contents: rows.iter().flatten().copied().collect(),
        ..Default::default()
    });
    let typed = infer(&mut client, typed).await;
    assert_eq!(typed.model_version, "1");
    assert_eq!(typed.outputs, raw.outputs);
    assert_eq!(typed.raw_output_contents, raw.raw_output_contents);
    assert_eq!(support::output::<i64>(&raw, "label").len(), 3);

    let mut label_only = support::demo_request(rows, "1");
    label_only.outputs = vec![InferRequestedOutputTensor {
        name: "label".into(),
        ..Default::default()
    }];
    let label_only = infer(&mut client, label_only).await;
    let names: Vec<&str> = label_only.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["label"]);
    assert_eq!(label_only.raw_output_contents.len(), 1);
    assert_eq!(label_only.outputs[0].datatype, "INT64");
    assert_eq!(label_only.outputs[0].shape, [3]);
    assert_eq!(
        support::output::<i64>(&label_only, "label"),
        support::output::<i64>(&raw, "label")
    );
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_datatype_round_trips_byte_identical() {
    let gateway = support::start_embedded("").await;
    let mut client = gateway.client().await;

    // (suffix, datatype, raw contents); 4 elements each.
    let tensors: Vec<(&str, &str, Vec<u8>)> = vec![
        ("bool", "BOOL", tensor::to_raw(&[true, false, false, true])),
        ("int8", "INT8", tensor::to_raw(&[i8::MIN, -1, 0, i8::MAX])),
        (
            "int16",
            "INT16",
            tensor::to_raw(&[i16::MIN, -1, 0, i16::MAX]),
        ),
        (
            "int32",
            "INT32",
            tensor::to_raw(&[i32::MIN, -1, 0, i32::MAX]),
        ),
        (
            "int64",
            "INT64",
            tensor::to_raw(&[i64::MIN, -1, 0, i64::MAX]),
        ),
        ("uint8", "UINT8", tensor::to_raw(&[0u8, 1, 128, u8::MAX])),
        (
            "uint16",
            "UINT16",
            tensor::to_raw(&[0u16, 1, 0x8000, u16::MAX]),
        ),
        (
            "uint32",
            "UINT32",
            tensor::to_raw(&[0u32, 1, 1 << 31, u32::MAX]),
        ),
        (
            "uint64",
            "UINT64",
            tensor::to_raw(&[0u64, 1, 1 << 63, u64::MAX]),
        ),
        // FP16 bits: 1.0, largest finite (65504), smallest subnormal, -infinity.
        (
            "fp16",
            "FP16",
            tensor::to_raw(&[0x3C00u16, 0x7BFF, 0x0001, 0xFC00]),
        ),
        // BF16 bits: 1.0, largest finite, smallest subnormal, -0.0.
        (
            "bf16",
            "BF16",
            tensor::to_raw(&[0x3F80u16, 0x7F7F, 0x0001, 0x8000]),
        ),
        (
            "fp32",
            "FP32",
            tensor::to_raw(&[f32::MIN, f32::MAX, f32::MIN_POSITIVE, -0.0]),
        ),
        (
            "fp64",
            "FP64",
            tensor::to_raw(&[f64::MIN, f64::MAX, f64::MIN_POSITIVE, f64::INFINITY]),
        ),
        (
            "bytes",
            "BYTES",
            tensor::encode_bytes_elements(["héllo", "", "日本語", "a b\tc"]),
        ),
    ];
    let (inputs, raw): (Vec<_>, Vec<_>) = tensors
        .iter()
        .map(|(t, datatype, raw)| (input(&format!("in_{t}"), datatype, &[4]), raw.clone()))
        .unzip();
    let response = infer(&mut client, request("types", "", inputs, raw)).await;
    assert_eq!(response.model_name, "types");
    assert_eq!(response.model_version, "1");
    assert_eq!(
        response.outputs.len(),
        tensors.len(),
        "{:?}",
        response.outputs
    );
    assert_eq!(response.raw_output_contents.len(), tensors.len());
    for (t, datatype, raw) in &tensors {
        let name = format!("out_{t}");
        let index = response
            .outputs
            .iter()
            .position(|o| o.name == name)
            .unwrap_or_else(|| panic!("no output {name}"));
        let output = &response.outputs[index];
        assert_eq!(output.datatype, *datatype, "{name}");
        assert_eq!(output.shape, [4], "{name}");
        assert_eq!(
            response.raw_output_contents[index][..],
            raw[..],
            "{name} differs from in_{t}"
        );
    }
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_config_and_readiness_describe_the_served_models() {
    let gateway = support::start_embedded(DEMO_BOTH).await;
    let mut client = gateway.client().await;

    let metadata = support::model_metadata(&mut client, "demo", "").await;
    assert_eq!(metadata.name, "demo");
    assert_eq!(metadata.versions, ["1", "2"]);
    assert_eq!(metadata.platform, "onnxruntime_onnx");
    let tensor = |name: &str, datatype: &str, shape: &[i64]| TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
    };
    assert_eq!(metadata.inputs, [tensor("input", "FP32", &[-1, 4])]);
    assert_eq!(
        metadata.outputs,
        [
            tensor("probabilities", "FP32", &[-1, 3]),
            tensor("label", "INT64", &[-1])
        ]
    );

    let config = support::model_config(&mut client, "demo", "").await;
    assert_eq!(config.name, "demo");
    assert_eq!(config.platform, "onnxruntime_onnx");
    assert_eq!(config.backend, "onnxruntime");
    assert_eq!(config.input.len(), 1);
    assert_eq!(config.input[0].name, "input");
    assert_eq!(config.input[0].data_type, DataType::TypeFp32 as i32);
    assert_eq!(config.input[0].dims, [-1, 4]);
    let outputs: Vec<(&str, i32, &[i64])> = config
        .output
        .iter()
        .map(|o| (o.name.as_str(), o.data_type, &o.dims[..]))
        .collect();
    assert_eq!(
        outputs,
        [
            ("probabilities", DataType::TypeFp32 as i32, &[-1i64, 3][..]),
            ("label", DataType::TypeInt64 as i32, &[-1i64][..])
        ]
    );

    let server = client
        .server_metadata(ServerMetadataRequest {})
        .await
        .expect("server metadata")
        .into_inner();
    assert_eq!(server.name, "aviary");
    assert!(!server.version.is_empty());
    for extension in [
        "model_configuration",
        "statistics",
        "model_repository",
        "classification",
        "sequence",
        "system_shared_memory",
    ] {
        assert!(
            server.extensions.iter().any(|e| e == extension),
            "extensions {:?} lack {extension}",
            server.extensions
        );
    }

    let live = client
        .server_live(ServerLiveRequest {})
        .await
        .expect("live")
        .into_inner();
    assert!(live.live);
    let ready = support::eventually(support::READINESS_DEADLINE, || {
        let mut client = client.clone();
        async move { support::server_ready(&mut client).await }
    })
    .await;
    assert!(ready, "ServerReady never became true");

    for (name, version, expected) in [
        ("demo", "", true),
        ("demo", "1", true),
        ("demo", "2", true),
        ("ghost", "", false),
        ("demo", "9", false),
    ] {
        let ready = support::model_ready(&mut client, name, version).await;
        assert_eq!(ready, expected, "ModelReady({name}, {version:?})");
    }
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_count_successes_failures_and_batch_rows() {
    let gateway = support::start_embedded(DEMO_BOTH).await;
    let mut client = gateway.client().await;

    let batches = [1usize, 2, 3, 5];
    for rows in batches {
        let rows: Vec<[f32; 4]> = ROWS.iter().cycle().take(rows).copied().collect();
        infer(&mut client, support::demo_request(&rows, "1")).await;
    }
    let mut bad_shape = support::demo_request(&[ROWS[0]], "1");
    bad_shape.inputs[0].shape = vec![4];
    let mut bad_output = support::demo_request(&[ROWS[0]], "1");
    bad_output.outputs = vec![InferRequestedOutputTensor {
        name: "bogus".into(),
        ..Default::default()
    }];
    let failures = [wrong_datatype("1"), bad_shape, bad_output];
    let (n, m) = (batches.len() as u64, failures.len() as u64);
    for bad in failures {
        let status = infer_error(&mut client, bad).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }

    let statistics = |name: &str, version: &str| {
        let mut client = client.clone();
        let request = ModelStatisticsRequest {
            name: name.into(),
            version: version.into(),
        };
        async move {
            client
                .model_statistics(request)
                .await
                .expect("statistics")
                .into_inner()
                .model_stats
        }
    };
    let v1 = statistics("demo", "1").await;
    assert_eq!(v1.len(), 1, "{v1:?}");
    let v1 = &v1[0];
    assert_eq!((v1.name.as_str(), v1.version.as_str()), ("demo", "1"));
    let stats = v1.inference_stats.expect("inference_stats");
    let success = stats.success.expect("success");
    let fail = stats.fail.expect("fail");
    assert_eq!(success.count, n, "{v1:?}");
    assert_eq!(fail.count, m, "{v1:?}");
    assert_eq!(v1.inference_count, batches.iter().sum::<usize>() as u64);
    assert_eq!(v1.execution_count, n);
    assert!(success.ns > 0, "{v1:?}");
    assert!(fail.ns > 0, "{v1:?}");
    assert!(stats.compute_infer.expect("compute_infer").ns > 0, "{v1:?}");
    assert!(v1.last_inference > 0, "{v1:?}");

    // Nothing was sent to version 2: its counters stay at zero.
    let v2 = statistics("demo", "2").await;
    assert_eq!(v2.len(), 1, "{v2:?}");
    assert_eq!(v2[0].version, "2");
    assert_eq!(v2[0].execution_count, 0, "{v2:?}");
    let v2_stats = v2[0].inference_stats.expect("inference_stats");
    assert_eq!(v2_stats.success.expect("success").count, 0);
    assert_eq!(v2_stats.fail.expect("fail").count, 0);

    let all = statistics("", "").await;
    let listed: BTreeSet<(String, String)> = all
        .iter()
        .map(|s| (s.name.clone(), s.version.clone()))
        .collect();
    let expected: BTreeSet<(String, String)> =
        [("demo", "1"), ("demo", "2"), ("fixed", "1"), ("types", "1")]
            .map(|(m, v)| (m.to_owned(), v.to_owned()))
            .into();
    assert_eq!(listed, expected);
    assert_eq!(
        all.len(),
        expected.len(),
        "each version listed once: {all:?}"
    );
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_index_lists_every_version_ready() {
    let gateway = support::start_embedded("").await;
    let mut client = gateway.client().await;
    let index = client
        .repository_index(RepositoryIndexRequest {
            repository_name: String::new(),
            ready: false,
        })
        .await
        .expect("index")
        .into_inner()
        .models;
    let listed: Vec<(&str, &str, &str)> = index
        .iter()
        .map(|m| (m.name.as_str(), m.version.as_str(), m.state.as_str()))
        .collect();
    assert_eq!(
        listed,
        [
            ("demo", "1", "READY"),
            ("demo", "2", "READY"),
            ("fixed", "1", "READY"),
            ("types", "1", "READY")
        ]
    );
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_serving_and_reflection_lists_the_services() {
    use tokio_stream::StreamExt;
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let gateway = support::start_embedded(DEMO_BOTH).await;
    let channel = gateway.channel().await;
    let health = HealthClient::new(channel.clone());
    for service in ["", "inference.GRPCInferenceService"] {
        let serving = support::eventually(Duration::from_secs(10), || {
            let mut health = health.clone();
            async move {
                health
                    .check(HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                    .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
            }
        })
        .await;
        assert!(serving, "health of {service:?} never became SERVING");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([list]))
        .await
        .expect("reflection")
        .into_inner();
    let first = responses
        .next()
        .await
        .expect("one response")
        .expect("reflection answers");
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("expected a service list, got {first:?}");
    };
    let services: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in ["inference.GRPCInferenceService", "grpc.health.v1.Health"] {
        assert!(
            services.contains(&expected),
            "{services:?} lacks {expected}"
        );
    }
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_infer_answers_each_request_in_order_and_survives_errors() {
    let gateway = support::start_embedded(DEMO_BOTH).await;
    let mut client = gateway.client().await;
    let unary = [
        infer(&mut client, support::demo_request(&[ROWS[2]], "1")).await,
        infer(&mut client, support::demo_request(&[ROWS[2]], "2")).await,
    ];

    let mut first = support::demo_request(&[ROWS[2]], "1");
    first.id = "first".into();
    let mut second = wrong_datatype("1");
    second.id = "second".into();
    let mut third = support::demo_request(&[ROWS[2]], "2");
    third.id = "third".into();
    let mut stream = client
        .model_stream_infer(tokio_stream::iter([first, second, third]))
        .await
        .expect("stream opens")
        .into_inner();
    let mut responses = Vec::new();
    while let Some(message) = stream.message().await.expect("stream stays healthy") {
        responses.push(message);
    }
    assert_eq!(responses.len(), 3, "{responses:?}");

    let ok = |i: usize| {
        assert_eq!(responses[i].error_message, "", "response {i}");
        responses[i]
            .infer_response
            .clone()
            .unwrap_or_else(|| panic!("response {i} carries a result"))
    };
    let one = ok(0);
    assert_eq!(
        (one.id.as_str(), one.model_version.as_str()),
        ("first", "1")
    );
    assert_eq!(one.raw_output_contents, unary[0].raw_output_contents);

    assert!(responses[1].infer_response.is_none(), "{:?}", responses[1]);
    let error = &responses[1].error_message;
    assert!(error.contains("input \"input\""), "{error}");
    assert!(
        error.contains("expected datatype FP32, got INT64"),
        "{error}"
    );

    let two = ok(2);
    assert_eq!(
        (two.id.as_str(), two.model_version.as_str()),
        ("third", "2")
    );
    assert_eq!(two.raw_output_contents, unary[1].raw_output_contents);
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_above_tonics_4_mib_default_are_accepted() {
    let gateway = support::start_embedded(DEMO_BOTH).await;
    let mut client = gateway.client().await;
    const ROWS_IN_BATCH: usize = 300_000;
    let rows: Vec<[f32; 4]> = ROWS.iter().cycle().take(ROWS_IN_BATCH).copied().collect();
    let big = support::demo_request(&rows, "1");
    assert!(
        big.encoded_len() > 4 << 20,
        "the request must exceed tonic's 4 MiB default to test anything"
    );
    let response = infer(&mut client, big).await;
    let labels = support::output::<i64>(&response, "label");
    let probabilities = support::output::<f32>(&response, "probabilities");
    assert_eq!(labels.len(), ROWS_IN_BATCH);
    assert_eq!(probabilities.len(), ROWS_IN_BATCH * 3);

    // Rows repeat every ROWS.len(); each must agree with the same row sent alone.
    let single = infer(&mut client, support::demo_request(&ROWS, "1")).await;
    let single_labels = support::output::<i64>(&single, "label");
    let single_probabilities = support::output::<f32>(&single, "probabilities");
    for (i, label) in labels.iter().enumerate() {
        let j = i % ROWS.len();
        assert_eq!(*label, single_labels[j], "row {i}");
        for k in 0..3 {
            let (got, want) = (probabilities[i * 3 + k], single_probabilities[j * 3 + k]);
            assert!((got - want).abs() <= 1e-5, "row {i}: {got} vs {want}");
        }
    }
    gateway.stop().await.expect("clean stop");
}
