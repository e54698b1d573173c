//! Writes the seed inputs of the fuzz targets into `fuzz/seeds/<target>/`: valid
//! messages and files the fuzzer mutates from. Run from `fuzz/` with
//! `cargo run --example seeds` after a message changes; the seeds are committed.

use std::{fs, path::Path};

use aviary::{
    contents::{BytesElements, InferTensorContents},
    pb::{
        admin::{
            AuditQuery, Limits, RolloutGates, RolloutPlan, RolloutStep, Route, SetRouteRequest,
            VersionRequest, VersionWeight,
        },
        inference::{
            ModelInferRequest, RepositoryModelLoadRequest,
            model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
        },
    },
};
use prost::Message;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let write = |target: &str, name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let folder = root.join(target);
        fs::create_dir_all(&folder)?;
        fs::write(folder.join(name), bytes)
    };

    for (name, request) in infer_requests() {
        write("infer_request", name, &request.encode_to_vec())?;
    }

    let repository = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (name, path) in [("local", "deploy/local/aviary.toml")] {
        if let Ok(text) = fs::read(repository.join(path)) {
            write("config", name, &text)?;
        }
    }
    // Every TOML example of the configuration reference, whole files and fragments.
    let reference = fs::read_to_string(repository.join("docs/configuration.md"))?;
    for (i, block) in reference.split("```toml\n").skip(1).enumerate() {
        let example = block.split("```").next().unwrap_or_default();
        write("config", &format!("reference-{i}"), example.as_bytes())?;
    }

    for (name, json) in ROUTES_AND_PLANS {
        if let Err(error) = aviary_fuzz::RouteAndPlan::parse(json.as_bytes()) {
            panic!("route_plan seed {name} does not parse: {error}");
        }
        write("route_plan", name, json.as_bytes())?;
    }

    for (name, selector, body) in admin_messages() {
        let mut bytes = vec![selector];
        bytes.extend(body);
        write("admin_messages", name, &bytes)?;
    }
    Ok(())
}

fn input(
    name: &str,
    datatype: &str,
    shape: &[i64],
    contents: InferTensorContents,
) -> InferInputTensor {
    InferInputTensor {
        name: name.to_owned(),
        datatype: datatype.to_owned(),
        shape: shape.to_vec(),
        contents: Some(contents),
        ..Default::default()
    }
}

fn infer_requests() -> Vec<(&'static str, ModelInferRequest)> {
    let iris = input(
        "input",
        "FP32",
        &[2, 4],
        InferTensorContents {
            fp32_contents: vec![5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3],
            ..Default::default()
        },
    );
    let mut text = BytesElements::default();
    text.push(b"hello");
    text.push(b"\0binary\xff");
    let many = vec![
        input(
            "text",
            "BYTES",
            &[2],
            InferTensorContents {
                bytes_contents: text,
                ..Default::default()
            },
        ),
        input(
            "ids",
            "INT64",
            &[1, 3],
            InferTensorContents {
                int64_contents: vec![1, 2, 3],
                ..Default::default()
            },
        ),
        input(
            "mask",
            "BOOL",
            &[1, 8],
            InferTensorContents {
                bool_contents: vec![true; 8],
                ..Default::default()
            },
        ),
        InferInputTensor {
            name: "half".into(),
            datatype: "FP16".into(),
            shape: vec![2, 1],
            ..Default::default()
        },
        InferInputTensor {
            name: "brain".into(),
            datatype: "BF16".into(),
            shape: vec![1],
            ..Default::default()
        },
        input(
            "small",
            "INT8",
            &[3],
            InferTensorContents {
                int_contents: vec![-1, 0, 1],
                ..Default::default()
            },
        ),
        input(
            "wide",
            "FP64",
            &[1, 2],
            InferTensorContents {
                fp64_contents: vec![0.5, 1e300],
                ..Default::default()
            },
        ),
        input(
            "u16",
            "UINT16",
            &[1],
            InferTensorContents {
                uint_contents: vec![65535],
                ..Default::default()
            },
        ),
        input(
            "u32",
            "UINT32",
            &[1],
            InferTensorContents {
                uint_contents: vec![7],
                ..Default::default()
            },
        ),
        input(
            "u64",
            "UINT64",
            &[1],
            InferTensorContents {
                uint64_contents: vec![u64::MAX],
                ..Default::default()
            },
        ),
        input(
            "i16",
            "INT16",
            &[1],
            InferTensorContents {
                int_contents: vec![-300],
                ..Default::default()
            },
        ),
        input(
            "i32",
            "INT32",
            &[1],
            InferTensorContents {
                int_contents: vec![1 << 20],
                ..Default::default()
            },
        ),
        InferInputTensor {
            name: "u8".into(),
            datatype: "UINT8".into(),
            shape: vec![2],
            ..Default::default()
        },
    ];
    let raw = |n: usize| bytes::Bytes::from(vec![0x3c_u8; n]);
    vec![
        (
            "iris-typed",
            ModelInferRequest {
                model_name: "iris".into(),
                id: "seed".into(),
                inputs: vec![iris.clone()],
                outputs: vec![InferRequestedOutputTensor {
                    name: "output".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        ),
        (
            "iris-raw",
            ModelInferRequest {
                model_name: "iris".into(),
                inputs: vec![InferInputTensor {
                    contents: None,
                    ..iris
                }],
                raw_input_contents: vec![raw(32)],
                ..Default::default()
            },
        ),
        (
            "every-datatype",
            ModelInferRequest {
                model_name: "many".into(),
                inputs: many.clone(),
                raw_input_contents: Vec::new(),
                ..Default::default()
            },
        ),
        (
            "every-datatype-raw",
            ModelInferRequest {
                model_name: "many".into(),
                inputs: many
                    .into_iter()
                    .map(|i| InferInputTensor {
                        contents: None,
                        ..i
                    })
                    .collect(),
                raw_input_contents: vec![
                    bytes::Bytes::from_static(b"\x02\0\0\0hi\x00\0\0\0"),
                    raw(24),
                    raw(8),
                    raw(4),
                    raw(2),
                    raw(3),
                    raw(16),
                    raw(2),
                    raw(4),
                    raw(8),
                    raw(2),
                    raw(4),
                    raw(2),
                ],
                ..Default::default()
            },
        ),
    ]
}

const ROUTES_AND_PLANS: &[(&str, &str)] = &[
    (
        "weighted",
        r#"{"model":"demo","route":{"versions":[{"version":"1","weight":90},{"version":"2","weight":10}]}}"#,
    ),
    (
        "sticky-rules-pin",
        r#"{"model":"demo","route":{"versions":[{"version":"1","weight":50},{"version":"3","weight":50}],
            "sticky":{"header":"x-user-id"},
            "rules":[{"header":"x-canary","equals":"yes","version":"3"},{"parameter":"tier","regex":"^gold","version":"1"}]},
            "headers":{"x-user-id":"alice","x-canary":"no"},"pin":"3"}"#,
    ),
    (
        "plan",
        r#"{"model":"demo","route":{"versions":[{"version":"1","weight":100},{"version":"2","weight":0}]},
            "plan":{"model":"demo","baseline":"1","canary":"2",
              "steps":[{"weight":10,"min_duration_ms":1000,"min_requests":100},{"weight":50,"min_duration_ms":1000,"min_requests":100}],
              "gates":{"max_error_rate_increase":0.01,"max_latency_ratio":1.5,"min_requests_for_rollback":20}}}"#,
    ),
];

fn admin_messages() -> Vec<(&'static str, u8, Vec<u8>)> {
    let route = Route {
        model: "demo".into(),
        versions: vec![
            VersionWeight {
                version: "1".into(),
                weight: 90,
                ..Default::default()
            },
            VersionWeight {
                version: "2".into(),
                weight: 10,
                endpoint: "http://127.0.0.1:9001".into(),
                limits: Some(Limits {
                    max_in_flight: Some(4),
                    timeout_ms: Some(250),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ],
        limits: Some(Limits::default()),
    };
    let plan = RolloutPlan {
        model: "demo".into(),
        baseline: "1".into(),
        canary: "2".into(),
        steps: vec![RolloutStep {
            weight: 10,
            min_duration_ms: 1000,
            min_requests: 100,
        }],
        gates: Some(RolloutGates {
            max_error_rate_increase: 0.01,
            ..Default::default()
        }),
    };
    vec![
        (
            "set-route",
            0,
            SetRouteRequest {
                route: Some(route),
                expected_generation: Some(3),
            }
            .encode_to_vec(),
        ),
        ("start-rollout", 1, plan.encode_to_vec()),
        (
            "audit-query",
            2,
            AuditQuery {
                kinds: vec!["route".into(), "prediction".into()],
                model: "demo".into(),
                since_ms: 1,
                limit: 10,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "load-version",
            3,
            VersionRequest {
                model: "demo".into(),
                version: "2".into(),
            }
            .encode_to_vec(),
        ),
        (
            "repository-load",
            5,
            RepositoryModelLoadRequest {
                model_name: "demo".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    ]
}
