//! Drift tracking through `aviary serve`: a demo version whose card asks for drift
//! captures its reference from the first 1,000 rows of traffic; rows from the same
//! distribution leave every input feature at `aviary_drift 0` on `/metrics`; once one
//! feature's values move by half a standard deviation, that feature, and only it among
//! the inputs, shows drift, in `ctl drift` too, and the data watch audits the crossing
//! and the values flag-mode rules let through. A rollout gated on output drift is
//! rolled back when the canary answers differently from the baseline on the same
//! traffic, with the numbers in its decision, and promoted when it does not; one that
//! pauses on input drift holds while that is unmeasured and pauses, naming the
//! features, once traffic moves. A split worker (`aviary worker`) tracks drift the same
//! way and audits the crossing.

mod support;

use std::{collections::BTreeMap, path::Path, time::Duration};

use serde_json::Value;

use rand::{Rng, SeedableRng, rngs::SmallRng};
use support::*;

/// Means and standard deviations of the four iris-like features.
const MEAN: [f64; 4] = [5.8, 3.0, 3.8, 1.2];
const SD: [f64; 4] = [0.8, 0.4, 1.7, 0.7];
const FEATURES: [&str; 4] = ["sepal_length", "sepal_width", "petal_length", "petal_width"];

/// A standard normal value (Box-Muller).
fn normal(rng: &mut SmallRng) -> f64 {
    let (u, v): (f64, f64) = (rng.random(), rng.random());
    (-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// `requests` requests of 10 rows each to demo at `version` (empty: as routed),
/// feature `c` shifted by `shift[c]` SDs.
fn send(addr: &str, rng: &mut SmallRng, requests: usize, shift: [f64; 4], version: &str) {
    runtime().block_on(async {
        let mut client = client(connect(addr).await);
        for _ in 0..requests {
            let rows: Vec<[f32; 4]> = (0..10)
                .map(|_| {
                    std::array::from_fn(|c| (MEAN[c] + SD[c] * (normal(rng) + shift[c])) as f32)
                })
                .collect();
            let request = demo_rows(version, &rows);
            client.model_infer(request).await.expect("served");
        }
    });
}

/// `aviary_drift` of each input feature of demo 1.
fn input_verdicts(served: &mut Served) -> BTreeMap<String, f64> {
    let samples = parse_samples(&scrape(served.metrics_addr()).2);
    FEATURES
        .iter()
        .filter_map(|f| {
            let key = format!(
                "aviary_drift{{model=\"demo\",version=\"1\",side=\"input\",tensor=\"input\",feature=\"{f}\"}}"
            );
            Some(((*f).to_owned(), *samples.get(&key)?))
        })
        .collect()
}

/// Copies demo version `from` of the test models to `<models>/demo/<to>` with its card
/// plus `extra`.
fn demo_version(models: &Path, from: &str, to: &str, extra: &str) {
    let source = repo_root().join("tests/models/demo").join(from);
    let target = models.join("demo").join(to);
    std::fs::create_dir_all(&target).expect("version folder");
    std::fs::copy(source.join("model.onnx"), target.join("model.onnx")).expect("model");
    let card = std::fs::read_to_string(source.join("model.toml")).expect("card");
    std::fs::write(target.join("model.toml"), format!("{card}\n{extra}")).expect("card");
}

/// Rollouts evaluated every 100 ms.
const ROLLING: &str = "\n[rollouts]\nevaluate_interval_ms = 100\n";

/// `aviary serve` over the repository `models` (one session a version), with `more`
/// in its `[repository]` table and after it, and a route of demo's `versions` at their
/// weights when there are any.
fn serve(models: &Path, more: &str, versions: &[(&str, u32)]) -> Served {
    let route = match versions.is_empty() {
        true => String::new(),
        false => {
            let versions: Vec<String> = versions
                .iter()
                .map(|(v, w)| format!("{{ version = \"{v}\", weight = {w} }}"))
                .collect();
            format!("\n[routes.demo]\nversions = [ {} ]\n", versions.join(", "))
        }
    };
    Served::start(
        &format!(
            "[repository]\npath = \"{}\"\ninstances = 1\n{more}{route}",
            models.display()
        ),
        &[],
    )
}

/// The records of `kind` in the gateway's audit trail.
fn audit_records(served: &Served, kind: &str) -> Vec<Value> {
    served
        .ctl(&["audit", "query", "--json", "--kind", kind])
        .ok()
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect()
}

#[test]
fn one_shifted_feature_drifts_and_the_others_do_not() {
    let dir = tempfile::tempdir().expect("temp dir");
    let models = dir.path().join("models");
    let names: Vec<String> = FEATURES
        .iter()
        .map(|f| format!("{{ name = \"{f}\" }}"))
        .collect();
    // Flag mode with a petal_width range the traffic sometimes leaves.
    demo_version(
        &models,
        "1",
        "1",
        &format!(
            "[input_rules]\nmode = \"flag\"\n[input_rules.inputs.input]\nfeatures = [{}, {{ name = \"petal_width\", min = 0.0, max = 3.0 }}]\n\n\
             [drift]\ncapture = 1000\nwindow = 1000\nmin_samples = 500\nclasses = [\"label\"]\n",
            names[..3].join(", ")
        ),
    );
    let mut served = serve(
        &models,
        "data_watch_interval_ms = 100\n\n[audit]\ndir = \"audit\"\n",
        &[],
    );
    let mut rng = SmallRng::seed_from_u64(20261202);

    send(&served.addr, &mut rng, 100, [0.0; 4], "1");
    assert!(
        input_verdicts(&mut served).is_empty(),
        "no verdict while the window is empty"
    );
    send(&served.addr, &mut rng, 100, [0.0; 4], "1");
    let same = input_verdicts(&mut served);
    assert_eq!(same.len(), 4, "{same:?}");
    assert!(
        same.values().all(|v| *v == 0.0),
        "like the reference: {same:?}"
    );

    send(&served.addr, &mut rng, 100, [0.0, 0.0, 0.5, 0.0], "1");
    let shifted = input_verdicts(&mut served);
    let expected: BTreeMap<String, f64> = FEATURES
        .iter()
        .map(|f| {
            (
                (*f).to_owned(),
                if *f == "petal_length" { 1.0 } else { 0.0 },
            )
        })
        .collect();
    assert_eq!(shifted, expected);
    let samples = parse_samples(&scrape(served.metrics_addr()).2);
    let psi = samples
        .get("aviary_drift_psi{model=\"demo\",version=\"1\",side=\"input\",tensor=\"input\",feature=\"petal_length\"}")
        .copied()
        .expect("a PSI for petal_length");
    assert!(psi > 0.0, "{psi}");

    // ctl drift: one row per feature, the shifted one drifting, with outliers counted.
    let report = served.ctl(&["drift", "demo", "--json"]).json();
    let features = report["versions"][0]["features"]
        .as_array()
        .expect("features")
        .clone();
    let input = |name: &str| {
        features
            .iter()
            .find(|f| f["side"] == "input" && f["feature"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(input("petal_length")["verdict"], "drift", "{report}");
    assert_eq!(input("sepal_width")["verdict"], "ok", "{report}");
    assert_eq!(input("petal_length")["window"], 1000);
    // petal_width's declared range [0, 3] in flag mode: N(1.2, 0.7) leaves it below 0
    // for about 4 % of values.
    let outliers = input("petal_width")["outliers"].as_u64().expect("outliers");
    assert!((10..100).contains(&outliers), "{outliers}");
    assert!(
        features
            .iter()
            .any(|f| f["test"] == "chi-square" && f["feature"] == "predicted class"),
        "{report}"
    );
    let table = served.ctl(&["drift", "demo"]).ok().stdout;
    assert!(
        table
            .lines()
            .any(|l| l.contains("input/petal_length") && l.ends_with("drift")),
        "{table}"
    );
    let unknown = served.ctl(&["drift", "nope"]);
    assert!(!unknown.status.success());
    assert!(unknown.stderr.contains("NotFound"), "{unknown:?}");

    // The data watch audited petal_length's crossing, and the flagged values.
    assert!(
        eventually(Duration::from_secs(30), || {
            audit_records(&served, "data")
                .iter()
                .any(|r| r["action"] == "drift" && r["after"]["feature"] == "petal_length")
        }),
        "{:#?}",
        audit_records(&served, "data")
    );
    // Every value flagged so far (counted on /metrics) is audited, once.
    let violations = parse_samples(&scrape(served.metrics_addr()).2)
        .get("aviary_input_violations_total{model=\"demo\",version=\"1\",input=\"input\",feature=\"petal_width\",rule=\"below_min\"}")
        .copied()
        .expect("petal_width values below 0 were flagged");
    let audited = |records: &[Value]| -> f64 {
        records
            .iter()
            .filter(|r| r["action"] == "flagged")
            .flat_map(|r| r["after"].as_array().cloned().unwrap_or_default())
            .filter(|c| c["feature"] == "petal_width" && c["rule"] == "below_min")
            .map(|c| c["values"].as_f64().unwrap_or(0.0))
            .sum()
    };
    assert!(
        eventually(Duration::from_secs(30), || audited(&audit_records(
            &served, "data"
        )) == violations),
        "{violations} flagged, audited: {:#?}",
        audit_records(&served, "data")
    );
    let records = audit_records(&served, "data");
    let flagged: Vec<&Value> = records
        .iter()
        .filter(|r| r["action"] == "flagged")
        .collect();
    assert!(
        flagged[0]["reason"].as_str().is_some_and(|r| r
            .contains("; latest: input \"input\" feature \"petal_width\" (column 3) row ")
            && (r.contains("is below min 0.0") || r.contains("is above max 3.0"))),
        "{flagged:#?}"
    );
}

/// Sends 10-row requests of reference-like traffic to `demo` (routed by weights) until
/// the rollout of demo ends; its final status.
fn traffic_until_the_rollout_ends(served: &Served, rng: &mut SmallRng) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        send(&served.addr, rng, 20, [0.0; 4], "");
        let status = served.ctl(&["rollout", "status", "demo", "--json"]).json();
        if status["terminal"] == true {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rollout never ended: {status:#}"
        );
    }
}

#[test]
fn a_canary_whose_outputs_drift_from_the_baselines_is_rolled_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let models = dir.path().join("models");
    // Windows of 600 rows: a KS p-value near 1e-11 for version 2 against 1, where a
    // copy's smallest adjusted p-value falls below 1e-6 about once in 10^5 evaluations.
    let drift = "[drift]\ncapture = 1\nwindow = 600\nmin_samples = 500\n";
    // Version 3 is version 1's file: the same answers. Version 2 is another model.
    demo_version(&models, "1", "1", drift);
    demo_version(&models, "2", "2", drift);
    demo_version(&models, "1", "3", drift);
    let served = serve(&models, ROLLING, &[("1", 100), ("2", 0), ("3", 0)]);
    let mut rng = SmallRng::seed_from_u64(7);
    let gated = |canary: &str, baseline: &str| {
        served
            .ctl(&[
                "rollout",
                "start",
                "demo",
                "--canary",
                canary,
                "--baseline",
                baseline,
                "--steps",
                "50,100",
                "--step-duration",
                "0",
                "--step-requests",
                "1000",
                "--max-output-drift-psi",
                "0.5",
                "--min-output-ks-p",
                "0.000001",
            ])
            .ok();
    };

    // The same answers: the comparison passes and the copy is promoted.
    gated("3", "1");
    let promoted = traffic_until_the_rollout_ends(&served, &mut rng);
    assert_eq!(promoted["state"], "promoted", "{promoted:#}");
    let passed = &promoted["history"][1]["numbers"];
    assert!(
        passed["output_drift_psi"]
            .as_f64()
            .is_some_and(|psi| psi < 0.5),
        "{promoted:#}"
    );

    // Another model: its outputs drift from the baseline's on the same traffic.
    gated("2", "3");
    let rolled_back = traffic_until_the_rollout_ends(&served, &mut rng);
    assert_eq!(rolled_back["state"], "rolled back", "{rolled_back:#}");
    let decision = rolled_back["history"]
        .as_array()
        .and_then(|h| h.last())
        .expect("a decision")
        .clone();
    let reason = decision["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("canary outputs drift from the baseline's"),
        "{decision:#}"
    );
    let numbers = &decision["numbers"];
    let psi = numbers["output_drift_psi"].as_f64().unwrap_or(0.0);
    let p = numbers["output_ks_p_value"].as_f64().unwrap_or(1.0);
    assert!(psi > 0.5 || p < 1e-6, "{decision:#}");
    assert_eq!(numbers["max_output_drift_psi"], 0.5);
    assert_eq!(numbers["min_output_ks_p"], 1e-6);
    let routes = served.route_entry("demo", "3");
    assert_eq!(
        routes["weight"], 100,
        "the baseline has all the traffic again"
    );
}

#[test]
fn a_split_worker_tracks_drift_and_audits_the_crossing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let models = dir.path().join("models");
    demo_version(
        &models,
        "1",
        "1",
        "[drift]\ncapture = 500\nwindow = 500\nmin_samples = 300\nrows_per_request = 10\n",
    );
    let trail = dir.path().join("trail");
    let (mut worker, addr) = start_worker_args(
        &models,
        1,
        &[
            "--audit-dir",
            trail.to_str().expect("utf-8 path"),
            "--data-watch-interval-ms",
            "100",
        ],
    );
    let metrics = worker.wait_address("aviary: metrics listening on ");
    let mut rng = SmallRng::seed_from_u64(3);
    send(&addr, &mut rng, 50, [0.0; 4], "1");
    send(&addr, &mut rng, 50, [0.0, 0.0, 0.0, 1.0], "1");
    let samples = parse_samples(&scrape(metrics).2);
    let drift = |feature: &str| {
        samples
            .get(&format!(
                "aviary_drift{{model=\"demo\",version=\"1\",side=\"input\",tensor=\"input\",feature=\"{feature}\"}}"
            ))
            .copied()
    };
    assert_eq!(drift("column 3"), Some(1.0), "the shifted feature");
    assert_eq!(drift("column 0"), Some(0.0));
    let crossed = |records: &[Value]| {
        records.iter().any(|r| {
            r["kind"] == "data"
                && r["action"] == "drift"
                && r["actor"] == "data-watch"
                && r["after"]["feature"] == "column 3"
        })
    };
    let read = || -> Vec<Value> {
        std::fs::read_to_string(trail.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(30), || crossed(&read())),
        "{:#?}",
        read()
    );
}

#[test]
fn a_rollout_pauses_when_traffic_drifts_from_the_versions_references() {
    let dir = tempfile::tempdir().expect("temp dir");
    let models = dir.path().join("models");
    let drift = "[drift]\ncapture = 300\nwindow = 300\nmin_samples = 300\nrows_per_request = 10\n";
    demo_version(&models, "1", "1", drift);
    demo_version(&models, "1", "3", drift);
    let served = serve(&models, ROLLING, &[("1", 100), ("3", 0)]);
    let mut rng = SmallRng::seed_from_u64(11);
    // Each version's reference: 300 rows of the usual traffic.
    send(&served.addr, &mut rng, 30, [0.0; 4], "1");
    send(&served.addr, &mut rng, 30, [0.0; 4], "3");
    served
        .ctl(&[
            "rollout",
            "start",
            "demo",
            "--canary",
            "3",
            "--baseline",
            "1",
            "--steps",
            "50,100",
            "--step-duration",
            "0",
            "--step-requests",
            "100000",
            "--pause-on-input-drift",
        ])
        .ok();
    let status = || served.ctl(&["rollout", "status", "demo", "--json"]).json();
    assert!(
        status()["waiting_for"]
            .as_array()
            .is_some_and(|w| w.iter().any(|b| b
                .as_str()
                .is_some_and(|b| b.starts_with("input drift not measured yet")))),
        "{:#}",
        status()
    );
    // Then petal_length moves by two standard deviations, on both versions.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let paused = loop {
        send(&served.addr, &mut rng, 20, [0.0, 0.0, 2.0, 0.0], "");
        let now = status();
        if now["state"] == "paused" {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never paused: {now:#}"
        );
    };
    let decision = paused["history"]
        .as_array()
        .and_then(|h| h.last())
        .expect("a decision")
        .clone();
    let reason = decision["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with(
            "paused at step 1/2 (canary 50%): input drift makes the comparison unreliable: "
        ) && reason.contains("canary input input/column 2: p ")
            && reason.contains("baseline input input/column 2: p "),
        "{decision:#}"
    );
    assert!(decision["numbers"]["input_drift_features"].as_f64() >= Some(2.0));
    assert_eq!(
        served.route_entry("demo", "3")["weight"],
        50,
        "held where it was"
    );
}

#[test]
fn data_gates_are_refused_where_they_could_never_be_measured() {
    let dir = tempfile::tempdir().expect("temp dir");
    let models = dir.path().join("models");
    demo_version(&models, "1", "1", "");
    demo_version(&models, "2", "2", "[drift]\n");
    let (_worker, worker) = start_worker_args(&models, 1, &[]);
    let start = |served: &Served, gate: &str| {
        let mut args = DEMO_ROLLOUT.to_vec();
        args.push(gate);
        served.ctl(&args)
    };
    // A gateway with no embedded worker reads no drift tracking.
    let remote = Served::gateway(
        &format!(
            "[routes.demo]\nversions = [ {{ version = \"1\", weight = 100, endpoint = \"{worker}\" }}, {{ version = \"2\", weight = 0, endpoint = \"{worker}\" }} ]\n"
        ),
        &[],
    );
    let unserved = remote.ctl(&["drift", "demo"]).failed();
    assert!(
        unserved.stderr.contains("this gateway has no embedded worker: read drift from each worker's /metrics (aviary_drift_*)"),
        "ctl drift says where drift is: {unserved:?}"
    );
    let refused = start(&remote, "--pause-on-input-drift").failed();
    assert!(
        refused.stderr.contains("gates.pause_on_input_drift: needs the versions' drift tracking, which only a gateway with an embedded worker (aviary serve) reads"),
        "{refused:?}"
    );
    // Embedded: version 1's card has no [drift].
    let embedded = serve(&models, "", &[("1", 100), ("2", 0)]);
    let refused = start(&embedded, "--min-output-ks-p=0.01").failed();
    assert!(
        refused.stderr.contains("gates.min_output_ks_p: version \"1\" of model \"demo\" is not loaded with drift tracking; add [drift] to its model.toml or remove this gate"),
        "{refused:?}"
    );
    assert!(
        !refused.stderr.contains("version \"2\""),
        "version 2 tracks drift: {refused:?}"
    );
}
