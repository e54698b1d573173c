//! `/metrics` of a running `aviary serve`: exact counters per version and code after
//! known traffic, the histogram's count, the worker's statistics, the routes'
//! weights, the process metrics, the config file's changes, and docs/metrics.md listing
//! exactly the names served.
mod support;

use std::collections::{BTreeMap, BTreeSet};

use support::{CONFIG_DEADLINE, Served, connect, demo_request, eventually, repo_root, runtime};

fn config() -> String {
    let models = repo_root().join("deploy/local/models");
    format!(
        "[repository]\npath = \"{}\"\ninstances = 2\n\n[routes.demo]\nversions = [ \
         {{ version = \"1\", weight = 90 }}, {{ version = \"2\", weight = 10 }} ]\n",
        models.display()
    )
}

/// The metric names a body declares, as their samples are named (counters end in
/// `_total`).
fn declared(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            Some(match kind {
                "counter" => format!("{name}_total"),
                _ => name.to_owned(),
            })
        })
        .collect()
}

/// The names docs/metrics.md documents: the first backticked word of each table row
/// that is a metric name.
fn documented() -> BTreeSet<String> {
    let text =
        std::fs::read_to_string(repo_root().join("docs/metrics.md")).expect("docs/metrics.md");
    text.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|name| {
            (name.starts_with("aviary_") || name.starts_with("process_"))
                && name.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn counters_per_version_and_code_match_the_traffic_sent() {
    const VALID: usize = 200;
    const INVALID: usize = 7;
    let mut served = Served::start(&config(), &[]);
    let metrics = served.metrics_addr();
    let addr = served.addr.clone();
    let answered: BTreeMap<String, u64> = runtime().block_on(async {
        let mut client = support::client(connect(&addr).await);
        let mut answered = BTreeMap::new();
        for _ in 0..VALID {
            let response = client
                .model_infer(demo_request())
                .await
                .expect("a valid request is answered")
                .into_inner();
            *answered.entry(response.model_version).or_insert(0) += 1;
        }
        for _ in 0..INVALID {
            // Pinned to version 2, with a row of 3 features where the model takes 4.
            let mut wrong = demo_request();
            wrong.model_version = "2".into();
            wrong.inputs[0].shape = vec![1, 3];
            wrong.raw_input_contents[0] = aviary::tensor::to_raw(&[1.0f32, 2.0, 3.0]).into();
            let status = client
                .model_infer(wrong)
                .await
                .expect_err("a wrong shape is refused");
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        }
        answered
    });
    assert_eq!(answered.values().sum::<u64>(), VALID as u64);
    assert!(
        answered.contains_key("1"),
        "the 90 % version answered: {answered:?}"
    );

    let (status, content_type, body) = support::scrape(metrics);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let samples = support::parse_samples(&body);
    let value = |key: &str| samples.get(key).copied();
    for (version, count) in &answered {
        let labels = format!("model=\"demo\",version=\"{version}\"");
        assert_eq!(
            value(&format!("aviary_requests_total{{{labels},code=\"OK\"}}")),
            Some(*count as f64),
            "OK requests of version {version}"
        );
        let invalid = if version == "2" { INVALID } else { 0 };
        assert_eq!(
            value(&format!(
                "aviary_request_duration_seconds_count{{{labels}}}"
            )),
            Some((*count as usize + invalid) as f64),
            "every routed request of version {version} is in its histogram"
        );
        assert_eq!(
            value(&format!(
                "aviary_worker_requests_total{{{labels},outcome=\"success\"}}"
            )),
            Some(*count as f64),
            "the worker counts the same successes for version {version}"
        );
    }
    assert_eq!(
        value("aviary_requests_total{model=\"demo\",version=\"2\",code=\"INVALID_ARGUMENT\"}"),
        Some(INVALID as f64)
    );
    assert_eq!(
        value("aviary_requests_total{model=\"demo\",version=\"1\",code=\"INVALID_ARGUMENT\"}"),
        None,
        "no invalid request went to version 1"
    );
    assert!(
        samples.contains_key(
            "aviary_request_duration_seconds_bucket{le=\"+Inf\",model=\"demo\",version=\"1\"}"
        ),
        "the last bucket is +Inf, as Prometheus requires"
    );
    assert_eq!(
        value("aviary_route_weight{model=\"demo\",version=\"1\"}"),
        Some(90.0)
    );
    assert_eq!(
        value("aviary_route_weight{model=\"demo\",version=\"2\"}"),
        Some(10.0)
    );
    assert_eq!(
        value("aviary_model_version_ready{model=\"demo\",version=\"1\"}"),
        Some(1.0)
    );
    // The valid requests were drawn from the split; the invalid ones were pinned.
    for (version, count) in &answered {
        assert_eq!(
            value(&format!(
                "aviary_routing_decisions_total{{model=\"demo\",version=\"{version}\",reason=\"weighted\"}}"
            )),
            Some(*count as f64)
        );
    }
    assert_eq!(
        value("aviary_routing_decisions_total{model=\"demo\",version=\"2\",reason=\"pinned\"}"),
        Some(INVALID as f64)
    );
    // Start-up loaded demo 1, demo 2 and mlp 1; nothing was reloaded yet.
    assert_eq!(
        value("aviary_model_loads_total{kind=\"load\",outcome=\"success\"}"),
        Some(3.0)
    );
    assert_eq!(
        value("aviary_model_loads_total{kind=\"reload\",outcome=\"success\"}"),
        Some(0.0)
    );
    assert!(value("aviary_model_load_seconds_total").is_some_and(|s| s > 0.0));
    // The worker's queue and compute histograms hold every successful request.
    for (version, count) in &answered {
        let labels = format!("model=\"demo\",version=\"{version}\"");
        for name in [
            "aviary_worker_queue_duration_seconds",
            "aviary_worker_compute_duration_seconds",
        ] {
            assert_eq!(
                value(&format!("{name}_count{{{labels}}}")),
                Some(*count as f64),
                "{name} of version {version}"
            );
            assert_eq!(
                value(&format!("{name}_bucket{{le=\"+Inf\",{labels}}}")),
                Some(*count as f64)
            );
        }
    }
    // Each loaded version's memory is measured (mlp's 1.8 MB file and sessions
    // cannot take less than a few hundred KiB).
    assert!(
        value("aviary_model_version_memory_bytes{model=\"mlp\",version=\"1\"}")
            .is_some_and(|bytes| bytes > 256.0 * 1024.0),
        "mlp's memory: {:?}",
        value("aviary_model_version_memory_bytes{model=\"mlp\",version=\"1\"}")
    );
    assert_eq!(value("aviary_config_last_reload_successful"), Some(1.0));
    assert_eq!(value("aviary_config_file_readable"), Some(1.0));
    assert!(value("process_resident_memory_bytes").is_some_and(|rss| rss > 1e6));
    assert!(value("process_cpu_seconds_total").is_some_and(|cpu| cpu > 0.0));

    // docs/metrics.md lists exactly what is served.
    let declared = declared(&body);
    let documented = documented();
    let undocumented: Vec<_> = declared.difference(&documented).collect();
    let missing: Vec<_> = documented.difference(&declared).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in docs/metrics.md: {undocumented:?}"
    );
    assert!(
        missing.is_empty(),
        "in docs/metrics.md but not served: {missing:?}"
    );
    // A reload and an unload show in the lifecycle counters.
    let reloaded = served.ctl(&["reload", "demo", "1"]);
    assert!(reloaded.status.success(), "{reloaded:?}");
    let unloaded = served.ctl(&["unload", "mlp", "1", "--force"]);
    assert!(unloaded.status.success(), "{unloaded:?}");
    let samples = support::parse_samples(&support::scrape(metrics).2);
    assert_eq!(
        samples.get("aviary_model_loads_total{kind=\"reload\",outcome=\"success\"}"),
        Some(&1.0)
    );
    assert_eq!(samples.get("aviary_model_unloads_total"), Some(&1.0));
}

#[test]
fn a_worker_serves_its_own_metrics() {
    let (mut worker, addr) = support::start_worker(&repo_root().join("deploy/local/models"));
    let metrics = worker.wait_address("aviary: metrics listening on ");
    runtime().block_on(async {
        let mut client = support::client(connect(&addr).await);
        let mut request = demo_request();
        request.model_version = "1".into();
        for _ in 0..3 {
            client.model_infer(request.clone()).await.expect("answered");
        }
    });
    let (status, _, body) = support::scrape(metrics);
    assert_eq!(status, "HTTP/1.1 200 OK");
    let samples = support::parse_samples(&body);
    assert_eq!(
        samples
            .get("aviary_worker_requests_total{model=\"demo\",version=\"1\",outcome=\"success\"}"),
        Some(&3.0)
    );
    assert_eq!(
        samples.get("aviary_worker_inferences_total{model=\"demo\",version=\"1\"}"),
        Some(&3.0),
        "one row each"
    );
    assert!(samples.contains_key("process_open_fds"));
    assert!(
        !body.contains("aviary_requests_total"),
        "a worker routes nothing: no gateway metrics"
    );
}

#[test]
fn the_dashboard_and_the_alerts_use_only_documented_metrics() {
    let documented = documented();
    for file in ["grafana-dashboard.json", "alerts.yml"] {
        let text = std::fs::read_to_string(repo_root().join("deploy/observability").join(file))
            .expect("the file");
        let used: BTreeSet<String> = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| word.starts_with("aviary_") || word.starts_with("process_"))
            .map(|word| {
                // A histogram's series are its name plus a suffix.
                ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|suffix| word.strip_suffix(suffix))
                    .filter(|base| documented.contains(*base))
                    .unwrap_or(word)
                    .to_owned()
            })
            .collect();
        assert!(!used.is_empty(), "{file} uses Aviary's metrics");
        let unknown: Vec<_> = used.difference(&documented).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics that do not exist: {unknown:?}"
        );
    }
}

#[test]
fn json_logs_are_one_object_per_line_and_record_route_changes() {
    let served = Served::start(&config(), &["--log-format", "json"]);
    let changed = served.ctl(&["set-weights", "demo", "1=50", "2=50"]);
    assert!(changed.status.success(), "{changed:?}");
    // Admin changes to versions are logged, done or refused.
    served.ctl(&["reload", "demo", "1"]).ok();
    served.ctl(&["unload", "demo", "1"]).failed();
    let mut server = served.server;
    support::sigterm(&server);
    let status = server.wait_exit(std::time::Duration::from_secs(30));
    assert_eq!(status.code(), Some(0));
    let stderr = server
        .stderr
        .take()
        .expect("stderr is read")
        .join()
        .expect("stderr reader");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty(), "the server logged");
    for line in &lines {
        assert!(
            line["timestamp"].is_string()
                && line["level"].is_string()
                && line["fields"]["message"].is_string(),
            "every line has a timestamp, a level and a message: {line}"
        );
    }
    let change = lines
        .iter()
        .find(|l| {
            l["fields"]["message"] == "route changed"
                && l["fields"]["model"] == "demo"
                && l["fields"]["after"] == "1=50 2=50"
        })
        .unwrap_or_else(|| panic!("the weight change is logged: {stderr}"));
    assert_eq!(change["fields"]["before"], "1=90 2=10", "{change}");
    let logged = |message: &str| {
        lines.iter().any(|l| {
            l["fields"]["message"] == message
                && l["fields"]["model"] == "demo"
                && l["fields"]["version"] == "1"
        })
    };
    assert!(logged("version reloaded through the admin API"), "{stderr}");
    assert!(
        logged("unload through the admin API refused or failed"),
        "an unload of a weighted version is refused, and logged: {stderr}"
    );
}

#[test]
fn shadow_mirrors_and_comparisons_are_counted() {
    const SENT: usize = 40;
    let models = repo_root().join("deploy/local/models");
    let config = format!(
        "[repository]\npath = \"{}\"\ninstances = 2\n\n[routes.demo]\nversions = [ \
         {{ version = \"1\", weight = 100 }} ]\nshadow = {{ version = \"2\", percent = 100 }}\n",
        models.display()
    );
    let mut served = Served::start(&config, &[]);
    let metrics = served.metrics_addr();
    let addr = served.addr.clone();
    runtime().block_on(async {
        let mut client = support::client(connect(&addr).await);
        for _ in 0..SENT {
            client.model_infer(demo_request()).await.expect("answered");
        }
    });
    let shadow = |samples: &BTreeMap<String, f64>, outcome: &str| {
        samples
            .get(&format!(
                "aviary_shadow_requests_total{{model=\"demo\",version=\"2\",outcome=\"{outcome}\"}}"
            ))
            .copied()
            .unwrap_or(0.0)
    };
    // Per output, one comparison per mirrored answer (each has one row).
    let compared = |samples: &BTreeMap<String, f64>, output: &str| -> f64 {
        ["agree", "disagree"]
            .iter()
            .filter_map(|result| {
                samples.get(&format!(
                    "aviary_shadow_comparisons_total{{model=\"demo\",version=\"2\",output=\"{output}\",result=\"{result}\"}}"
                ))
            })
            .sum()
    };
    // Comparisons happen after the answers, on the mirror's own task.
    let settled = support::eventually(support::CONFIG_DEADLINE, || {
        let samples = support::parse_samples(&support::scrape(metrics).2);
        let done = shadow(&samples, "sent") - shadow(&samples, "failed");
        done > 0.0
            && compared(&samples, "label") == done
            && compared(&samples, "probabilities") == done
    });
    let samples = support::parse_samples(&support::scrape(metrics).2);
    assert!(settled, "every mirrored answer is compared: {samples:?}");
    assert_eq!(
        shadow(&samples, "sent") + shadow(&samples, "dropped"),
        SENT as f64,
        "every request was mirrored or dropped"
    );
}

#[test]
fn a_rejected_config_change_and_a_deleted_file_show_on_metrics() {
    let mut served = Served::start(&config(), &[]);
    let metrics = served.metrics_addr();
    let sample = |key: &str| {
        support::parse_samples(&support::scrape(metrics).2)
            .get(key)
            .copied()
    };
    let rejected_before = sample("aviary_config_reloads_total{outcome=\"rejected\"}");
    assert_eq!(rejected_before, Some(0.0));
    std::fs::write(
        &served.config,
        "[routes.demo]\nversions = [ { version = \"1\", weight = -1 } ]\n",
    )
    .expect("write a broken config");
    assert!(
        eventually(CONFIG_DEADLINE, || {
            sample("aviary_config_reloads_total{outcome=\"rejected\"}") == Some(1.0)
        }),
        "the rejection is counted"
    );
    assert_eq!(sample("aviary_config_last_reload_successful"), Some(0.0));
    std::fs::remove_file(&served.config).expect("delete the config");
    assert!(
        eventually(CONFIG_DEADLINE, || sample("aviary_config_file_readable")
            == Some(0.0)),
        "a deleted file shows"
    );
    // The good config back: applied, and the gauges recover.
    std::fs::write(&served.config, config()).expect("restore the config");
    assert!(
        eventually(CONFIG_DEADLINE, || {
            sample("aviary_config_last_reload_successful") == Some(1.0)
                && sample("aviary_config_file_readable") == Some(1.0)
        }),
        "the restored file applies"
    );
    assert!(sample("aviary_config_reloads_total{outcome=\"applied\"}").is_some_and(|n| n >= 1.0));
}

#[test]
fn experiment_feedback_is_counted_per_version_and_kind() {
    let mut served = Served::start(&config(), &[]);
    let metrics = served.metrics_addr();
    for outcome in [
        &["--correct"][..],
        &["--correct"],
        &["--incorrect"],
        &["--reward", "2.5"],
        &["--reward", "-0.5"],
    ] {
        let mut args = vec!["feedback", "demo", "2", "req-1"];
        args.extend_from_slice(outcome);
        served.ctl(&args).ok();
    }
    let samples = support::parse_samples(&support::scrape(metrics).2);
    let feedback = |kind: &str| {
        samples
            .get(&format!(
                "aviary_experiment_feedback_total{{model=\"demo\",version=\"2\",kind=\"{kind}\"}}"
            ))
            .copied()
    };
    assert_eq!(feedback("correct"), Some(2.0), "{samples:#?}");
    assert_eq!(feedback("incorrect"), Some(1.0));
    assert_eq!(feedback("reward"), Some(2.0));
    assert_eq!(
        samples.get("aviary_experiment_reward_mean{model=\"demo\",version=\"2\"}"),
        Some(&1.0)
    );
    assert!(
        !samples
            .keys()
            .any(|k| k.starts_with("aviary_experiment_feedback_total")
                && k.contains("version=\"1\"")),
        "version 1 got no feedback"
    );
}
