//! A real Prometheus (Debian's package, installed by scripts/setup.sh) scrapes a
//! running `aviary serve` every second, and answers PromQL for the per-version request
//! rate and the exact counts sent. Prometheus runs on 127.0.0.1 with a temporary
//! config and data folder and is killed at the end.
mod support;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use support::{Served, connect, demo_request, repo_root, runtime};

/// A Prometheus of the test's own; killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Started scraping `target` (`host:port`) every second, or `None` when the
    /// `prometheus` binary is not installed. The same target is scraped a second time
    /// as job `aviary-replica` through the name `localhost`, so queries meet what a
    /// fleet gives them: the same series from several instances.
    fn start(target: &str) -> Option<Prometheus> {
        let port = target.rsplit_once(':').expect("host:port").1;
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: aviary\n    static_configs:\n      \
                 - targets: [\"{target}\"]\n  - job_name: aviary-replica\n    \
                 static_configs:\n      - targets: [\"localhost:{port}\"]\n"
            ),
        )
        .expect("write config");
        // Prometheus takes no port 0: a free one is picked and handed over.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
            Err(error) => panic!("starting prometheus: {error}"),
        };
        Some(Prometheus {
            child,
            port,
            _dir: dir,
        })
    }

    /// The JSON answer of an instant PromQL query.
    fn answer(&self, promql: &str) -> Option<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", encode(promql));
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: prometheus\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        let (_, body) = answer.split_once("\r\n\r\n")?;
        serde_json::from_str(body).ok()
    }

    /// The answer of an instant PromQL query: each series' labels and value.
    fn query(&self, promql: &str) -> Option<Vec<(BTreeMap<String, String>, f64)>> {
        let json = self.answer(promql)?;
        let results = json["data"]["result"].as_array()?;
        results
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()?
                    .iter()
                    .map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect::<Option<BTreeMap<_, _>>>()?;
                let value = r["value"][1].as_str()?.parse().ok()?;
                Some((labels, value))
            })
            .collect()
    }

    /// Polls `promql` until `done` holds for its answer, for at most 60 s.
    fn wait_for(
        &self,
        promql: &str,
        done: impl Fn(&[(BTreeMap<String, String>, f64)]) -> bool,
    ) -> Vec<(BTreeMap<String, String>, f64)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(answer) = self.query(promql) {
                if done(&answer) {
                    return answer;
                }
                last = Some(answer);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("Prometheus never answered `{promql}` as expected; last answer: {last:?}");
    }
}

/// Percent-encodes a query string value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Per-version values of an answer.
fn by_version(answer: &[(BTreeMap<String, String>, f64)]) -> BTreeMap<String, f64> {
    answer
        .iter()
        .filter_map(|(labels, value)| Some((labels.get("version")?.clone(), *value)))
        .collect()
}

#[test]
fn prometheus_scrapes_the_gateway_and_answers_per_version_rates_and_counts() {
    let models = repo_root().join("deploy/local/models");
    let config = format!(
        "[repository]\npath = \"{}\"\ninstances = 2\n\n[routes.demo]\nversions = [ \
         {{ version = \"1\", weight = 90 }}, {{ version = \"2\", weight = 10 }} ]\n",
        models.display()
    );
    let mut served = Served::start(&config, &[]);
    let target = served.metrics_addr().to_string();
    let Some(prometheus) = Prometheus::start(&target) else {
        eprintln!(
            "SKIPPED: `prometheus` is not installed (scripts/setup.sh installs Debian's \
             package where it runs as root with apt-get)"
        );
        return;
    };
    // The target is up once Prometheus has scraped it.
    prometheus.wait_for("up", |a| a.len() == 2 && a.iter().all(|(_, v)| *v == 1.0));

    // Traffic for about 4 s, so rates span several scrapes.
    let addr = served.addr.clone();
    let answered: BTreeMap<String, f64> = runtime().block_on(async {
        let mut client = support::client(connect(&addr).await);
        let mut answered = BTreeMap::new();
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            let response = client
                .model_infer(demo_request())
                .await
                .expect("answered")
                .into_inner();
            *answered.entry(response.model_version).or_insert(0.0) += 1.0;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        answered
    });
    assert!(answered.len() == 2, "both versions answered: {answered:?}");

    let rates = prometheus.wait_for(
        "sum by (version) (rate(aviary_requests_total{job=\"aviary\",model=\"demo\",code=\"OK\"}[10s]))",
        |a| by_version(a).len() == 2 && by_version(a).values().all(|r| *r > 0.0),
    );
    let rates = by_version(&rates);
    assert!(
        rates["1"] > rates["2"],
        "version 1 takes 90 % of the traffic: rates {rates:?}"
    );
    // Once a scrape after the traffic is in, the counts are exactly what was sent.
    let counts = prometheus.wait_for(
        "sum by (version) (aviary_requests_total{job=\"aviary\",model=\"demo\",code=\"OK\"})",
        |a| by_version(a) == answered,
    );
    assert_eq!(by_version(&counts), answered);

    // Every query of the Grafana dashboard is PromQL that Prometheus evaluates (the
    // dashboard's variables set to match everything) over both instances: a join that
    // ignored the instance would fail here as many-to-many.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/observability/grafana-dashboard.json"))
            .expect("the dashboard file"),
    )
    .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let promql = expr
                .replace("$__rate_interval", "10s")
                .replace("$model", ".*")
                .replace("$job", ".*");
            let json = prometheus.answer(&promql).expect("Prometheus answers");
            assert_eq!(
                json["status"], "success",
                "panel {:?}: `{promql}`: {json}",
                panel["title"]
            );
        }
    }
}
