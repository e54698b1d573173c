//! Conformance with what Triton and KServe clients expect of the inference port, seen
//! from a plain gRPC client: the codes of a client's own deadline.

mod support;

use aviary::pb::inference::ModelInferRequest;
use prost::Message;
use support::*;
use tonic::{Code, Status};

/// Sends `request` to `addr` over a bare HTTP/2 stream with `grpc-timeout: timeout`
/// and returns the status the server answers. No client-side timer runs (tonic's and
/// gRPC C-core's channels enforce `grpc-timeout` themselves), so this is the server's
/// own answer.
async fn server_status(addr: &str, request: &ModelInferRequest, timeout: &str) -> Status {
    let addr = addr.trim_start_matches("http://");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let head = http::Request::post(format!(
        "http://{addr}/inference.GRPCInferenceService/ModelInfer"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-timeout", timeout)
    .body(())
    .expect("request head");
    let (response, mut body) = client.send_request(head, false).expect("send");
    let message = request.encode_to_vec();
    let mut frame = vec![0];
    frame.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(&message);
    body.send_data(frame.into(), true).expect("send body");
    let (head, mut body) = response.await.expect("response").into_parts();
    if let Some(status) = Status::from_header_map(&head.headers) {
        return status;
    }
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body
        .trailers()
        .await
        .expect("trailers")
        .expect("a gRPC answer ends with trailers");
    Status::from_header_map(&trailers).expect("grpc-status")
}

/// Every code the server at `addr` answers to slow requests whose `grpc-timeout`
/// passes while they wait or run: 1 to 40 ms, all sent at once.
fn codes_of_expired_calls(addr: &str) -> Vec<(u64, Code, String)> {
    runtime().block_on(async {
        let calls: Vec<_> = (1..=40u64)
            .map(|ms| {
                let addr = addr.to_owned();
                tokio::spawn(async move {
                    let status = server_status(&addr, &slow_request(), &format!("{ms}m")).await;
                    (ms, status.code(), status.message().to_owned())
                })
            })
            .collect();
        let mut codes = Vec::new();
        for call in calls {
            codes.push(call.await.expect("call task"));
        }
        codes
    })
}

#[test]
fn a_client_deadline_that_passes_is_deadline_exceeded_never_cancelled() {
    let (_worker, worker) = start_worker_with(&repo_root().join("tests/slow-models"), 1);
    let gateway = Served::start(&slow_config(), &[]);
    for (server, addr) in [
        ("worker", worker.as_str()),
        ("gateway", gateway.addr.as_str()),
    ] {
        let codes = codes_of_expired_calls(addr);
        let wrong: Vec<_> = codes
            .iter()
            .filter(|(_, code, _)| *code != Code::DeadlineExceeded)
            .collect();
        assert!(
            wrong.is_empty(),
            "{server}: every expired call is DEADLINE_EXCEEDED (grpc-timeout ms, code, message): {wrong:?}"
        );
    }
    // A deadline long enough is served.
    let status = runtime().block_on(server_status(&gateway.addr, &slow_request(), "20S"));
    assert_eq!(status.code(), Code::Ok, "{status:?}");
}
