//! The gateway's `ModelInfer` client to workers (`aviary_gateway::infer_client`)
//! against a real worker server on 127.0.0.1:0: it answers as tonic's client does,
//! passes the worker's statuses through, and maps transport failures and deadlines.
mod support;

use std::time::{Duration, Instant};

use aviary::{pb::inference::ModelInferRequest, server::DEFAULT_MAX_MESSAGE_BYTES};
use aviary_gateway::infer_client::InferClient;
use tokio::net::TcpListener;
use tonic::Code;

const ROW: [f32; 4] = [5.1, 3.5, 1.4, 0.2];

fn client_for(addr: &str) -> InferClient {
    InferClient::new(
        &format!("http://{addr}"),
        DEFAULT_MAX_MESSAGE_BYTES,
        aviary::client::Authorization::default(),
        None,
    )
    .expect("a valid endpoint")
}

/// What tonic's own client gets for `request` from the same worker.
async fn through_tonic(
    worker: &support::Running,
    request: ModelInferRequest,
) -> Result<aviary::pb::inference::ModelInferResponse, tonic::Status> {
    worker
        .client()
        .await
        .model_infer(request)
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn answers_exactly_what_tonic_s_client_gets_small_and_large_requests() {
    let worker = support::start_worker(&support::test_models()).await;
    let client = client_for(&worker.addr.to_string());
    // 1 row is copied into one buffer; 4096 rows (64 KiB) go out without a copy.
    for rows in [1, 4096] {
        let request = support::demo_request(&vec![ROW; rows], "1");
        let ours = client
            .infer(&request, None)
            .await
            .expect("the worker answers");
        let tonic = through_tonic(&worker, request)
            .await
            .expect("the worker answers");
        assert_eq!(
            ours.outputs, tonic.outputs,
            "{rows} rows: same output tensors"
        );
        assert_eq!(
            ours.raw_output_contents, tonic.raw_output_contents,
            "{rows} rows: same output bytes"
        );
        assert_eq!(ours.model_version, "1");
    }
    worker.stop().await.expect("worker stops");
}

#[tokio::test]
async fn the_worker_s_status_passes_through_unchanged() {
    let worker = support::start_worker(&support::test_models()).await;
    let client = client_for(&worker.addr.to_string());
    let mut unknown = support::demo_request(&[ROW], "1");
    unknown.model_name = "no-such-model".into();
    let ours = client
        .infer(&unknown, None)
        .await
        .expect_err("unknown model");
    let tonic = through_tonic(&worker, unknown)
        .await
        .expect_err("unknown model");
    assert_eq!(ours.code(), tonic.code());
    assert_eq!(ours.message(), tonic.message());
    assert!(
        ours.message().contains("no-such-model"),
        "{}",
        ours.message()
    );
    worker.stop().await.expect("worker stops");
}

#[tokio::test]
async fn a_worker_that_is_not_there_is_unavailable() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let client = client_for(&addr.to_string());
    let status = client
        .infer(&support::demo_request(&[ROW], "1"), None)
        .await
        .expect_err("nothing listens");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(&addr.to_string()),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_worker_that_never_answers_costs_the_deadline_and_no_more() {
    // Accepts connections and reads nothing: a hung worker.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let client = client_for(&addr.to_string());
    let deadline = Instant::now() + Duration::from_millis(200);
    let status = client
        .infer(&support::demo_request(&[ROW], "1"), Some(deadline))
        .await
        .expect_err("no answer");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        Instant::now() >= deadline,
        "not given up before the deadline"
    );
    held.abort();
}

#[tokio::test]
async fn a_restarted_worker_is_called_again_on_a_new_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let worker = support::start_worker_on(&support::test_models(), listener).await;
    let client = client_for(&addr.to_string());
    let request = support::demo_request(&[ROW], "1");
    client
        .infer(&request, None)
        .await
        .expect("first worker answers");
    worker.stop().await.expect("worker stops");
    let status = client
        .infer(&request, None)
        .await
        .expect_err("worker is gone");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // The same address again (tokio's listeners reuse addresses).
    let listener = TcpListener::bind(addr).await.expect("rebind the same port");
    let worker = support::start_worker_on(&support::test_models(), listener).await;
    client
        .infer(&request, None)
        .await
        .expect("the restarted worker answers");
    worker.stop().await.expect("worker stops");
}
