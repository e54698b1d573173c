//! Memory under hostile load, as attackers and stampedes make it: real `aviary`
//! processes with their default limits, on 127.0.0.1 port 0. A worker refuses requests
//! whose decoded tensors would dwarf their wire size (BYTES elements, packed varints)
//! before it decodes them; a gateway refuses the excess of 512 clients on a slow
//! version at once while the requests it admits finish in the time its limits imply.
//! Each time the process's peak RSS (VmHWM) stays within a bound of its idle RSS.

mod support;

use std::time::{Duration, Instant};

use aviary::pb::inference::{
    ModelInferRequest, ModelMetadataRequest, model_infer_request::InferInputTensor,
};
use bytes::{Buf, BufMut, Bytes};
use support::*;
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

/// BYTES elements in the expansion requests: 4 wire bytes each (an empty element's
/// length prefix), so ~40 MB on the wire.
const ELEMENTS: usize = 10_000_000;

/// How far the worker's peak RSS may rise above its idle RSS over the whole test.
const HEADROOM_KIB: u64 = 300 * 1024;

/// A field of `/proc/PID/status`, in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// A `types` request whose `in_bytes` holds [`ELEMENTS`] empty strings in `raw` and
/// every other input is empty (the model needs all 14).
fn empty_strings_request(raw: &Bytes) -> ModelInferRequest {
    let names = [
        ("bool", "BOOL"),
        ("int8", "INT8"),
        ("int16", "INT16"),
        ("int32", "INT32"),
        ("int64", "INT64"),
        ("uint8", "UINT8"),
        ("uint16", "UINT16"),
        ("uint32", "UINT32"),
        ("uint64", "UINT64"),
        ("fp16", "FP16"),
        ("bf16", "BF16"),
        ("fp32", "FP32"),
        ("fp64", "FP64"),
        ("bytes", "BYTES"),
    ];
    let (inputs, raw_input_contents) = names
        .iter()
        .map(|(name, datatype)| {
            let bytes = *name == "bytes";
            let count = if bytes { ELEMENTS as i64 } else { 0 };
            let input = InferInputTensor {
                name: format!("in_{name}"),
                datatype: (*datatype).into(),
                shape: vec![count],
                ..Default::default()
            };
            (input, if bytes { raw.clone() } else { Bytes::new() })
        })
        .unzip();
    ModelInferRequest {
        model_name: "types".into(),
        inputs,
        raw_input_contents,
        ..Default::default()
    }
}

fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A length-delimited protobuf field.
fn field(tag: u64, payload: &[u8], out: &mut Vec<u8>) {
    varint(tag << 3 | 2, out);
    varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// The wire form of a `demo` request whose FP32 input carries `elements` one-byte
/// strings in `contents.bytes_contents` (3 wire bytes each), encoded by hand so the
/// test itself never holds them as `Vec<Vec<u8>>`.
fn typed_bytes_request(elements: usize) -> Bytes {
    let mut contents = Vec::with_capacity(elements * 3);
    for _ in 0..elements {
        field(8, b"x", &mut contents);
    }
    let header = InferInputTensor {
        name: "input".into(),
        datatype: "FP32".into(),
        shape: vec![(elements / 4) as i64, 4],
        ..Default::default()
    };
    let mut input = prost::Message::encode_to_vec(&header);
    field(5, &contents, &mut input);
    drop(contents);
    let request = ModelInferRequest {
        model_name: "demo".into(),
        ..Default::default()
    };
    let mut wire = prost::Message::encode_to_vec(&request);
    field(5, &input, &mut wire);
    wire.into()
}

/// INT64 zeros in the packed-varint request: one wire byte each, 8 once decoded, so
/// ~40 MB on the wire would be ~320 MB in memory, over the 256 MiB request budget.
const PACKED_ZEROS: usize = 40_000_000;

/// How far the worker's peak RSS may rise above its idle RSS while it refuses them:
/// the received message (~40 MB) and what tonic grows to receive it, not the ~320 MB
/// of decoded elements.
const PACKED_HEADROOM_KIB: u64 = 100 * 1024;

/// The wire form of a `types` request whose `in_int64` carries `elements` zeros in
/// `contents.int64_contents` (packed: one byte each) and every other input is empty,
/// encoded by hand so the test itself never holds them as `Vec<i64>`.
fn packed_int64_request(elements: usize) -> Bytes {
    let empty = |name: &str, datatype: &str| InferInputTensor {
        name: format!("in_{name}"),
        datatype: datatype.into(),
        shape: vec![0],
        ..Default::default()
    };
    let names = [
        ("bool", "BOOL"),
        ("int8", "INT8"),
        ("int16", "INT16"),
        ("int32", "INT32"),
        ("uint8", "UINT8"),
        ("uint16", "UINT16"),
        ("uint32", "UINT32"),
        ("uint64", "UINT64"),
        ("fp16", "FP16"),
        ("bf16", "BF16"),
        ("fp32", "FP32"),
        ("fp64", "FP64"),
        ("bytes", "BYTES"),
    ];
    let request = ModelInferRequest {
        model_name: "types".into(),
        inputs: names.iter().map(|(n, d)| empty(n, d)).collect(),
        ..Default::default()
    };
    let mut wire = prost::Message::encode_to_vec(&request);
    let header = InferInputTensor {
        shape: vec![elements as i64],
        ..empty("int64", "INT64")
    };
    let mut input = prost::Message::encode_to_vec(&header);
    let mut contents = Vec::with_capacity(elements + 8);
    field(3, &vec![0u8; elements], &mut contents);
    field(5, &contents, &mut input);
    drop(contents);
    field(5, &input, &mut wire);
    wire.into()
}

/// Sends already-encoded request bytes and takes the response bytes as they come.
#[derive(Debug, Default, Clone, Copy)]
struct PreEncoded;

impl Codec for PreEncoded {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = PreEncoded;
    type Decoder = PreEncoded;
    fn encoder(&mut self) -> PreEncoded {
        PreEncoded
    }
    fn decoder(&mut self) -> PreEncoded {
        PreEncoded
    }
}

impl Encoder for PreEncoded {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for PreEncoded {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// `ModelInfer` with a body encoded by hand.
async fn infer_encoded(channel: Channel, body: Bytes) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/inference.GRPCInferenceService/ModelInfer",
    );
    grpc.unary(tonic::Request::new(body), path, PreEncoded)
        .await
        .map(|_| ())
}

#[test]
fn expanding_requests_are_refused_before_they_are_decoded() {
    let (worker, addr) = start_worker(&repo_root().join("tests/models"));
    let pid = worker.pid();
    let runtime = runtime();
    let channel = runtime.block_on(connect(&addr));

    let metadata = runtime
        .block_on(
            client(channel.clone()).model_metadata(ModelMetadataRequest {
                name: "types".into(),
                version: String::new(),
            }),
        )
        .expect("types metadata")
        .into_inner();
    let in_bytes = metadata
        .inputs
        .iter()
        .find(|i| i.name == "in_bytes")
        .expect("types has in_bytes");
    assert_eq!(
        (in_bytes.datatype.as_str(), &in_bytes.shape[..]),
        ("BYTES", &[-1][..])
    );

    let idle = status_kib(pid, "VmRSS");
    eprintln!(
        "idle VmRSS {idle} KiB, VmHWM {} KiB",
        status_kib(pid, "VmHWM")
    );

    // One FP32 input with ~30 MB of one-byte strings in contents.bytes_contents.
    let body = typed_bytes_request(ELEMENTS);
    let typed = runtime
        .block_on(infer_encoded(channel.clone(), body))
        .err()
        .unwrap_or_else(|| Status::ok("answered"));
    let after_typed = status_kib(pid, "VmHWM");
    eprintln!(
        "after typed bytes: VmHWM {after_typed} KiB (+{} MiB)",
        (after_typed - idle) / 1024
    );
    eprintln!("  {:?}: {}", typed.code(), typed.message());

    // Four at once: each ~40 MB on the wire, ~1 GiB once decoded into strings.
    let raw = Bytes::from(vec![0u8; ELEMENTS * 4]);
    let statuses: Vec<Status> = runtime.block_on(async {
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let (channel, request) = (channel.clone(), empty_strings_request(&raw));
                tokio::spawn(async move { client(channel).model_infer(request).await })
            })
            .collect();
        let mut statuses = Vec::new();
        for call in calls {
            let outcome = call.await.expect("request task");
            statuses.push(outcome.err().unwrap_or_else(|| Status::ok("answered")));
        }
        statuses
    });
    drop(raw);
    let after_strings = status_kib(pid, "VmHWM");
    eprintln!(
        "after 4 x BYTES: VmHWM {after_strings} KiB (+{} MiB)",
        (after_strings - idle) / 1024
    );
    for status in &statuses {
        eprintln!("  {:?}: {}", status.code(), status.message());
    }

    for status in &statuses {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status
                .message()
                .contains("max_request_tensor_bytes = 256 MiB"),
            "{status:?}"
        );
    }
    assert_eq!(typed.code(), Code::InvalidArgument, "{typed:?}");
    assert!(
        typed.message().contains("input \"input\"")
            && typed.message().contains("bytes_contents")
            && typed.message().contains("fp32_contents"),
        "{typed:?}"
    );
    assert!(
        after_typed < idle + HEADROOM_KIB,
        "peak RSS {after_typed} KiB above idle {idle} KiB + {HEADROOM_KIB} KiB"
    );
}

/// The overload: [`OVERLOAD_CLIENTS`] clients, each sending demo requests pinned to
/// version 2 one after another for [`OVERLOAD_FOR`], on [`OVERLOAD_CONNECTIONS`]
/// connections. Version 2 waits [`SLOW_DELAY_MS`] before each request (an injected
/// delay) and takes [`MAX_IN_FLIGHT`] at once with [`MAX_QUEUE`] waiting.
const OVERLOAD_CLIENTS: usize = 512;
const OVERLOAD_CONNECTIONS: usize = 8;
const OVERLOAD_FOR: Duration = Duration::from_secs(4);
const SLOW_DELAY_MS: u64 = 50;
const MAX_IN_FLIGHT: u64 = 8;
const MAX_QUEUE: u64 = 32;

/// How far the gateway's peak RSS may rise above its idle RSS under the overload.
const OVERLOAD_HEADROOM_KIB: u64 = 100 * 1024;

/// What one overload client saw: latencies of the answered requests, and the
/// refusals' messages.
#[derive(Default)]
struct Outcomes {
    answered: Vec<Duration>,
    refused: u64,
    refusal: Option<String>,
    other: Vec<String>,
}

async fn overload_client(channel: Channel, until: Instant) -> Outcomes {
    let mut client = client(channel);
    let mut seen = Outcomes::default();
    while Instant::now() < until {
        let started = Instant::now();
        let request = ModelInferRequest {
            model_version: "2".into(),
            ..demo_request()
        };
        match client.model_infer(request).await {
            Ok(_) => seen.answered.push(started.elapsed()),
            Err(status) if status.code() == Code::ResourceExhausted => {
                seen.refused += 1;
                seen.refusal
                    .get_or_insert_with(|| status.message().to_owned());
            }
            Err(status) => seen
                .other
                .push(format!("{:?}: {}", status.code(), status.message())),
        }
    }
    seen
}

#[test]
fn a_slow_version_under_512_clients_refuses_the_excess_in_bounded_memory_and_time() {
    let slow = demo_config().replace(
        "{ version = \"2\", weight = 10 }",
        &format!("{{ version = \"2\", weight = 10, fault = {{ delay_ms = {SLOW_DELAY_MS} }} }}"),
    );
    let config = format!(
        "{slow}\n[routes.demo.limits]\nmax_in_flight = {MAX_IN_FLIGHT}\nmax_queue = {MAX_QUEUE}\n"
    );
    let served = Served::start(&config, &[]);
    let pid = served.server.pid();
    let runtime = runtime();
    let pinned = |version: &str| ModelInferRequest {
        model_version: version.into(),
        ..demo_request()
    };

    // Every path the overload takes has run once before the idle RSS is read.
    let channels: Vec<Channel> = runtime.block_on(async {
        let mut channels = Vec::new();
        for _ in 0..OVERLOAD_CONNECTIONS {
            channels.push(connect(&served.addr).await);
        }
        for version in ["1", "2"] {
            client(channels[0].clone())
                .model_infer(pinned(version))
                .await
                .unwrap_or_else(|s| panic!("version {version} answers: {s:?}"));
        }
        channels
    });
    let idle = status_kib(pid, "VmRSS");
    eprintln!(
        "idle VmRSS {idle} KiB, VmHWM {} KiB",
        status_kib(pid, "VmHWM")
    );

    let (outcomes, other_version) = runtime.block_on(async {
        let until = Instant::now() + OVERLOAD_FOR;
        let clients: Vec<_> = (0..OVERLOAD_CLIENTS)
            .map(|i| {
                let channel = channels[i % OVERLOAD_CONNECTIONS].clone();
                tokio::spawn(overload_client(channel, until))
            })
            .collect();
        // Meanwhile version 1, on a connection of its own, answers as always.
        tokio::time::sleep(OVERLOAD_FOR / 2).await;
        let started = Instant::now();
        let other_version = client(connect(&served.addr).await)
            .model_infer(pinned("1"))
            .await
            .map(|_| started.elapsed());
        let mut outcomes = Vec::new();
        for client in clients {
            // Hang protection only: every client stops at `until`.
            let seen = tokio::time::timeout(LOAD_LIMIT, client)
                .await
                .expect("an overload client hung")
                .expect("overload client task");
            outcomes.push(seen);
        }
        (outcomes, other_version)
    });
    let peak = status_kib(pid, "VmHWM");

    let mut answered: Vec<Duration> = outcomes.iter().flat_map(|o| o.answered.clone()).collect();
    answered.sort();
    let refused: u64 = outcomes.iter().map(|o| o.refused).sum();
    let other: Vec<&String> = outcomes.iter().flat_map(|o| &o.other).collect();
    let total = answered.len() as u64 + refused + other.len() as u64;
    let refused_share = refused as f64 / total as f64;
    let p99 = answered
        .get((answered.len() * 99).div_ceil(100).saturating_sub(1))
        .copied()
        .unwrap_or_default();
    // An admitted request waits for at most MAX_QUEUE / MAX_IN_FLIGHT rounds of the
    // delay, then takes one itself; ten times that leaves room for a loaded machine.
    let theoretical = Duration::from_millis((MAX_QUEUE / MAX_IN_FLIGHT + 1) * SLOW_DELAY_MS);
    let p99_bound = theoretical * 10;
    eprintln!(
        "{total} requests: {} answered, {refused} refused ({:.1}%), {} other; \
         answered p50 {:?} p99 {p99:?} max {:?} (bound {p99_bound:?}); version 1 during it: {other_version:?}",
        answered.len(),
        refused_share * 100.0,
        other.len(),
        answered
            .get(answered.len() / 2)
            .copied()
            .unwrap_or_default(),
        answered.last().copied().unwrap_or_default(),
    );
    eprintln!(
        "peak VmHWM {peak} KiB (+{} MiB over idle)",
        peak.saturating_sub(idle) / 1024
    );

    assert!(other.is_empty(), "only OK or RESOURCE_EXHAUSTED: {other:?}");
    let refusal = outcomes.iter().find_map(|o| o.refusal.clone());
    let limit = format!(
        "model \"demo\" version \"2\" is at its limit ({MAX_IN_FLIGHT} requests in flight and {MAX_QUEUE} waiting)"
    );
    assert!(
        refusal.as_deref().is_some_and(|m| m.contains(&limit)),
        "refusals name the limit: {refusal:?}"
    );
    assert!(
        refused_share > 0.5,
        "512 clients on 40 places: most requests are refused ({refused} of {total})"
    );
    assert!(
        answered.len() as u64 >= MAX_IN_FLIGHT + MAX_QUEUE,
        "the version keeps serving: {} answered",
        answered.len()
    );
    assert!(p99 <= p99_bound, "admitted p99 {p99:?} above {p99_bound:?}");
    assert!(
        other_version.is_ok(),
        "version 1 answers during the overload: {other_version:?}"
    );
    assert!(
        peak < idle + OVERLOAD_HEADROOM_KIB,
        "peak RSS {peak} KiB above idle {idle} KiB + {OVERLOAD_HEADROOM_KIB} KiB"
    );
}

#[test]
fn packed_varints_are_refused_before_they_expand() {
    let (worker, addr) = start_worker(&repo_root().join("tests/models"));
    let pid = worker.pid();
    let runtime = runtime();
    let channel = runtime.block_on(connect(&addr));
    let body = packed_int64_request(PACKED_ZEROS);
    let idle = status_kib(pid, "VmRSS");
    eprintln!(
        "idle VmRSS {idle} KiB, VmHWM {} KiB",
        status_kib(pid, "VmHWM")
    );
    let status = runtime
        .block_on(infer_encoded(channel, body))
        .err()
        .unwrap_or_else(|| Status::ok("answered"));
    let peak = status_kib(pid, "VmHWM");
    eprintln!(
        "after {PACKED_ZEROS} packed INT64 zeros: VmHWM {peak} KiB (+{} MiB)",
        peak.saturating_sub(idle) / 1024
    );
    eprintln!("  {:?}: {}", status.code(), status.message());

    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("int64_contents")
            && status
                .message()
                .contains("max_request_tensor_bytes = 256 MiB"),
        "{status:?}"
    );
    assert!(
        peak < idle + PACKED_HEADROOM_KIB,
        "peak RSS {peak} KiB above idle {idle} KiB + {PACKED_HEADROOM_KIB} KiB"
    );
}
