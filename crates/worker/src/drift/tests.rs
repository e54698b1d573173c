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
    let tracker = DriftTracker::from_card(
        &card("capture = 1000\nwindow = 1000\nmin_samples = 200"),
        &demo_schema(),
        None,
        Path::new("."),
    )
    .expect("valid");
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
    let tracker = DriftTracker::from_card(
        &card("capture = 3\nwindow = 2\nmin_samples = 2"),
        &demo_schema(),
        None,
        Path::new("."),
    )
    .expect("valid");
    let report = tracker.report();
    assert_eq!(
        report.len(),
        4 + 3 + 1,
        "4 input features, 3 probabilities, 1 label"
    );
    assert!(report.iter().all(|f| f.verdict == "insufficient"));
    for value in [1.0, 2.0, 3.0, 10.0, 11.0, 12.0] {
        tracker.record_inputs(&input(&[[value; 4]]));
    }
    let samples = tracker.samples.lock().expect("lock");
    assert_eq!(samples.reference[0], [1.0, 2.0, 3.0]);
    let mut window = samples.window[0].clone();
    window.sort_by(f64::total_cmp);
    assert_eq!(
        window,
        [11.0, 12.0],
        "the oldest window value was overwritten"
    );
}

#[test]
fn outputs_are_tracked_from_their_raw_values() {
    let tracker = DriftTracker::from_card(
        &card("capture = 2\nwindow = 2\nmin_samples = 1"),
        &demo_schema(),
        None,
        Path::new("."),
    )
    .expect("valid");
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
    assert_eq!(label.ks_statistic, Some(1.0), "the labels moved entirely");
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
