//! Rollouts as Kubernetes users run them: a plan in the config file of a gateway that
//! watches that file (`aviary serve --config F`), a rollout resumed from the state file
//! after a restart, and config edits and `ctl set-weights` while a rollout holds the
//! model's weights. Real processes on 127.0.0.1 port 0, changed through `aviary ctl`.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

/// Upper bound for a rollout to finish (hang protection only).
const ROLLOUT_DEADLINE: Duration = Duration::from_secs(90);

/// `demo` on version 1 only, version 2 pinnable, and a rollout plan for version 2 with
/// steps of `{step_ms}` ms and 20 canary requests each; rollouts kept beside the file.
fn plan_config(step_ms: u64) -> String {
    let models = repo_root().join("deploy/local/models");
    format!(
        r#"
[repository]
path = "{models}"
instances = 2

[routes.demo]
versions = [ {{ version = "1", weight = 100 }}, {{ version = "2", weight = 0 }} ]

[rollouts]
evaluate_interval_ms = 100
state_file = "rollouts.json"

[rollouts.plans.demo]
canary = "2"
baseline = "1"
steps = [
  {{ weight = 20, min_duration_ms = {step_ms}, min_requests = 20 }},
  {{ weight = 100, min_duration_ms = {step_ms}, min_requests = 20 }},
]
gates = {{ max_error_rate_increase = 0.05 }}
"#,
        models = models.display()
    )
}

fn rollout(served: &Served) -> Value {
    served.ctl(&["rollout", "status", "demo", "--json"]).json()
}

fn config_status(served: &Served) -> Value {
    served.ctl(&["config-status", "--json"]).json()
}

/// The notes of the config status that name `routes.demo`.
fn demo_notes(served: &Served) -> Vec<String> {
    config_status(served)["notes"]
        .as_array()
        .map(|notes| {
            notes
                .iter()
                .filter_map(Value::as_str)
                .filter(|n| n.starts_with("routes.demo"))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Appends `text` to the config file and waits until the gateway has applied a newer
/// version of it than the one it had applied before.
fn edit_config(served: &Served, text: &str) {
    let before = config_status(served)["applied_at_ms"].as_u64().unwrap_or(0);
    let mut contents = std::fs::read_to_string(&served.config).expect("read config");
    contents.push_str(text);
    // Written whole and renamed over the file, as editors and ConfigMaps do.
    let tmp = served.config.with_extension("toml.tmp");
    std::fs::write(&tmp, contents).expect("write config");
    std::fs::rename(&tmp, &served.config).expect("replace config");
    assert!(
        eventually(CONFIG_DEADLINE, || {
            let status = config_status(served);
            status["applied_at_ms"].as_u64().unwrap_or(0) > before
                && status["errors"].as_array().is_some_and(Vec::is_empty)
        }),
        "the edit applied: {:#}",
        config_status(served)
    );
}

#[test]
fn a_plan_in_the_watched_config_file_runs_to_promotion() {
    let mut served = Served::start(&plan_config(1000), &[]);
    assert_eq!(
        config_status(&served)["path"].as_str(),
        served.config.to_str(),
        "the gateway watches its config file"
    );
    let traffic = Traffic::start(&[&served.addr]);

    // Within the first step the canary serves: the watcher's first pass over the file
    // must not put the file's weights (2 at 0) back.
    assert!(
        eventually(ROLLOUT_DEADLINE, || {
            let status = rollout(&served);
            status["step"] == 1
                && route_of(&served.routes(), "demo") == pairs(&[("2", 20), ("1", 80)])
                && status["canary_metrics"]["requests"].as_u64() >= Some(1)
        }),
        "the canary gets traffic in step 1: {:#} {:#}",
        rollout(&served),
        served.routes()
    );
    assert!(
        eventually(ROLLOUT_DEADLINE, || rollout(&served)["terminal"] == true),
        "the plan finishes: {:#}",
        rollout(&served)
    );
    let (answered, failures) = traffic.stop();

    let status = rollout(&served);
    assert_eq!(status["state"], "promoted", "{status:#}");
    let steps: Vec<u64> = status["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|d| d["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(steps, [1, 2, 0], "started, advanced, promoted: {status:#}");
    assert_eq!(
        route_of(&served.routes(), "demo"),
        pairs(&[("2", 100), ("1", 0)])
    );
    assert!(failures.is_empty(), "no request failed: {failures:?}");
    assert!(
        answered.get("2").copied().unwrap_or(0) >= 40,
        "{answered:?}"
    );
    assert!(
        demo_notes(&served).is_empty(),
        "a finished rollout holds nothing: {:#}",
        config_status(&served)
    );
    // /metrics shows the rollout's end.
    let samples = parse_samples(&scrape(served.metrics_addr()).2);
    let state = |state: &str| {
        samples
            .get(&format!(
                "aviary_rollout_state{{model=\"demo\",canary=\"2\",state=\"{state}\"}}"
            ))
            .copied()
    };
    assert_eq!(state("promoted"), Some(1.0), "{samples:?}");
    assert_eq!(state("progressing"), Some(0.0));
    assert_eq!(
        samples.get("aviary_rollouts_ended_total{outcome=\"promoted\"}"),
        Some(&1.0)
    );
    assert_eq!(
        samples.get("aviary_rollouts_ended_total{outcome=\"rolled back\"}"),
        Some(&0.0)
    );
    // Promoted: the former canary is the stable version, the old one has no part.
    assert_eq!(
        samples.get("aviary_version_role{model=\"demo\",version=\"2\",role=\"stable\"}"),
        Some(&1.0),
        "{samples:?}"
    );
    assert!(
        !samples
            .keys()
            .any(|k| k.starts_with("aviary_version_role{model=\"demo\",version=\"1\"")),
        "{samples:?}"
    );
}

#[test]
fn a_resumed_rollout_keeps_its_weights_with_the_watch_on() {
    // Steps of an hour: the rollout stays at step 1 for the whole test.
    let mut served = Served::start(&plan_config(3_600_000), &[]);
    assert!(
        eventually(CONFIG_DEADLINE, || route_of(&served.routes(), "demo")
            == pairs(&[("2", 20), ("1", 80)])),
        "{:#}",
        served.routes()
    );
    // While the rollout runs, /metrics says which version is its canary.
    let samples = parse_samples(&scrape(served.metrics_addr()).2);
    for (version, role) in [("2", "canary"), ("1", "stable")] {
        assert_eq!(
            samples.get(&format!(
                "aviary_version_role{{model=\"demo\",version=\"{version}\",role=\"{role}\"}}"
            )),
            Some(&1.0),
            "{samples:?}"
        );
    }
    served.restart();

    let status = rollout(&served);
    assert_eq!(
        (status["state"].as_str(), status["step"].as_u64()),
        (Some("progressing"), Some(1)),
        "resumed from the state file: {status:#}"
    );
    // A comment appended to the file is a change the watcher applies; once it has, the
    // watcher has read the file at least twice since the restart.
    edit_config(&served, "\n# touched\n");
    assert_eq!(
        route_of(&served.routes(), "demo"),
        pairs(&[("2", 20), ("1", 80)]),
        "the resumed rollout keeps its weights"
    );
    let traffic = Traffic::start(&[&served.addr]);
    assert!(
        eventually(
            CONFIG_DEADLINE,
            || rollout(&served)["canary_metrics"]["requests"].as_u64() >= Some(20)
        ),
        "the canary serves after the restart: {:#}",
        rollout(&served)
    );
    let (_, failures) = traffic.stop();
    assert!(failures.is_empty(), "no request failed: {failures:?}");
}

#[test]
fn a_running_rollout_holds_its_weights_against_edits_and_set_weights() {
    let served = Served::start(&plan_config(3_600_000), &[]);
    assert!(
        eventually(CONFIG_DEADLINE, || route_of(&served.routes(), "demo")
            == pairs(&[("2", 20), ("1", 80)])),
        "{:#}",
        served.routes()
    );

    // The file moves demo's weights and routes mlp: mlp's route applies, demo's
    // weights stay the rollout's and the status says so.
    edit_config(
        &served,
        "\n[routes.mlp]\nversions = [ { version = \"1\", weight = 100 } ]\n",
    );
    let text = std::fs::read_to_string(&served.config).expect("read config");
    let text = text.replace(
        r#"versions = [ { version = "1", weight = 100 }, { version = "2", weight = 0 } ]"#,
        r#"versions = [ { version = "1", weight = 50 }, { version = "2", weight = 50 } ]"#,
    );
    std::fs::write(served.dir.path().join("next.toml"), text).expect("write");
    let before = config_status(&served)["applied_at_ms"].as_u64();
    std::fs::rename(served.dir.path().join("next.toml"), &served.config).expect("rename");
    assert!(
        eventually(CONFIG_DEADLINE, || config_status(&served)["applied_at_ms"]
            .as_u64()
            > before),
        "the edit applied"
    );
    assert_eq!(
        route_of(&served.routes(), "demo"),
        pairs(&[("2", 20), ("1", 80)]),
        "the rollout keeps demo's weights"
    );
    assert_eq!(route_of(&served.routes(), "mlp"), pairs(&[("1", 100)]));
    let notes = demo_notes(&served);
    assert!(
        notes.len() == 1 && notes[0].contains("running rollout holds them"),
        "{notes:?}"
    );

    let refused = served
        .ctl(&["set-weights", "demo", "1=100", "2=0"])
        .failed();
    assert!(
        refused.stderr.contains("FailedPrecondition") && refused.stderr.contains("running rollout"),
        "{refused:#?}"
    );

    served.ctl(&["rollout", "abort", "demo"]).ok();
    assert_eq!(
        route_of(&served.routes(), "demo"),
        pairs(&[("2", 0), ("1", 100)]),
        "aborted: the baseline has everything"
    );
    assert!(demo_notes(&served).is_empty(), "nothing is held any more");
    served.ctl(&["set-weights", "demo", "1=70", "2=30"]).ok();
    assert_eq!(
        route_of(&served.routes(), "demo"),
        pairs(&[("1", 70), ("2", 30)])
    );
}

#[test]
fn plans_added_to_a_running_gateway_start_and_what_waits_for_a_restart_is_reported() {
    let with_plan = plan_config(3_600_000);
    let (before_plan, plan) = with_plan
        .split_once("[rollouts.plans.demo]")
        .expect("the config has a plan");
    let served = Served::start(before_plan, &[]);
    assert!(
        served
            .ctl(&["rollout", "status", "demo"])
            .failed()
            .stderr
            .contains("NotFound"),
        "no rollout before the plan is in the file"
    );

    // The plan is added, and the evaluation interval changed with it.
    let edited = format!("{before_plan}[rollouts.plans.demo]{plan}")
        .replace("evaluate_interval_ms = 100", "evaluate_interval_ms = 200");
    let applied_before = config_status(&served)["applied_at_ms"].as_u64();
    std::fs::write(served.dir.path().join("next.toml"), &edited).expect("write");
    std::fs::rename(served.dir.path().join("next.toml"), &served.config).expect("rename");
    assert!(
        eventually(CONFIG_DEADLINE, || config_status(&served)["applied_at_ms"]
            .as_u64()
            > applied_before),
        "the edit applied: {:#}",
        config_status(&served)
    );
    let status = rollout(&served);
    assert_eq!(
        (status["state"].as_str(), status["canary_weight"].as_u64()),
        (Some("progressing"), Some(20)),
        "the added plan started: {status:#}"
    );
    let notes: Vec<String> = config_status(&served)["notes"]
        .as_array()
        .expect("notes")
        .iter()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        notes,
        [
            "rollouts.evaluate_interval_ms: changed in the file; applies at restart".to_owned(),
            demo_notes(&served).concat()
        ],
        "the listen flags are no change to the file's settings; demo's file weights are \
         held by the rollout: {notes:?}"
    );
    assert!(
        notes[1].contains("a running rollout holds them"),
        "{notes:?}"
    );

    // The plan is removed again: the rollout goes on, and the status says why.
    let applied_before = config_status(&served)["applied_at_ms"].as_u64();
    std::fs::write(served.dir.path().join("next.toml"), before_plan).expect("write");
    std::fs::rename(served.dir.path().join("next.toml"), &served.config).expect("rename");
    assert!(
        eventually(CONFIG_DEADLINE, || config_status(&served)["applied_at_ms"]
            .as_u64()
            > applied_before),
        "the edit applied"
    );
    let notes = config_status(&served)["notes"].to_string();
    assert!(
        notes.contains("rollouts.plans.demo: removed from the file; that stops no rollout"),
        "{notes}"
    );
    assert_eq!(rollout(&served)["state"], "progressing");
}
