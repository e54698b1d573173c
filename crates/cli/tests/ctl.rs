//! `aviary ctl` and `aviary serve` as an operator runs them: a real gateway process on
//! 127.0.0.1 port 0 with its admin API, changed through `aviary ctl` processes, and a
//! SIGTERM drain with slow requests in flight. Every process is killed when its guard
//! drops, even when an assertion fails first.

mod support;

use std::{collections::BTreeMap, net::TcpStream, time::Duration};

use support::*;

#[test]
fn routes_show_weights_and_set_weights_steers_traffic() {
    let served = Served::demo();

    let table = served.ctl(&["routes"]).ok().stdout;
    let demo1 = rows_starting(&table, &["demo", "1"]);
    let demo2 = rows_starting(&table, &["demo", "2"]);
    assert_eq!(demo1.len(), 1, "one row for demo 1:\n{table}");
    assert_eq!(demo2.len(), 1, "one row for demo 2:\n{table}");
    assert_eq!(demo1[0][2], "90", "demo 1 has weight 90:\n{table}");
    assert_eq!(demo2[0][2], "10", "demo 2 has weight 10:\n{table}");
    assert_eq!(demo1[0][3], "90.0%", "{table}");
    assert_eq!(demo2[0][3], "10.0%", "{table}");

    let routes = served.routes();
    let generation = routes["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("generation is a number: {routes:#}"));
    assert_eq!(
        route_of(&routes, "demo"),
        pairs(&[("1", 90), ("2", 10)]),
        "{routes:#}"
    );
    assert!(
        table.contains(&format!("generation {generation}")),
        "{table}"
    );

    let set = served.ctl(&["set-weights", "demo", "1=0", "2=100"]).ok();
    assert!(
        set.stdout
            .contains(&format!("generation {}", generation + 1)),
        "says the new generation: {set:#?}"
    );
    let versions = infer_versions(&served.addr, None, 50);
    assert_eq!(
        versions,
        BTreeMap::from([("2".to_owned(), 50)]),
        "with weights 0/100 only version 2 answers"
    );

    let refused = served.ctl(&["set-weights", "demo", "1=0", "2=0"]).failed();
    assert!(
        refused.stderr.contains("all weights are 0"),
        "says why: {refused:#?}"
    );
    let routes = served.routes();
    assert_eq!(
        routes["generation"].as_u64(),
        Some(generation + 1),
        "a refused change publishes nothing: {routes:#}"
    );
    assert_eq!(
        route_of(&routes, "demo"),
        pairs(&[("1", 0), ("2", 100)]),
        "{routes:#}"
    );

    let stale = served
        .ctl(&["set-weights", "demo", "1=5", "--expect-generation", "1"])
        .failed();
    assert!(
        stale
            .stderr
            .contains(&format!("generation {}", generation + 1)),
        "names the current generation: {stale:#?}"
    );
    let current = (generation + 1).to_string();
    let fresh = served
        .ctl(&[
            "set-weights",
            "demo",
            "1=5",
            "2=5",
            "--expect-generation",
            &current,
        ])
        .ok();
    assert!(
        fresh
            .stdout
            .contains(&format!("generation {}", generation + 2)),
        "the current generation applies: {fresh:#?}"
    );

    let via_env = run(
        &["ctl", "routes", "--json"],
        &[("AVIARY_ADMIN", &served.admin)],
    )
    .json();
    assert_eq!(
        via_env["generation"].as_u64(),
        Some(generation + 2),
        "AVIARY_ADMIN names the gateway: {via_env:#}"
    );
    assert_eq!(
        route_of(&via_env, "demo"),
        pairs(&[("1", 5), ("2", 5)]),
        "{via_env:#}"
    );
}

#[test]
fn dlq_on_a_gateway_without_a_queue_says_how_to_get_one() {
    let served = Served::demo();
    for args in [&["dlq", "list"][..], &["dlq", "replay"][..]] {
        let refused = served.ctl(args).failed();
        assert!(
            refused.stderr.contains("Unimplemented")
                && refused
                    .stderr
                    .contains("set `dead_letters = true` on a route"),
            "{args:?}: {refused:#?}"
        );
    }
}

#[test]
fn models_lists_every_version_with_state_path_and_card() {
    let served = Served::demo();
    let models = repo_root().join("deploy/local/models");

    let table = served.ctl(&["models"]).ok().stdout;
    for (model, version) in [("demo", "1"), ("demo", "2"), ("mlp", "1")] {
        let rows = rows_starting(&table, &[model, version]);
        assert_eq!(rows.len(), 1, "one row for {model} {version}:\n{table}");
        assert_eq!(rows[0][4], "READY", "{model} {version}:\n{table}");
        let path = models.join(model).join(version).join("model.onnx");
        assert_eq!(
            rows[0].last().copied(),
            Some(path.to_str().expect("utf-8 path")),
            "{model} {version} shows its file:\n{table}"
        );
    }

    // The demo cards state their semantic versions; the mlp's card states none.
    for (model, version, semver) in [
        ("demo", "1", "1.0.0"),
        ("demo", "2", "2.0.0"),
        ("mlp", "1", "-"),
    ] {
        assert_eq!(
            rows_starting(&table, &[model, version])[0][2],
            semver,
            "{table}"
        );
    }

    let list = served.ctl(&["models", "--json"]).json();
    let list = list["versions"].as_array().expect("an array of versions");
    assert_eq!(list.len(), 3, "{list:#?}");
    let demo1 = list
        .iter()
        .find(|v| v["model"] == "demo" && v["version"] == "1")
        .unwrap_or_else(|| panic!("demo 1 is listed: {list:#?}"));
    assert_eq!(demo1["state"], "READY", "{demo1:#}");
    assert_eq!(demo1["weight"], 90, "{demo1:#}");
    assert!(
        demo1["card"]["owner"]
            .as_str()
            .is_some_and(|owner| !owner.is_empty()),
        "demo 1 has a model card with an owner: {demo1:#}"
    );
    assert!(
        demo1["card"]["metrics"]["heldout_accuracy"].is_number(),
        "{demo1:#}"
    );

    let only_demo = served.ctl(&["models", "demo", "--json"]).json();
    let listed: Vec<(&str, &str)> = only_demo["versions"]
        .as_array()
        .expect("an array of versions")
        .iter()
        .map(|v| {
            (
                v["model"].as_str().expect("model"),
                v["version"].as_str().expect("version"),
            )
        })
        .collect();
    assert_eq!(listed, [("demo", "1"), ("demo", "2")], "{only_demo:#}");
}

#[test]
fn approve_lets_a_candidate_take_traffic_and_models_shows_its_stage() {
    // The demo's file routes demo 1 and 2 (adopted at this first start); mlp is
    // unrouted and its only version a candidate: it serves pinned requests only.
    let served = Served::start(&format!("{}\n[registry]\n", demo_config()), &[]);
    let stage_of = |model: &str, version: &str| {
        let table = served.ctl(&["models", model]).ok().stdout;
        let rows = rows_starting(&table, &[model, version]);
        assert_eq!(rows.len(), 1, "one row for {model} {version}:\n{table}");
        rows[0][3].to_owned()
    };
    assert_eq!(stage_of("demo", "2"), "approved");
    assert_eq!(stage_of("mlp", "1"), "candidate");
    // Both demo versions were adopted: weights may move between them.
    let moved = served.ctl(&["set-weights", "demo", "1=100", "2=0"]).ok();
    assert!(moved.stdout.contains("generation"), "{moved:#?}");

    let approved = served
        .ctl(&["approve", "mlp", "1", "--note", "offline eval passed"])
        .ok()
        .stdout;
    assert!(
        approved.contains("mlp 1: production"),
        "approved, and on the implicit route at once, production: {approved}"
    );
    assert_eq!(stage_of("mlp", "1"), "production");
    let card = served.ctl(&["card", "mlp", "1"]).ok().stdout;
    assert!(card.contains("production"), "{card}");

    let unknown = served.ctl(&["approve", "mlp", "9"]).failed();
    assert!(unknown.stderr.contains("9"), "{unknown:#?}");
}

#[test]
fn card_shows_a_versions_registry_record() {
    let served = Served::demo();
    let file = repo_root().join("deploy/local/models/demo/2/model.onnx");
    let sha256 = aviary_worker::registry::Sha256::of(&std::fs::read(&file).expect("model"));

    let text = served.ctl(&["card", "demo", "2"]).ok().stdout;
    for expected in [
        "semver           2.0.0".to_owned(),
        format!("file sha256      {sha256}"),
        "training run     make_models.py:demo_v2".to_owned(),
        "hidden_units".to_owned(),
        "owner            Aviary maintainers".to_owned(),
    ] {
        assert!(text.contains(&expected), "{expected:?} in:\n{text}");
    }
    let record = served.ctl(&["card", "demo", "2", "--json"]).json();
    assert_eq!(record["card"]["semver"], "2.0.0", "{record:#}");
    assert_eq!(record["sha256"], sha256.as_str(), "{record:#}");
    assert_eq!(
        record["card"]["lineage"]["training_run"],
        "make_models.py:demo_v2"
    );

    let missing = served.ctl(&["card", "demo", "9"]).failed();
    assert!(
        missing.stderr.contains("no version 9 of model \"demo\""),
        "{missing:#?}"
    );
}

#[test]
fn unload_refuses_weighted_versions_unless_forced_and_load_brings_them_back() {
    let served = Served::demo();

    let refused = served.ctl(&["unload", "demo", "2"]).failed();
    assert!(
        refused.stderr.contains("weight to 0") && refused.stderr.contains("force"),
        "tells to set its weight to 0 or force: {refused:#?}"
    );
    assert_eq!(
        route_of(&served.routes(), "demo"),
        pairs(&[("1", 90), ("2", 10)]),
        "a refused unload changes nothing"
    );

    served.ctl(&["unload", "demo", "2", "--force"]).ok();
    let routes = served.routes();
    assert_eq!(
        route_of(&routes, "demo"),
        pairs(&[("1", 90)]),
        "demo 2 left the route: {routes:#}"
    );
    let table = served.ctl(&["routes"]).ok().stdout;
    assert!(
        rows_starting(&table, &["demo", "2"]).is_empty(),
        "ctl routes no longer lists demo 2:\n{table}"
    );
    let pinned = infer_demo(&served.addr, &["--version", "2"]).failed();
    assert!(pinned.stderr.contains("NotFound"), "{pinned:#?}");

    let loaded = served.ctl(&["load", "demo", "2"]).ok();
    let ms = loaded
        .stdout
        .trim()
        .strip_prefix("demo version 2 loaded in ")
        .and_then(|rest| rest.strip_suffix(" ms"))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(ms.is_some(), "prints the load time: {loaded:#?}");
    let list = served.ctl(&["models", "demo", "--json"]).json();
    let demo2 = list["versions"]
        .as_array()
        .expect("an array of versions")
        .iter()
        .find(|v| v["version"] == "2")
        .unwrap_or_else(|| panic!("demo 2 is listed again: {list:#}"));
    assert_eq!(demo2["state"], "READY", "{demo2:#}");

    let reloaded = served.ctl(&["reload", "mlp", "1", "--json"]).json();
    assert!(reloaded["load_ms"].is_u64(), "{reloaded:#}");
    assert_eq!(reloaded["version"]["model"], "mlp", "{reloaded:#}");
    assert_eq!(reloaded["version"]["version"], "1", "{reloaded:#}");
    assert_eq!(reloaded["version"]["state"], "READY", "{reloaded:#}");
}

#[test]
fn an_invalid_config_edit_is_rejected_naming_the_key_and_routes_keep_serving() {
    let served = Served::demo();
    let before = served.route_table();
    let status = served.ctl(&["config-status"]).ok().stdout;
    assert!(status.contains("applied"), "{status}");
    assert!(!status.contains("REJECTED"), "{status}");

    let good = demo_config();
    let bad = good.replace(
        "{ version = \"2\", weight = 10 }",
        "{ version = \"2\", wieght = 10 }",
    );
    assert_ne!(bad, good, "the typo went in");
    std::fs::write(&served.config, &bad).expect("write the bad config");

    let mut last = String::new();
    let rejected = eventually(CONFIG_DEADLINE, || {
        last = served.ctl(&["config-status"]).ok().stdout;
        last.contains("REJECTED")
    });
    assert!(rejected, "config-status shows the rejection: {last}");
    assert!(last.contains("wieght"), "names the bad key: {last}");
    let json = served.ctl(&["config-status", "--json"]).json();
    assert!(
        json["errors"].as_array().is_some_and(|e| e
            .iter()
            .any(|e| e.as_str().is_some_and(|e| e.contains("wieght")))),
        "{json:#}"
    );
    assert_eq!(
        served.route_table(),
        before,
        "the last good routes keep serving"
    );

    // A valid edit after the bad one applies and clears the errors.
    let fixed = good
        .replace("weight = 90", "weight = 50")
        .replace("weight = 10", "weight = 50");
    std::fs::write(&served.config, fixed).expect("write the fixed config");
    let applied = eventually(CONFIG_DEADLINE, || {
        route_of(&served.routes(), "demo") == pairs(&[("1", 50), ("2", 50)])
    });
    assert!(applied, "the fixed config applies: {:#}", served.routes());
    let status = served.ctl(&["config-status"]).ok().stdout;
    assert!(!status.contains("REJECTED"), "{status}");
}

/// SIGTERM while slow requests are in flight: every one of them completes, new
/// connections are refused as soon as the listener closes, and the process exits 0.
#[test]
fn sigterm_drains_slow_requests_in_flight_and_exits_zero() {
    let mut served = Served::start(&slow_config(), &["--grace-period", "30"]);
    let runtime = runtime();

    // What a batch answers when nothing is shutting down.
    let reference = slow_reference(&runtime, &served.addr);
    assert_eq!(
        reference.0,
        [SLOW_BATCH as i64, SLOW_WIDTH as i64],
        "y has the batch's shape"
    );
    assert_eq!(reference.1, "FP32");
    assert_eq!(reference.2.len(), SLOW_BATCH * SLOW_WIDTH * 4);

    // The drain is held open by a stream the test ends itself (a health Watch, which
    // the server keeps until the grace period), so "refused while still running" is
    // observed for certain rather than within four 200 ms requests.
    let hold = runtime.block_on(hold_open(&served.addr));
    let clients = slow_requests_in_flight(&runtime, &served.addr, 4);

    sigterm(&served.server);

    // The listener closes at once; the process still runs, finishing the requests.
    let refused = eventually(Duration::from_secs(10), || {
        TcpStream::connect_timeout(&served.inference, Duration::from_secs(1))
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    });
    assert!(refused, "new connections are refused after SIGTERM");
    assert!(
        served.server.exited().is_none(),
        "the process still runs, draining, while new connections are refused"
    );

    let results = runtime.block_on(async {
        let mut results = Vec::new();
        for handle in clients {
            let joined = tokio::time::timeout(Duration::from_secs(60), handle)
                .await
                .expect("a slow request finished within 60 s");
            results.push(joined.expect("client task"));
        }
        results
    });
    for (i, result) in results.into_iter().enumerate() {
        let response = result
            .unwrap_or_else(|status| panic!("slow request {i} failed while draining: {status:?}"))
            .into_inner();
        assert_eq!(
            slow_output(&response),
            reference,
            "slow request {i} answers in full, as before shutdown"
        );
    }
    drop(hold);

    let status = served.server.wait_exit(Duration::from_secs(30));
    let stderr = served.server.take_stderr();
    assert_eq!(status.code(), Some(0), "serve exits 0; stderr:\n{stderr}");
    assert!(
        !stderr.contains("grace period over"),
        "the requests finished within the grace period; stderr:\n{stderr}"
    );
}

#[test]
fn a_bandit_route_learns_from_ctl_feedback_and_the_report_shows_its_posterior() {
    let routed = "  { version = \"2\", weight = 10 },\n]\n";
    let config = demo_config();
    assert!(config.contains(routed), "the demo routes demo 90/10");
    let config = config.replace(
        routed,
        &format!(
            "{routed}bandit = {{ strategy = \"thompson\", reward = \"correct\", warmup = 20, \
             interval_ms = 100, seed = 3 }}\n"
        ),
    );
    let served = Served::start(&config, &[]);
    for i in 0..10 {
        let id = format!("req-{i}");
        served
            .ctl(&["feedback", "demo", "2", &id, "--correct"])
            .ok();
        served
            .ctl(&["feedback", "demo", "1", &id, "--incorrect"])
            .ok();
    }
    let weight_of_2 = || {
        route_of(&served.routes(), "demo")
            .and_then(|route| route.into_iter().find(|(v, _)| v == "2"))
            .map_or(0, |(_, w)| w)
    };
    assert!(
        eventually(Duration::from_secs(20), || weight_of_2() >= 9_000),
        "version 2, right every time, takes 90 % or more: {:?}",
        route_of(&served.routes(), "demo")
    );
    let report = served.ctl(&["experiment", "report", "demo"]).ok().stdout;
    for expected in [
        "bandit: thompson on correct feedback, min share 5.00%; 20 rewards, learnt shares",
        "Beta(11, 1)",
        "Beta(1, 11)",
    ] {
        assert!(report.contains(expected), "{expected:?} in:\n{report}");
    }
    let json = served
        .ctl(&["experiment", "report", "demo", "--json"])
        .json();
    assert_eq!(
        json["bandit"]["arms"][1]["posterior_alpha"], 11.0,
        "{json:#}"
    );
}
