//! Quick check that the harness and ONNX Runtime work.
mod support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_gateway_answers_pinned_versions() {
    let gateway = support::start_embedded("[routes.demo]\nversions = [ { version = \"1\", weight = 1 }, { version = \"2\", weight = 1 } ]\n").await;
    let mut client = gateway.client().await;
    let one = client
        .model_infer(support::demo_request(&[[5.1, 3.5, 1.4, 0.2]], "1"))
        .await
        .expect("v1")
        .into_inner();
    let two = client
        .model_infer(support::demo_request(&[[5.1, 3.5, 1.4, 0.2]], "2"))
        .await
        .expect("v2")
        .into_inner();
    assert_eq!(one.model_version, "1");
    assert_eq!(two.model_version, "2");
    assert_ne!(
        support::output::<f32>(&one, "probabilities"),
        support::output::<f32>(&two, "probabilities")
    );
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_card_is_served_as_config_parameters() {
    let gateway = support::start_embedded("").await;
    let mut client = gateway.client().await;
    let config = support::model_config(&mut client, "demo", "1").await;
    let card_path = support::test_models().join("demo/1/model.toml");
    let card: toml::Value =
        toml::from_str(&std::fs::read_to_string(card_path).expect("card")).expect("toml");
    let owner = card["owner"].as_str().expect("demo card names an owner");
    assert_eq!(config.parameters["card.owner"].string_value, owner);
    let accuracy = card["metrics"]["heldout_accuracy"]
        .as_float()
        .expect("demo card has accuracy");
    let served: f64 = config.parameters["card.metrics.heldout_accuracy"]
        .string_value
        .parse()
        .expect("number");
    assert_eq!(served, accuracy);
    // The fixed test model has no card, so it has no card parameters.
    let fixed = support::model_config(&mut client, "fixed", "").await;
    assert!(fixed.parameters.keys().all(|k| !k.starts_with("card.")));
}
