//! Quick check that the harness and ONNX Runtime work.
mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_gateway_answers_pinned_versions() {
    let gateway = common::start_embedded("[routes.demo]\nversions = [ { version = \"1\", weight = 1 }, { version = \"2\", weight = 1 } ]\n").await;
    let mut client = gateway.client().await;
    let one = client
        .model_infer(common::demo_request(&[[5.1, 3.5, 1.4, 0.2]], "1"))
        .await
        .expect("v1")
        .into_inner();
    let two = client
        .model_infer(common::demo_request(&[[5.1, 3.5, 1.4, 0.2]], "2"))
        .await
        .expect("v2")
        .into_inner();
    assert_eq!(one.model_version, "1");
    assert_eq!(two.model_version, "2");
    assert_ne!(
        common::output::<f32>(&one, "probabilities"),
        common::output::<f32>(&two, "probabilities")
    );
    gateway.stop().await.expect("clean stop");
}
