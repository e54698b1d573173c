use proptest::prelude::*;

use super::*;
use crate::schema::TensorSpec;

/// The iris-like demo: one FP32 input of 4 features per row.
fn schema(datatype: Datatype, shape: &[i64]) -> ModelSchema {
    ModelSchema {
        inputs: vec![TensorSpec {
            name: "input".into(),
            datatype,
            shape: shape.to_vec(),
        }],
        outputs: Vec::new(),
    }
}

fn card(text: &str) -> InputRulesCard {
    toml::from_str(text).unwrap_or_else(|e| panic!("card parses: {e}"))
}

const IRIS: &str = r#"
[inputs.input]
features = [
  { name = "sepal_length", min = 4.0, max = 8.0 },
  { name = "sepal_width", min = 2.0, max = 4.5 },
  { name = "petal_length", min = 1.0, max = 7.0 },
  { name = "petal_width", min = 0.1, max = 10.0 },
]
"#;

fn iris(mode: &str) -> InputRules {
    let text = format!("mode = \"{mode}\"\n{IRIS}");
    InputRules::from_card(&card(&text), &schema(Datatype::Fp32, &[-1, 4])).expect("valid rules")
}

fn fp32(rows: &[[f32; 4]]) -> Vec<InputTensor> {
    vec![InputTensor {
        name: "input".into(),
        shape: vec![rows.len() as i64, 4],
        data: TensorData::Fp32(rows.iter().flatten().copied().collect()),
    }]
}

fn rejected(rules: &InputRules, rows: &[[f32; 4]]) -> Option<String> {
    rules
        .check(&fp32(rows))
        .expect("the shape fits")
        .map(|v| v.to_string())
}

#[test]
fn a_value_outside_its_features_range_is_named_with_row_column_and_rule() {
    let rules = iris("reject");
    assert_eq!(rejected(&rules, &[[5.1, 3.5, 1.4, 0.2]]), None);
    assert_eq!(
        rejected(&rules, &[[5.1, 3.5, 1.4, 0.2], [5.1, 3.5, 1.4, 41.0]]).as_deref(),
        Some(r#"input "input" feature "petal_width" (column 3) row 1: 41.0 is above max 10.0"#)
    );
    assert_eq!(
        rejected(&rules, &[[3.9, 3.5, 1.4, 0.2]]).as_deref(),
        Some(r#"input "input" feature "sepal_length" (column 0) row 0: 3.9 is below min 4.0"#)
    );
    // Bounds are inclusive.
    assert_eq!(rejected(&rules, &[[4.0, 4.5, 7.0, 0.1]]), None);
}

#[test]
fn nan_and_infinities_are_rejected_unless_allowed() {
    let rules = iris("reject");
    assert_eq!(
        rejected(&rules, &[[5.1, f32::NAN, 1.4, 0.2]]).as_deref(),
        Some(
            r#"input "input" feature "sepal_width" (column 1) row 0: NaN is NaN, which is rejected"#
        )
    );
    assert_eq!(
        rejected(&rules, &[[5.1, 3.5, f32::INFINITY, 0.2]]).as_deref(),
        Some(
            r#"input "input" feature "petal_length" (column 2) row 0: inf is infinite, which is rejected"#
        )
    );
    let text = r#"
[inputs.input]
nan = "allow"
features = [{}, {}, {}, { inf = "allow", max = 1.0 }]
"#;
    let rules =
        InputRules::from_card(&card(text), &schema(Datatype::Fp32, &[-1, 4])).expect("valid");
    assert_eq!(
        rejected(&rules, &[[f32::NAN, 0.0, 0.0, f32::INFINITY]]),
        None
    );
    assert_eq!(
        rejected(&rules, &[[0.0, f32::NEG_INFINITY, 0.0, 0.0]]).as_deref(),
        Some(
            r#"input "input" feature "column 1" (column 1) row 0: -inf is infinite, which is rejected"#
        )
    );
}

#[test]
fn allowed_values_and_whole_input_rules() {
    let text = r#"
[inputs.input]
allowed = [0, 1, 2]
"#;
    let rules = InputRules::from_card(&card(text), &schema(Datatype::Int64, &[-1])).expect("valid");
    let ints = |v: Vec<i64>| {
        vec![InputTensor {
            name: "input".into(),
            shape: vec![v.len() as i64],
            data: TensorData::Int64(v),
        }]
    };
    assert_eq!(rules.check(&ints(vec![0, 2, 1])).expect("shape"), None);
    assert_eq!(
        rules
            .check(&ints(vec![0, 7]))
            .expect("shape")
            .map(|v| v.to_string())
            .as_deref(),
        Some(r#"input "input" element 1: 7 is not one of the allowed values [0.0, 1.0, 2.0]"#)
    );

    let text = r#"
[inputs.input]
allowed = ["red", "green"]
"#;
    let rules = InputRules::from_card(&card(text), &schema(Datatype::Bytes, &[-1])).expect("valid");
    let texts = vec![InputTensor {
        name: "input".into(),
        shape: vec![2],
        data: TensorData::Bytes(vec!["red".into(), "blue".into()]),
    }];
    assert_eq!(
        rules
            .check(&texts)
            .expect("shape")
            .map(|v| v.to_string())
            .as_deref(),
        Some(
            r#"input "input" element 1: "blue" is not one of the allowed values ["red", "green"]"#
        )
    );
}

#[test]
fn flag_mode_serves_and_counts_every_broken_rule_per_feature() {
    let rules = iris("flag");
    let rows = [[5.1, 3.5, 1.4, 41.0], [3.0, f32::NAN, 1.4, 42.0]];
    assert_eq!(rules.check(&fp32(&rows)).expect("shape"), None);
    assert_eq!(
        rules.counts(),
        vec![
            ("input", "sepal_length", Broken::BelowMin, 1),
            ("input", "sepal_width", Broken::Nan, 1),
            ("input", "petal_width", Broken::AboveMax, 2),
        ]
    );
    // Reject mode counts the one it refuses.
    let rules = iris("reject");
    assert!(rejected(&rules, &rows).is_some());
    assert_eq!(
        rules.counts(),
        vec![("input", "petal_width", Broken::AboveMax, 1)]
    );
}

#[test]
fn a_request_with_another_number_of_features_is_refused_in_either_mode() {
    let text = format!("mode = \"flag\"\n{IRIS}");
    let rules =
        InputRules::from_card(&card(&text), &schema(Datatype::Fp32, &[-1, -1])).expect("valid");
    let five = vec![InputTensor {
        name: "input".into(),
        shape: vec![1, 5],
        data: TensorData::Fp32(vec![1.0; 5]),
    }];
    assert_eq!(
        rules.check(&five),
        Err(r#"input "input": the model card declares 4 features along the last axis, the request has 5"#.to_owned())
    );
}

#[test]
fn cards_that_cannot_apply_fail_naming_the_key() {
    let fp32 = schema(Datatype::Fp32, &[-1, 4]);
    let cases = [
        (
            "[inputs.x]\nmin = 0.0",
            &fp32,
            r#"input_rules.inputs.x: the model has no input "x" (inputs: "input")"#,
        ),
        (
            "[inputs.input]\nfeatures = [{}, {}]",
            &fp32,
            "input_rules.inputs.input.features: 2 features for a last dimension of 4",
        ),
        (
            "[inputs.input]\nmin = 2.0\nmax = 1.0",
            &fp32,
            "input_rules.inputs.input: min 2 is above max 1",
        ),
        (
            "[inputs.input]\nallowed = []",
            &fp32,
            "input_rules.inputs.input.allowed: lists no value",
        ),
        (
            "[inputs.input]\nallowed = [\"a\"]",
            &fp32,
            "input_rules.inputs.input.allowed: a FP32 input takes numbers",
        ),
        (
            "[inputs.input]\nfeatures = [{}, {}, {}, { min = 5.0, max = 4.0 }]",
            &fp32,
            "input_rules.inputs.input.features[3]: min 5 is above max 4",
        ),
    ];
    for (text, schema, expected) in cases {
        assert_eq!(
            InputRules::from_card(&card(text), schema).err().as_deref(),
            Some(expected),
            "{text}"
        );
    }
    let bytes = schema(Datatype::Bytes, &[-1]);
    assert_eq!(
        InputRules::from_card(&card("[inputs.input]\nmax = 1.0"), &bytes)
            .err()
            .as_deref(),
        Some("input_rules.inputs.input: min and max do not apply to a BYTES input; use allowed")
    );
    assert!(toml::from_str::<InputRulesCard>("[inputs.input]\nmaximum = 1.0").is_err());
    assert!(toml::from_str::<InputRulesCard>("mode = \"warn\"").is_err());
}

proptest! {
    /// The check agrees with a plain reading of the rules on any values: a request is
    /// refused exactly when some value is outside its feature's range (or NaN), and the
    /// first such value (in row-major order) is the one named.
    #[test]
    fn refuses_exactly_the_first_value_outside_its_range(
        values in prop::collection::vec(
            prop_oneof![8 => -20.0f32..20.0, 1 => Just(f32::NAN), 1 => Just(f32::INFINITY)],
            0..40usize,
        ),
    ) {
        let rules = iris("reject");
        let rows: Vec<[f32; 4]> = values
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect();
        let bounds = [(4.0f32, 8.0f32), (2.0, 4.5), (1.0, 7.0), (0.1, 10.0)];
        let first_bad = rows.iter().flatten().enumerate().find(|(i, v)| {
            let (min, max) = bounds[i % 4];
            !(**v >= min && **v <= max)
        });
        let got = rules.check(&fp32(&rows)).expect("the shape fits");
        match (first_bad, got) {
            (None, None) => {}
            (Some((i, _)), Some(violation)) => {
                prop_assert_eq!(violation.index, i / 4);
                prop_assert_eq!(violation.feature.map(|f| f.1), Some(i % 4));
            }
            (expected, got) => prop_assert!(false, "expected {:?}, got {:?}", expected, got),
        }
    }
}

#[test]
fn a_value_sent_as_the_cards_bound_is_at_the_bound_in_the_inputs_precision() {
    // 0.3 and 0.1 are not exact in FP32: the request's 0.3f32 is 0.30000001192...,
    // the card's 0.3 is compared at FP32 precision too.
    let text =
        "[inputs.input]\nfeatures = [{ max = 0.3 }, { allowed = [0.1, 0.2] }, { min = 0.3 }, {}]";
    let rules =
        InputRules::from_card(&card(text), &schema(Datatype::Fp32, &[-1, 4])).expect("valid");
    assert_eq!(rejected(&rules, &[[0.3, 0.2, 0.3, 0.0]]), None);
    assert_eq!(rejected(&rules, &[[0.1, 0.1, 0.3, 0.0]]), None);
    assert_eq!(
        rejected(&rules, &[[0.31, 0.2, 0.3, 0.0]]).as_deref(),
        Some(r#"input "input" feature "column 0" (column 0) row 0: 0.31 is above max 0.3"#)
    );
    assert_eq!(
        rejected(&rules, &[[0.3, 0.3, 0.3, 0.0]]).as_deref(),
        Some(
            r#"input "input" feature "column 1" (column 1) row 0: 0.3 is not one of the allowed values [0.1, 0.2]"#
        )
    );
}

#[test]
fn allowed_values_that_can_never_match_fail_the_load() {
    let fp32 = schema(Datatype::Fp32, &[-1, 4]);
    assert_eq!(
        InputRules::from_card(&card("[inputs.input]\nallowed = [1.0, nan]"), &fp32)
            .err()
            .as_deref(),
        Some(
            "input_rules.inputs.input.allowed[1]: NaN can never match (NaN and infinities have nan and inf)"
        )
    );
    let ints = schema(Datatype::Int64, &[-1]);
    assert_eq!(
        InputRules::from_card(&card("[inputs.input]\nallowed = [1, 0.5]"), &ints)
            .err()
            .as_deref(),
        Some("input_rules.inputs.input.allowed[1]: 0.5 can never match a INT64 value")
    );
}

#[test]
fn a_request_refused_for_its_shape_counts_nothing() {
    let text = r#"
mode = "flag"
[inputs.a]
min = 0.0
[inputs.b]
features = [{}, {}]
"#;
    let schema = ModelSchema {
        inputs: vec![
            TensorSpec {
                name: "a".into(),
                datatype: Datatype::Fp32,
                shape: vec![-1],
            },
            TensorSpec {
                name: "b".into(),
                datatype: Datatype::Fp32,
                shape: vec![-1, -1],
            },
        ],
        outputs: Vec::new(),
    };
    let rules = InputRules::from_card(&card(text), &schema).expect("valid");
    let inputs = vec![
        InputTensor {
            name: "a".into(),
            shape: vec![1],
            data: TensorData::Fp32(vec![-1.0]),
        },
        InputTensor {
            name: "b".into(),
            shape: vec![1, 3],
            data: TensorData::Fp32(vec![0.0; 3]),
        },
    ];
    assert!(rules.check(&inputs).is_err());
    assert_eq!(rules.counts(), vec![], "input a's value was not counted");
}
