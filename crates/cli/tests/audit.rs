//! The audit trail through the binary: a weight change and rollout decisions are
//! recorded with who made them and the state before and after; with prediction audit
//! on, every prediction is recorded with the version and the model file that answered;
//! a sticky key is written only as its pseudonym, never in the clear, anywhere on disk
//! or in the process's output. Workers and controllers keep trails of their own.

mod support;

use std::{collections::BTreeMap, path::Path, time::Duration};

use serde_json::Value;
use support::*;
use tonic::Request;

const OPS_KEY: &str = "ops-key-5d1e";
const APP_KEY: &str = "app-key-c0a7";
/// A sticky key that must never be written in the clear.
const USER: &str = "alice-7781-secret";
/// Predictions sent in each round.
const PREDICTIONS: usize = 20;

/// The records `ctl audit query ARGS --json` prints.
fn query(served: &Served, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--token", OPS_KEY, "audit", "query", "--json"];
    all.extend_from_slice(args);
    let output = served.ctl(&all).ok();
    output
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect()
}

/// Sends `PREDICTIONS` demo requests with the app key, ids `{prefix}-{i}`, with the
/// sticky key when `sticky`; the version that answered each, by id.
fn predict(addr: &str, prefix: &str, sticky: bool) -> BTreeMap<String, String> {
    runtime().block_on(async {
        let mut client = client(connect(addr).await);
        let mut answered = BTreeMap::new();
        for i in 0..PREDICTIONS {
            let mut request = demo_request();
            request.id = format!("{prefix}-{i}");
            let mut request = Request::new(request);
            let metadata = request.metadata_mut();
            metadata.insert(
                "authorization",
                format!("Bearer {APP_KEY}").parse().expect("ascii"),
            );
            if sticky {
                metadata.insert("x-user-id", USER.parse().expect("ascii"));
            }
            let response = client
                .model_infer(request)
                .await
                .expect("answered")
                .into_inner();
            answered.insert(format!("{prefix}-{i}"), response.model_version);
        }
        answered
    })
}

/// Every file under `dir`, read as bytes.
fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("lists").flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            found.push((path.display().to_string(), bytes));
        }
    }
    found
}

#[test]
fn changes_and_predictions_are_recorded_with_who_and_what_and_no_key_in_the_clear() {
    let keys_dir = tempfile::tempdir().expect("temp dir");
    let keys = keys_dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        key_entry("ops", OPS_KEY, r#"roles = ["admin"]"#)
            + &key_entry("app", APP_KEY, "roles = [\"infer\"]\nmodels = [\"demo\"]"),
    )
    .expect("write keys");
    // The demo route ends the demo config: the sticky key goes into it.
    let config = format!(
        "[auth]\nkeys_file = \"{}\"\n\n[audit]\ndir = \"audit\"\npredictions = 1.0\n\n\
         [rollouts]\nevaluate_interval_ms = 100\n\n{}sticky = {{ header = \"x-user-id\" }}\n",
        keys.display(),
        demo_config()
    );
    let mut served = Served::start(&config, &[]);

    // A weight change by ops, and an unload refused to app.
    served
        .ctl(&["--token", OPS_KEY, "set-weights", "demo", "1=50", "2=50"])
        .ok();
    served
        .ctl(&["--token", APP_KEY, "unload", "demo", "1"])
        .failed();
    let routes = query(&served, &["--kind", "route", "--model", "demo"]);
    let change = routes
        .iter()
        .find(|r| r["actor"] == "key:ops")
        .unwrap_or_else(|| panic!("ops's route change in {routes:#?}"));
    assert_eq!(change["before"], serde_json::json!({"1": 90, "2": 10}));
    assert_eq!(change["after"], serde_json::json!({"1": 50, "2": 50}));
    assert!(change["generation"].as_u64().is_some(), "{change}");
    let calls = query(&served, &["--kind", "call"]);
    let set_route = "/aviary.admin.v1.Routes/SetRoute";
    assert!(
        calls
            .iter()
            .any(|c| c["action"] == set_route && c["actor"] == "key:ops" && c["status"] == "OK"),
        "ops's SetRoute in {calls:#?}"
    );
    assert!(
        calls
            .iter()
            .any(|c| c["action"] == "/aviary.admin.v1.Models/UnloadVersion"
                && c["status"] == "PERMISSION_DENIED"
                && c["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("key \"app\""))),
        "app's refused unload in {calls:#?}"
    );

    // A rollout: started by ops, then its driver decides.
    let mut start = vec!["--token", OPS_KEY];
    start.extend(DEMO_ROLLOUT);
    start.extend(["--step-duration", "0", "--step-requests", "1"]);
    served.ctl(&start).ok();
    // Unpinned traffic without a sticky key: about half of it is the canary's evidence.
    let mut answered = predict(&served.addr, "anonymous", false);
    let decided = eventually(COMMAND_DEADLINE, || {
        query(&served, &["--kind", "rollout", "--actor", "rollout-driver"])
            .iter()
            .any(|r| r["action"] == "decision")
    });
    assert!(decided, "the driver's decision is recorded");
    let rollouts = query(&served, &["--kind", "rollout", "--model", "demo"]);
    let start = rollouts
        .iter()
        .find(|r| r["action"] == "start")
        .unwrap_or_else(|| panic!("the start in {rollouts:#?}"));
    assert_eq!(start["actor"], "key:ops");
    assert_eq!(start["version"], "2");
    let decision = rollouts
        .iter()
        .find(|r| r["action"] == "decision")
        .expect("the decision");
    assert_ne!(decision["before"], decision["after"], "{decision}");
    assert!(
        decision["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{decision}"
    );

    // Predictions with a sticky key: one record each, as every other prediction.
    answered.extend(predict(&served.addr, "user", true));
    let fingerprints: BTreeMap<String, String> = runtime().block_on(async {
        let mut client = client(connect(&served.addr).await);
        let mut fingerprints = BTreeMap::new();
        for version in ["1", "2"] {
            let mut request = Request::new(aviary::pb::inference::ModelConfigRequest {
                name: "demo".into(),
                version: version.into(),
            });
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {OPS_KEY}").parse().expect("ascii"),
            );
            let config = client
                .model_config(request)
                .await
                .expect("config")
                .into_inner();
            let parameter = config.config.expect("a config").parameters["aviary_model_fingerprint"]
                .string_value
                .clone();
            fingerprints.insert(version.to_owned(), parameter);
        }
        fingerprints
    });
    let predictions = query(
        &served,
        &["--kind", "prediction", "--model", "demo", "--limit", "1000"],
    );
    assert_eq!(predictions.len(), 2 * PREDICTIONS, "{predictions:#?}");
    let subject = predictions
        .iter()
        .find_map(|p| p["subject"].as_str())
        .expect("a pseudonym")
        .to_owned();
    for record in &predictions {
        let id = record["request_id"].as_str().expect("the request's id");
        let version = record["version"].as_str().expect("a version");
        assert_eq!(Some(&version.to_owned()), answered.get(id), "{record}");
        assert_eq!(
            record["fingerprint"].as_str(),
            fingerprints.get(version).map(String::as_str),
            "{record}"
        );
        assert_eq!(record["actor"], "key:app");
        assert_eq!(record["status"], "OK");
        match id.starts_with("user-") {
            true => assert_eq!(
                record["subject"],
                subject.as_str(),
                "one user, one pseudonym"
            ),
            false => assert!(
                record.get("subject").is_none(),
                "no sticky key, no subject: {record}"
            ),
        }
        assert!(
            record["inputs_hash"]
                .as_str()
                .is_some_and(|h| h.len() == 32),
            "{record}"
        );
        assert!(record["latency_us"].as_u64().is_some(), "{record}");
    }
    assert!(
        subject.starts_with("h:") && !subject.contains("alice"),
        "{subject}"
    );

    // The metrics count what was written.
    let (_, _, body) = scrape(served.metrics_addr());
    let samples = parse_samples(&body);
    let written = samples
        .get("aviary_audit_records_total{kind=\"prediction\",outcome=\"written\"}")
        .copied();
    assert!(written >= Some(2.0 * PREDICTIONS as f64), "{written:?}");

    // The sticky key is nowhere on disk, nor in what the process printed.
    sigterm(&served.server);
    served.server.wait_exit(Duration::from_secs(30));
    let output = served.server.take_stdout() + &served.server.take_stderr();
    assert!(!output.contains(USER), "the process printed the sticky key");
    let files = files_under(served.dir.path());
    assert!(
        files.iter().any(|(name, _)| name.ends_with("audit.jsonl")),
        "the trail is on disk: {:?}",
        files.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    for (name, bytes) in files {
        assert!(
            !bytes.windows(USER.len()).any(|w| w == USER.as_bytes()),
            "{name} holds the sticky key in the clear"
        );
    }
}

#[test]
fn predictions_carry_their_inputs_and_outputs_within_the_size_cap() {
    let records = |max_payload_bytes: usize| {
        let config = format!(
            "[audit]\ndir = \"audit\"\npredictions = 1.0\npayloads = true\n\
             max_payload_bytes = {max_payload_bytes}\n\n{}",
            demo_config()
        );
        let served = Served::start(&config, &[]);
        run(
            &[
                "infer",
                "--addr",
                &served.addr,
                "--model",
                "demo",
                "-i",
                ROW,
            ],
            &[],
        )
        .ok();
        let output = served
            .ctl(&["audit", "query", "--json", "--kind", "prediction"])
            .ok();
        output
            .stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str::<Value>(l).expect("a JSON record"))
            .collect::<Vec<_>>()
    };

    let roomy = records(16 * 1024);
    assert_eq!(roomy.len(), 1, "{roomy:#?}");
    let inputs = &roomy[0]["inputs"];
    assert_eq!(inputs[0]["name"], "input", "{inputs}");
    assert_eq!(inputs[0]["shape"], serde_json::json!([1, 4]), "{inputs}");
    let values: Vec<f64> = serde_json::from_value(inputs[0]["data"].clone()).expect("numbers");
    let sent = [5.1, 3.5, 1.4, 0.2];
    assert!(
        values.iter().zip(sent).all(|(v, s)| (v - s).abs() < 1e-6),
        "{values:?}"
    );
    let outputs = roomy[0]["outputs"].as_array().expect("the outputs");
    assert!(
        outputs
            .iter()
            .all(|o| o["data"].as_array().is_some_and(|d| !d.is_empty())),
        "{outputs:?}"
    );

    // Over the cap, each payload is left out and the record says so.
    let tight = records(16);
    assert_eq!(tight.len(), 1, "{tight:#?}");
    for field in ["inputs", "outputs"] {
        let note = tight[0][field].as_str().unwrap_or_default();
        assert!(
            note.starts_with("not recorded") && note.contains("max_payload_bytes (16)"),
            "{field}: {note}"
        );
    }
}

/// The records of the trail in `dir` once `wanted` of them are there (hang protection:
/// the writer flushes every few milliseconds).
fn records_in(dir: &Path, wanted: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let read = || -> Vec<Value> {
        std::fs::read_to_string(dir.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    eventually(Duration::from_secs(15), || wanted(&read()));
    read()
}

#[test]
fn workers_and_controllers_keep_a_trail_of_their_changes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (worker_trail, controller_trail) =
        (dir.path().join("worker"), dir.path().join("controller"));
    let models = repo_root().join("deploy/local/models");
    let trail = worker_trail.display().to_string();
    let (_worker, worker_addr) = start_worker_args(
        &models,
        1,
        &["--audit-dir", &trail, "--model-control", "explicit"],
    );
    runtime().block_on(async {
        client(connect(&worker_addr).await)
            .repository_model_load(aviary::pb::inference::RepositoryModelLoadRequest {
                model_name: "demo".into(),
                ..Default::default()
            })
            .await
            .expect("loaded");
    });
    let records = records_in(&worker_trail, |r| !r.is_empty());
    assert_eq!(records[0]["kind"], "call", "{records:#?}");
    assert_eq!(
        records[0]["action"],
        "/inference.GRPCInferenceService/RepositoryModelLoad"
    );
    assert_eq!(records[0]["status"], "OK");
    assert!(
        records[0]["actor"]
            .as_str()
            .is_some_and(|a| a.starts_with("peer:"))
    );

    let gateway = Served::start(
        &format!("[rollouts]\ncontrolled = true\n\n{}", demo_config()),
        &[],
    );
    let trail = controller_trail.display().to_string();
    let (_controller, admin) = start_controller_args(
        gateway.admin.trim_start_matches("http://"),
        &["--audit-dir", &trail],
    );
    let mut start = vec!["ctl", "--admin", admin.as_str()];
    start.extend(DEMO_ROLLOUT);
    run(&start, &[]).ok();
    // The call's record is written once it is answered, after the rollout's own.
    let records = records_in(&controller_trail, |r| {
        r.iter().any(|r| r["kind"] == "rollout") && r.iter().any(|r| r["kind"] == "call")
    });
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "call" && r["action"] == "/aviary.admin.v1.Rollouts/StartRollout"),
        "{records:#?}"
    );
    let rollout = records
        .iter()
        .find(|r| r["kind"] == "rollout")
        .expect("a rollout record");
    assert_eq!(rollout["model"], "demo", "{rollout}");
}

#[test]
fn a_gateway_without_a_trail_says_how_to_keep_one() {
    let served = Served::demo();
    let refused = served.ctl(&["audit", "tail"]).failed();
    assert!(refused.stderr.contains("[audit] dir"), "{refused:?}");
}
