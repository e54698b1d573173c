//! The `aviary` binary as a user runs it: real processes on 127.0.0.1 port 0, talking to
//! each other over gRPC. Every process is killed when its guard drops, even when an
//! assertion fails first.

mod support;

use std::{collections::BTreeMap, time::Duration};

use serde_json::Value;
use support::*;

/// `aviary serve` over the demo config on a free port.
fn serve_demo() -> (Process, String) {
    serve_demo_with(&[])
}

/// [`serve_demo`] with `extra` flags.
fn serve_demo_with(extra: &[&str]) -> (Process, String) {
    let config = repo_root().join("deploy/local/aviary.toml");
    let config = config.to_str().expect("utf-8 path");
    let mut args = vec![
        "serve",
        "--config",
        config,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let mut server = Process::spawn(&args, &[]);
    let addr = server.wait_listening();
    (server, format!("http://{addr}"))
}

#[test]
fn serve_and_infer_split_pin_and_refuse() {
    let (_server, addr) = serve_demo();

    let output = run(
        &[
            "infer", "--addr", &addr, "--model", "demo", "--input", ROW, "--repeat", "300",
            "--json",
        ],
        &[],
    );
    let report = output.json();
    assert_eq!(report["model"], "demo", "{report:#}");
    assert_eq!(report["requests"], 300, "{report:#}");
    let versions: BTreeMap<String, u64> =
        serde_json::from_value(report["versions"].clone()).expect("versions: name -> count");
    // At 90/10 over 300 requests, P(version 2 never answers) = 0.9^300 ≈ 2e-14.
    assert_eq!(
        versions.keys().map(String::as_str).collect::<Vec<_>>(),
        ["1", "2"],
        "both versions answer and no other: {report:#}"
    );
    assert_eq!(versions.values().sum::<u64>(), 300, "{report:#}");
    assert!(
        versions["1"] > versions["2"],
        "version 1 has the larger share: {report:#}"
    );
    let mut probabilities = BTreeMap::new();
    for version in ["1", "2"] {
        let outputs = report["outputs"][version]
            .as_array()
            .unwrap_or_else(|| panic!("outputs of version {version}: {report:#}"));
        let output = outputs
            .iter()
            .find(|o| o["name"] == "probabilities")
            .unwrap_or_else(|| panic!("version {version} has probabilities: {report:#}"));
        assert_eq!(output["shape"], serde_json::json!([1, 3]), "{report:#}");
        assert_eq!(output["datatype"], "FP32", "{report:#}");
        probabilities.insert(version, output["data"].clone());
    }
    assert_ne!(
        probabilities["1"], probabilities["2"],
        "the versions answer differently"
    );

    let output = run(
        &[
            "infer",
            "--addr",
            &addr,
            "--model",
            "demo",
            "--input",
            ROW,
            "--version",
            "2",
        ],
        &[],
    );
    assert!(output.status.success(), "{output:#?}");
    assert!(output.stdout.contains("version 2"), "{output:#?}");
    assert!(!output.stdout.contains("version 1"), "{output:#?}");
    assert!(output.stdout.contains("probabilities"), "{output:#?}");

    let output = run(
        &[
            "infer",
            "--addr",
            &addr,
            "--model",
            "demo",
            "--input",
            "[[5.1,3.5,1.4,0.2,9.9]]",
        ],
        &[],
    );
    assert!(
        !output.status.success(),
        "a bad shape must fail: {output:#?}"
    );
    assert!(output.stderr.contains("InvalidArgument"), "{output:#?}");
    assert!(output.stderr.contains("input \"input\""), "{output:#?}");
}

#[test]
fn worker_and_bench() {
    let (_worker, addr) = start_worker(&repo_root().join("tests/models"));

    let output = run(
        &[
            "bench",
            "--addr",
            &addr,
            "--model",
            "demo",
            "--concurrency",
            "2",
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--json",
        ],
        &[],
    );
    let report = output.json();
    assert_eq!(report["model"], "demo", "{report:#}");
    assert!(
        report["requests"].as_u64().is_some_and(|n| n > 0),
        "some requests succeeded: {report:#}"
    );
    assert_eq!(
        report["errors"],
        serde_json::json!({}),
        "no request failed: {report:#}"
    );
    let served: u64 = report["versions"]
        .as_object()
        .expect("versions object")
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(
        Some(served),
        report["requests"].as_u64(),
        "every success is counted by a version: {report:#}"
    );
}

#[test]
fn sigterm_stops_serve_with_exit_code_zero() {
    let (mut server, addr) = serve_demo();
    // It really serves before it is told to stop.
    let output = run(
        &["infer", "--addr", &addr, "--model", "demo", "--input", ROW],
        &[],
    );
    assert!(output.status.success(), "{output:#?}");

    sigterm(&server);
    let status = server.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(0),
        "serve exits 0 on SIGTERM; stderr:\n{}",
        server.take_stderr()
    );
}

#[test]
fn missing_onnx_runtime_says_what_to_do() {
    let models = repo_root().join("tests/models");
    let missing = "/nonexistent/libonnxruntime.so";
    let output = run(
        &[
            "worker",
            "--repo",
            models.to_str().expect("utf-8 path"),
            "--listen",
            "127.0.0.1:0",
        ],
        &[("ORT_DYLIB_PATH", missing)],
    );
    assert!(!output.status.success(), "{output:#?}");
    assert!(
        !output.stdout.contains("listening"),
        "it never listens: {output:#?}"
    );
    assert!(output.stderr.contains("ORT_DYLIB_PATH"), "{output:#?}");
    assert!(
        output.stderr.contains(missing),
        "names the path: {output:#?}"
    );
    assert!(
        output.stderr.contains("unset it") && output.stderr.contains("libonnxruntime.so.1.31.1"),
        "says what to do: {output:#?}"
    );
}

#[test]
fn config_typo_is_rejected_naming_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let models = repo_root().join("tests/models");
    let cases = [
        (
            "wieght",
            format!(
                "[repository]\npath = \"{}\"\n[routes.demo]\nversions = [ {{ version = \"1\", wieght = 1 }} ]\n",
                models.display()
            ),
        ),
        (
            "max_mesage_bytes",
            "[server]\nmax_mesage_bytes = 1048576\n".to_owned(),
        ),
    ];
    for (key, text) in cases {
        let path = dir.path().join(format!("{key}.toml"));
        std::fs::write(&path, text).expect("write config");
        let output = run(
            &[
                "serve",
                "--config",
                path.to_str().expect("utf-8 path"),
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ],
            &[],
        );
        assert!(!output.status.success(), "{key}: {output:#?}");
        assert!(
            !output.stdout.contains("listening"),
            "{key}: never listens: {output:#?}"
        );
        assert!(output.stderr.contains(key), "names the key: {output:#?}");
        assert!(
            output.stderr.contains(&path.display().to_string()),
            "names the file: {output:#?}"
        );
    }
}

/// ONNX Runtime's own telemetry never starts: nothing is written under the user's home
/// (its device id and event database would go to `~/.cache/Microsoft/...`).
#[test]
fn onnx_runtime_telemetry_writes_nothing_to_home() {
    let home = tempfile::tempdir().expect("temp dir");
    let config = repo_root().join("deploy/local/aviary.toml");
    let mut args = vec!["serve", "--config", config.to_str().expect("utf-8 path")];
    args.extend(LOOPBACK_LISTENERS);
    let home_path = home.path().to_str().expect("utf-8 path");
    let mut server = Process::spawn(&args, &[("HOME", home_path)]);
    let addr = format!("http://{}", server.wait_listening());
    assert_eq!(infer_versions(&addr, Some("1"), 1).get("1"), Some(&1));
    sigterm(&server);
    assert!(server.wait_exit(START_DEADLINE).success());
    let written: Vec<_> = std::fs::read_dir(home.path())
        .expect("read home")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(written.is_empty(), "written to HOME: {written:?}");
}

/// `check-config` judges a file as a start would, without starting: the demo config is
/// valid; a broken one exits 1 listing every problem with its path (and a typo that a
/// start would refuse is refused the same way), with nothing listening.
#[test]
fn check_config_lists_every_problem_and_exits_1() {
    let demo = repo_root().join("deploy/local/aviary.toml");
    let output = run(&["check-config", demo.to_str().expect("utf-8 path")], &[]).ok();
    assert!(output.stdout.contains("aviary.toml: valid"), "{output:#?}");

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("aviary.toml");
    std::fs::write(
        &path,
        r#"
[server]
max_message_bytes = 10
[repository]
path = "models"
[routes.demo]
versions = [{ version = "1", weight = 90 }, { version = "7", weight = 10 }]
"#,
    )
    .expect("write config");
    let path = path.to_str().expect("utf-8 path");
    let output = run(&["check-config", path], &[]).failed();
    assert!(
        output
            .stderr
            .contains("server.max_message_bytes: 10 is too small"),
        "{output:#?}"
    );

    // Routes are checked against a copy of the models given by --repo.
    std::fs::write(
        path,
        r#"
[repository]
path = "/var/lib/aviary/models"
[routes.demo]
versions = [{ version = "1", weight = 90 }, { version = "7", weight = 10 }]
"#,
    )
    .expect("write config");
    let output = run(&["check-config", path], &[]).failed();
    assert!(output.stderr.contains("give --repo"), "{output:#?}");
    let models = repo_root().join("deploy/local/models");
    let models = models.to_str().expect("utf-8 path");
    let output = run(&["check-config", path, "--repo", models], &[]).failed();
    assert!(
        output
            .stderr
            .contains(r#"routes.demo.versions[1].version: model "demo" has no version "7""#),
        "{output:#?}"
    );
    assert!(output.stderr.contains("1 problem"), "{output:#?}");
    // The same file is wrong for `aviary gateway`, which runs no models itself; and
    // without the repository, for want of endpoints.
    let output = run(&["check-config", path, "--mode", "gateway"], &[]).failed();
    assert!(
        output
            .stderr
            .contains("repository: `aviary gateway` runs no models itself"),
        "{output:#?}"
    );
    std::fs::write(
        path,
        r#"
[routes.demo]
versions = [{ version = "1", weight = 90 }, { version = "7", weight = 10 }]
"#,
    )
    .expect("write config");
    let output = run(&["check-config", path], &[]).failed();
    assert!(
        output
            .stderr
            .contains("routes.demo.versions[0].endpoint: required"),
        "{output:#?}"
    );
}

/// A client holding a streaming call open (here a gRPC health `Watch`, as load balancers
/// and sidecars do; an open `ModelStreamInfer` behaves the same) must not keep the
/// server from stopping: after `--grace-period` the open stream is abandoned and the
/// process exits 0, instead of waiting for Kubernetes' SIGKILL.
#[test]
fn sigterm_with_an_open_stream_exits_zero_after_the_grace_period() {
    let (mut server, addr) = serve_demo_with(&["--grace-period", "1"]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _stream = runtime.block_on(hold_open(&addr));
    sigterm(&server);
    let status = server.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(0),
        "serve exits 0 on SIGTERM; stderr:\n{}",
        server.take_stderr()
    );
}
