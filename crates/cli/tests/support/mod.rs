//! What the binary tests share: a guard for `aviary` processes (killed and reaped on
//! drop, even when an assertion fails first), commands run to completion, and a
//! gateway serving a config file of its own. Every listener binds 127.0.0.1 port 0;
//! the tests read the bound addresses from the lines the process prints.
#![allow(dead_code, unreachable_pub)]

pub mod redis_server;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aviary::{
    pb::inference::{
        ModelInferRequest, ModelInferResponse,
        grpc_inference_service_client::GrpcInferenceServiceClient,
        model_infer_request::InferInputTensor,
    },
    tensor,
};
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};

const BIN: &str = env!("CARGO_BIN_EXE_aviary");

/// Upper bound for a server to load its models and listen (hang protection only).
pub const START_DEADLINE: Duration = Duration::from_secs(60);

/// Upper bound for a client command to finish (hang protection only).
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(120);

/// Upper bound for a watched config change to show (the watcher also polls every 2 s).
pub const CONFIG_DEADLINE: Duration = Duration::from_secs(30);

/// The longest any load loop runs (hang protection only).
pub const LOAD_LIMIT: Duration = Duration::from_secs(120);

/// The input row the demo model takes: one row of 4 features.
pub const ROW: &str = "[[5.1,3.5,1.4,0.2]]";

/// Environment that would change what a command talks to or how it logs; removed
/// from every process.
pub const AMBIENT: &[&str] = &[
    "AVIARY_CONFIG",
    "AVIARY_LISTEN",
    "AVIARY_ADMIN_LISTEN",
    "AVIARY_ADDR",
    "AVIARY_ADMIN",
    "AVIARY_GRACE_PERIOD",
    "AVIARY_LOG",
    "AVIARY_LOG_FORMAT",
    "RUST_LOG",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_SCHEDULE_DELAY",
];

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root exists")
}

/// A running `aviary` process; killed and reaped on drop.
pub struct Process {
    what: String,
    child: Child,
    pub stdout: Receiver<String>,
    stdout_seen: Vec<String>,
    pub stderr: Option<JoinHandle<String>>,
}

impl Process {
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut command = Command::new(BIN);
        command.args(args).envs(env.iter().copied());
        Process::spawn_command(command, &format!("aviary {}", args.join(" ")))
    }

    /// Starts `command` (an `aviary` binary, maybe a copy elsewhere) with piped output
    /// and without the [`AMBIENT`] environment; `what` names it in messages.
    pub fn spawn_command(mut command: Command, what: &str) -> Process {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for name in AMBIENT {
            if command.get_envs().all(|(set, _)| set != *name) {
                command.env_remove(name);
            }
        }
        let what = what.to_owned();
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads stdout until the `aviary: listening on ADDR` line (the inference API) and
    /// returns ADDR.
    pub fn wait_listening(&mut self) -> SocketAddr {
        self.wait_address("aviary: listening on ")
    }

    /// Reads stdout until the `aviary: admin listening on ADDR` line and returns ADDR.
    /// A gateway prints it after the inference line.
    pub fn wait_admin(&mut self) -> SocketAddr {
        self.wait_address("aviary: admin listening on ")
    }

    pub fn wait_address(&mut self, prefix: &str) -> SocketAddr {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    let addr = line
                        .strip_prefix(prefix)
                        .map(|a| a.trim().parse().expect("listening line has an address"));
                    self.stdout_seen.push(line);
                    if let Some(addr) = addr {
                        return addr;
                    }
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
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the process to exit, polling until `timeout`; panics (and the guard
    /// kills it) if it does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
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
    pub fn take_stdout(&mut self) -> String {
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
    pub fn take_stderr(&mut self) -> String {
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
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn ok(self) -> Output {
        assert!(self.status.success(), "command failed: {self:#?}");
        self
    }

    pub fn failed(self) -> Output {
        assert!(!self.status.success(), "command must fail: {self:#?}");
        self
    }

    pub fn json(&self) -> Value {
        assert!(self.status.success(), "command failed: {self:#?}");
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

/// Runs `aviary ARGS` to completion.
pub fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut process = Process::spawn(args, env);
    let status = process.wait_exit(COMMAND_DEADLINE);
    Output {
        status,
        stdout: process.take_stdout(),
        stderr: process.take_stderr(),
    }
}

/// `aviary infer --addr ADDR --model demo --input ROW EXTRA`, run to completion.
pub fn infer_demo(addr: &str, extra: &[&str]) -> Output {
    let mut args = vec!["infer", "--addr", addr, "--model", "demo", "--input", ROW];
    args.extend_from_slice(extra);
    run(&args, &[])
}

/// `aviary infer --repeat N --json` of demo through `addr`, pinned to `version` if
/// given: the answers by version.
pub fn infer_versions(addr: &str, version: Option<&str>, repeat: usize) -> BTreeMap<String, u64> {
    let repeat = repeat.to_string();
    let mut extra = vec!["--repeat", &repeat, "--json"];
    if let Some(version) = version {
        extra.extend(["--version", version]);
    }
    let report = infer_demo(addr, &extra).json();
    serde_json::from_value(report["versions"].clone()).expect("versions: name -> count")
}

/// A gateway process serving a config file of its own.
pub struct Served {
    pub server: Process,
    /// `http://` address of the inference API.
    pub addr: String,
    pub inference: SocketAddr,
    /// `http://` address of the admin API.
    pub admin: String,
    pub config: PathBuf,
    /// The folder of the config file, for state files beside it.
    pub dir: tempfile::TempDir,
    command: &'static str,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    metrics: Option<SocketAddr>,
    /// Read after `metrics` (the listening lines come in that order).
    http: Option<SocketAddr>,
}

impl Served {
    /// `aviary serve` over `config_text`, written to a temporary file it watches.
    /// `{dir}` in the text stands for that file's folder.
    pub fn start(config_text: &str, extra: &[&str]) -> Served {
        Served::start_command("serve", config_text, extra, &[])
    }

    /// [`Served::start`] with `env` set for the process.
    pub fn start_with_env(config_text: &str, extra: &[&str], env: &[(&str, &str)]) -> Served {
        Served::start_command("serve", config_text, extra, env)
    }

    /// `aviary gateway` (remote-only: every routed version names its worker's
    /// `endpoint`) over `config_text`, like [`Served::start`].
    pub fn gateway(config_text: &str, extra: &[&str]) -> Served {
        Served::start_command("gateway", config_text, extra, &[])
    }

    /// [`Served::gateway`] with `env` set for the process.
    pub fn gateway_with_env(config_text: &str, extra: &[&str], env: &[(&str, &str)]) -> Served {
        Served::start_command("gateway", config_text, extra, env)
    }

    fn start_command(
        command: &'static str,
        config_text: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Served {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("aviary.toml");
        let text = config_text.replace("{dir}", &dir.path().display().to_string());
        std::fs::write(&config, text).expect("write config");
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let (server, inference, admin) = Served::spawn(command, &config, &extra, &env);
        Served {
            server,
            addr: format!("http://{inference}"),
            inference,
            admin: format!("http://{admin}"),
            config,
            dir,
            command,
            extra,
            env,
            metrics: None,
            http: None,
        }
    }

    fn spawn(
        command: &str,
        config: &Path,
        extra: &[String],
        env: &[(String, String)],
    ) -> (Process, SocketAddr, SocketAddr) {
        let path = config.to_str().expect("utf-8 path");
        let mut args = vec![command, "--config", path];
        args.extend(LOOPBACK_LISTENERS);
        args.extend(extra.iter().map(String::as_str));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut server = Process::spawn(&args, &env);
        let inference = server.wait_listening();
        let admin = server.wait_admin();
        (server, inference, admin)
    }

    /// `ctl routes --json`'s entry of `model` at `version`, or null.
    pub fn route_entry(&self, model: &str, version: &str) -> Value {
        let routes = self.routes();
        routes["routes"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["model"] == model))
            .and_then(|r| {
                r["versions"]
                    .as_array()?
                    .iter()
                    .find(|v| v["version"] == version)
            })
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Where the gateway serves `/metrics` (read from its output once).
    /// The HTTP/REST listener's address (after [`Self::metrics_addr`]: the listening
    /// lines come in that order).
    pub fn http_addr(&mut self) -> SocketAddr {
        self.metrics_addr();
        *self
            .http
            .get_or_insert_with(|| self.server.wait_address("aviary: http listening on "))
    }

    pub fn metrics_addr(&mut self) -> SocketAddr {
        *self
            .metrics
            .get_or_insert_with(|| self.server.wait_address("aviary: metrics listening on "))
    }

    /// Stops the gateway with SIGTERM (asserting it exits 0) and starts it again over
    /// the same config file, on new ports.
    pub fn restart(&mut self) {
        sigterm(&self.server);
        let status = self.server.wait_exit(Duration::from_secs(30));
        assert_eq!(status.code(), Some(0), "serve exits 0 on SIGTERM");
        let (server, inference, admin) =
            Served::spawn(self.command, &self.config, &self.extra, &self.env);
        self.server = server;
        self.metrics = None;
        self.http = None;
        self.inference = inference;
        self.addr = format!("http://{inference}");
        self.admin = format!("http://{admin}");
    }

    /// The demo deployment (`deploy/local/aviary.toml`: demo 1 at 90, 2 at 10, mlp
    /// unrouted), from a copy whose repository path is absolute.
    pub fn demo() -> Served {
        Served::start(&demo_config(), &[])
    }

    /// `aviary ctl --admin ADMIN ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["ctl", "--admin", &self.admin];
        all.extend_from_slice(args);
        run(&all, &[])
    }

    /// `aviary ctl routes --json`.
    pub fn routes(&self) -> Value {
        self.ctl(&["routes", "--json"]).json()
    }

    /// `routes --json` without each version's health, which the readiness check
    /// changes on its own time: two reads compare equal when the table is the same.
    pub fn route_table(&self) -> Value {
        let mut routes = self.routes();
        for route in routes["routes"].as_array_mut().into_iter().flatten() {
            for version in route["versions"].as_array_mut().into_iter().flatten() {
                if let Some(version) = version.as_object_mut() {
                    version.remove("health");
                }
            }
        }
        routes
    }
}

/// A gateway's four listeners on loopback, each on a port the system picks.
pub const LOOPBACK_LISTENERS: [&str; 8] = [
    "--listen",
    "127.0.0.1:0",
    "--admin-listen",
    "127.0.0.1:0",
    "--metrics-listen",
    "127.0.0.1:0",
    "--http-listen",
    "127.0.0.1:0",
];

/// `rollout start demo --canary 2 --baseline 1 --steps 50,100`: the demo rollout the
/// tests start through `aviary ctl` (more flags go after it).
pub const DEMO_ROLLOUT: [&str; 9] = [
    "rollout",
    "start",
    "demo",
    "--canary",
    "2",
    "--baseline",
    "1",
    "--steps",
    "50,100",
];

/// The SHA-256 of `key` in hex, as a keys file holds it (`sha256sum`'s output).
pub fn sha256_hex(key: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One `[[keys]]` entry of a keys file: `name`, the hash of `key`, and `grants` (the
/// rest of the entry, e.g. `roles = ["infer"]`).
pub fn key_entry(name: &str, key: &str, grants: &str) -> String {
    format!(
        "[[keys]]\nname = \"{name}\"\nsha256 = \"{}\"\n{grants}\n\n",
        sha256_hex(key)
    )
}

/// `deploy/local/aviary.toml` with its repository path made absolute.
pub fn demo_config() -> String {
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
pub fn route_of(routes: &Value, model: &str) -> Option<Vec<(String, u64)>> {
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

pub fn pairs(list: &[(&str, u64)]) -> Option<Vec<(String, u64)>> {
    Some(list.iter().map(|(v, w)| ((*v).to_owned(), *w)).collect())
}

/// Whitespace-separated cells of every table row that starts with `cells`.
pub fn rows_starting<'a>(table: &'a str, cells: &[&str]) -> Vec<Vec<&'a str>> {
    table
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|row| row.starts_with(cells))
        .collect()
}

/// Polls `condition` every 100 ms until it holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
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

pub fn sigterm(process: &Process) {
    signal(process, "-TERM");
}

/// `kill -9`: the process dies at once, as on an OOM kill or a lost node.
pub fn sigkill(process: &Process) {
    signal(process, "-KILL");
}

/// Stops `process` as if it hung: it keeps its connections but answers nothing.
pub fn sigstop(process: &Process) {
    signal(process, "-STOP");
}

/// Lets a stopped process run again.
pub fn sigcont(process: &Process) {
    signal(process, "-CONT");
}

fn signal(process: &Process, signal: &str) {
    let kill = Command::new("kill")
        .args([signal, &process.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(kill.success(), "kill {signal} delivered");
}

/// `aviary worker` over `repository` on a free port; returns it and its `http://`
/// address.
pub fn start_worker(repository: &Path) -> (Process, String) {
    start_worker_with(repository, 2)
}

/// [`start_worker`] with `instances` sessions per version.
pub fn start_worker_with(repository: &Path, instances: usize) -> (Process, String) {
    start_worker_args(repository, instances, &[])
}

/// [`start_worker_with`], with `extra` arguments.
pub fn start_worker_args(repository: &Path, instances: usize, extra: &[&str]) -> (Process, String) {
    let instances = instances.to_string();
    let mut args = vec![
        "worker",
        "--repo",
        repository.to_str().expect("utf-8 path"),
        "--listen",
        "127.0.0.1:0",
        "--instances",
        &instances,
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let mut worker = Process::spawn(&args, &[]);
    let addr = format!("http://{}", worker.wait_listening());
    (worker, addr)
}

/// An `aviary controller` over the admin addresses `gateways` (comma-separated), on
/// free ports, with `extra` arguments; returns it and its admin address (`http://`).
pub fn start_controller_args(gateways: &str, extra: &[&str]) -> (Process, String) {
    let mut args = vec![
        "controller",
        "--gateways",
        gateways,
        "--admin-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let mut controller = Process::spawn(&args, &[]);
    let admin = format!("http://{}", controller.wait_admin());
    (controller, admin)
}

/// A connected channel to an `http://` address.
pub async fn connect(addr: &str) -> Channel {
    Endpoint::from_shared(addr.to_owned())
        .expect("valid url")
        .connect()
        .await
        .expect("the server accepts connections")
}

/// A v2 client on `channel` that takes the slow model's large answers.
pub fn client(channel: Channel) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::new(channel).max_decoding_message_size(64 << 20)
}

/// A multi-threaded runtime for a test's async clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A gateway config routing `slow` (tests/slow-models: about 200 ms per batch of
/// [`SLOW_BATCH`] rows) on two sessions.
pub fn slow_config() -> String {
    let models = repo_root().join("tests/slow-models");
    format!(
        "[repository]\npath = \"{}\"\ninstances = 2\nintra_op_threads = 1\ninter_op_threads = 1\n\n\
         [routes.slow]\nversions = [ {{ version = \"1\", weight = 1 }} ]\n",
        models.display()
    )
}

/// Rows and columns of the slow model's requests: batch 64 of `x` FP32 [-1, 512].
pub const SLOW_BATCH: usize = 64;
pub const SLOW_WIDTH: usize = 512;

pub fn slow_request() -> ModelInferRequest {
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

/// `y` of a slow response: its shape, datatype and raw bytes.
pub fn slow_output(response: &ModelInferResponse) -> (Vec<i64>, String, Vec<u8>) {
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

/// What the slow model at `addr` answers to [`slow_request`] (before any shutdown).
pub fn slow_reference(
    runtime: &tokio::runtime::Runtime,
    addr: &str,
) -> (Vec<i64>, String, Vec<u8>) {
    runtime.block_on(async {
        let response = client(connect(addr).await)
            .model_infer(slow_request())
            .await
            .expect("a slow request before shutdown")
            .into_inner();
        slow_output(&response)
    })
}

/// A request the server has accepted and is still working on.
pub type InFlight =
    tokio::task::JoinHandle<Result<tonic::Response<ModelInferResponse>, tonic::Status>>;

/// `n` slow requests the server at `addr` has accepted when this returns (without
/// sleeping): each client opens its own connection, hands the slow request to it (one
/// poll puts it in the channel's FIFO queue, so its HEADERS frame goes out before those
/// of any later request on the connection), then sends a ServerLive on the same
/// connection. The server reads a connection's frames in order, so once ServerLive
/// answers, it has accepted the slow request's stream. HTTP/2 graceful shutdown
/// (GOAWAY, then a PING round trip, then the last stream id) finishes every stream
/// accepted before it.
pub fn slow_requests_in_flight(
    runtime: &tokio::runtime::Runtime,
    addr: &str,
    n: usize,
) -> Vec<InFlight> {
    let (accepted_tx, accepted) = mpsc::channel::<()>();
    let clients: Vec<InFlight> = (0..n)
        .map(|_| {
            let addr = addr.to_owned();
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
                    .server_live(aviary::pb::inference::ServerLiveRequest {})
                    .await
                    .expect("ServerLive on the slow request's connection");
                accepted_tx.send(()).expect("the test is waiting");
                slow.await
            })
        })
        .collect();
    drop(accepted_tx);
    for i in 0..n {
        accepted
            .recv_timeout(START_DEADLINE)
            .unwrap_or_else(|e| panic!("slow request {i} was not accepted: {e}"));
    }
    clients
}

/// A stream open on the server at `addr` (a gRPC health Watch, as load balancers
/// hold) until dropped: a server shutting down waits for it up to its grace period,
/// so a test can look at the draining process for as long as it needs.
pub async fn hold_open(addr: &str) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let mut health = tonic_health::pb::health_client::HealthClient::new(connect(addr).await);
    let mut stream = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    stream.message().await.expect("first status");
    stream
}

/// One row for the demo model (4 features).
pub fn demo_request() -> ModelInferRequest {
    demo_rows("", &[[5.1, 3.5, 1.4, 0.2]])
}

/// A demo request of `rows` (4 features each) for `version` ("" unpinned).
pub fn demo_rows(version: &str, rows: &[[f32; 4]]) -> ModelInferRequest {
    let values: Vec<f32> = rows.iter().flatten().copied().collect();
    ModelInferRequest {
        model_name: "demo".into(),
        model_version: version.into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![rows.len() as i64, 4],
            ..Default::default()
        }],
        raw_input_contents: vec![tensor::to_raw(&values).into()],
        ..Default::default()
    }
}

/// Whether the tests run as root (else namespaces need a user namespace).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// What a [`Traffic`] client saw: answers by version, and every failure's message.
pub type Seen = (BTreeMap<String, u64>, Vec<String>);

/// Unpinned demo requests sent one after another to each address until stopped, on a
/// thread of their own; counts the answers by the version that served them.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Seen>>,
}

impl Traffic {
    /// Starts one client per `http://` address.
    pub fn start(addrs: &[&str]) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = addrs
            .iter()
            .map(|addr| {
                let (addr, stop) = ((*addr).to_owned(), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    runtime.block_on(send_until(addr, stop))
                })
            })
            .collect();
        Traffic { stop, threads }
    }

    /// Stops the clients; the answers by version and every failure's message.
    pub fn stop(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        let mut answered = BTreeMap::new();
        let mut failures = Vec::new();
        for thread in self.threads {
            let (by_version, failed) = thread.join().expect("traffic thread");
            for (version, n) in by_version {
                *answered.entry(version).or_default() += n;
            }
            failures.extend(failed);
        }
        (answered, failures)
    }
}

async fn send_until(addr: String, stop: Arc<AtomicBool>) -> Seen {
    let mut client = aviary::client::connect(&addr, None, &Default::default())
        .await
        .expect("the gateway accepts connections");
    let (mut answered, mut failures) = (BTreeMap::new(), Vec::new());
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < LOAD_LIMIT {
        match client.model_infer(demo_request()).await {
            Ok(response) => {
                *answered
                    .entry(response.into_inner().model_version)
                    .or_default() += 1
            }
            Err(status) => failures.push(format!("{:?}: {}", status.code(), status.message())),
        }
    }
    (answered, failures)
}

/// `demo` successes a worker counted for `version`.
pub async fn successes(worker: &str, version: &str) -> u64 {
    client(connect(worker).await)
        .model_statistics(aviary::pb::inference::ModelStatisticsRequest {
            name: "demo".into(),
            version: version.into(),
        })
        .await
        .unwrap_or_else(|s| panic!("statistics of {worker}: {s:?}"))
        .into_inner()
        .model_stats
        .iter()
        .filter_map(|s| s.inference_stats.as_ref()?.success.as_ref())
        .map(|d| d.count)
        .sum()
}

/// `GET /metrics` over plain HTTP/1.1: the status line and the body.
pub fn scrape(addr: SocketAddr) -> (String, String, String) {
    let stream = TcpStream::connect(addr).expect("the metrics endpoint accepts");
    http_get(stream, "/metrics").expect("an answer")
}

/// `GET /metrics` over HTTPS, trusting the CA in `ca` and presenting `identity`
/// (certificate and key files) when given; the error of a refused handshake.
pub fn scrape_tls(
    addr: SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> std::io::Result<(String, String, String)> {
    get_tls(addr, "/metrics", ca, identity)
}

/// `GET path` over HTTPS, as [`scrape_tls`].
pub fn get_tls(
    addr: SocketAddr,
    path: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> std::io::Result<(String, String, String)> {
    use tokio_rustls::rustls::{ClientConnection, StreamOwned, pki_types::ServerName};
    let config =
        aviary::tls::client_config(ca, identity, &[b"http/1.1"]).map_err(std::io::Error::other)?;
    let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
    let session = ClientConnection::new(Arc::new(config), name).map_err(std::io::Error::other)?;
    http_get(StreamOwned::new(session, TcpStream::connect(addr)?), path)
}

/// The HTTP/1.1 exchange of `GET path` over `stream`: status line, content type, body.
fn http_get(
    mut stream: impl Read + Write,
    path: &str,
) -> std::io::Result<(String, String, String)> {
    stream.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: aviary\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut answer = Vec::new();
    // A TLS peer that closes without close_notify still sent the whole answer.
    if let Err(error) = stream.read_to_end(&mut answer)
        && (answer.is_empty() || error.kind() != std::io::ErrorKind::UnexpectedEof)
    {
        return Err(error);
    }
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no head and body in {answer:?}")))?;
    let status = head.lines().next().unwrap_or_default().to_owned();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_owned();
    Ok((status, content_type, body.to_owned()))
}

/// Every sample line as `name{labels}` → value.
pub fn parse_samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}
