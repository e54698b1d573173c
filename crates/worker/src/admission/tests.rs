//! Unit and property tests of the decoded-cost computation and the budgets.

use std::sync::{Arc, Barrier};

use aviary::{
    pb::inference::{
        InferTensorContents, ModelInferRequest, model_infer_request::InferInputTensor,
    },
    tensor::{Datatype, encode_bytes_elements, to_raw},
};
use bytes::Bytes;
use proptest::{collection::vec, prelude::*, sample::select};

use super::*;
use crate::{
    schema::{ModelSchema, TensorSpec},
    validate,
};

fn schema(datatype: Datatype) -> ModelSchema {
    ModelSchema {
        inputs: vec![TensorSpec {
            name: "x".into(),
            datatype,
            shape: vec![-1, -1],
        }],
        outputs: Vec::new(),
    }
}

fn raw_request(datatype: Datatype, shape: &[i64], raw: Vec<u8>) -> ModelInferRequest {
    ModelInferRequest {
        inputs: vec![InferInputTensor {
            name: "x".into(),
            datatype: datatype.as_str().into(),
            shape: shape.to_vec(),
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from(raw)],
        ..Default::default()
    }
}

/// An input `x` of `datatype` whose elements travel as typed `bytes_contents`.
fn typed_strings(datatype: Datatype, shape: &[i64], strings: &[&str]) -> ModelInferRequest {
    let mut request = raw_request(datatype, shape, Vec::new());
    request.raw_input_contents.clear();
    request.inputs[0].contents = Some(InferTensorContents {
        bytes_contents: strings.iter().collect(),
        ..Default::default()
    });
    request
}

fn limits(request: u64, inflight: u64) -> TensorLimits {
    TensorLimits {
        max_request_tensor_bytes: request,
        max_inflight_tensor_bytes: inflight,
    }
}

#[test]
fn fixed_size_types_cost_their_element_size() {
    assert_eq!(tensor_cost(Datatype::Fp32, 6, 0), Some(24));
    assert_eq!(tensor_cost(Datatype::Bool, 6, 0), Some(6));
    assert_eq!(tensor_cost(Datatype::Fp64, 6, 0), Some(48));
    assert_eq!(
        tensor_cost(Datatype::Bf16, 6, 99),
        Some(12),
        "payload is BYTES only"
    );
    assert_eq!(tensor_cost(Datatype::Int64, 0, 0), Some(0));
}

#[test]
fn bytes_elements_cost_their_overhead_and_three_copies_of_their_bytes() {
    assert_eq!(
        tensor_cost(Datatype::Bytes, 10, 0),
        Some(10 * BYTES_ELEMENT_OVERHEAD)
    );
    assert_eq!(
        tensor_cost(Datatype::Bytes, 2, 5),
        Some(2 * BYTES_ELEMENT_OVERHEAD + 15)
    );
    // The measured attack: 10 M empty strings, 40 MB on the wire, over 1 GiB decoded.
    let cost = tensor_cost(Datatype::Bytes, 10_000_000, 0).expect("fits");
    assert!(cost > 1 << 30, "{cost}");
}

#[test]
fn costs_past_u64_are_none_not_wrapped() {
    assert_eq!(tensor_cost(Datatype::Fp64, u64::MAX / 4, 0), None);
    assert_eq!(tensor_cost(Datatype::Bytes, u64::MAX / 64, 0), None);
    assert_eq!(tensor_cost(Datatype::Bytes, 1, u64::MAX / 2), None);
    assert_eq!(tensor_cost(Datatype::Uint8, u64::MAX, 0), Some(u64::MAX));
}

#[test]
fn shapes_whose_product_overflows_are_refused_not_wrapped() {
    // 2^32 × 2^32 is 2^64: one past u64::MAX, which wraps to 0 unchecked.
    for shape in [[1 << 32, 1 << 32], [i64::MAX, i64::MAX], [i64::MAX, 3]] {
        let request = raw_request(Datatype::Uint8, &shape, Vec::new());
        let error =
            validate::check(&schema(Datatype::Uint8), &request).expect_err("no such tensor fits");
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error}");
        assert!(error.to_string().contains("input \"x\""), "{error}");
    }
}

#[test]
fn a_checked_request_knows_its_decoded_cost() {
    let request = raw_request(Datatype::Fp32, &[2, 3], to_raw(&[0f32; 6]));
    let checked = validate::check(&schema(Datatype::Fp32), &request).expect("valid");
    assert_eq!(checked.cost(), Some(24));

    let raw = encode_bytes_elements(["", "ab", "cde"]);
    let request = raw_request(Datatype::Bytes, &[1, 3], raw);
    let checked = validate::check(&schema(Datatype::Bytes), &request).expect("valid");
    assert_eq!(checked.cost(), Some(3 * BYTES_ELEMENT_OVERHEAD + 3 * 5));

    let typed = typed_strings(Datatype::Bytes, &[1, 2], &["x", "yz"]);
    let checked = validate::check(&schema(Datatype::Bytes), &typed).expect("valid");
    assert_eq!(checked.cost(), Some(2 * BYTES_ELEMENT_OVERHEAD + 3 * 3));
}

#[test]
fn contents_of_the_wrong_kind_are_refused_by_the_check() {
    let request = typed_strings(Datatype::Fp32, &[1, 2], &["a", "b"]);
    let error = validate::check(&schema(Datatype::Fp32), &request).expect_err("wrong kind");
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    let message = error.to_string();
    for needle in [
        "input \"x\"",
        "contents.bytes_contents",
        "contents.fp32_contents",
    ] {
        assert!(message.contains(needle), "{needle} missing from {message}");
    }
}

#[test]
fn a_request_over_its_own_budget_is_refused_naming_the_limit() {
    let admission = Admission::new(limits(256 << 20, 1 << 30));
    let error = admission
        .admit(tensor_cost(Datatype::Bytes, 10_000_000, 0))
        .expect_err("over the per-request budget");
    assert_eq!(error.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        error.to_string(),
        "request needs 1.3 GiB of decoded tensors; the limit is max_request_tensor_bytes = 256 MiB"
    );
    assert_eq!(admission.held(), 0);

    let error = admission.admit(None).expect_err("past u64");
    assert!(
        error
            .to_string()
            .starts_with("request needs more than 16 EiB"),
        "{error}"
    );
}

#[test]
fn reservations_are_returned_when_they_drop() {
    let admission = Admission::new(limits(1000, 1000));
    let first = admission.admit(Some(600)).expect("fits");
    assert_eq!((first.bytes(), admission.held()), (600, 600));
    let error = admission.admit(Some(500)).expect_err("600 + 500 > 1000");
    assert_eq!(error.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        error.to_string(),
        "request needs 500 B of decoded tensors and requests in flight hold 600 B; \
         the limit is max_inflight_tensor_bytes = 1000 B (retry later)"
    );
    let free = admission.admit(Some(0)).expect("nothing to reserve");
    drop(first);
    assert_eq!(admission.held(), 0);
    let second = admission.admit(Some(1000)).expect("room again");
    assert_eq!(admission.held(), 1000);
    drop((second, free));
    assert_eq!(admission.held(), 0);
}

#[test]
fn concurrent_requests_beyond_the_process_budget_are_refused_while_earlier_ones_run() {
    let admission = Arc::new(Admission::new(limits(100, 300)));
    let threads = 8;
    // Every thread holds what it got until all of them have tried.
    let tried = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (admission, tried) = (Arc::clone(&admission), Arc::clone(&tried));
            std::thread::spawn(move || {
                let outcome = admission.admit(Some(100));
                tried.wait();
                outcome.map(|r| r.bytes()).map_err(|e| e.code())
            })
        })
        .collect();
    let outcomes: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let admitted = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(admitted, 3, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .filter_map(|o| o.err())
            .all(|code| code == tonic::Code::ResourceExhausted),
        "{outcomes:?}"
    );
    assert_eq!(admission.held(), 0, "every reservation went back");
}

#[test]
fn limits_must_be_positive_and_fit_together() {
    assert!(TensorLimits::default().problems().is_empty());
    let problems = limits(0, 0).problems();
    assert_eq!(
        problems,
        vec![
            "max_request_tensor_bytes: must be at least 1",
            "max_inflight_tensor_bytes: must be at least 1"
        ]
    );
    let problems = limits(2048, 1024).problems();
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].starts_with(
            "max_request_tensor_bytes: 2048 is above max_inflight_tensor_bytes (1024)"
        ),
        "{problems:?}"
    );
}

fn arb_datatype() -> impl Strategy<Value = Datatype> {
    select(Datatype::ALL.to_vec())
}

/// Dimensions from tiny to overflowing, negative included.
fn arb_shape() -> impl Strategy<Value = Vec<i64>> {
    let dim = prop_oneof![
        0i64..4,
        Just(1 << 32),
        Just(i64::MAX),
        Just(-1),
        any::<i64>(),
    ];
    vec(dim, 0..5)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_cost_never_panics_and_never_wraps(
        datatype in arb_datatype(),
        count in any::<u64>(),
        payload in any::<u64>(),
    ) {
        let cost = tensor_cost(datatype, count, payload);
        let exact = match datatype.element_size() {
            Some(size) => u128::from(count) * size as u128,
            None => u128::from(count) * u128::from(BYTES_ELEMENT_OVERHEAD)
                + u128::from(payload) * u128::from(BYTES_COPIES),
        };
        prop_assert_eq!(cost.map(u128::from), u64::try_from(exact).ok().map(u128::from));
    }

    #[test]
    fn the_check_and_admission_never_panic_on_any_shape(
        datatype in arb_datatype(),
        declared in arb_datatype(),
        shape in arb_shape(),
        raw in vec(any::<u8>(), 0..64),
        request_limit in 1u64..4096,
        extra in 0u64..4096,
    ) {
        let schema = ModelSchema {
            inputs: vec![TensorSpec {
                name: "x".into(),
                datatype,
                shape: vec![-1; shape.len()],
            }],
            outputs: Vec::new(),
        };
        let request = raw_request(declared, &shape, raw);
        let admission = Admission::new(limits(request_limit, request_limit + extra));
        if let Ok(checked) = validate::check(&schema, &request) {
            // What passed the check is addressable, so its cost is known.
            prop_assert!(checked.cost().is_some());
            match admission.admit(checked.cost()) {
                Ok(reservation) => {
                    prop_assert!(reservation.bytes() <= request_limit);
                    prop_assert_eq!(admission.held(), reservation.bytes());
                }
                Err(error) => prop_assert_eq!(error.code(), tonic::Code::ResourceExhausted),
            }
        }
        prop_assert_eq!(admission.held(), 0);
    }
}
