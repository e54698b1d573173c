//! `aviary controller` as it runs in a cluster: a process driving one rollout across
//! two `aviary serve` processes whose rollouts it controls, restarted mid-rollout and
//! resuming from its state file. Real processes on 127.0.0.1 port 0.

mod support;

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use support::*;

/// Upper bound for the rollout to finish (hang protection only).
const ROLLOUT_DEADLINE: Duration = Duration::from_secs(90);

/// A gateway whose rollouts a controller drives: `demo` on version 1 only.
fn controlled_config() -> String {
    let models = repo_root().join("deploy/local/models");
    format!(
        r#"
[repository]
path = "{models}"
instances = 2

[rollouts]
controlled = true

[routes.demo]
versions = [ {{ version = "1", weight = 100 }}, {{ version = "2", weight = 0 }} ]
"#,
        models = models.display()
    )
}

/// A controller over `gateways`, judging every 100 ms and keeping rollouts in
/// `state_file`; returns it, its admin address and its `/metrics` address.
fn start_controller(gateways: &str, state_file: &str) -> (Process, String, SocketAddr) {
    let (mut controller, admin) = start_controller_args(
        gateways,
        &["--evaluate-interval-ms", "100", "--state-file", state_file],
    );
    let metrics = controller.wait_address("aviary: metrics listening on ");
    (controller, admin, metrics)
}

fn ctl(admin: &str, args: &[&str]) -> Output {
    let mut all = vec!["ctl", "--admin", admin];
    all.extend_from_slice(args);
    run(&all, &[])
}

fn rollout(admin: &str) -> Value {
    ctl(admin, &["rollout", "status", "demo", "--json"]).json()
}

#[test]
fn a_restarted_controller_resumes_the_rollout_of_two_gateways() {
    let a = Served::start(&controlled_config(), &[]);
    let b = Served::start(&controlled_config(), &[]);
    let gateways = [&a, &b]
        .map(|g| g.admin.trim_start_matches("http://").to_owned())
        .join(",");
    let state_dir = tempfile::tempdir().expect("temp dir");
    let state_file = state_dir.path().join("rollouts.json");
    let state_file = state_file.to_str().expect("utf-8 path");
    let (controller, admin, _) = start_controller(&gateways, state_file);
    let traffic = Traffic::start(&[&a.addr, &b.addr]);

    let mut start = DEMO_ROLLOUT.to_vec();
    start.extend([
        "--step-duration",
        "2",
        "--step-requests",
        "20",
        "--max-error-rate-increase",
        "0.05",
        "--json",
    ]);
    let started = ctl(&admin, &start).json();
    assert_eq!(
        (started["state"].as_str(), started["canary_weight"].as_u64()),
        (Some("progressing"), Some(50)),
        "{started:#}"
    );
    for gateway in [&a, &b] {
        assert_eq!(
            route_of(&gateway.routes(), "demo"),
            pairs(&[("2", 50), ("1", 50)]),
            "the first step reached every gateway"
        );
        let refused = gateway
            .ctl(&["set-weights", "demo", "1=100", "2=0"])
            .failed();
        assert!(
            refused.stderr.contains("running rollout"),
            "a gateway keeps the controller's weights: {refused:#?}"
        );
        let unserved = gateway.ctl(&["rollout", "status", "demo"]).failed();
        assert!(
            unserved.stderr.contains("ask the controller"),
            "{unserved:#?}"
        );
    }
    let routes_on_controller = ctl(&admin, &["routes"]).failed();
    assert!(
        routes_on_controller
            .stderr
            .contains("a controller serves only `aviary ctl rollout`; ask a gateway"),
        "{routes_on_controller:#?}"
    );

    // Restarted mid-rollout: the gateways keep the held weights meanwhile, and the new
    // controller carries on from its state file.
    sigterm(&controller);
    let mut controller = controller;
    assert_eq!(
        controller.wait_exit(Duration::from_secs(30)).code(),
        Some(0)
    );
    drop(controller);
    let (_controller, admin, metrics) = start_controller(&gateways, state_file);
    let resumed = rollout(&admin);
    assert_eq!(resumed["terminal"], false, "{resumed:#}");
    assert!(resumed["step"].as_u64() >= Some(1), "{resumed:#}");
    assert!(
        eventually(ROLLOUT_DEADLINE, || rollout(&admin)["terminal"] == true),
        "the resumed rollout finishes: {:#}",
        rollout(&admin)
    );
    let (answered, failures) = traffic.stop();

    let last = rollout(&admin);
    assert_eq!(last["state"], "promoted", "{last:#}");
    // The controller's /metrics shows the rollout it drove.
    let samples = parse_samples(&scrape(metrics).2);
    let state = |state: &str| {
        samples
            .get(&format!(
                "aviary_rollout_state{{model=\"demo\",canary=\"2\",state=\"{state}\"}}"
            ))
            .copied()
    };
    assert_eq!(state("promoted"), Some(1.0), "{samples:#?}");
    assert_eq!(state("progressing"), Some(0.0));
    assert_eq!(
        samples.get("aviary_rollouts_ended_total{outcome=\"promoted\"}"),
        Some(&1.0)
    );
    assert!(samples.contains_key("process_cpu_seconds_total"));
    for gateway in [&a, &b] {
        assert_eq!(
            route_of(&gateway.routes(), "demo"),
            pairs(&[("2", 100), ("1", 0)]),
            "every gateway ends promoted"
        );
        gateway.ctl(&["set-weights", "demo", "1=10", "2=90"]).ok();
    }
    assert!(failures.is_empty(), "no request failed: {failures:?}");
    assert!(
        answered.get("2").copied().unwrap_or(0) >= 40,
        "{answered:?}"
    );
}
