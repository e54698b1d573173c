//! `aviary ctl` and `aviary serve` as an operator runs them: a real gateway process on
//! 127.0.0.1 port 0 with its admin API, changed through `aviary ctl` processes, and a
//! SIGTERM drain with slow requests in flight. Every process is killed when its guard
//! drops, even when an assertion fails first.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aviary::{
    pb::inference::{
        ModelInferRequest, ModelInferResponse, ServerLiveRequest,
        grpc_inference_service_client::GrpcInferenceServiceClient,
        model_infer_request::InferInputTensor,
    },
    tensor,
};
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};

const BIN: &str = env!("CARGO_BIN_EXE_aviary");

/// Upper bound for a server to load its models and listen (hang protection only).
const START_DEADLINE: Duration = Duration::from_secs(60);

/// Upper bound for a client command to finish (hang protection only).
const COMMAND_DEADLINE: Duration = Duration::from_secs(120);

/// Upper bound for a watched config change to show (the watcher also polls every 2 s).
const CONFIG_DEADLINE: Duration = Duration::from_secs(30);

/// The input row the demo model takes: one row of 4 features.
const ROW: &str = "[[5.1,3.5,1.4,0.2]]";

/// Environment that would change what a command talks to; removed from every process.
const AMBIENT: [&str; 6] = [
    "AVIARY_CONFIG",
    "AVIARY_LISTEN",
    "AVIARY_ADMIN_LISTEN",
    "AVIARY_ADDR",
    "AVIARY_ADMIN",
    "AVIARY_GRACE_PERIOD",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root exists")
}

/// A running `aviary` process; killed and reaped on drop.
struct Process {
    what: String,
    child: Child,
    stdout: Receiver<String>,
    stdout_seen: Vec<String>,
    stderr: Option<JoinHandle<String>>,
}

impl Process {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for name in AMBIENT {
            command.env_remove(name);
        }
        command.envs(env.iter().copied());
        let what = format!("aviary {}", args.join(" "));
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        let (tx, stdout) = mpsc::channel();
        let out = child.stdout.take().expect("stdout is piped");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().expect("stderr is piped");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            text
        });
        Process {
            what,
            child,
            stdout,
            stdout_seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads stdout until the inference and the admin `listening on` lines.
    fn wait_listening(&mut self) -> (SocketAddr, SocketAddr) {
        let deadline = Instant::now() + START_DEADLINE;
        let (mut inference, mut admin) = (None, None);
        loop {
            if let (Some(inference), Some(admin)) = (inference, admin) {
                return (inference, admin);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    let parse = |rest: &str| -> SocketAddr {
                        rest.trim().parse().expect("listening line has an address")
                    };
                    if let Some(rest) = line.strip_prefix("aviary: listening on ") {
                        inference = Some(parse(rest));
                    } else if let Some(rest) = line.strip_prefix("aviary: admin listening on ") {
                        admin = Some(parse(rest));
                    }
                    self.stdout_seen.push(line);
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{} did not listen within {START_DEADLINE:?}", self.what)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.wait_exit(Duration::from_secs(10));
                    let stderr = self.take_stderr();
                    panic!(
                        "{} exited ({status}) before listening; stderr:\n{stderr}",
                        self.what
                    )
                }
            }
        }
    }

    /// The exit status if the process has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the process to exit, polling until `timeout`; panics (and the guard
    /// kills it) if it does not.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => panic!("{} still running after {timeout:?}", self.what),
                Err(e) => panic!("waiting for {}: {e}", self.what),
            }
        }
    }

    /// Everything the process wrote on stdout (call after it exited).
    fn take_stdout(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => self.stdout_seen.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("{}: stdout did not close", self.what),
            }
        }
        let mut text = self.stdout_seen.join("\n");
        text.push('\n');
        text
    }

    /// Everything the process wrote on stderr (call after it exited).
    fn take_stderr(&mut self) -> String {
        self.stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// What a finished command said.
#[derive(Debug)]
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn ok(self) -> Output {
        assert!(self.status.success(), "command failed: {self:#?}");
        self
    }

    fn failed(self) -> Output {
        assert!(!self.status.success(), "command must fail: {self:#?}");
        self
    }

    fn json(&self) -> Value {
        assert!(self.status.success(), "command failed: {self:#?}");
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

/// Runs `aviary ARGS` to completion.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut process = Process::spawn(args, env);
    let status = process.wait_exit(COMMAND_DEADLINE);
    Output {
        status,
        stdout: process.take_stdout(),
        stderr: process.take_stderr(),
    }
}

/// A gateway process serving a config file of its own.
struct Served {
    server: Process,
    /// `http://` address of the inference API.
    addr: String,
    inference: SocketAddr,
    /// `http://` address of the admin API.
    admin: String,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Served {
    /// `aviary serve` over `config_text`, written to a temporary file it watches.
    fn start(config_text: &str, extra: &[&str]) -> Served {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("aviary.toml");
        std::fs::write(&config, config_text).expect("write config");
        let path = config.to_str().expect("utf-8 path");
        let mut args = vec![
            "serve",
            "--config",
            path,
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let mut server = Process::spawn(&args, &[]);
        let (inference, admin) = server.wait_listening();
        Served {
            server,
            addr: format!("http://{inference}"),
            inference,
            admin: format!("http://{admin}"),
            config,
            _dir: dir,
        }
    }

    /// The demo deployment (`deploy/local/aviary.toml`: demo 1 at 90, 2 at 10, mlp
    /// unrouted), from a copy whose repository path is absolute.
    fn demo() -> Served {
        Served::start(&demo_config(), &[])
    }

    /// `aviary ctl --admin ADMIN ARGS`.
    fn ctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["ctl", "--admin", &self.admin];
        all.extend_from_slice(args);
        run(&all, &[])
    }

    /// `aviary ctl routes --json`.
    fn routes(&self) -> Value {
        self.ctl(&["routes", "--json"]).json()
    }
}

/// `deploy/local/aviary.toml` with its repository path made absolute.
fn demo_config() -> String {
    let original = std::fs::read_to_string(repo_root().join("deploy/local/aviary.toml"))
        .expect("read the demo config");
    let models = repo_root().join("deploy/local/models");
    let text = original.replace(
        "path = \"models\"",
        &format!("path = \"{}\"", models.display()),
    );
    assert_ne!(text, original, "the demo config names its repository path");
    text
}

/// `(version, weight)` of `model` in a `ctl routes --json` report, in split order.
fn route_of(routes: &Value, model: &str) -> Option<Vec<(String, u64)>> {
    routes["routes"]
        .as_array()
        .expect("routes is an array")
        .iter()
        .find(|r| r["model"] == model)
        .map(|r| {
            r["versions"]
                .as_array()
                .expect("versions is an array")
                .iter()
                .map(|v| {
                    (
                        v["version"].as_str().expect("version").to_owned(),
                        v["weight"].as_u64().expect("weight"),
                    )
                })
                .collect()
        })
}

fn pairs(list: &[(&str, u64)]) -> Option<Vec<(String, u64)>> {
    Some(list.iter().map(|(v, w)| ((*v).to_owned(), *w)).collect())
}

/// Whitespace-separated cells of every table row that starts with `cells`.
fn rows_starting<'a>(table: &'a str, cells: &[&str]) -> Vec<Vec<&'a str>> {
    table
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|row| row.starts_with(cells))
        .collect()
}

/// Polls `condition` every 100 ms until it holds or `timeout` passes.
fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sigterm(process: &Process) {
    let kill = Command::new("kill")
        .args(["-TERM", &process.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(kill.success(), "kill -TERM delivered");
}

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
    let report = run(
        &[
            "infer",
            "--addr",
            &served.addr,
            "--model",
            "demo",
            "--input",
            ROW,
            "--repeat",
            "50",
            "--json",
        ],
        &[],
    )
    .json();
    let versions: BTreeMap<String, u64> =
        serde_json::from_value(report["versions"].clone()).expect("versions: name -> count");
    assert_eq!(
        versions,
        BTreeMap::from([("2".to_owned(), 50)]),
        "with weights 0/100 only version 2 answers: {report:#}"
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
fn models_lists_every_version_with_state_path_and_card() {
    let served = Served::demo();
    let models = repo_root().join("deploy/local/models");

    let table = served.ctl(&["models"]).ok().stdout;
    for (model, version) in [("demo", "1"), ("demo", "2"), ("mlp", "1")] {
        let rows = rows_starting(&table, &[model, version]);
        assert_eq!(rows.len(), 1, "one row for {model} {version}:\n{table}");
        assert_eq!(rows[0][2], "READY", "{model} {version}:\n{table}");
        let path = models.join(model).join(version).join("model.onnx");
        assert_eq!(
            rows[0].last().copied(),
            Some(path.to_str().expect("utf-8 path")),
            "{model} {version} shows its file:\n{table}"
        );
    }

    let list = served.ctl(&["models", "--json"]).json();
    let list = list.as_array().expect("an array of versions");
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
    let listed: Vec<(&str, &str)> = only_demo
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
    let pinned = run(
        &[
            "infer",
            "--addr",
            &served.addr,
            "--model",
            "demo",
            "--version",
            "2",
            "--input",
            ROW,
        ],
        &[],
    )
    .failed();
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
    let demo2 = list
        .as_array()
        .expect("an array of versions")
        .iter()
        .find(|v| v["version"] == "2")
        .unwrap_or_else(|| panic!("demo 2 is listed again: {list:#}"));
    assert_eq!(demo2["state"], "READY", "{demo2:#}");

    let reloaded = served.ctl(&["reload", "mlp", "1", "--json"]).json();
    assert!(reloaded["load_ms"].is_u64(), "{reloaded:#}");
    assert_eq!(reloaded["action"], "reloaded", "{reloaded:#}");
}

#[test]
fn an_invalid_config_edit_is_rejected_naming_the_key_and_routes_keep_serving() {
    let served = Served::demo();
    let before = served.routes();
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
    assert_eq!(served.routes(), before, "the last good routes keep serving");

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

/// Rows and columns of the slow model's requests: batch 64 of `x` FP32 [-1, 512].
const SLOW_BATCH: usize = 64;
const SLOW_WIDTH: usize = 512;

fn slow_request() -> ModelInferRequest {
    let values: Vec<f32> = (0..SLOW_BATCH * SLOW_WIDTH)
        .map(|i| ((i * 7919) % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    ModelInferRequest {
        model_name: "slow".into(),
        id: "drain".into(),
        inputs: vec![InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![SLOW_BATCH as i64, SLOW_WIDTH as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![tensor::to_raw(&values).into()],
        ..Default::default()
    }
}

async fn connect(addr: &str) -> Channel {
    Endpoint::from_shared(addr.to_owned())
        .expect("valid url")
        .connect()
        .await
        .expect("the server accepts connections")
}

fn client(channel: Channel) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::new(channel).max_decoding_message_size(64 << 20)
}

/// `y` of a slow response: its shape, datatype and raw bytes.
fn slow_output(response: &ModelInferResponse) -> (Vec<i64>, String, Vec<u8>) {
    assert_eq!(response.outputs.len(), 1, "{:?}", response.outputs);
    let output = &response.outputs[0];
    assert_eq!(output.name, "y");
    let raw = response
        .raw_output_contents
        .first()
        .expect("raw output contents")
        .to_vec();
    (output.shape.clone(), output.datatype.clone(), raw)
}

/// SIGTERM while slow requests are in flight: every one of them completes, new
/// connections are refused as soon as the listener closes, and the process exits 0.
#[test]
fn sigterm_drains_slow_requests_in_flight_and_exits_zero() {
    let models = repo_root().join("tests/slow-models");
    let config = format!(
        "[repository]\npath = \"{}\"\ninstances = 2\nintra_op_threads = 1\ninter_op_threads = 1\n\n\
         [routes.slow]\nversions = [ {{ version = \"1\", weight = 1 }} ]\n",
        models.display()
    );
    let mut served = Served::start(&config, &["--grace-period", "30"]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // What a batch answers when nothing is shutting down.
    let reference = runtime.block_on(async {
        let response = client(connect(&served.addr).await)
            .model_infer(slow_request())
            .await
            .expect("a slow request before shutdown")
            .into_inner();
        slow_output(&response)
    });
    assert_eq!(
        reference.0,
        [SLOW_BATCH as i64, SLOW_WIDTH as i64],
        "y has the batch's shape"
    );
    assert_eq!(reference.1, "FP32");
    assert_eq!(reference.2.len(), SLOW_BATCH * SLOW_WIDTH * 4);

    // Knowing that a request is in flight, without sleeping: each client opens its
    // own connection, hands the slow request to it (one poll puts it in the channel's
    // FIFO queue, so its HEADERS frame goes out before those of any later request on
    // the connection), then sends a ServerLive on the same connection. The server
    // reads a connection's frames in order, so once ServerLive answers, it has
    // accepted the slow request's stream. HTTP/2 graceful shutdown (GOAWAY, then a PING round trip, then the last
    // stream id) finishes every stream accepted before it, so SIGTERM after all four
    // markers have answered leaves four slow requests in flight: two running on the
    // two instances (~200 ms each), two queued behind them.
    let (accepted_tx, accepted) = mpsc::channel::<()>();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let addr = served.addr.clone();
            let accepted_tx = accepted_tx.clone();
            runtime.spawn(async move {
                let channel = connect(&addr).await;
                let mut slow_client = client(channel.clone());
                let mut slow = std::pin::pin!(slow_client.model_infer(slow_request()));
                assert!(
                    futures::poll!(slow.as_mut()).is_pending(),
                    "a 200 ms inference cannot answer at once"
                );
                client(channel)
                    .server_live(ServerLiveRequest {})
                    .await
                    .expect("ServerLive on the slow request's connection");
                accepted_tx.send(()).expect("the test is waiting");
                slow.await
            })
        })
        .collect();
    drop(accepted_tx);
    for i in 0..clients.len() {
        accepted
            .recv_timeout(START_DEADLINE)
            .unwrap_or_else(|e| panic!("slow request {i} was not accepted: {e}"));
    }

    sigterm(&served.server);

    // The listener closes at once; the process still runs, finishing the requests.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut refused_while_draining = None;
    while Instant::now() < deadline {
        match TcpStream::connect_timeout(&served.inference, Duration::from_secs(1)) {
            Ok(stream) => drop(stream),
            Err(error) => {
                assert_eq!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionRefused,
                    "{error}"
                );
                refused_while_draining = Some(served.server.exited().is_none());
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        refused_while_draining,
        Some(true),
        "new connections are refused while in-flight requests still run"
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

    let status = served.server.wait_exit(Duration::from_secs(30));
    let stderr = served.server.take_stderr();
    assert_eq!(status.code(), Some(0), "serve exits 0; stderr:\n{stderr}");
    assert!(
        !stderr.contains("grace period over"),
        "the requests finished within the grace period; stderr:\n{stderr}"
    );
}
