//! A model card's input rules (`[input_rules]`) through a gateway, embedded and in
//! front of a remote worker: a value outside its feature's range, not among its
//! allowed values, NaN or infinite is refused with INVALID_ARGUMENT naming the input,
//! feature, row, value and rule; in flag mode it is served and counted on `/metrics`;
//! the rules are served in `ModelConfig`. A route's `input_rules_mode` overrides the
//! cards' mode, and a client cannot choose it.

mod support;

use std::path::{Path, PathBuf};

use aviary::pb::inference::{
    InferParameter, ModelConfigRequest, ModelInferRequest, infer_parameter::ParameterChoice,
};
use support::*;
use tonic::Code;

/// The demo's four features, each with a rule of another kind.
const RULES: &str = r#"
[input_rules]
mode = "MODE"

[input_rules.inputs.input]
features = [
  { name = "sepal_length", min = 4.0, max = 8.0 },
  { name = "sepal_width", allowed = [2.5, 3.0, 3.5] },
  { name = "petal_length", min = 1.0, max = 7.0 },
  { name = "petal_width", min = 0.1, max = 10.0 },
]
"#;

/// A copy of the test repository's `demo` whose versions carry [`RULES`] in `mode`.
fn models(dir: &Path, mode: &str) -> PathBuf {
    let models = dir.join("models");
    for version in ["1", "2"] {
        let from = repo_root().join("tests/models/demo").join(version);
        let to = models.join("demo").join(version);
        std::fs::create_dir_all(&to).expect("version folder");
        std::fs::copy(from.join("model.onnx"), to.join("model.onnx")).expect("model file");
        let card = std::fs::read_to_string(from.join("model.toml")).expect("card");
        std::fs::write(
            to.join("model.toml"),
            format!("{card}\n{}", RULES.replace("MODE", mode)),
        )
        .expect("card with rules");
    }
    models
}

fn request(rows: &[[f32; 4]]) -> ModelInferRequest {
    demo_rows("1", rows)
}

const GOOD: [f32; 4] = [5.1, 3.5, 1.4, 0.2];

/// Requests that break one rule each, and what the refusal says.
fn cases() -> Vec<(Vec<[f32; 4]>, &'static str)> {
    vec![
        (
            vec![[5.1, 3.5, 1.4, 41.0]],
            r#"input "input" feature "petal_width" (column 3) row 0: 41.0 is above max 10.0"#,
        ),
        (
            vec![GOOD, [5.1, 3.5, 1.4, -1.0]],
            r#"input "input" feature "petal_width" (column 3) row 1: -1.0 is below min 0.1"#,
        ),
        (
            vec![[5.1, 3.2, 1.4, 0.2]],
            r#"input "input" feature "sepal_width" (column 1) row 0: 3.2 is not one of the allowed values [2.5, 3.0, 3.5]"#,
        ),
        (
            vec![[f32::NAN, 3.5, 1.4, 0.2]],
            r#"input "input" feature "sepal_length" (column 0) row 0: NaN is NaN, which is rejected"#,
        ),
        (
            vec![[5.1, 3.5, f32::INFINITY, 0.2]],
            r#"input "input" feature "petal_length" (column 2) row 0: inf is infinite, which is rejected"#,
        ),
    ]
}

/// Every case refused with its message at `addr`, and a good request answered.
fn assert_refusals(addr: &str) {
    runtime().block_on(async {
        let mut client = client(connect(addr).await);
        client
            .model_infer(request(&[GOOD, GOOD]))
            .await
            .expect("values within the rules are served");
        for (rows, message) in cases() {
            let status = client
                .model_infer(request(&rows))
                .await
                .expect_err("a broken rule is refused");
            assert_eq!(
                (status.code(), status.message()),
                (Code::InvalidArgument, message),
                "{rows:?}"
            );
        }
    });
}

#[test]
fn broken_rules_are_refused_naming_feature_row_value_and_rule_embedded_and_remote() {
    let dir = tempfile::tempdir().expect("temp dir");
    let models = models(dir.path(), "reject");

    let embedded = Served::start(
        &format!(
            "[repository]\npath = \"{}\"\ninstances = 1\n",
            models.display()
        ),
        &[],
    );
    assert_refusals(&embedded.addr);

    let (_worker, worker) = start_worker_args(&models, 1, &[]);
    let remote = Served::gateway(
        &format!(
            "[routes.demo]\nversions = [ {{ version = \"1\", weight = 1, endpoint = \"{worker}\" }} ]\n"
        ),
        &[],
    );
    assert_refusals(&remote.addr);

    // The rules are part of the version's ModelConfig, through either path.
    for addr in [&embedded.addr, &remote.addr] {
        let config = runtime().block_on(async {
            client(connect(addr).await)
                .model_config(ModelConfigRequest {
                    name: "demo".into(),
                    version: "1".into(),
                })
                .await
                .expect("ModelConfig")
                .into_inner()
                .config
                .expect("a config")
        });
        let rules: serde_json::Value =
            serde_json::from_str(&config.parameters["card.input_rules"].string_value)
                .expect("the rules as JSON");
        assert_eq!(rules["mode"], "reject");
        assert_eq!(
            rules["inputs"]["input"]["features"][3]["name"],
            "petal_width"
        );
    }
}

#[test]
fn flag_mode_serves_and_counts_each_broken_rule_per_feature() {
    let dir = tempfile::tempdir().expect("temp dir");
    let models = models(dir.path(), "flag");
    let mut served = Served::start(
        &format!(
            "[repository]\npath = \"{}\"\ninstances = 1\n",
            models.display()
        ),
        &[],
    );
    runtime().block_on(async {
        let mut client = client(connect(&served.addr).await);
        for (rows, _) in cases() {
            client
                .model_infer(request(&rows))
                .await
                .expect("flag mode serves");
        }
    });
    let samples = parse_samples(&scrape(served.metrics_addr()).2);
    let count = |feature: &str, rule: &str| {
        samples
            .get(&format!(
                "aviary_input_violations_total{{model=\"demo\",version=\"1\",input=\"input\",feature=\"{feature}\",rule=\"{rule}\"}}"
            ))
            .copied()
    };
    assert_eq!(count("petal_width", "above_max"), Some(1.0), "{samples:#?}");
    assert_eq!(count("petal_width", "below_min"), Some(1.0));
    assert_eq!(count("sepal_width", "not_allowed"), Some(1.0));
    assert_eq!(count("sepal_length", "nan"), Some(1.0));
    assert_eq!(count("petal_length", "inf"), Some(1.0));
    let total: f64 = samples
        .iter()
        .filter(|(name, _)| name.starts_with("aviary_input_violations_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(total, 5.0, "nothing else counted: {samples:#?}");

    // `ctl models --schema`: one row per feature, with the rules the worker applies.
    let shown = served.ctl(&["models", "demo", "--schema"]).ok().stdout;
    let row = |feature, min, max, allowed| {
        let mut row = vec!["demo", "1", "flag", "input"];
        row.extend([feature, min, max, allowed, "reject", "reject"]);
        row
    };
    assert_eq!(
        rows_starting(&shown, &["demo", "1", "flag", "input"]),
        [
            row("sepal_length", "4.0", "8.0", "-"),
            row("sepal_width", "-", "-", "2.5,3.0,3.5"),
            row("petal_length", "1.0", "7.0", "-"),
            row("petal_width", "0.1", "10.0", "-"),
        ],
        "{shown}"
    );
}

/// Every case of [`cases`] served at `addr`; the request `tweak` changes first.
fn assert_served(addr: &str, tweak: impl Fn(&mut ModelInferRequest)) {
    runtime().block_on(async {
        let mut client = client(connect(addr).await);
        for (rows, _) in cases() {
            let mut request = request(&rows);
            tweak(&mut request);
            client
                .model_infer(request)
                .await
                .unwrap_or_else(|status| panic!("{rows:?} served: {status:?}"));
        }
    });
}

/// The route's input-rule mode parameter set to `mode` on a request, as a client might.
fn with_mode(request: &mut ModelInferRequest, mode: &str) {
    request.parameters.insert(
        "aviary_input_rules_mode".into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::StringParam(mode.into())),
        },
    );
}

#[test]
fn a_routes_mode_overrides_the_cards_and_a_client_cannot_choose_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let models = models(dir.path(), "reject");
    let (_worker, worker) = start_worker_args(&models, 1, &[]);
    let flagged = Served::start(
        &format!(
            "[repository]\npath = \"{}\"\ninstances = 1\n\n\
             [routes.demo]\ninput_rules_mode = \"flag\"\n\
             versions = [ {{ version = \"1\", weight = 1 }} ]\n",
            models.display()
        ),
        &[],
    );
    let flagged_remote = Served::gateway(
        &format!(
            "[routes.demo]\ninput_rules_mode = \"flag\"\n\
             versions = [ {{ version = \"1\", weight = 1, endpoint = \"{worker}\" }} ]\n"
        ),
        &[],
    );
    // The route flags what the cards (reject) would refuse, embedded and remote.
    for addr in [&flagged.addr, &flagged_remote.addr] {
        assert_served(addr, |_| {});
    }

    // A client cannot choose the mode, with or without a route mode: the parameter is
    // refused, not ignored.
    let plain = Served::gateway(
        &format!(
            "[routes.demo]\nversions = [ {{ version = \"1\", weight = 1, endpoint = \"{worker}\" }} ]\n"
        ),
        &[],
    );
    for (addr, mode) in [
        (&flagged.addr, "reject"),
        (&flagged_remote.addr, "reject"),
        (&plain.addr, "flag"),
    ] {
        let status = runtime().block_on(async {
            let mut request = request(&[GOOD]);
            with_mode(&mut request, mode);
            client(connect(addr).await)
                .model_infer(request)
                .await
                .expect_err("a client's mode is refused")
        });
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(
                r#"parameter "aviary_input_rules_mode": not a parameter Aviary knows"#
            ),
            "{status:?}"
        );
    }

    // A worker takes the mode from its gateway; a value it does not know is refused.
    let status = runtime().block_on(async {
        let mut request = request(&[GOOD]);
        with_mode(&mut request, "warn");
        client(connect(&worker).await)
            .model_infer(request)
            .await
            .expect_err("refused")
    });
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::InvalidArgument,
            r#"parameter "aviary_input_rules_mode": "warn" is not an input-rule mode (reject, flag)"#
        )
    );
}
