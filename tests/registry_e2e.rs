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
    assert_eq!(
        rollout.code(),
        tonic::Code::FailedPrecondition,
        "{rollout:?}"
    );
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
    // Version 1 leaves the route altogether: archived all the same.
    set(&[("2", 100)]).await.expect("all of it");
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

/// The audit trail's lines once every one of `expected` is there (its writer runs on
/// its own thread), or after ten seconds.
async fn audit_trail(dir: &std::path::Path, expected: &[&str]) -> String {
    let file = dir.join("audit.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let trail = std::fs::read_to_string(&file).unwrap_or_default();
        if expected.iter().all(|e| trail.contains(e)) || std::time::Instant::now() > deadline {
            return trail;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_with_no_approved_version_serves_pins_only_until_one_is_approved() {
    use aviary::pb::admin::ApproveRequest;
    let dir = tempfile::tempdir().expect("temp dir");
    let models = support::copy_test_models(dir.path());
    // No route and no stages: every version of every model is a candidate.
    let config = format!(
        "[repository]\npath = \"{}\"\n\n[registry]\n",
        models.display()
    );
    let gateway = support::start_gateway(&config, aviary_gateway::Mode::Embedded)
        .await
        .expect("starts: candidates wait, they do not stop the gateway");
    let mut client = gateway.client().await;
    let row = [[1.0, 2.0, 3.0, 4.0]];

    let refused = support::infer_error(&mut client, support::demo_request(&row, "")).await;
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("pinned requests only")
            && refused.message().contains("aviary ctl approve demo"),
        "{}",
        refused.message()
    );
    let pinned = support::infer(&mut client, support::demo_request(&row, "1")).await;
    assert_eq!(pinned.model_version, "1", "a candidate can be pinned");

    // Approving version 1 gives it the implicit route: all unpinned traffic, so it is
    // production at once.
    let admin = gateway.admin().await;
    admin
        .models()
        .approve(ApproveRequest {
            model: "demo".into(),
            version: "1".into(),
            note: String::new(),
        })
        .await
        .expect("approve");
    let unpinned = support::infer(&mut client, support::demo_request(&row, "")).await;
    assert_eq!(unpinned.model_version, "1");
    let stage = |versions: &[aviary::pb::admin::ModelVersionInfo], version: &str| {
        versions
            .iter()
            .find(|v| v.version == version)
            .and_then(|v| v.stage.as_ref())
            .map(|s| s.stage.clone())
            .unwrap_or_default()
    };
    let versions = admin.list_models("demo").await;
    assert_eq!(stage(&versions, "1"), "production");
    assert_eq!(stage(&versions, "2"), "candidate", "the newer one waits");
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_start_adopts_what_the_file_routes_and_later_starts_judge_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let models = support::copy_test_models(dir.path());
    let state = dir.path().join("registry.json");
    let audit = dir.path().join("audit");
    let config = |weights: &str| {
        format!(
            "[repository]\npath = \"{}\"\n\n[registry]\nstate_file = \"{}\"\n\n\
             [audit]\ndir = \"{}\"\n\n[routes.demo]\nversions = [ {weights} ]\n",
            models.display(),
            state.display(),
            audit.display()
        )
    };
    // Turning [registry] on under a running deployment: what the file routes is
    // approved by config-file, recorded.
    let gateway = support::start_gateway(
        &config("{ version = \"1\", weight = 100 }, { version = \"2\", weight = 0 }"),
        aviary_gateway::Mode::Embedded,
    )
    .await
    .expect("the first start adopts version 1");
    let versions = gateway.admin().await.list_models("demo").await;
    let one = versions
        .iter()
        .find(|v| v.version == "1")
        .and_then(|v| v.stage.clone())
        .expect("version 1 has a stage");
    assert_eq!(
        (one.stage.as_str(), one.by.as_str()),
        ("approved", "config-file")
    );
    let trail = audit_trail(&audit, &["\"actor\":\"config-file\""]).await;
    assert!(
        trail.contains("\"action\":\"approved\"") && trail.contains("\"actor\":\"config-file\""),
        "{trail}"
    );
    gateway.stop().await.expect("clean stop");

    // Now the registry knows the model: a file giving the candidate half is refused.
    let refused = support::rejected_at_start(
        &config("{ version = \"1\", weight = 50 }, { version = \"2\", weight = 50 }"),
        aviary_gateway::Mode::Embedded,
    )
    .await;
    assert!(
        refused.contains("version 2 is at stage candidate")
            && refused.contains("canary_cap_percent"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_model_out_of_rule_blocks_neither_another_model_nor_its_own_rollback() {
    use aviary::pb::admin::SetRouteRequest;
    let dir = tempfile::tempdir().expect("temp dir");
    let models = support::copy_test_models(dir.path());
    for version in ["1", "2"] {
        prepend(
            &models.join(format!("demo/{version}/model.toml")),
            "stage = \"approved\"",
        );
    }
    std::fs::write(models.join("fixed/1/model.toml"), "stage = \"approved\"\n").expect("card");
    let config = format!(
        "[repository]\npath = \"{}\"\nwatch = true\nwatch_interval_ms = 50\n\n[registry]\n\n\
         [routes.demo]\nversions = [ {{ version = \"1\", weight = 50 }}, {{ version = \"2\", weight = 50 }} ]\n",
        models.display()
    );
    let gateway = support::start_gateway(&config, aviary_gateway::Mode::Embedded)
        .await
        .expect("starts");
    let admin = gateway.admin().await;
    // Version 2's card is republished as a candidate: demo's route in force is now
    // out of rule.
    let card = models.join("demo/2/model.toml");
    let text = std::fs::read_to_string(&card).expect("card");
    let staged = models.join("demo/2/.model.toml.new");
    std::fs::write(
        &staged,
        text.replace("stage = \"approved\"", "stage = \"candidate\""),
    )
    .expect("write");
    std::fs::rename(&staged, &card).expect("publish the card");
    let demoted =
        support::eventually(std::time::Duration::from_secs(30), || async {
            admin.list_models("demo").await.iter().any(|v| {
                v.version == "2" && v.stage.as_ref().is_some_and(|s| s.stage == "candidate")
            })
        })
        .await;
    assert!(demoted, "the reloaded card's stage is in force");

    let set = |model: &'static str, weights: &'static [(&'static str, u32)]| {
        let admin = &admin;
        async move {
            admin
                .routes()
                .set_route(SetRouteRequest {
                    route: Some(support::route(model, weights)),
                    expected_generation: None,
                })
                .await
        }
    };
    // Another model, judged alone, changes.
    set("fixed", &[("1", 100)]).await.expect("fixed is in rule");
    // demo's candidate cannot move to another share past the cap...
    let refused = set("demo", &[("1", 60), ("2", 40)])
        .await
        .expect_err("a candidate past the cap");
    assert!(
        refused
            .message()
            .contains("version 2 is at stage candidate"),
        "{}",
        refused.message()
    );
    // ...but taking its traffic away, a rollback, is allowed.
    set("demo", &[("1", 100), ("2", 0)])
        .await
        .expect("a rollback to the approved version");
    gateway.stop().await.expect("clean stop");
}
