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

/// `text` added at the end of the card at `path` (after its tables: a table).
fn append(path: &std::path::Path, text: &str) {
    let card = std::fs::read_to_string(path).expect("card");
    std::fs::write(path, format!("{card}\n{text}\n")).expect("write card");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_takes_at_most_the_cap_until_approved_and_promotion_archives_the_last() {
    use aviary::pb::admin::{ApproveRequest, SetRouteRequest};
    let dir = tempfile::tempdir().expect("temp dir");
    let models = support::copy_test_models(dir.path());
    // Version 1 was published approved and in production; version 2 states no stage.
    prepend(&models.join("demo/1/model.toml"), "stage = \"production\"");
    append(
        &models.join("demo/1/model.toml"),
        "[approval]\nby = \"ml-lead\"\nat = 2026-11-30T12:00:00Z\nnote = \"shipped\"",
    );
    let state = dir.path().join("registry.json");
    let audit = dir.path().join("audit");
    let config = format!(
        "[repository]\npath = \"{}\"\n\n[registry]\ncanary_cap_percent = 10\nstate_file = \"{}\"\n\n\
         [audit]\ndir = \"{}\"\n\n[routes.demo]\nversions = [ {{ version = \"1\", weight = 100 }}, {{ version = \"2\", weight = 0 }} ]\n",
        models.display(),
        state.display(),
        audit.display()
    );
    let gateway = support::start_gateway(&config, aviary_gateway::Mode::Embedded)
        .await
        .expect("starts: the production version takes everything");
    let admin = gateway.admin().await;
    let set = |weights: &'static [(&'static str, u32)]| {
        let admin = &admin;
        async move {
            admin
                .routes()
                .set_route(SetRouteRequest {
                    route: Some(support::route("demo", weights)),
                    expected_generation: None,
                })
                .await
        }
    };

    // The candidate: up to the cap, not past it; the refusal names the rule.
    set(&[("1", 90), ("2", 10)]).await.expect("10 % is the cap");
    let refused = set(&[("1", 50), ("2", 50)])
        .await
        .expect_err("past the cap");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused
            .message()
            .contains("version 2 is at stage candidate")
            && refused.message().contains("canary_cap_percent"),
        "{}",
        refused.message()
    );
    // A rollout that would take it past the cap is refused at start, naming why.
    let rollout = admin
        .rollouts()
        .start_rollout(support::demo_plan(60_000))
        .await
        .expect_err("a plan past the cap");
    assert!(
        rollout.message().contains("not approved"),
        "{}",
        rollout.message()
    );

    // Approved, it may take any share; at all of it, it is production and 1 archived.
    let approved = admin
        .models()
        .approve(ApproveRequest {
            model: "demo".into(),
            version: "2".into(),
            note: "offline eval passed".into(),
        })
        .await
        .expect("approve")
        .into_inner();
    assert_eq!(
        approved.stage.as_ref().map(|s| s.stage.as_str()),
        Some("approved")
    );
    set(&[("1", 50), ("2", 50)]).await.expect("approved");
    set(&[("1", 0), ("2", 100)]).await.expect("all of it");
    let stages: std::collections::BTreeMap<String, String> = admin
        .list_models("demo")
        .await
        .into_iter()
        .map(|v| (v.version, v.stage.map(|s| s.stage).unwrap_or_default()))
        .collect();
    assert_eq!(stages["2"], "production", "{stages:?}");
    assert_eq!(stages["1"], "archived", "{stages:?}");
    // The archived version is not approved any more: back to the cap for it.
    let refused = set(&[("1", 50), ("2", 50)]).await.expect_err("archived");
    assert!(
        refused.message().contains("version 1 is at stage archived"),
        "{}",
        refused.message()
    );
    // Every change is in the audit trail (written by its own thread: read until there).
    let expected = [
        "/aviary.admin.v1.Models/Approve",
        "\"action\":\"approved\"",
        "\"action\":\"production\"",
        "\"action\":\"archived\"",
    ];
    let trail_file = audit.join("audit.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let trail = loop {
        let trail = std::fs::read_to_string(&trail_file).unwrap_or_default();
        if expected.iter().all(|e| trail.contains(e)) || std::time::Instant::now() > deadline {
            break trail;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    for expected in expected {
        assert!(
            trail.contains(expected),
            "{expected} in the audit trail:\n{trail}"
        );
    }
    gateway.stop().await.expect("clean stop");
    // The stages were saved.
    let saved = std::fs::read_to_string(&state).expect("state file");
    assert!(
        saved.contains("\"production\"") && saved.contains("\"archived\""),
        "{saved}"
    );
}
