use rand::{Rng, SeedableRng, rngs::SmallRng};

use super::*;
use crate::validate::TensorData;

fn demo_schema() -> ModelSchema {
    let spec = |name: &str, datatype, shape: &[i64]| TensorSpec {
        name: name.into(),
        datatype,
        shape: shape.to_vec(),
    };
    ModelSchema {
        inputs: vec![spec("input", Datatype::Fp32, &[-1, 4])],
        outputs: vec![
            spec("probabilities", Datatype::Fp32, &[-1, 3]),
            spec("label", Datatype::Int64, &[-1]),
        ],
    }
}

fn card(text: &str) -> DriftCard {
    toml::from_str(text).expect("card parses")
}

/// A valid tracker of the demo model's schema, without input rules or a reference file.
fn tracker(text: &str) -> DriftTracker {
    DriftTracker::from_card(&card(text), &demo_schema(), None, Path::new(".")).expect("valid")
}

/// A standard normal value (Box-Muller).
fn normal(rng: &mut SmallRng) -> f64 {
    let (u, v): (f64, f64) = (rng.random(), rng.random());
    (-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

fn rows(rng: &mut SmallRng, n: usize, shift: [f64; 4]) -> Vec<[f32; 4]> {
    (0..n)
        .map(|_| std::array::from_fn(|c| (normal(rng) + shift[c]) as f32))
        .collect()
}

fn input(rows: &[[f32; 4]]) -> Vec<InputTensor> {
    vec![InputTensor {
        name: "input".into(),
        shape: vec![rows.len() as i64, 4],
        data: TensorData::Fp32(rows.iter().flatten().copied().collect()),
    }]
}

/// A tracker whose reference is the first 1000 rows of `reference` traffic, then
/// `live` rows: the verdict of each input feature.
fn verdicts(seed: u64, shift: [f64; 4]) -> Vec<(String, &'static str)> {
    let tracker = tracker("capture = 1000\nwindow = 1000\nmin_samples = 200");
    let mut rng = SmallRng::seed_from_u64(seed);
    // One row per request, as clients send them.
    for row in rows(&mut rng, 1000, [0.0; 4]) {
        tracker.record_inputs(&input(&[row]));
    }
    for row in rows(&mut rng, 1000, shift) {
        tracker.record_inputs(&input(&[row]));
    }
    tracker
        .report()
        .into_iter()
        .filter(|f| f.side == "input")
        .map(|f| (f.feature, f.verdict))
        .collect()
}

#[test]
fn a_shifted_feature_is_flagged_and_only_it() {
    let features = ["column 0", "column 1", "column 2", "column 3"];
    assert_eq!(
        verdicts(1, [0.0, 0.0, 0.5, 0.0]),
        features
            .iter()
            .map(|f| (f.to_string(), if *f == "column 2" { "drift" } else { "ok" }))
            .collect::<Vec<_>>()
    );
}

#[test]
fn traffic_like_the_reference_is_rarely_flagged() {
    // 100 seeded runs of 4 features, each with the same distribution as its reference:
    // Benjamini-Hochberg at alpha 0.01 keeps the share of runs with any false alarm at
    // most 1 % (PSI above 0.25 on 1000 values is far rarer: its null mean is ~0.02).
    // Over 100 runs that allows up to 3 (P(X >= 4) = 1.8 % for X ~ Bin(100, 0.01));
    // these seeds give 2.
    let alarms = (0..100)
        .filter(|seed| verdicts(*seed, [0.0; 4]).iter().any(|(_, v)| *v == "drift"))
        .count();
    assert!(alarms <= 3, "{alarms} of 100 runs raised a false alarm");
}

#[test]
fn no_verdict_before_min_samples_and_the_window_keeps_the_newest() {
    let tracker = tracker("capture = 3\nwindow = 2\nmin_samples = 2");
    let report = tracker.report();
    assert_eq!(
        report.len(),
        4 + 3 + 1,
        "4 input features, 3 probabilities, 1 label (no classes unless the card lists them)"
    );
    assert!(report.iter().all(|f| f.verdict == "insufficient"));
    for value in [1.0, 2.0, 3.0, 10.0, 11.0, 12.0] {
        tracker.record_inputs(&input(&[[value; 4]]));
    }
    let samples = tracker.samples.lock().expect("lock");
    assert_eq!(samples.features[0].reference, [1.0, 2.0, 3.0]);
    let mut window = samples.features[0].window.values.clone();
    window.sort_by(f64::total_cmp);
    assert_eq!(
        window,
        [11.0, 12.0],
        "the oldest window value was overwritten"
    );
}

#[test]
fn outputs_are_tracked_from_their_raw_values() {
    let tracker = tracker("capture = 2\nwindow = 2\nmin_samples = 1");
    let outputs = |p: f32, label: i64| {
        vec![
            OutputTensor {
                name: "probabilities".into(),
                datatype: Datatype::Fp32,
                shape: vec![1, 3],
                raw: tensor::to_raw(&[p, 1.0 - p, 0.0]),
            },
            OutputTensor {
                name: "label".into(),
                datatype: Datatype::Int64,
                shape: vec![1],
                raw: tensor::to_raw(&[label]),
            },
        ]
    };
    for (p, label) in [(0.9, 0), (0.8, 0), (0.1, 1), (0.2, 1)] {
        tracker.record_outputs(&outputs(p, label));
    }
    let report = tracker.report();
    let label = report
        .iter()
        .find(|f| f.tensor == "label")
        .expect("label tracked");
    assert_eq!(
        (label.feature.as_str(), label.reference, label.window),
        ("label", 2, 2)
    );
    assert_eq!(label.statistic, Some(1.0), "the labels moved entirely");
}

#[test]
fn a_reference_file_and_feature_names_from_the_input_rules() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("reference.json"),
        r#"{"input": [[1, 2, 3, 4], [5, 6, 7, 8]], "label": [[0], [1]]}"#,
    )
    .expect("write reference");
    let rules: InputRulesCard = toml::from_str(
        "[inputs.input]\nfeatures = [{ name = \"a\" }, { name = \"b\" }, {}, { name = \"d\" }]",
    )
    .expect("rules");
    let tracker = DriftTracker::from_card(
        &card("reference = \"reference.json\"\nmin_samples = 1"),
        &demo_schema(),
        Some(&rules),
        dir.path(),
    )
    .expect("valid");
    // With a file, traffic goes to the window from the first request.
    tracker.record_inputs(&input(&[[1.0, 2.0, 3.0, 4.0]]));
    let report = tracker.report();
    let names: Vec<&str> = report.iter().map(|f| f.feature.as_str()).collect();
    assert_eq!(
        names,
        [
            "a", "b", "column 2", "d", "column 0", "column 1", "column 2", "label"
        ]
    );
    assert_eq!((report[0].reference, report[0].window), (2, 1));

    for (text, error) in [
        (
            r#"{"input": [[1, 2]]}"#,
            "\"input\" row 0 has 2 values for 4 features",
        ),
        (
            r#"{"nope": [[1]]}"#,
            "\"nope\" is not a tracked tensor of the model",
        ),
    ] {
        std::fs::write(dir.path().join("reference.json"), text).expect("write reference");
        let refused = DriftTracker::from_card(
            &card("reference = \"reference.json\""),
            &demo_schema(),
            None,
            dir.path(),
        )
        .expect_err("a bad reference fails the load");
        assert!(
            refused.starts_with("drift.reference: ") && refused.ends_with(error),
            "{refused}"
        );
    }
    assert!(toml::from_str::<DriftCard>("windw = 3").is_err());
    let bad = |text: &str| {
        DriftTracker::from_card(&card(text), &demo_schema(), None, dir.path()).expect_err("refused")
    };
    assert_eq!(
        bad("alpha = 1.5"),
        "drift.alpha: 1.5 is not between 0 and 1"
    );
    assert_eq!(bad("max_psi = 0.0"), "drift.max_psi: 0 is not positive");
}

/// A demo-shaped output of one row: probabilities `p` and the label of the largest.
fn demo_outputs(p: [f32; 3]) -> Vec<OutputTensor> {
    let label = (0..3).max_by(|a, b| p[*a].total_cmp(&p[*b])).unwrap_or(0) as i64;
    vec![
        OutputTensor {
            name: "probabilities".into(),
            datatype: Datatype::Fp32,
            shape: vec![1, 3],
            raw: tensor::to_raw(&p),
        },
        OutputTensor {
            name: "label".into(),
            datatype: Datatype::Int64,
            shape: vec![1],
            raw: tensor::to_raw(&[label]),
        },
    ]
}

#[test]
fn outliers_are_values_outside_the_reference_percentiles() {
    let tracker = tracker("capture = 1000\nwindow = 3\nmin_samples = 3");
    // Reference 0..=999: p0.1 is 0.999, p99.9 is 998.001.
    for i in 0..1000 {
        tracker.record_inputs(&input(&[[i as f32; 4]]));
    }
    for value in [0.5, 500.0, 998.5, 2000.0, -3.0, 10.0] {
        tracker.record_inputs(&input(&[[value, 500.0, 500.0, 500.0]]));
    }
    let report = tracker.report();
    assert_eq!(
        report[0].outliers,
        Some(2),
        "the window holds 2000, -3 and 10"
    );
    assert_eq!(report[0].outliers_total, Some(4), "0.5, 998.5, 2000 and -3");
    assert_eq!(report[1].outliers, Some(0));
    assert!(report.iter().all(|f| f.test == "ks"), "no classes listed");
}

#[test]
fn flag_mode_outliers_are_values_outside_the_declared_range() {
    let rules: InputRulesCard = toml::from_str(
        "mode = \"flag\"\n[inputs.input]\nfeatures = [{ min = 0.0, max = 10.0 }, {}, {}, {}]",
    )
    .expect("rules");
    let tracker = DriftTracker::from_card(
        &card("capture = 2\nwindow = 10\nmin_samples = 1"),
        &demo_schema(),
        Some(&rules),
        Path::new("."),
    )
    .expect("valid");
    for value in [100.0, 200.0, 5.0, 11.0, -1.0, 150.0] {
        tracker.record_inputs(&input(&[[value; 4]]));
    }
    let report = tracker.report();
    assert_eq!(
        report[0].outliers,
        Some(3),
        "11, -1 and 150 are outside [0, 10]"
    );
    assert_eq!(
        report[1].outliers,
        Some(3),
        "column 1 declares nothing: outside the reference's [100.1, 199.9]"
    );
}

#[test]
fn predicted_classes_are_compared_by_chi_square() {
    let tracker = tracker(
        "capture = 300\nwindow = 300\nmin_samples = 100\nclasses = [\"probabilities\", \"label\"]",
    );
    let one_hot = |class: usize| std::array::from_fn(|c| if c == class { 0.8 } else { 0.1 });
    // Reference: classes evenly; window: class 2 twice as often as each other.
    for i in 0..300 {
        tracker.record_outputs(&demo_outputs(one_hot(i % 3)));
    }
    for i in 0..300 {
        tracker.record_outputs(&demo_outputs(one_hot([0, 1, 2, 2][i % 4])));
    }
    let report = tracker.report();
    let classes: Vec<&FeatureDrift> = report.iter().filter(|f| f.test == "chi-square").collect();
    assert_eq!(classes.len(), 2, "probabilities (argmax) and label");
    for f in classes {
        assert_eq!(
            (f.feature.as_str(), f.reference, f.window),
            ("predicted class", 300, 300)
        );
        // scipy.stats.chi2_contingency([[100, 100, 100], [75, 75, 150]], correction=False):
        // 120/7, and with 2 degrees of freedom p = exp(-60/7).
        assert!(
            (f.statistic.expect("measured") - 120.0 / 7.0).abs() < 1e-9,
            "{f:?}"
        );
        assert!((f.p_value.expect("measured") - (-60.0f64 / 7.0).exp()).abs() < 1e-12);
        assert_eq!(f.verdict, "drift");
    }
}

#[test]
fn changes_report_each_crossing_once() {
    let tracker = tracker("capture = 200\nwindow = 200\nmin_samples = 200");
    let mut rng = SmallRng::seed_from_u64(7);
    for row in rows(&mut rng, 200, [0.0; 4]) {
        tracker.record_inputs(&input(&[row]));
    }
    assert!(tracker.changes().is_empty(), "insufficient is not drift");
    for row in rows(&mut rng, 200, [0.0, 3.0, 0.0, 0.0]) {
        tracker.record_inputs(&input(&[row]));
    }
    let crossed: Vec<String> = tracker.changes().into_iter().map(|f| f.feature).collect();
    assert_eq!(crossed, ["column 1"]);
    assert!(tracker.changes().is_empty(), "reported once");
    for row in rows(&mut rng, 200, [0.0; 4]) {
        tracker.record_inputs(&input(&[row]));
    }
    let cleared = tracker.changes();
    assert_eq!(
        (
            cleared.len(),
            cleared[0].feature.as_str(),
            cleared[0].verdict
        ),
        (1, "column 1", "ok")
    );
}

#[test]
fn a_canary_is_compared_with_its_baseline_on_outputs_only() {
    let text =
        "capture = 1\nwindow = 500\nmin_samples = 100\nclasses = [\"probabilities\", \"label\"]";
    let (baseline, same, shifted) = (tracker(text), tracker(text), tracker(text));
    let mut rng = SmallRng::seed_from_u64(11);
    let mut row = |shift: f32| {
        let p = rng.random::<f32>() * 0.5 + shift;
        [p, 1.0 - p, 0.0]
    };
    for _ in 0..501 {
        baseline.record_outputs(&demo_outputs(row(0.0)));
        same.record_outputs(&demo_outputs(row(0.0)));
        shifted.record_outputs(&demo_outputs(row(0.4)));
    }
    // Inputs are not compared: only what the versions answer differs between them.
    baseline.record_inputs(&input(&[[1.0; 4]]));
    let alike = same.compare_outputs(&baseline);
    assert_eq!(
        alike.len(),
        3 + 2,
        "3 probabilities, 2 class counts (a listed integer label is not KS-tested)"
    );
    assert!(
        alike
            .iter()
            .all(|f| f.side == "output" && f.reference == 500)
    );
    assert!(alike.iter().all(|f| f.verdict == "ok"), "{alike:?}");
    let apart = shifted.compare_outputs(&baseline);
    let column = |name: &str| apart.iter().find(|f| f.feature == name).expect("compared");
    assert_eq!(column("column 0").verdict, "drift");
    assert_eq!(column("column 2").verdict, "ok", "always 0 on both");
    assert!(column("column 0").psi.expect("psi") > 1.0);
}

#[test]
fn a_large_batch_records_a_random_share_of_its_rows() {
    // 64 distinct rows: row r holds r in every column.
    let batch: Vec<[f32; 4]> = (0..64).map(|r| [r as f32; 4]).collect();
    let default = tracker("capture = 1000\nwindow = 1000");
    default.record_inputs(&input(&batch));
    let samples = default.samples.lock().expect("lock");
    let reference = &samples.features[0].reference;
    assert_eq!(reference.len(), 10, "window / 100 rows of the 64");
    let distinct: std::collections::BTreeSet<u64> = reference.iter().map(|v| *v as u64).collect();
    assert_eq!(distinct.len(), 10, "10 different rows");
    // A row is recorded whole: every column holds the same rows.
    assert_eq!(samples.features[3].reference, *reference);
    drop(samples);

    let all = tracker("capture = 1000\nwindow = 1000\nrows_per_request = 64");
    all.record_inputs(&input(&batch));
    assert_eq!(
        all.samples.lock().expect("lock").features[0]
            .reference
            .len(),
        64
    );
    let refused = DriftTracker::from_card(
        &card("rows_per_request = 0"),
        &demo_schema(),
        None,
        Path::new("."),
    )
    .expect_err("refused");
    assert_eq!(refused, "drift.rows_per_request: must be at least 1");
}

#[test]
fn a_large_reference_file_is_sampled_down_the_same_way_every_time() {
    let dir = tempfile::tempdir().expect("temp dir");
    let rows: Vec<[f64; 4]> = (0..5000).map(|r| [f64::from(r); 4]).collect();
    std::fs::write(
        dir.path().join("reference.json"),
        serde_json::json!({ "input": rows }).to_string(),
    )
    .expect("write reference");
    let reference = || {
        let tracker = DriftTracker::from_card(
            &card("reference = \"reference.json\"\ncapture = 1000"),
            &demo_schema(),
            None,
            dir.path(),
        )
        .expect("valid");
        let samples = tracker.samples.lock().expect("lock");
        samples.features[0].reference.clone()
    };
    let first = reference();
    assert_eq!(first.len(), 1000);
    assert!(
        first.windows(2).all(|w| w[0] < w[1]),
        "distinct rows, in file order"
    );
    assert!(
        first[999] > 4000.0,
        "drawn from the whole file, not its start"
    );
    assert_eq!(reference(), first, "the same file, the same reference");
}

#[test]
fn a_card_that_cannot_work_is_refused_naming_its_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("labels.json"), r#"{"label": [[0], [1.5]]}"#)
        .expect("write reference");
    std::fs::write(
        dir.path().join("short.json"),
        r#"{"input": [[1, 2, 3, 4]]}"#,
    )
    .expect("write reference");
    let refused = |text: &str| {
        DriftTracker::from_card(&card(text), &demo_schema(), None, dir.path()).expect_err(text)
    };
    assert_eq!(refused("capture = 0"), "drift.capture: must be at least 1");
    assert_eq!(
        refused("window = 50\nmin_samples = 100"),
        "drift.min_samples: 100 is more than window (50): no verdict could ever be reached"
    );
    assert_eq!(refused("bins = 1"), "drift.bins: 1 is fewer than 2");
    assert_eq!(
        refused("classes = [\"scores\"]"),
        "drift.classes[0]: \"scores\" is not a tracked output of the model"
    );
    assert!(
        refused("classes = [\"input\"]").starts_with("drift.classes[0]: \"input\""),
        "an input is not an output"
    );
    let labels = refused("reference = \"labels.json\"\nmin_samples = 1\nclasses = [\"label\"]");
    assert!(
        labels.ends_with("\"label\" row 1: 1.5 is not a class (an integer)"),
        "{labels}"
    );
    let short = refused("reference = \"short.json\"\nmin_samples = 2");
    assert!(
        short.ends_with(
            "\"input\" has 1 rows, fewer than min_samples (2): it could never be judged"
        ),
        "{short}"
    );
}

#[test]
fn tensors_a_reference_file_leaves_out_are_captured_from_traffic() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("reference.json"),
        r#"{"input": [[1, 2, 3, 4], [5, 6, 7, 8]]}"#,
    )
    .expect("write reference");
    let tracker = DriftTracker::from_card(
        &card("reference = \"reference.json\"\ncapture = 2\nmin_samples = 1"),
        &demo_schema(),
        None,
        dir.path(),
    )
    .expect("valid");
    for p in [0.9, 0.8, 0.7] {
        tracker.record_inputs(&input(&[[1.0; 4]]));
        tracker.record_outputs(&demo_outputs([p, 1.0 - p, 0.0]));
    }
    let report = tracker.report();
    let sizes = |side: &str, feature: &str| {
        report
            .iter()
            .find(|f| f.side == side && f.feature == feature)
            .map(|f| (f.reference, f.window))
    };
    assert_eq!(sizes("input", "column 0"), Some((2, 3)), "from the file");
    assert_eq!(
        sizes("output", "column 0"),
        Some((2, 1)),
        "captured: the first 2 outputs, then the window"
    );
}

#[test]
fn half_precision_outputs_and_rank_1_feature_vectors_are_tracked() {
    let schema = ModelSchema {
        inputs: vec![TensorSpec {
            name: "x".into(),
            datatype: Datatype::Fp32,
            shape: vec![3],
        }],
        outputs: vec![TensorSpec {
            name: "y".into(),
            datatype: Datatype::Fp16,
            shape: vec![-1, 2],
        }],
    };
    let rules: InputRulesCard = toml::from_str(
        "[inputs.x]\nfeatures = [{ name = \"a\" }, { name = \"b\" }, { name = \"c\" }]",
    )
    .expect("rules");
    let tracker = DriftTracker::from_card(
        &card("capture = 1\nmin_samples = 1"),
        &schema,
        Some(&rules),
        Path::new("."),
    )
    .expect("valid");
    tracker.record_inputs(&[InputTensor {
        name: "x".into(),
        shape: vec![3],
        data: TensorData::Fp32(vec![1.0, 2.0, 3.0]),
    }]);
    tracker.record_outputs(&[OutputTensor {
        name: "y".into(),
        datatype: Datatype::Fp16,
        shape: vec![1, 2],
        raw: [0.25f32, 0.75]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
    }]);
    let samples = tracker.samples.lock().expect("lock");
    let references: Vec<Vec<f64>> = samples
        .features
        .iter()
        .map(|f| f.reference.clone())
        .collect();
    assert_eq!(
        references,
        [vec![1.0], vec![2.0], vec![3.0], vec![0.25], vec![0.75]],
        "three declared features of a rank-1 input, and the FP16 output's two columns"
    );
}
