//! Unit and property tests of request validation.
//!
//! Every rejection is checked for its variant (`InvalidRequest`, i.e. `INVALID_ARGUMENT`)
//! and for a message that names the offending input, output or field and the reason.

use aviary::{
    pb::inference::{
        InferTensorContents, ModelInferRequest,
        model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
    },
    tensor::{self, Datatype, encode_bytes_elements, to_raw},
};
use bytes::Bytes;
use half::{bf16, f16};
use proptest::{collection::vec, prelude::*, sample::select, test_runner::TestCaseError};

use super::{TensorData, ValidatedRequest, validate};
use crate::{
    WorkerError,
    schema::{ModelSchema, TensorSpec},
};

// ---------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------

fn spec(name: &str, datatype: Datatype, shape: &[i64]) -> TensorSpec {
    TensorSpec {
        name: name.to_owned(),
        datatype,
        shape: shape.to_vec(),
    }
}

/// The model most tests run against: a batch of 3-vectors and a batch of strings in,
/// three outputs out.
fn model() -> ModelSchema {
    ModelSchema {
        inputs: vec![
            spec("image", Datatype::Fp32, &[-1, 3]),
            spec("label", Datatype::Bytes, &[-1]),
        ],
        outputs: vec![
            spec("scores", Datatype::Fp32, &[-1, 10]),
            spec("embedding", Datatype::Fp32, &[-1, 4]),
            spec("top", Datatype::Int64, &[-1]),
        ],
    }
}

/// A model with one input `x` and one output `y`.
fn single(datatype: Datatype, shape: &[i64]) -> ModelSchema {
    ModelSchema {
        inputs: vec![spec("x", datatype, shape)],
        outputs: vec![spec("y", datatype, shape)],
    }
}

fn tensor(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
    InferInputTensor {
        name: name.to_owned(),
        datatype: datatype.to_owned(),
        shape: shape.to_vec(),
        ..Default::default()
    }
}

fn typed(
    name: &str,
    datatype: &str,
    shape: &[i64],
    contents: InferTensorContents,
) -> InferInputTensor {
    InferInputTensor {
        contents: Some(contents),
        ..tensor(name, datatype, shape)
    }
}

/// A request whose inputs all travel in `raw_input_contents`.
fn raw_request(inputs: Vec<(InferInputTensor, Vec<u8>)>) -> ModelInferRequest {
    let (inputs, raw): (Vec<_>, Vec<_>) = inputs.into_iter().unzip();
    ModelInferRequest {
        inputs,
        raw_input_contents: raw.into_iter().map(Bytes::from).collect(),
        ..Default::default()
    }
}

/// A request whose inputs all travel in typed `contents`.
fn typed_request(inputs: Vec<InferInputTensor>) -> ModelInferRequest {
    ModelInferRequest {
        inputs,
        ..Default::default()
    }
}

fn with_outputs(request: ModelInferRequest, names: &[&str]) -> ModelInferRequest {
    ModelInferRequest {
        outputs: names
            .iter()
            .map(|name| InferRequestedOutputTensor {
                name: (*name).to_owned(),
                ..Default::default()
            })
            .collect(),
        ..request
    }
}

fn fp32s(values: &[f32]) -> InferTensorContents {
    InferTensorContents {
        fp32_contents: values.to_vec(),
        ..Default::default()
    }
}

fn ints(values: &[i32]) -> InferTensorContents {
    InferTensorContents {
        int_contents: values.to_vec(),
        ..Default::default()
    }
}

fn uints(values: &[u32]) -> InferTensorContents {
    InferTensorContents {
        uint_contents: values.to_vec(),
        ..Default::default()
    }
}

fn byte_strings(values: &[&[u8]]) -> InferTensorContents {
    InferTensorContents {
        bytes_contents: values.iter().map(|v| v.to_vec()).collect(),
        ..Default::default()
    }
}

/// `rows` valid rows of the `image` input, raw.
fn image_raw(rows: usize) -> (InferInputTensor, Vec<u8>) {
    let values: Vec<f32> = (0..rows * 3).map(|i| i as f32 * 0.5).collect();
    let shape = [i64::try_from(rows).expect("small"), 3];
    (tensor("image", "FP32", &shape), to_raw(&values))
}

/// A valid `label` input, raw.
fn label_raw(labels: &[&str]) -> (InferInputTensor, Vec<u8>) {
    let shape = [i64::try_from(labels.len()).expect("small")];
    (
        tensor("label", "BYTES", &shape),
        encode_bytes_elements(labels),
    )
}

fn valid_raw_request() -> ModelInferRequest {
    raw_request(vec![image_raw(2), label_raw(&["cat", "dog"])])
}

/// The message of an `InvalidRequest`, failing the test on success or any other error.
fn invalid(result: Result<ValidatedRequest, WorkerError>) -> String {
    match result {
        Err(WorkerError::InvalidRequest(message)) => message,
        other => panic!("expected WorkerError::InvalidRequest, got {other:?}"),
    }
}

/// Asserts `InvalidRequest` with a message holding every one of `needles`.
#[track_caller]
fn assert_invalid(result: Result<ValidatedRequest, WorkerError>, needles: &[&str]) {
    let message = invalid(result);
    for needle in needles {
        assert!(
            message.contains(needle),
            "message {message:?} should contain {needle:?}"
        );
    }
    // The message is what the client sees as the INVALID_ARGUMENT status message.
    let status = tonic::Status::from(WorkerError::InvalidRequest(message.clone()));
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), message);
}

// ---------------------------------------------------------------------------------------
// Happy paths
// ---------------------------------------------------------------------------------------

#[test]
fn raw_and_typed_fp32_decode_to_the_same_tensor() {
    let schema = single(Datatype::Fp32, &[-1, 3]);
    let values = [1.5f32, -2.25, 0.0, f32::MAX, f32::MIN_POSITIVE, -0.0];
    let raw = raw_request(vec![(tensor("x", "FP32", &[2, 3]), to_raw(&values))]);
    let typed = typed_request(vec![typed("x", "FP32", &[2, 3], fp32s(&values))]);

    let from_raw = validate(&schema, &raw).expect("raw request is valid");
    let from_typed = validate(&schema, &typed).expect("typed request is valid");
    assert_eq!(from_raw, from_typed);
    assert_eq!(from_raw.inputs.len(), 1);
    let input = &from_raw.inputs[0];
    assert_eq!(input.name, "x");
    assert_eq!(input.shape, vec![2, 3]);
    assert_eq!(input.data, TensorData::Fp32(values.to_vec()));
    assert_eq!(from_raw.outputs, vec!["y".to_owned()]);
}

#[test]
fn raw_is_little_endian() {
    let cases = [
        (Datatype::Uint16, TensorData::Uint16(vec![0x0201, 0x0403])),
        (Datatype::Int16, TensorData::Int16(vec![0x0201, 0x0403])),
        (Datatype::Uint32, TensorData::Uint32(vec![0x0403_0201])),
        (Datatype::Int32, TensorData::Int32(vec![0x0403_0201])),
        (
            Datatype::Fp16,
            TensorData::Fp16(vec![f16::from_bits(0x0201), f16::from_bits(0x0403)]),
        ),
        (
            Datatype::Bf16,
            TensorData::Bf16(vec![bf16::from_bits(0x0201), bf16::from_bits(0x0403)]),
        ),
    ];
    for (datatype, expected) in cases {
        let count = i64::try_from(expected.len()).expect("small");
        let schema = single(datatype, &[-1]);
        let request = raw_request(vec![(
            tensor("x", datatype.as_str(), &[count]),
            vec![1, 2, 3, 4],
        )]);
        let validated = validate(&schema, &request)
            .unwrap_or_else(|e| panic!("{datatype}: unexpected error {e}"));
        assert_eq!(validated.inputs[0].data, expected, "{datatype}");
    }
    let schema = single(Datatype::Uint64, &[1]);
    let request = raw_request(vec![(
        tensor("x", "UINT64", &[1]),
        vec![1, 2, 3, 4, 5, 6, 7, 8],
    )]);
    let validated = validate(&schema, &request).expect("valid");
    assert_eq!(
        validated.inputs[0].data,
        TensorData::Uint64(vec![0x0807_0605_0403_0201])
    );
}

/// One raw payload and its decoded elements per datatype, three elements each.
fn raw_cases() -> Vec<(Datatype, Vec<u8>, TensorData)> {
    let halves = [1.5f32, -0.0, 65504.0];
    let f16s: Vec<f16> = halves.iter().map(|&v| f16::from_f32(v)).collect();
    let bf16s: Vec<bf16> = halves.iter().map(|&v| bf16::from_f32(v)).collect();
    vec![
        (
            Datatype::Bool,
            to_raw(&[true, false, true]),
            TensorData::Bool(vec![true, false, true]),
        ),
        (
            Datatype::Uint8,
            to_raw(&[0u8, 7, u8::MAX]),
            TensorData::Uint8(vec![0, 7, u8::MAX]),
        ),
        (
            Datatype::Uint16,
            to_raw(&[0u16, 513, u16::MAX]),
            TensorData::Uint16(vec![0, 513, u16::MAX]),
        ),
        (
            Datatype::Uint32,
            to_raw(&[0u32, 70_000, u32::MAX]),
            TensorData::Uint32(vec![0, 70_000, u32::MAX]),
        ),
        (
            Datatype::Uint64,
            to_raw(&[0u64, 1 << 40, u64::MAX]),
            TensorData::Uint64(vec![0, 1 << 40, u64::MAX]),
        ),
        (
            Datatype::Int8,
            to_raw(&[i8::MIN, -1i8, i8::MAX]),
            TensorData::Int8(vec![i8::MIN, -1, i8::MAX]),
        ),
        (
            Datatype::Int16,
            to_raw(&[i16::MIN, -1i16, i16::MAX]),
            TensorData::Int16(vec![i16::MIN, -1, i16::MAX]),
        ),
        (
            Datatype::Int32,
            to_raw(&[i32::MIN, -1i32, i32::MAX]),
            TensorData::Int32(vec![i32::MIN, -1, i32::MAX]),
        ),
        (
            Datatype::Int64,
            to_raw(&[i64::MIN, -1i64, i64::MAX]),
            TensorData::Int64(vec![i64::MIN, -1, i64::MAX]),
        ),
        (
            Datatype::Fp16,
            to_raw(&f16s.iter().map(|v| v.to_bits()).collect::<Vec<u16>>()),
            TensorData::Fp16(f16s.clone()),
        ),
        (
            Datatype::Bf16,
            to_raw(&bf16s.iter().map(|v| v.to_bits()).collect::<Vec<u16>>()),
            TensorData::Bf16(bf16s.clone()),
        ),
        (
            Datatype::Fp32,
            to_raw(&[1.5f32, -2.25, f32::MAX]),
            TensorData::Fp32(vec![1.5, -2.25, f32::MAX]),
        ),
        (
            Datatype::Fp64,
            to_raw(&[1.5f64, -2.25, f64::MAX]),
            TensorData::Fp64(vec![1.5, -2.25, f64::MAX]),
        ),
        (
            Datatype::Bytes,
            encode_bytes_elements(["", "héllo wörld", "a\tb"]),
            TensorData::Bytes(vec![
                Vec::new(),
                "héllo wörld".as_bytes().to_vec(),
                b"a\tb".to_vec(),
            ]),
        ),
    ]
}

#[test]
fn every_datatype_decodes_from_raw() {
    let cases = raw_cases();
    let covered: Vec<Datatype> = cases.iter().map(|(d, _, _)| *d).collect();
    assert_eq!(covered, Datatype::ALL.to_vec(), "one case per datatype");
    for (datatype, raw, expected) in cases {
        for schema_shape in [&[3][..], &[-1]] {
            let schema = single(datatype, schema_shape);
            let request = raw_request(vec![(tensor("x", datatype.as_str(), &[3]), raw.clone())]);
            let validated = validate(&schema, &request)
                .unwrap_or_else(|e| panic!("{datatype}: unexpected error {e}"));
            assert_eq!(validated.inputs.len(), 1);
            assert_eq!(validated.inputs[0].name, "x");
            assert_eq!(validated.inputs[0].shape, vec![3]);
            assert_eq!(validated.inputs[0].data, expected, "{datatype}");
        }
    }
}

/// One typed `contents` and its decoded elements per datatype that has a typed field.
fn typed_cases() -> Vec<(Datatype, InferTensorContents, TensorData)> {
    vec![
        (
            Datatype::Bool,
            InferTensorContents {
                bool_contents: vec![true, false, true],
                ..Default::default()
            },
            TensorData::Bool(vec![true, false, true]),
        ),
        (
            Datatype::Uint8,
            uints(&[0, 7, 255]),
            TensorData::Uint8(vec![0, 7, u8::MAX]),
        ),
        (
            Datatype::Uint16,
            uints(&[0, 513, 65_535]),
            TensorData::Uint16(vec![0, 513, u16::MAX]),
        ),
        (
            Datatype::Uint32,
            uints(&[0, 70_000, u32::MAX]),
            TensorData::Uint32(vec![0, 70_000, u32::MAX]),
        ),
        (
            Datatype::Uint64,
            InferTensorContents {
                uint64_contents: vec![0, 1 << 40, u64::MAX],
                ..Default::default()
            },
            TensorData::Uint64(vec![0, 1 << 40, u64::MAX]),
        ),
        (
            Datatype::Int8,
            ints(&[-128, -1, 127]),
            TensorData::Int8(vec![i8::MIN, -1, i8::MAX]),
        ),
        (
            Datatype::Int16,
            ints(&[-32_768, -1, 32_767]),
            TensorData::Int16(vec![i16::MIN, -1, i16::MAX]),
        ),
        (
            Datatype::Int32,
            ints(&[i32::MIN, -1, i32::MAX]),
            TensorData::Int32(vec![i32::MIN, -1, i32::MAX]),
        ),
        (
            Datatype::Int64,
            InferTensorContents {
                int64_contents: vec![i64::MIN, -1, i64::MAX],
                ..Default::default()
            },
            TensorData::Int64(vec![i64::MIN, -1, i64::MAX]),
        ),
        (
            Datatype::Fp32,
            fp32s(&[1.5, -2.25, f32::MAX]),
            TensorData::Fp32(vec![1.5, -2.25, f32::MAX]),
        ),
        (
            Datatype::Fp64,
            InferTensorContents {
                fp64_contents: vec![1.5, -2.25, f64::MAX],
                ..Default::default()
            },
            TensorData::Fp64(vec![1.5, -2.25, f64::MAX]),
        ),
        (
            Datatype::Bytes,
            byte_strings(&[b"", "héllo wörld".as_bytes(), b"a\tb"]),
            TensorData::Bytes(vec![
                Vec::new(),
                "héllo wörld".as_bytes().to_vec(),
                b"a\tb".to_vec(),
            ]),
        ),
    ]
}

#[test]
fn every_typed_datatype_decodes_from_contents_like_raw() {
    let raw_by_type = raw_cases();
    let cases = typed_cases();
    let covered: Vec<Datatype> = cases.iter().map(|(d, _, _)| *d).collect();
    let expected_types: Vec<Datatype> = Datatype::ALL
        .into_iter()
        .filter(|d| !matches!(d, Datatype::Fp16 | Datatype::Bf16))
        .collect();
    assert_eq!(covered, expected_types, "one case per typed datatype");
    for (datatype, contents, expected) in cases {
        let schema = single(datatype, &[-1]);
        let request = typed_request(vec![typed("x", datatype.as_str(), &[3], contents)]);
        let validated = validate(&schema, &request)
            .unwrap_or_else(|e| panic!("{datatype}: unexpected error {e}"));
        assert_eq!(validated.inputs[0].shape, vec![3]);
        assert_eq!(validated.inputs[0].data, expected, "{datatype}");

        // The same elements sent raw decode identically.
        let (_, raw, raw_expected) = raw_by_type
            .iter()
            .find(|(d, _, _)| *d == datatype)
            .expect("raw case for every datatype");
        assert_eq!(
            *raw_expected, expected,
            "{datatype}: raw and typed cases agree"
        );
        let request = raw_request(vec![(tensor("x", datatype.as_str(), &[3]), raw.clone())]);
        let from_raw = validate(&schema, &request).expect("raw request is valid");
        assert_eq!(from_raw, validated, "{datatype}");
    }
}

#[test]
fn scalar_and_zero_element_tensors_are_accepted_raw() {
    let schema = single(Datatype::Fp32, &[]);
    let request = raw_request(vec![(tensor("x", "FP32", &[]), to_raw(&[4.0f32]))]);
    let validated = validate(&schema, &request).expect("scalar is valid");
    assert_eq!(validated.inputs[0].shape, Vec::<i64>::new());
    assert_eq!(validated.inputs[0].data, TensorData::Fp32(vec![4.0]));

    let request = raw_request(vec![
        (tensor("image", "FP32", &[0, 3]), Vec::new()),
        (tensor("label", "BYTES", &[0]), Vec::new()),
    ]);
    let validated = validate(&model(), &request).expect("empty batch is valid");
    assert_eq!(validated.inputs[0].shape, vec![0, 3]);
    assert_eq!(validated.inputs[0].data, TensorData::Fp32(Vec::new()));
    assert_eq!(validated.inputs[1].data, TensorData::Bytes(Vec::new()));
}

/// A zero-element tensor has no elements to put in `contents`, and protobuf cannot tell
/// an empty repeated field from an unset one; a present-but-empty `contents` is the only
/// way to send it typed (the only way at all when the other inputs travel typed).
#[test]
fn zero_element_tensor_is_accepted_with_empty_typed_contents() {
    let request = typed_request(vec![
        typed("image", "FP32", &[0, 3], InferTensorContents::default()),
        typed("label", "BYTES", &[0], InferTensorContents::default()),
    ]);
    let validated = validate(&model(), &request).expect("an empty batch is a valid request");
    assert_eq!(validated.inputs[0].data, TensorData::Fp32(Vec::new()));
    assert_eq!(validated.inputs[1].data, TensorData::Bytes(Vec::new()));
}

/// Typed contents are checked for their kind and count even when the shape has no
/// elements: they are not silently dropped.
#[test]
fn zero_element_tensor_with_typed_elements_is_rejected() {
    let request = typed_request(vec![
        typed("image", "FP32", &[0, 3], byte_strings(&[b"x"])),
        typed("label", "BYTES", &[0], InferTensorContents::default()),
    ]);
    assert_invalid(
        validate(&model(), &request),
        &[
            "input \"image\"",
            "contents.bytes_contents is set",
            "FP32 data belongs in contents.fp32_contents",
        ],
    );
    let request = typed_request(vec![
        typed("image", "FP32", &[0, 3], fp32s(&[1.0])),
        typed("label", "BYTES", &[0], InferTensorContents::default()),
    ]);
    assert_invalid(
        validate(&model(), &request),
        &[
            "input \"image\"",
            "contents.fp32_contents holds 1 elements, shape needs 0",
        ],
    );
}

#[test]
fn raw_wins_over_present_but_empty_typed_contents() {
    let (mut image, raw) = image_raw(1);
    image.contents = Some(InferTensorContents::default());
    let request = raw_request(vec![(image, raw), label_raw(&["x"])]);
    let validated = validate(&model(), &request).expect("empty contents are no contents");
    assert_eq!(
        validated.inputs[0].data,
        TensorData::Fp32(vec![0.0, 0.5, 1.0])
    );
}

#[test]
fn requested_outputs_keep_their_subset_and_order() {
    let request = with_outputs(valid_raw_request(), &["top", "scores"]);
    let validated = validate(&model(), &request).expect("valid");
    assert_eq!(
        validated.outputs,
        vec!["top".to_owned(), "scores".to_owned()]
    );

    let request = with_outputs(valid_raw_request(), &["embedding"]);
    let validated = validate(&model(), &request).expect("valid");
    assert_eq!(validated.outputs, vec!["embedding".to_owned()]);
}

#[test]
fn no_requested_outputs_means_all_outputs_in_schema_order() {
    let validated = validate(&model(), &valid_raw_request()).expect("valid");
    assert_eq!(
        validated.outputs,
        vec![
            "scores".to_owned(),
            "embedding".to_owned(),
            "top".to_owned()
        ]
    );
}

#[test]
fn inputs_come_back_in_schema_order_with_their_own_raw_contents() {
    // `label` first: raw_input_contents follow the request's order, the result the schema's.
    let request = raw_request(vec![label_raw(&["a", "bb"]), image_raw(2)]);
    let validated = validate(&model(), &request).expect("valid");
    let names: Vec<&str> = validated.inputs.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["image", "label"]);
    assert_eq!(validated.inputs[0].shape, vec![2, 3]);
    assert_eq!(
        validated.inputs[0].data,
        TensorData::Fp32(vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    );
    assert_eq!(
        validated.inputs[1].data,
        TensorData::Bytes(vec![b"a".to_vec(), b"bb".to_vec()])
    );

    let request = typed_request(vec![
        typed("label", "BYTES", &[1], byte_strings(&[b"z"])),
        typed("image", "FP32", &[1, 3], fp32s(&[1.0, 2.0, 3.0])),
    ]);
    let validated = validate(&model(), &request).expect("valid");
    let names: Vec<&str> = validated.inputs.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["image", "label"]);
}

#[test]
fn request_metadata_is_not_checked_but_input_parameters_are_refused_by_name() {
    let mut request = with_outputs(valid_raw_request(), &["top"]);
    request.model_name = "whatever".to_owned();
    request.model_version = "7".to_owned();
    request.id = "req-1".to_owned();
    let validated = validate(&model(), &request).expect("valid");
    assert_eq!(validated.inputs.len(), 2);
    assert_eq!(validated.outputs, vec!["top".to_owned()]);
    request.inputs[0]
        .parameters
        .insert("binary_data_size".to_owned(), Default::default());
    assert_invalid(
        validate(&model(), &request),
        &[
            "parameter \"binary_data_size\" of input \"image\"",
            "HTTP/REST",
        ],
    );
}

// ---------------------------------------------------------------------------------------
// Input set errors
// ---------------------------------------------------------------------------------------

#[test]
fn unknown_input_is_named_with_the_model_inputs() {
    let request = raw_request(vec![
        image_raw(1),
        label_raw(&["x"]),
        (tensor("imgae", "FP32", &[1, 3]), to_raw(&[0f32; 3])),
    ]);
    assert_invalid(
        validate(&model(), &request),
        &["unexpected inference input 'imgae'", "image, label"],
    );
}

#[test]
fn duplicate_input_is_rejected() {
    let request = raw_request(vec![image_raw(1), label_raw(&["x"]), image_raw(2)]);
    assert_invalid(
        validate(&model(), &request),
        &["input \"image\"", "given twice"],
    );

    let request = typed_request(vec![
        typed("label", "BYTES", &[1], byte_strings(&[b"a"])),
        typed("label", "BYTES", &[1], byte_strings(&[b"b"])),
    ]);
    assert_invalid(
        validate(&model(), &request),
        &["input \"label\"", "given twice"],
    );
}

#[test]
fn missing_input_lists_what_the_model_needs() {
    let request = raw_request(vec![image_raw(1)]);
    let message = invalid(validate(&model(), &request));
    assert!(message.contains("missing input \"label\""), "{message}");
    assert!(
        message.contains("the model needs: image, label"),
        "{message}"
    );
    assert!(!message.contains("missing inputs"), "{message}");

    let request = ModelInferRequest::default();
    assert_invalid(
        validate(&model(), &request),
        &[
            "missing inputs \"image\", \"label\"",
            "the model needs: image, label",
        ],
    );
}

#[test]
fn model_without_inputs_accepts_an_empty_request() {
    let schema = ModelSchema {
        inputs: Vec::new(),
        outputs: vec![spec("constant", Datatype::Fp32, &[1])],
    };
    let validated = validate(&schema, &ModelInferRequest::default()).expect("valid");
    assert!(validated.inputs.is_empty());
    assert_eq!(validated.outputs, vec!["constant".to_owned()]);
}

#[test]
fn raw_contents_count_must_match_inputs_count() {
    let mut request = valid_raw_request();
    request.raw_input_contents.pop();
    assert_invalid(
        validate(&model(), &request),
        &["raw_input_contents has 1 entries for 2 inputs"],
    );

    let mut request = valid_raw_request();
    request.raw_input_contents.push(Bytes::new());
    assert_invalid(
        validate(&model(), &request),
        &["raw_input_contents has 3 entries for 2 inputs"],
    );

    // Raw contents with no inputs at all.
    let request = ModelInferRequest {
        raw_input_contents: vec![Bytes::from_static(b"abcd")],
        ..Default::default()
    };
    assert_invalid(
        validate(&model(), &request),
        &["raw_input_contents has 1 entries for 0 inputs"],
    );
}

// ---------------------------------------------------------------------------------------
// Datatype and shape errors
// ---------------------------------------------------------------------------------------

#[test]
fn wrong_datatype_is_rejected() {
    let request = raw_request(vec![
        (tensor("image", "FP64", &[1, 3]), to_raw(&[0f64; 3])),
        label_raw(&["x"]),
    ]);
    assert_invalid(
        validate(&model(), &request),
        &["input \"image\"", "expected datatype FP32, got FP64"],
    );

    let request = raw_request(vec![
        image_raw(1),
        (tensor("label", "UINT8", &[1]), vec![0]),
    ]);
    assert_invalid(
        validate(&model(), &request),
        &["input \"label\"", "expected datatype BYTES, got UINT8"],
    );
}

#[test]
fn unknown_datatype_string_is_rejected() {
    for name in ["FLOAT", "fp32", "", "FP32 ", "STRING"] {
        let request = raw_request(vec![
            (tensor("image", name, &[1, 3]), to_raw(&[0f32; 3])),
            label_raw(&["x"]),
        ]);
        assert_invalid(
            validate(&model(), &request),
            &[
                "input \"image\"",
                &format!("unknown datatype \"{name}\""),
                "expected FP32",
            ],
        );
    }
}

#[test]
fn wrong_rank_is_rejected() {
    for shape in [&[3][..], &[1, 1, 3], &[]] {
        let request = raw_request(vec![
            (tensor("image", "FP32", shape), to_raw(&[0f32; 3])),
            label_raw(&["x"]),
        ]);
        assert_invalid(
            validate(&model(), &request),
            &[
                "input \"image\"",
                "expected shape [-1, 3] (rank 2)",
                &format!("got {shape:?} (rank {})", shape.len()),
            ],
        );
    }
}

#[test]
fn wrong_fixed_dimension_is_rejected() {
    let request = raw_request(vec![
        (tensor("image", "FP32", &[2, 4]), to_raw(&[0f32; 8])),
        label_raw(&["x"]),
    ]);
    assert_invalid(
        validate(&model(), &request),
        &["input \"image\"", "expected shape [-1, 3]", "got [2, 4]"],
    );

    let schema = single(Datatype::Int32, &[2, -1, 5]);
    let request = raw_request(vec![(
        tensor("x", "INT32", &[3, 1, 5]),
        to_raw(&[0i32; 15]),
    )]);
    assert_invalid(
        validate(&schema, &request),
        &["input \"x\"", "expected shape [2, -1, 5]", "got [3, 1, 5]"],
    );
}

#[test]
fn negative_dimension_is_rejected() {
    for (shape, dim) in [
        ([-1i64, 3], "-1"),
        ([-5, 3], "-5"),
        ([i64::MIN, 3], "-9223372036854775808"),
    ] {
        let request = raw_request(vec![
            (tensor("image", "FP32", &shape), Vec::new()),
            label_raw(&["x"]),
        ]);
        assert_invalid(
            validate(&model(), &request),
            &["input \"image\"", &format!("negative dimension {dim}")],
        );
    }
    // A negative dimension is reported even where the schema has a fixed one.
    let request = raw_request(vec![
        (tensor("image", "FP32", &[1, -3]), Vec::new()),
        label_raw(&["x"]),
    ]);
    assert_invalid(
        validate(&model(), &request),
        &["input \"image\"", "negative dimension -3"],
    );
}

#[test]
fn element_count_overflow_is_rejected() {
    let schema = single(Datatype::Fp32, &[-1, -1]);
    let shape = [i64::MAX, i64::MAX];
    let request = raw_request(vec![(tensor("x", "FP32", &shape), to_raw(&[0f32]))]);
    assert_invalid(
        validate(&schema, &request),
        &[
            "input \"x\"",
            "[9223372036854775807, 9223372036854775807]",
            "more elements than this machine can address",
        ],
    );
    let request = typed_request(vec![typed("x", "FP32", &shape, fp32s(&[0.0]))]);
    assert_invalid(
        validate(&schema, &request),
        &["input \"x\"", "more elements than this machine can address"],
    );

    let schema = single(Datatype::Bytes, &[-1, -1]);
    let request = raw_request(vec![(
        tensor("x", "BYTES", &[1 << 32, 1 << 32]),
        encode_bytes_elements(["a"]),
    )]);
    assert_invalid(
        validate(&schema, &request),
        &["input \"x\"", "more elements than this machine can address"],
    );
}

#[cfg(target_pointer_width = "64")]
#[test]
fn huge_but_addressable_element_counts_are_rejected_without_allocating() {
    // i64::MAX elements fit a usize, but not once multiplied by the element size.
    let schema = single(Datatype::Fp32, &[-1]);
    let request = raw_request(vec![(tensor("x", "FP32", &[i64::MAX]), to_raw(&[0f32]))]);
    assert_invalid(
        validate(&schema, &request),
        &[
            "input \"x\"",
            "9223372036854775807 elements of FP32 overflow the byte size",
        ],
    );

    let schema = single(Datatype::Uint8, &[-1]);
    let request = raw_request(vec![(tensor("x", "UINT8", &[i64::MAX]), vec![1, 2])]);
    assert_invalid(
        validate(&schema, &request),
        &[
            "input \"x\"",
            "raw contents hold 2 bytes",
            "needs 9223372036854775807",
        ],
    );

    let schema = single(Datatype::Bytes, &[-1]);
    let request = raw_request(vec![(
        tensor("x", "BYTES", &[i64::MAX]),
        encode_bytes_elements(["a", "b"]),
    )]);
    assert_invalid(
        validate(&schema, &request),
        &[
            "input \"x\"",
            "holds 2 elements, shape needs 9223372036854775807",
        ],
    );

    let schema = single(Datatype::Int64, &[-1]);
    let request = typed_request(vec![typed(
        "x",
        "INT64",
        &[i64::MAX],
        InferTensorContents {
            int64_contents: vec![1],
            ..Default::default()
        },
    )]);
    assert_invalid(
        validate(&schema, &request),
        &[
            "input \"x\"",
            "contents.int64_contents holds 1 elements, shape needs 9223372036854775807",
        ],
    );
}

// ---------------------------------------------------------------------------------------
// Contents errors
// ---------------------------------------------------------------------------------------

#[test]
fn raw_byte_length_mismatch_gives_both_numbers() {
    let request = raw_request(vec![
        (tensor("image", "FP32", &[2, 3]), vec![0; 20]),
        label_raw(&["x"]),
    ]);
    assert_invalid(
        validate(&model(), &request),
        &[
            "input \"image\"",
            "raw contents hold 20 bytes",
            "needs 24",
            "6 elements × 4 bytes",
        ],
    );

    let schema = single(Datatype::Fp16, &[-1]);
    let request = raw_request(vec![(tensor("x", "FP16", &[2]), vec![0; 5])]);
    assert_invalid(
        validate(&schema, &request),
        &["input \"x\"", "hold 5 bytes", "needs 4"],
    );

    let schema = single(Datatype::Bool, &[-1]);
    let request = raw_request(vec![(tensor("x", "BOOL", &[0]), vec![1])]);
    assert_invalid(
        validate(&schema, &request),
        &["input \"x\"", "hold 1 bytes", "needs 0"],
    );
}

#[test]
fn both_raw_and_typed_contents_are_rejected() {
    let (mut image, raw) = image_raw(1);
    image.contents = Some(fp32s(&[1.0, 2.0, 3.0]));
    let request = raw_request(vec![(image, raw), label_raw(&["x"])]);
    assert_invalid(
        validate(&model(), &request),
        &[
            "input \"image\"",
            "both contents and raw_input_contents are set",
        ],
    );

    // Also when the typed contents sit in an unrelated field.
    let (mut label, raw) = label_raw(&["x"]);
    label.contents = Some(InferTensorContents {
        bool_contents: vec![true],
        ..Default::default()
    });
    let request = raw_request(vec![image_raw(1), (label, raw)]);
    assert_invalid(
        validate(&model(), &request),
        &["input \"label\"", "both contents and raw_input_contents"],
    );
}

#[test]
fn no_contents_at_all_is_rejected() {
    let request = typed_request(vec![
        tensor("image", "FP32", &[1, 3]),
        typed("label", "BYTES", &[1], byte_strings(&[b"x"])),
    ]);
    assert_invalid(
        validate(&model(), &request),
        &[
            "input \"image\"",
            "no data",
            "contents or raw_input_contents",
        ],
    );

    let request = typed_request(vec![
        typed("image", "FP32", &[1, 3], fp32s(&[1.0, 2.0, 3.0])),
        typed("label", "BYTES", &[1], InferTensorContents::default()),
    ]);
    assert_invalid(
        validate(&model(), &request),
        &["input \"label\"", "no data"],
    );
}

#[test]
fn typed_contents_in_the_wrong_field_are_rejected() {
    let request = typed_request(vec![
        typed(
            "image",
            "FP32",
            &[1, 3],
            InferTensorContents {
                fp64_contents: vec![1.0, 2.0, 3.0],
                ..Default::default()
            },
        ),
        typed("label", "BYTES", &[1], byte_strings(&[b"x"])),
    ]);
    assert_invalid(
        validate(&model(), &request),
        &[
            "input \"image\"",
            "contents.fp64_contents is set",
            "FP32 data belongs in contents.fp32_contents",
        ],
    );

    // The right field plus a stray one.
    let mut contents = fp32s(&[1.0, 2.0, 3.0]);
    contents.int_contents = vec![1];
    let request = typed_request(vec![
        typed("image", "FP32", &[1, 3], contents),
        typed("label", "BYTES", &[1], byte_strings(&[b"x"])),
    ]);
    assert_invalid(
        validate(&model(), &request),
        &[
            "input \"image\"",
            "contents.int_contents is set",
            "contents.fp32_contents",
        ],
    );

    // Unsigned values in the signed field.
    let schema = single(Datatype::Uint8, &[-1]);
    let request = typed_request(vec![typed("x", "UINT8", &[1], ints(&[1]))]);
    assert_invalid(
        validate(&schema, &request),
        &[
            "input \"x\"",
            "contents.int_contents is set",
            "UINT8 data belongs in contents.uint_contents",
        ],
    );

    // 64-bit integers have their own field.
    let schema = single(Datatype::Int64, &[-1]);
    let request = typed_request(vec![typed("x", "INT64", &[1], ints(&[1]))]);
    assert_invalid(
        validate(&schema, &request),
        &[
            "input \"x\"",
            "INT64 data belongs in contents.int64_contents",
        ],
    );
}

#[test]
fn typed_element_count_mismatch_is_rejected() {
    let request = typed_request(vec![
        typed("image", "FP32", &[2, 3], fp32s(&[0.0; 5])),
        typed("label", "BYTES", &[1], byte_strings(&[b"x"])),
    ]);
    assert_invalid(
        validate(&model(), &request),
        &[
            "input \"image\"",
            "contents.fp32_contents holds 5 elements, shape needs 6",
        ],
    );

    let request = typed_request(vec![
        typed("image", "FP32", &[1, 3], fp32s(&[0.0; 3])),
        typed("label", "BYTES", &[1], byte_strings(&[b"x", b"y"])),
    ]);
    assert_invalid(
        validate(&model(), &request),
        &[
            "input \"label\"",
            "contents.bytes_contents holds 2 elements, shape needs 1",
        ],
    );
}

#[test]
fn narrow_integer_values_out_of_range_are_rejected() {
    let cases: [(Datatype, InferTensorContents, &str); 7] = [
        (Datatype::Int8, ints(&[1, 300]), "INT8"),
        (Datatype::Int8, ints(&[-129, 0]), "INT8"),
        (Datatype::Int16, ints(&[40_000, 0]), "INT16"),
        (Datatype::Int16, ints(&[0, -32_769]), "INT16"),
        (Datatype::Uint8, uints(&[256, 0]), "UINT8"),
        (Datatype::Uint16, uints(&[0, 70_000]), "UINT16"),
        (Datatype::Uint16, uints(&[u32::MAX, 0]), "UINT16"),
    ];
    for (datatype, contents, name) in cases {
        let field = if contents.int_contents.is_empty() {
            "contents.uint_contents"
        } else {
            "contents.int_contents"
        };
        let schema = single(datatype, &[-1]);
        let request = typed_request(vec![typed("x", datatype.as_str(), &[2], contents)]);
        assert_invalid(
            validate(&schema, &request),
            &[
                "input \"x\"",
                &format!("{field} holds a value outside the range of {name}"),
            ],
        );
    }
}

#[test]
fn fp16_and_bf16_must_be_sent_raw() {
    for datatype in [Datatype::Fp16, Datatype::Bf16] {
        let schema = single(datatype, &[-1]);
        for contents in [
            fp32s(&[1.0, 2.0]),
            uints(&[0x3c00, 0x3c00]),
            InferTensorContents {
                fp64_contents: vec![1.0, 2.0],
                ..Default::default()
            },
        ] {
            let request = typed_request(vec![typed("x", datatype.as_str(), &[2], contents)]);
            assert_invalid(
                validate(&schema, &request),
                &[
                    "input \"x\"",
                    &format!("{datatype} has no typed contents field"),
                    "raw_input_contents",
                ],
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// BYTES errors
// ---------------------------------------------------------------------------------------

fn raw_label(shape: &[i64], payload: Vec<u8>) -> ModelInferRequest {
    raw_request(vec![
        image_raw(1),
        (tensor("label", "BYTES", shape), payload),
    ])
}

#[test]
fn malformed_raw_bytes_are_rejected() {
    // A second element whose 4-byte prefix is cut short.
    let mut truncated = encode_bytes_elements(["abc"]);
    truncated.extend_from_slice(&[1, 0]);
    assert_invalid(
        validate(&model(), &raw_label(&[2], truncated)),
        &[
            "input \"label\"",
            "raw BYTES contents",
            "element 1: truncated length prefix at byte offset 7",
        ],
    );

    // Only a partial prefix.
    assert_invalid(
        validate(&model(), &raw_label(&[1], vec![3, 0])),
        &[
            "input \"label\"",
            "element 0: truncated length prefix at byte offset 0",
        ],
    );

    // A prefix that runs past the end.
    assert_invalid(
        validate(&model(), &raw_label(&[1], vec![9, 0, 0, 0, b'x'])),
        &[
            "input \"label\"",
            "element 0: length prefix 9 at byte offset 0 runs past the end (1 bytes remain)",
        ],
    );
    assert_invalid(
        validate(&model(), &raw_label(&[1], vec![0xff, 0xff, 0xff, 0xff])),
        &["input \"label\"", "length prefix 4294967295"],
    );

    // Too many elements.
    let two = encode_bytes_elements(["a", "b"]);
    assert_invalid(
        validate(&model(), &raw_label(&[1], two.clone())),
        &["input \"label\"", "holds 2 elements, shape needs 1"],
    );
    // Too few elements.
    assert_invalid(
        validate(&model(), &raw_label(&[3], two)),
        &["input \"label\"", "holds 2 elements, shape needs 3"],
    );
    // An empty payload for a non-empty shape.
    assert_invalid(
        validate(&model(), &raw_label(&[1], Vec::new())),
        &["input \"label\"", "holds 0 elements, shape needs 1"],
    );
}

#[test]
fn bytes_may_be_any_binary_data_but_nul() {
    let payload = encode_bytes_elements([&b"fine"[..], b"\xff\xfe"]);
    let validated = validate(&model(), &raw_label(&[2], payload)).expect("binary BYTES");
    assert_eq!(
        validated.inputs[1].data,
        TensorData::Bytes(vec![b"fine".to_vec(), b"\xff\xfe".to_vec()])
    );
    let request = typed_request(vec![
        typed("image", "FP32", &[1, 3], fp32s(&[0.0; 3])),
        typed("label", "BYTES", &[2], byte_strings(&[b"\xc3", b"ok"])),
    ]);
    assert!(validate(&model(), &request).is_ok());
}

#[test]
fn bytes_may_hold_nul() {
    let payload = encode_bytes_elements([&b"ok"[..], b"a\0b", b"\0"]);
    let validated = validate(&model(), &raw_label(&[3], payload)).expect("NUL is data");
    assert_eq!(
        validated.inputs[1].data,
        TensorData::Bytes(vec![b"ok".to_vec(), b"a\0b".to_vec(), b"\0".to_vec()])
    );
}

// ---------------------------------------------------------------------------------------
// Output errors
// ---------------------------------------------------------------------------------------

#[test]
fn unknown_requested_output_is_named_with_the_model_outputs() {
    let request = with_outputs(valid_raw_request(), &["scores", "logits"]);
    assert_invalid(
        validate(&model(), &request),
        &[
            "output \"logits\"",
            "not an output of this model",
            "scores, embedding, top",
        ],
    );

    // An input's name is not an output.
    let request = with_outputs(valid_raw_request(), &["image"]);
    assert_invalid(
        validate(&model(), &request),
        &["output \"image\"", "not an output"],
    );
}

#[test]
fn duplicate_requested_output_is_rejected() {
    let request = with_outputs(valid_raw_request(), &["top", "scores", "top"]);
    assert_invalid(
        validate(&model(), &request),
        &["output \"top\"", "requested twice"],
    );
}

#[test]
fn input_errors_are_reported_before_output_errors() {
    let mut request = with_outputs(valid_raw_request(), &["logits"]);
    request.inputs[0].datatype = "FP64".to_owned();
    assert_invalid(
        validate(&model(), &request),
        &["input \"image\"", "expected datatype FP32"],
    );
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

/// Checks what an accepted request promises: one decoded input per model input, in
/// schema order, each with a shape that fits the schema and exactly as many elements as
/// its shape has; outputs that exist, are unique, and follow the request (or the schema).
fn check_accepted(
    schema: &ModelSchema,
    request: &ModelInferRequest,
    validated: &ValidatedRequest,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(validated.inputs.len(), schema.inputs.len());
    prop_assert_eq!(request.inputs.len(), schema.inputs.len());
    for (spec, input) in schema.inputs.iter().zip(&validated.inputs) {
        prop_assert_eq!(&input.name, &spec.name);
        prop_assert_eq!(input.data.datatype(), spec.datatype);
        prop_assert_eq!(input.shape.len(), spec.shape.len());
        for (&want, &got) in spec.shape.iter().zip(&input.shape) {
            prop_assert!(got >= 0, "negative dimension in {:?}", input.shape);
            prop_assert!(
                want < 0 || want == got,
                "{:?} vs {:?}",
                spec.shape,
                input.shape
            );
        }
        prop_assert_eq!(
            tensor::element_count(&input.shape),
            Some(input.data.len()),
            "input {} shape {:?}",
            &input.name,
            &input.shape
        );
        let sent: Vec<&InferInputTensor> = request
            .inputs
            .iter()
            .filter(|i| i.name == spec.name)
            .collect();
        prop_assert_eq!(sent.len(), 1);
        prop_assert_eq!(&sent[0].shape, &input.shape);
        prop_assert_eq!(sent[0].datatype.as_str(), spec.datatype.as_str());
    }
    if request.outputs.is_empty() {
        let all: Vec<&str> = schema.outputs.iter().map(|o| o.name.as_str()).collect();
        prop_assert_eq!(
            validated
                .outputs
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            all
        );
    } else {
        let asked: Vec<&str> = request.outputs.iter().map(|o| o.name.as_str()).collect();
        prop_assert_eq!(
            validated
                .outputs
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            asked
        );
    }
    for (i, name) in validated.outputs.iter().enumerate() {
        prop_assert!(schema.output(name).is_some(), "unknown output {}", name);
        prop_assert!(
            !validated.outputs[..i].contains(name),
            "duplicate output {}",
            name
        );
    }
    Ok(())
}

/// The schema of the property tests: every kind of decoding path in three inputs.
fn prop_model() -> ModelSchema {
    ModelSchema {
        inputs: vec![
            spec("image", Datatype::Fp32, &[-1, 3]),
            spec("label", Datatype::Bytes, &[-1]),
            spec("ids", Datatype::Int8, &[2, -1]),
        ],
        outputs: model().outputs,
    }
}

const OUTPUT_NAMES: [&str; 5] = ["scores", "embedding", "top", "image", ""];

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        // Never write regression files next to the sources.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Mostly empty, sometimes a few arbitrary values.
fn sometimes<T, S>(element: S) -> impl Strategy<Value = Vec<T>>
where
    T: std::fmt::Debug + Clone + 'static,
    S: Strategy<Value = T> + 'static,
{
    prop_oneof![3 => Just(Vec::new()), 1 => vec(element, 0..5)]
}

fn arb_contents() -> impl Strategy<Value = Option<InferTensorContents>> {
    let fields = (
        sometimes(any::<bool>()),
        sometimes(prop_oneof![-300i32..300, any::<i32>()]),
        sometimes(any::<i64>()),
        sometimes(prop_oneof![0u32..70_000, any::<u32>()]),
        sometimes(any::<u64>()),
        sometimes(any::<f32>()),
        sometimes(any::<f64>()),
        sometimes(prop_oneof![
            vec(any::<u8>(), 0..8),
            "[a-z]{0,4}".prop_map(String::into_bytes),
        ]),
    )
        .prop_map(
            |(
                bool_contents,
                int_contents,
                int64_contents,
                uint_contents,
                uint64_contents,
                fp32_contents,
                fp64_contents,
                bytes_contents,
            )| InferTensorContents {
                bool_contents,
                int_contents,
                int64_contents,
                uint_contents,
                uint64_contents,
                fp32_contents,
                fp64_contents,
                bytes_contents: bytes_contents.into_iter().collect(),
            },
        );
    prop::option::of(fields)
}

fn arb_shape() -> impl Strategy<Value = Vec<i64>> {
    let dim = prop_oneof![
        6 => -2i64..5,
        1 => any::<i64>(),
        1 => select(vec![i64::MAX, i64::MIN, 1 << 32, 1 << 62, (1 << 62) + 1]),
    ];
    vec(dim, 0..4)
}

fn arb_input() -> impl Strategy<Value = InferInputTensor> {
    let names = select(vec!["image", "label", "ids", "", "IMAGE", "scores"]);
    let datatypes = {
        let mut all: Vec<&str> = Datatype::ALL.iter().map(|d| d.as_str()).collect();
        all.extend(["FLOAT", "fp32", "", "BYTE", "INT8 "]);
        select(all)
    };
    (names, datatypes, arb_shape(), arb_contents()).prop_map(|(name, datatype, shape, contents)| {
        InferInputTensor {
            contents,
            ..tensor(name, datatype, &shape)
        }
    })
}

fn arb_request() -> impl Strategy<Value = ModelInferRequest> {
    let raw_entry = || {
        prop_oneof![
            vec(any::<u8>(), 0..64),
            vec("[a-z\\x00]{0,3}", 0..4).prop_map(encode_bytes_elements),
        ]
    };
    let inputs_and_raw = (vec(arb_input(), 0..5), 0u8..3).prop_flat_map(move |(inputs, mode)| {
        let count = inputs.len();
        let raw = match mode {
            0 => Just(Vec::new()).boxed(),
            1 => vec(raw_entry(), count).boxed(),
            _ => vec(raw_entry(), 0..5).boxed(),
        };
        (Just(inputs), raw)
    });
    let outputs = vec(select(OUTPUT_NAMES.to_vec()), 0..4);
    (inputs_and_raw, outputs).prop_map(|((inputs, raw), outputs)| {
        let request = ModelInferRequest {
            inputs,
            raw_input_contents: raw.into_iter().map(Bytes::from).collect(),
            ..Default::default()
        };
        with_outputs(request, &outputs)
    })
}

/// One well-formed input of `prop_model`, with its expected decoding.
#[derive(Debug, Clone)]
struct Case {
    name: &'static str,
    shape: Vec<i64>,
    elements: Elements,
}

#[derive(Debug, Clone)]
enum Elements {
    Fp32(Vec<f32>),
    Bytes(Vec<String>),
    Int8(Vec<i8>),
}

impl Case {
    fn datatype(&self) -> &'static str {
        match self.elements {
            Elements::Fp32(_) => "FP32",
            Elements::Bytes(_) => "BYTES",
            Elements::Int8(_) => "INT8",
        }
    }

    fn raw(&self) -> Vec<u8> {
        match &self.elements {
            Elements::Fp32(v) => to_raw(v),
            Elements::Bytes(v) => encode_bytes_elements(v),
            Elements::Int8(v) => to_raw(v),
        }
    }

    fn contents(&self) -> InferTensorContents {
        match &self.elements {
            Elements::Fp32(v) => fp32s(v),
            Elements::Bytes(v) => InferTensorContents {
                bytes_contents: v.iter().map(|s| s.clone().into_bytes()).collect(),
                ..Default::default()
            },
            Elements::Int8(v) => InferTensorContents {
                int_contents: v.iter().map(|&b| i32::from(b)).collect(),
                ..Default::default()
            },
        }
    }

    fn expected(&self) -> TensorData {
        match &self.elements {
            Elements::Fp32(v) => TensorData::Fp32(v.clone()),
            Elements::Bytes(v) => {
                TensorData::Bytes(v.iter().map(|s| s.clone().into_bytes()).collect())
            }
            Elements::Int8(v) => TensorData::Int8(v.clone()),
        }
    }

    fn input(&self, typed_contents: bool) -> InferInputTensor {
        InferInputTensor {
            contents: typed_contents.then(|| self.contents()),
            ..tensor(self.name, self.datatype(), &self.shape)
        }
    }
}

fn to_usize(n: i64) -> usize {
    usize::try_from(n).expect("small non-negative")
}

/// A size for a free dimension; zero now and then.
fn free_dim() -> impl Strategy<Value = i64> {
    prop_oneof![1 => Just(0i64), 4 => 1i64..4]
}

fn valid_cases() -> impl Strategy<Value = Vec<Case>> {
    let image = free_dim().prop_flat_map(|rows| {
        vec(-1e6f32..1e6, to_usize(rows * 3)).prop_map(move |v| Case {
            name: "image",
            shape: vec![rows, 3],
            elements: Elements::Fp32(v),
        })
    });
    let label = free_dim().prop_flat_map(|n| {
        vec("[a-zA-Z0-9 é✓]{0,6}", to_usize(n)).prop_map(move |v| Case {
            name: "label",
            shape: vec![n],
            elements: Elements::Bytes(v),
        })
    });
    let ids = free_dim().prop_flat_map(|n| {
        vec(any::<i8>(), to_usize(2 * n)).prop_map(move |v| Case {
            name: "ids",
            shape: vec![2, n],
            elements: Elements::Int8(v),
        })
    });
    // Any order: validation must put them back into schema order.
    (image, label, ids)
        .prop_map(|(a, b, c)| vec![a, b, c])
        .prop_shuffle()
}

/// A change to an otherwise valid request. Indices are taken modulo the current number
/// of inputs, so mutations can be chained.
#[derive(Debug, Clone)]
enum Mutation {
    None,
    Drop(usize),
    Duplicate(usize),
    Rename(usize, &'static str),
    Datatype(usize, &'static str),
    Shape(usize, Vec<i64>),
    TruncateRaw(usize),
    ReplaceRaw(usize, Vec<u8>),
    ExtraRawEntry,
    TypedAlongsideRaw(usize),
    ReplaceContents(usize, Option<InferTensorContents>),
    Outputs(Vec<&'static str>),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    let datatypes = {
        let mut all: Vec<&'static str> = Datatype::ALL.iter().map(|d| d.as_str()).collect();
        all.push("FLOAT");
        select(all)
    };
    let names = select(vec!["image", "label", "ids", "", "scores"]);
    prop_oneof![
        4 => Just(Mutation::None),
        1 => (0usize..3).prop_map(Mutation::Drop),
        1 => (0usize..3).prop_map(Mutation::Duplicate),
        1 => (0usize..3, names).prop_map(|(i, n)| Mutation::Rename(i, n)),
        1 => (0usize..3, datatypes).prop_map(|(i, d)| Mutation::Datatype(i, d)),
        2 => (0usize..3, arb_shape()).prop_map(|(i, s)| Mutation::Shape(i, s)),
        1 => (0usize..3).prop_map(Mutation::TruncateRaw),
        1 => (0usize..3, vec(any::<u8>(), 0..64)).prop_map(|(i, r)| Mutation::ReplaceRaw(i, r)),
        1 => Just(Mutation::ExtraRawEntry),
        1 => (0usize..3).prop_map(Mutation::TypedAlongsideRaw),
        1 => (0usize..3, arb_contents()).prop_map(|(i, c)| Mutation::ReplaceContents(i, c)),
        2 => vec(select(OUTPUT_NAMES.to_vec()), 0..4).prop_map(Mutation::Outputs),
    ]
}

/// What a single mutation of a valid request must lead to.
enum Expect {
    /// Accepted, decoding to the cases' elements.
    Accepted,
    /// Rejected with a message holding this text.
    Rejected(String),
    /// Either; only the general promises apply.
    Either,
}

/// A request under construction from valid cases.
struct Draft {
    inputs: Vec<InferInputTensor>,
    raw: Vec<Vec<u8>>,
    outputs: Vec<&'static str>,
}

impl Draft {
    fn new(cases: &[Case], use_raw: bool) -> Draft {
        Draft {
            inputs: cases.iter().map(|c| c.input(!use_raw)).collect(),
            raw: if use_raw {
                cases.iter().map(Case::raw).collect()
            } else {
                Vec::new()
            },
            outputs: Vec::new(),
        }
    }

    /// Applies `mutation`; the expectation holds when it is the only one applied.
    fn apply(&mut self, cases: &[Case], use_raw: bool, mutation: &Mutation) -> Expect {
        let count = self.inputs.len();
        let index = |i: &usize| i.checked_rem(count);
        match mutation {
            Mutation::None => Expect::Accepted,
            Mutation::Drop(i) => {
                let Some(i) = index(i) else {
                    return Expect::Either;
                };
                let name = self.inputs.remove(i).name;
                if i < self.raw.len() {
                    self.raw.remove(i);
                }
                Expect::Rejected(format!("missing input \"{name}\""))
            }
            Mutation::Duplicate(i) => {
                let Some(i) = index(i) else {
                    return Expect::Either;
                };
                self.inputs.push(self.inputs[i].clone());
                if let Some(raw) = self.raw.get(i).cloned() {
                    self.raw.push(raw);
                }
                Expect::Rejected(format!("input \"{}\" is given twice", self.inputs[i].name))
            }
            Mutation::Rename(i, name) => {
                if let Some(i) = index(i) {
                    (*name).clone_into(&mut self.inputs[i].name);
                }
                Expect::Either
            }
            Mutation::Datatype(i, datatype) => {
                let Some(i) = index(i) else {
                    return Expect::Either;
                };
                let input = &mut self.inputs[i];
                let before = std::mem::replace(&mut input.datatype, (*datatype).to_owned());
                if before == *datatype {
                    Expect::Accepted
                } else {
                    Expect::Rejected(format!("input \"{}\"", input.name))
                }
            }
            Mutation::Shape(i, shape) => {
                let Some(i) = index(i) else {
                    return Expect::Either;
                };
                let input = &mut self.inputs[i];
                let unchanged = input.shape == *shape;
                input.shape.clone_from(shape);
                if unchanged {
                    Expect::Accepted
                } else if let Some(dim) = shape.iter().find(|&&d| d < 0) {
                    Expect::Rejected(format!(
                        "input \"{}\": shape {shape:?} has negative dimension {dim}",
                        input.name
                    ))
                } else {
                    Expect::Either
                }
            }
            Mutation::TruncateRaw(i) => {
                match index(i).and_then(|i| self.raw.get_mut(i).map(|r| (i, r))) {
                    Some((i, raw)) if !raw.is_empty() => {
                        raw.pop();
                        Expect::Rejected(format!("input \"{}\"", self.inputs[i].name))
                    }
                    _ => Expect::Accepted,
                }
            }
            Mutation::ReplaceRaw(i, bytes) => {
                if let Some(raw) = index(i).and_then(|i| self.raw.get_mut(i)) {
                    raw.clone_from(bytes);
                }
                Expect::Either
            }
            Mutation::ExtraRawEntry => {
                self.raw.push(vec![0; 4]);
                Expect::Rejected(format!(
                    "raw_input_contents has {} entries for {count} inputs",
                    self.raw.len()
                ))
            }
            Mutation::TypedAlongsideRaw(i) => {
                let Some(i) = index(i) else {
                    return Expect::Either;
                };
                let Some(case) = cases.iter().find(|c| c.name == self.inputs[i].name) else {
                    return Expect::Either;
                };
                let empty = tensor::element_count(&case.shape) == Some(0);
                self.inputs[i].contents = Some(case.contents());
                if use_raw && !empty {
                    Expect::Rejected(format!(
                        "input \"{}\": both contents and raw_input_contents",
                        case.name
                    ))
                } else {
                    Expect::Accepted
                }
            }
            Mutation::ReplaceContents(i, contents) => {
                if let Some(i) = index(i) {
                    self.inputs[i].contents.clone_from(contents);
                }
                Expect::Either
            }
            Mutation::Outputs(names) => {
                self.outputs.clone_from(names);
                // The first offending name, in request order, is the one reported.
                let schema = model();
                let offence = names.iter().enumerate().find_map(|(i, name)| {
                    if schema.output(name).is_none() {
                        Some(format!("output \"{name}\" is not an output of this model"))
                    } else if names[..i].contains(name) {
                        Some(format!("output \"{name}\" is requested twice"))
                    } else {
                        None
                    }
                });
                offence.map_or(Expect::Accepted, Expect::Rejected)
            }
        }
    }

    fn request(self) -> ModelInferRequest {
        let request = ModelInferRequest {
            inputs: self.inputs,
            raw_input_contents: self.raw.into_iter().map(Bytes::from).collect(),
            ..Default::default()
        };
        with_outputs(request, &self.outputs)
    }
}

/// A valid request with a few mutations: mostly near the edge between valid and invalid.
fn near_valid_request() -> impl Strategy<Value = ModelInferRequest> {
    (valid_cases(), any::<bool>(), vec(arb_mutation(), 0..4)).prop_map(
        |(cases, use_raw, mutations)| {
            let mut draft = Draft::new(&cases, use_raw);
            for mutation in &mutations {
                draft.apply(&cases, use_raw, mutation);
            }
            draft.request()
        },
    )
}

/// Every rejection starts by naming what it is about, and names only what was sent.
fn check_rejected(request: &ModelInferRequest, message: &str) -> Result<(), TestCaseError> {
    let quoted = |prefix: &str| {
        message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('"').next())
            .map(str::to_owned)
    };
    let unexpected = message
        .strip_prefix("unexpected inference input '")
        .and_then(|rest| rest.split('\'').next());
    if let Some(name) = quoted("input \"").as_deref().or(unexpected) {
        prop_assert!(
            request.inputs.iter().any(|i| i.name == name),
            "{:?} names an input that was not sent",
            message
        );
    } else if let Some(name) = quoted("output \"") {
        prop_assert!(
            request.outputs.iter().any(|o| o.name == name),
            "{:?} names an output that was not requested",
            message
        );
    } else {
        prop_assert!(
            message.contains("missing input") || message.starts_with("raw_input_contents has"),
            "{:?} names nothing",
            message
        );
    }
    Ok(())
}

fn check_arbitrary(request: &ModelInferRequest) -> Result<(), TestCaseError> {
    let schema = prop_model();
    match validate(&schema, request) {
        Ok(validated) => check_accepted(&schema, request, &validated),
        Err(WorkerError::InvalidRequest(message)) => check_rejected(request, &message),
        Err(other) => Err(TestCaseError::fail(format!(
            "unexpected error kind: {other:?}"
        ))),
    }
}

fn check_mutation(cases: &[Case], use_raw: bool, mutation: &Mutation) -> Result<(), TestCaseError> {
    let schema = prop_model();
    let mut draft = Draft::new(cases, use_raw);
    let expect = draft.apply(cases, use_raw, mutation);
    let request = draft.request();
    // Zero-element inputs travel typed as present-but-empty contents and are accepted
    // (`zero_element_tensor_is_accepted_with_empty_typed_contents`): no exception here.
    let result = validate(&schema, &request);
    match &result {
        Ok(validated) => check_accepted(&schema, &request, validated)?,
        Err(WorkerError::InvalidRequest(message)) => check_rejected(&request, message)?,
        Err(other) => prop_assert!(false, "unexpected error kind: {:?}", other),
    }
    match (expect, result) {
        (Expect::Accepted, Ok(validated)) => {
            for case in cases {
                let input = validated
                    .inputs
                    .iter()
                    .find(|i| i.name == case.name)
                    .ok_or_else(|| TestCaseError::fail("input missing"))?;
                prop_assert_eq!(&input.shape, &case.shape);
                prop_assert_eq!(&input.data, &case.expected());
            }
        }
        (Expect::Accepted, Err(error)) => prop_assert!(false, "rejected: {}", error),
        (Expect::Rejected(needle), Err(WorkerError::InvalidRequest(message))) => {
            prop_assert!(
                message.contains(&needle),
                "{:?} lacks {:?}",
                message,
                needle
            );
        }
        (Expect::Rejected(needle), other) => {
            prop_assert!(
                false,
                "expected rejection with {:?}, got {:?}",
                needle,
                other
            );
        }
        (Expect::Either, _) => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_requests_never_panic_and_accepted_ones_fit(
        request in prop_oneof![arb_request(), near_valid_request()],
    ) {
        check_arbitrary(&request)?;
    }

    #[test]
    fn valid_requests_are_accepted_and_mutated_ones_keep_the_promises(
        cases in valid_cases(),
        use_raw in any::<bool>(),
        mutation in arb_mutation(),
    ) {
        check_mutation(&cases, use_raw, &mutation)?;
    }
}
