use super::*;
use model_repository_parameter::ParameterChoice;

fn parameters(pairs: &[(&str, ParameterChoice)]) -> HashMap<String, ModelRepositoryParameter> {
    pairs
        .iter()
        .map(|(name, choice)| {
            (
                (*name).to_owned(),
                ModelRepositoryParameter {
                    parameter_choice: Some(choice.clone()),
                },
            )
        })
        .collect()
}

fn config(text: &str) -> Result<LoadRequest, WorkerError> {
    read(
        "demo",
        "",
        &parameters(&[("config", ParameterChoice::StringParam(text.into()))]),
    )
}

fn refusal(result: Result<LoadRequest, WorkerError>) -> String {
    result.expect_err("refused").to_string()
}

#[test]
fn supported_fields_become_the_models_settings() {
    let read = config(
        r#"{"name": "demo", "backend": "onnxruntime", "max_batch_size": 8,
            "dynamic_batching": {"preferred_batch_size": [4, 8], "max_queue_delay_microseconds": 500},
            "instance_group": [{"count": 3, "kind": "KIND_CPU"}],
            "version_policy": {"latest": {"num_versions": 1}},
            "model_warmup": []}"#,
    )
    .expect("supported");
    assert_eq!(
        read.config,
        Some(ModelOverride {
            policy: Some(VersionPolicy::Latest(1)),
            instances: Some(3),
            batching: Some(Some(BatchingCard {
                max_batch_size: 8,
                max_queue_delay_us: 500,
                preferred_batch_sizes: vec![4, 8],
            })),
            warmup: Some(WarmupCard::Switch(WarmupSwitch::Off)),
        })
    );
    // 64-bit integers as proto3 JSON writes them may be strings.
    let read =
        config(r#"{"max_batch_size": 0, "version_policy": {"specific": {"versions": ["1", 3]}}}"#)
            .expect("supported");
    let over = read.config.expect("an override");
    assert_eq!(over.batching, Some(None));
    assert_eq!(over.policy, Some(VersionPolicy::Specific([1, 3].into())));
    assert_eq!(
        config("{}").expect("empty").config,
        Some(ModelOverride::default())
    );
}

#[test]
fn everything_else_is_refused_naming_it() {
    for (text, says) in [
        ("{not json", "parameter \"config\": not JSON"),
        ("[1]", "parameter \"config\": must be a JSON object"),
        (r#"{"name": "other"}"#, "config.name: must be \"demo\""),
        (r#"{"platform": "tensorrt_plan"}"#, "config.platform:"),
        (
            r#"{"input": []}"#,
            "config.input: Aviary does not take this field",
        ),
        (r#"{"sequence_batching": {}}"#, "config.sequence_batching:"),
        (
            r#"{"max_batch_size": -1}"#,
            "config.max_batch_size: must be a whole number",
        ),
        (r#"{"max_batch_size": 4}"#, "config.max_batch_size: above 0"),
        (
            r#"{"dynamic_batching": {}}"#,
            "config.dynamic_batching: needs max_batch_size",
        ),
        (
            r#"{"max_batch_size": 4, "dynamic_batching": {"priority_levels": 2}}"#,
            "config.dynamic_batching: field \"priority_levels\" is not taken",
        ),
        (
            r#"{"instance_group": [{"count": 1, "kind": "KIND_GPU"}]}"#,
            "config.instance_group: kind KIND_GPU",
        ),
        (
            r#"{"instance_group": [{"count": 0}]}"#,
            "config.instance_group: count must be",
        ),
        (
            r#"{"version_policy": {"latest": {"num_versions": 0}}}"#,
            "config.version_policy: latest.num_versions 0",
        ),
        (
            r#"{"version_policy": {"all": {}, "latest": {}}}"#,
            "config.version_policy: give exactly one of all, latest and specific",
        ),
    ] {
        let refused = refusal(config(text));
        assert!(refused.starts_with(says), "{text}: {refused}");
    }
    let random = config(
        r#"{"model_warmup": [{"name": "w", "batch_size": 1, "inputs": {"input": {"data_type": "TYPE_FP32", "dims": [4], "random_data": true}}}]}"#,
    );
    assert!(
        matches!(&random, Err(WorkerError::Unimplemented(m)) if m.starts_with("config.model_warmup: warm-up samples are not taken")),
        "{random:?}"
    );
}

#[test]
fn files_and_other_parameters() {
    let onnx = ParameterChoice::BytesParam(vec![1, 2, 3]);
    let read = read(
        "demo",
        "",
        &parameters(&[
            ("config", ParameterChoice::StringParam("{}".into())),
            ("file:3/model.onnx", onnx.clone()),
        ]),
    )
    .expect("a supplied model");
    assert_eq!(
        read.files,
        vec![SuppliedFile {
            version: 3,
            name: MODEL_FILE,
            bytes: vec![1, 2, 3]
        }]
    );
    for (name, says) in [
        (
            "file:../x/model.onnx",
            "parameter \"file:../x/model.onnx\": Aviary takes",
        ),
        ("file:3/other.bin", "parameter \"file:3/other.bin\""),
        ("file:03/model.onnx", "parameter \"file:03/model.onnx\""),
        (
            "file:3/sub/model.onnx",
            "parameter \"file:3/sub/model.onnx\"",
        ),
    ] {
        let refused = refusal(super::read(
            "demo",
            "",
            &parameters(&[
                ("config", ParameterChoice::StringParam("{}".into())),
                (name, onnx.clone()),
            ]),
        ));
        assert!(refused.starts_with(says), "{name}: {refused}");
    }
    let alone = refusal(super::read(
        "demo",
        "",
        &parameters(&[("file:1/model.onnx", onnx)]),
    ));
    assert!(alone.contains("need a \"config\" parameter too"), "{alone}");
    let unknown = refusal(super::read(
        "demo",
        "",
        &parameters(&[("poll", ParameterChoice::BoolParam(true))]),
    ));
    assert!(
        unknown.starts_with("parameter \"poll\": not a RepositoryModelLoad parameter"),
        "{unknown}"
    );
    let repository = refusal(super::read("demo", "other", &HashMap::new()));
    assert!(
        repository.starts_with("repository_name \"other\""),
        "{repository}"
    );
}

#[test]
fn a_card_supplied_without_its_model_is_named() {
    let file = |path: &'static str| (path, ParameterChoice::BytesParam(b"x".to_vec()));
    let request = read(
        "demo",
        "",
        &parameters(&[
            ("config", ParameterChoice::StringParam("{}".into())),
            file("file:5/model.toml"),
            file("file:6/model.toml"),
            file("file:6/model.onnx"),
            file("file:7/model.onnx"),
        ]),
    )
    .expect("read");
    assert_eq!(request.cards_alone(), BTreeSet::from([5]));
    let refusal = card_without_model("demo", 5).to_string();
    assert!(
        refusal.contains("file:5/model.toml") && refusal.contains("loads nothing"),
        "{refusal}"
    );
}
