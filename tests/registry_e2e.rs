//! Model cards as registry records: the semantic version, lineage and SHA-256 a card
//! states are served, and a model file that is not the one its card's SHA-256 names is
//! refused at load.
mod support;

use aviary::pb::inference::RepositoryIndexRequest;
use aviary_worker::registry::Sha256;

/// `line` put at the top of the card at `path` (before its tables).
fn prepend(path: &std::path::Path, line: &str) {
    let card = std::fs::read_to_string(path).expect("card");
    std::fs::write(path, format!("{line}\n{card}")).expect("write card");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cards_record_is_served_and_a_swapped_file_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let models = support::copy_test_models(dir.path());
    let v1 = std::fs::read(models.join("demo/1/model.onnx")).expect("v1");
    let v2 = std::fs::read(models.join("demo/2/model.onnx")).expect("v2");
    let (sha1, sha2) = (Sha256::of(&v1), Sha256::of(&v2));
    prepend(
        &models.join("demo/1/model.toml"),
        &format!("sha256 = \"{sha1}\""),
    );
    // Version 2's card names its own file, but version 1's bytes sit in its place.
    prepend(
        &models.join("demo/2/model.toml"),
        &format!("sha256 = \"{sha2}\""),
    );
    std::fs::write(models.join("demo/2/model.onnx"), &v1).expect("swap");

    // The repository is watched: a fixed card is picked up without a reload.
    let config = format!(
        "[repository]\npath = \"{}\"\nwatch = true\nwatch_interval_ms = 50\n\n\
         [routes.demo]\nversions = [ {{ version = \"1\", weight = 1 }} ]\n",
        models.display()
    );
    let gateway = support::start_gateway(&config, aviary_gateway::Mode::Embedded)
        .await
        .expect("version 1 serves; version 2 is refused, not the gateway");
    let mut client = gateway.client().await;

    let index = client
        .repository_index(RepositoryIndexRequest::default())
        .await
        .expect("index")
        .into_inner();
    let two = index
        .models
        .iter()
        .find(|m| m.name == "demo" && m.version == "2")
        .expect("version 2 is listed");
    assert_eq!(two.state, "UNAVAILABLE", "{two:?}");
    assert!(
        two.reason.contains(sha1.as_str()) && two.reason.contains("swapped"),
        "the reason names the file's SHA-256 and why: {}",
        two.reason
    );

    let config = support::model_config(&mut client, "demo", "1").await;
    let parameter = |name: &str| {
        config
            .parameters
            .get(name)
            .map(|p| p.string_value.clone())
            .unwrap_or_default()
    };
    assert_eq!(parameter("card.semver"), "1.0.0");
    assert_eq!(parameter("card.sha256"), sha1.as_str());
    assert_eq!(parameter("model.sha256"), sha1.as_str());
    assert_eq!(
        parameter("card.lineage.training_run"),
        "make_models.py:demo_v1"
    );
    let hyperparameters: serde_json::Value =
        serde_json::from_str(&parameter("card.lineage.hyperparameters")).expect("JSON");
    assert_eq!(hyperparameters["steps"], 300);

    // A card that now describes the file in place: the version loads, the model file
    // untouched (the card is part of the version's fingerprint).
    let card = models.join("demo/2/model.toml");
    let text = std::fs::read_to_string(&card).expect("card");
    let fixed = text.replace(sha2.as_str(), sha1.as_str());
    let staged = models.join("demo/2/.model.toml.new");
    std::fs::write(&staged, fixed).expect("write");
    std::fs::rename(&staged, &card).expect("publish the card");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let index = client
            .repository_index(RepositoryIndexRequest::default())
            .await
            .expect("index")
            .into_inner();
        let state = index
            .models
            .iter()
            .find(|m| m.name == "demo" && m.version == "2")
            .map(|m| m.state.clone())
            .unwrap_or_default();
        if state == "READY" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "version 2 loads once its card is fixed: {state}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    gateway.stop().await.expect("clean stop");
}
