//! Hostile requests against a running `aviary serve`, sent as raw gRPC bodies where a
//! typed client could not build them: each gets its gRPC code, the process's memory
//! stays bounded, and the server answers a valid request afterwards. (Malformed but
//! well-formed requests — wrong shapes, overflowing element counts, negative
//! dimensions — are covered name by name in tests/gateway_e2e.rs.)

mod support;

use aviary::pb::inference::ModelInferRequest;
use bytes::{Buf, BufMut};
use prost::Message;
use support::*;
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
};

/// A codec that sends bytes as they are and returns the answer's bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Sends `body` as one ModelInfer message; the answer's code.
async fn send(channel: tonic::transport::Channel, body: Vec<u8>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
    grpc.ready().await.expect("the connection is up");
    let path = PathAndQuery::from_static("/inference.GRPCInferenceService/ModelInfer");
    match grpc.unary(tonic::Request::new(body), path, Raw).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// A protobuf field header.
fn tag(field: u32, wire_type: u32, out: &mut Vec<u8>) {
    prost::encoding::encode_varint(u64::from(field << 3 | wire_type), out);
}

/// A BYTES input of `elements` empty strings, typed (`bytes_contents`): millions of
/// tiny elements, each its own protobuf field.
fn many_tiny_bytes(elements: usize) -> Vec<u8> {
    let mut request = ModelInferRequest {
        model_name: "demo".into(),
        ..Default::default()
    }
    .encode_to_vec();
    // inputs (field 5): name "input", datatype "BYTES", shape [1, elements], contents.
    let mut contents = Vec::with_capacity(elements * 2);
    for _ in 0..elements {
        tag(8, 2, &mut contents); // bytes_contents
        contents.push(0);
    }
    let mut input = Vec::new();
    tag(1, 2, &mut input);
    prost::encoding::encode_varint(5, &mut input);
    input.extend_from_slice(b"input");
    tag(2, 2, &mut input);
    prost::encoding::encode_varint(5, &mut input);
    input.extend_from_slice(b"BYTES");
    let mut shape = Vec::new();
    prost::encoding::encode_varint(1, &mut shape);
    prost::encoding::encode_varint(elements as u64, &mut shape);
    tag(3, 2, &mut input);
    prost::encoding::encode_varint(shape.len() as u64, &mut input);
    input.extend_from_slice(&shape);
    tag(5, 2, &mut input);
    prost::encoding::encode_varint(contents.len() as u64, &mut input);
    input.extend_from_slice(&contents);
    tag(5, 2, &mut request);
    prost::encoding::encode_varint(input.len() as u64, &mut request);
    request.extend_from_slice(&input);
    request
}

/// Groups nested `depth` deep (a start-group tag per level, never closed).
fn nested_groups(depth: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(depth * 2);
    for _ in 0..depth {
        tag(15, 3, &mut body);
    }
    body
}

/// A valid demo request with an unknown field (number 99) after its own fields.
fn with_unknown_field() -> Vec<u8> {
    let mut body = demo_request().encode_to_vec();
    tag(99, 2, &mut body);
    prost::encoding::encode_varint(3, &mut body);
    body.extend_from_slice(b"new");
    body
}

#[test]
fn hostile_requests_get_their_codes_memory_stays_bounded_and_the_server_lives() {
    let mut served = Served::demo();
    let metrics = served.metrics_addr();
    let rss = || {
        parse_samples(&scrape(metrics).2)
            .get("process_resident_memory_bytes")
            .copied()
            .expect("rss")
    };
    let before = rss();
    let mut nul = demo_request();
    nul.model_name = "de\0mo".into();
    let max = aviary::server::DEFAULT_MAX_MESSAGE_BYTES;
    let cases: Vec<(&str, Vec<u8>, Code)> = vec![
        // One byte over the message limit: refused by its length, never buffered.
        ("64 MiB + 1", vec![0; max + 1], Code::ResourceExhausted),
        (
            "4 million empty BYTES elements",
            many_tiny_bytes(4_000_000),
            Code::InvalidArgument,
        ),
        ("NUL in the model name", nul.encode_to_vec(), Code::NotFound),
        (
            "random bytes",
            (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(),
            Code::InvalidArgument,
        ),
        (
            "groups nested 100 000 deep",
            nested_groups(100_000),
            Code::InvalidArgument,
        ),
        // Unknown fields are skipped, as protobuf requires (newer clients).
        ("an unknown field", with_unknown_field(), Code::Ok),
    ];
    let runtime = runtime();
    for (what, body, expected) in cases {
        let code = runtime.block_on(async { send(connect(&served.addr).await, body).await });
        assert_eq!(code, expected, "{what}");
        assert!(
            served.server.exited().is_none(),
            "the server is alive after {what}"
        );
    }
    // Bounded: nothing of the hostile bodies is kept (64 MiB was never buffered whole).
    let grown = rss() - before;
    assert!(
        grown < 256.0 * 1024.0 * 1024.0,
        "resident memory grew {:.0} MiB",
        grown / 1024.0 / 1024.0
    );
    // And it serves.
    assert_eq!(
        infer_versions(&served.addr, None, 20).values().sum::<u64>(),
        20
    );
}
