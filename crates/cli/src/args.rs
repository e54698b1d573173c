//! The `aviary` command line (clap derive). Settings a container sets by environment
//! have an `AVIARY_*` variable.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

/// Aviary: a gRPC inference gateway for ONNX models.
#[derive(Debug, Parser)]
#[command(name = "aviary", version, about)]
pub struct Cli {
    /// Threads that run the async runtime: serving, routing and the model runs short
    /// enough to run inline (default: one per core the process may use). One thread runs a
    /// single-threaded runtime, with no hand-offs between threads: the cheapest for a
    /// gateway that shares its node's cores (docs/benchmarks.md).
    #[arg(long, global = true, env = "AVIARY_ASYNC_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub async_threads: Option<u16>,
    /// Log lines on stderr as text, or as one JSON object per line (for a log
    /// collector). Filters are `AVIARY_LOG` (or `RUST_LOG`), e.g. `info,aviary_gateway=debug`.
    #[arg(long, global = true, env = "AVIARY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line: timestamp, level, target, message and fields, and the
    /// spans the event happened in.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway with an embedded worker for the config's [repository] (one process).
    Serve(ServeArgs),
    /// Run the gateway alone: every routed version names a remote worker `endpoint`.
    Gateway(ServeArgs),
    /// Run a standalone worker serving one model repository over the v2 protocol.
    Worker(WorkerArgs),
    /// Send inference requests and print the outputs and the version that served them.
    Infer(InferArgs),
    /// Load-test a v2 server: throughput, latency percentiles, errors.
    Bench(BenchArgs),
    /// Change a running gateway through its admin API: routes, weights, model versions.
    Ctl(crate::ctl::CtlArgs),
    /// Run the rollouts of many gateways on their summed stats (gateways set
    /// `[rollouts] controlled = true`).
    Controller(ControllerArgs),
    /// Check a config file as a gateway would at start, without starting anything:
    /// prints every problem with its path and exits 1, or says it is valid.
    CheckConfig(CheckConfigArgs),
}

/// `check-config`.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The config file (TOML).
    pub config: PathBuf,
    /// Which command the file is for (default: `serve` when it has a [repository],
    /// else `gateway`).
    #[arg(long, value_enum)]
    pub mode: Option<CheckMode>,
    /// Check routes against the models in this repository instead of the file's
    /// [repository] path (a file written for a container, checked where the models
    /// are a copy).
    #[arg(long)]
    pub repo: Option<PathBuf>,
}

/// The command a checked config is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckMode {
    /// `aviary serve`: versions without an endpoint run in the embedded worker.
    Serve,
    /// `aviary gateway`: every version names a remote worker.
    Gateway,
}

/// `controller`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("targets").required(true))]
pub struct ControllerArgs {
    /// The gateways' admin addresses, `HOST:PORT,HOST:PORT`.
    #[arg(
        long,
        env = "AVIARY_GATEWAYS",
        value_delimiter = ',',
        group = "targets"
    )]
    pub gateways: Vec<String>,
    /// A DNS name resolving to every gateway replica, `NAME:PORT` (the admin port),
    /// resolved again every evaluation (e.g. a Kubernetes headless Service).
    #[arg(long, env = "AVIARY_GATEWAYS_DNS", group = "targets")]
    pub gateways_dns: Option<String>,
    /// Where the controller serves the rollout admin RPCs.
    #[arg(long, env = "AVIARY_ADMIN_LISTEN", default_value = "127.0.0.1:8004")]
    pub admin_listen: SocketAddr,
    /// Prometheus `/metrics` listen address (default: 127.0.0.1:8006 when free).
    #[arg(long, env = "AVIARY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// How often active rollouts are judged, in milliseconds.
    #[arg(long, env = "AVIARY_EVALUATE_INTERVAL_MS", default_value_t = 5_000)]
    pub evaluate_interval_ms: u64,
    /// Where rollouts are kept across restarts (a JSON file, replaced atomically); a
    /// restarted controller resumes them. Without it rollouts live only in memory.
    #[arg(long, env = "AVIARY_STATE_FILE")]
    pub state_file: Option<PathBuf>,
    /// TLS on the admin listener.
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// API keys and roles for the admin listener (the gateway's keys-file format);
    /// read again when it changes.
    #[arg(long, env = "AVIARY_KEYS_FILE")]
    pub keys_file: Option<PathBuf>,
    /// A file holding the API key sent to the gateways (an `admin` key of theirs).
    #[arg(long, env = "AVIARY_GATEWAY_TOKEN_FILE")]
    pub gateway_token_file: Option<PathBuf>,
    /// Keep an audit trail in this folder (the gateway's JSON lines): every call that
    /// changes something and every rollout decision, with who and the result.
    #[arg(long, env = "AVIARY_AUDIT_DIR")]
    pub audit_dir: Option<PathBuf>,
    /// Call the gateways' admin listeners over TLS, trusting this CA (PEM); their
    /// certificates must name the host of `--gateways` (or of `--gateways-dns`).
    #[arg(long, env = "AVIARY_GATEWAY_TLS_CA")]
    pub gateway_tls_ca: Option<PathBuf>,
    /// The certificate presented to gateways whose admin listener has a `client_ca`.
    #[arg(
        long,
        env = "AVIARY_GATEWAY_TLS_CERT",
        requires_all = ["gateway_tls_key", "gateway_tls_ca"]
    )]
    pub gateway_tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "AVIARY_GATEWAY_TLS_KEY", requires = "gateway_tls_cert")]
    pub gateway_tls_key: Option<PathBuf>,
}

/// `serve` and `gateway`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Config file (TOML).
    #[arg(long, env = "AVIARY_CONFIG")]
    pub config: PathBuf,
    /// Listen address; overrides the config's server.listen (port 0 picks a free port).
    #[arg(long, env = "AVIARY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Admin API listen address; overrides the config's admin.listen.
    #[arg(long, env = "AVIARY_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Prometheus `/metrics` listen address; overrides the config's metrics.listen.
    #[arg(long, env = "AVIARY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// KServe v2 HTTP/REST listen address; overrides the config's http.listen.
    #[arg(long, env = "AVIARY_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "AVIARY_GRACE_PERIOD", default_value_t = 30.0)]
    pub grace_period: f64,
}

/// `worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Model repository: <repo>/<model>/<version>/model.onnx.
    #[arg(long, env = "AVIARY_REPO")]
    pub repo: PathBuf,
    /// Listen address (port 0 picks a free port).
    #[arg(long, env = "AVIARY_LISTEN", default_value = "127.0.0.1:8002")]
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address (default 127.0.0.1:8005 when free: 8002 is
    /// the worker's own gRPC port).
    #[arg(long, env = "AVIARY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// ONNX Runtime sessions per version (default: number of cores).
    #[arg(long, env = "AVIARY_INSTANCES")]
    pub instances: Option<usize>,
    /// ORT threads inside one operator.
    #[arg(long, env = "AVIARY_INTRA_OP_THREADS", default_value_t = 1)]
    pub intra_op_threads: usize,
    /// ORT threads across operators.
    #[arg(long, env = "AVIARY_INTER_OP_THREADS", default_value_t = 1)]
    pub inter_op_threads: usize,
    /// Requests expected to run at most this many microseconds (measured at load) run
    /// inline on the async thread instead of the blocking pool (0: never).
    #[arg(long, env = "AVIARY_INLINE_MAX_US", default_value_t = aviary_worker::model::DEFAULT_INLINE_MAX.as_micros() as u64)]
    pub inline_max_us: u64,
    /// Largest request or response message in bytes.
    #[arg(long, env = "AVIARY_MAX_MESSAGE_BYTES", default_value_t = aviary::server::DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Largest decoded size of one request's input tensors, in bytes; larger requests
    /// are refused with RESOURCE_EXHAUSTED before they are decoded.
    #[arg(
        long,
        env = "AVIARY_MAX_REQUEST_TENSOR_BYTES",
        default_value_t = aviary_worker::admission::DEFAULT_MAX_REQUEST_TENSOR_BYTES,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub max_request_tensor_bytes: u64,
    /// Largest decoded size of the input tensors of all requests being decoded or run
    /// at once, in bytes; a request that would go over it is refused at once.
    #[arg(
        long,
        env = "AVIARY_MAX_INFLIGHT_TENSOR_BYTES",
        default_value_t = aviary_worker::admission::DEFAULT_MAX_INFLIGHT_TENSOR_BYTES,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub max_inflight_tensor_bytes: u64,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "AVIARY_GRACE_PERIOD", default_value_t = 30.0)]
    pub grace_period: f64,
    /// Triton's RepositoryModelLoad/Unload on this port: `none` refuses them (the
    /// default, as Triton's), `explicit` serves them.
    #[arg(long, env = "AVIARY_MODEL_CONTROL", default_value = "none")]
    pub model_control: aviary_worker::ModelControl,
    /// TLS on the listener.
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// API keys and roles (the gateway's keys-file format): every call but health
    /// checks then needs a key; the gateway sends its `[workers] token_file`. Read
    /// again when it changes.
    #[arg(long, env = "AVIARY_KEYS_FILE")]
    pub keys_file: Option<PathBuf>,
    /// Keep an audit trail in this folder (the gateway's JSON lines): every call that
    /// changes something (Triton's model load and unload), with who and the result,
    /// and the data watch's findings.
    #[arg(long, env = "AVIARY_AUDIT_DIR")]
    pub audit_dir: Option<PathBuf>,
    /// How often the data watch looks for features crossing into drift and values
    /// flag-mode input rules let through (logged, and audited), in milliseconds.
    #[arg(long, env = "AVIARY_DATA_WATCH_INTERVAL_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub data_watch_interval_ms: u64,
}

/// The server and model a client command talks to.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// Server address.
    #[arg(long, env = "AVIARY_ADDR", default_value = "http://127.0.0.1:8001")]
    pub addr: String,
    /// Model name.
    #[arg(long)]
    pub model: String,
    /// Pin a version (default: the server's routing picks).
    #[arg(long)]
    pub version: Option<String>,
    /// API key for a gateway that requires one (sent as `authorization: Bearer`).
    #[arg(long, env = "AVIARY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// TLS, for an `https://` address.
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// What a client trusts and presents over TLS (`https://` addresses).
#[derive(Debug, Clone, Default, Args)]
pub struct ClientTlsArgs {
    /// The CA (PEM) the server's certificate must chain to.
    #[arg(long, env = "AVIARY_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// A client certificate (PEM) for a server that requires one (mTLS).
    #[arg(long, env = "AVIARY_CLIENT_CERT", global = true, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "AVIARY_CLIENT_KEY", global = true, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// The files, as the client takes them.
    pub fn files(&self) -> aviary::client::ClientTlsFiles {
        aviary::client::ClientTlsFiles {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        }
    }
}

/// TLS on a server's listener.
#[derive(Debug, Clone, Default, Args)]
pub struct ServerTlsArgs {
    /// The listener's certificate chain (PEM); with `--tls-key`, the listener speaks TLS.
    /// Read again when the file changes.
    #[arg(long, env = "AVIARY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "AVIARY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Only clients with a certificate signed by this CA (PEM) get in (mTLS).
    #[arg(long, env = "AVIARY_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve `/metrics` over TLS too, from the same files (with `--tls-client-ca`,
    /// scrapers then need a client certificate signed by it).
    #[arg(long, env = "AVIARY_METRICS_TLS", requires = "tls_cert")]
    pub metrics_tls: bool,
}

impl ServerTlsArgs {
    /// The files, when TLS is asked for.
    pub fn files(&self) -> Option<aviary::tls::TlsFiles> {
        Some(aviary::tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }
}

/// `infer`.
#[derive(Debug, Args)]
pub struct InferArgs {
    /// Which server and model.
    #[command(flatten)]
    pub target: TargetArgs,
    /// An input as JSON, `NAME=[[...]]`, or just `[[...]]` when the model has one input.
    #[arg(long = "input", short = 'i', required = true)]
    pub inputs: Vec<String>,
    /// Send the request this many times and count which versions answered.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which server and model.
    #[command(flatten)]
    pub target: TargetArgs,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Unmeasured warm-up seconds.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Size of every variable input dimension.
    #[arg(long, default_value_t = 1)]
    pub batch: i64,
    /// A gRPC header sent with every request, `NAME=VALUE` (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// A header sent with a new random value on every request (e.g. a sticky user key).
    #[arg(long)]
    pub random_header: Option<String>,
    /// Reload this version of the model through the admin API (`--admin`) all through
    /// the measured time, every `--reload-every-ms`: hot swaps under load, driven from
    /// this process.
    #[arg(long, requires = "admin")]
    pub reload_version: Option<String>,
    /// Milliseconds between the start of one reload and the next.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    pub reload_every_ms: u64,
    /// The server's admin API, for `--reload-version`.
    #[arg(long)]
    pub admin: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(name, value)| (name.to_ascii_lowercase(), value.to_owned()))
        .ok_or_else(|| format!("\"{text}\": write NAME=VALUE"))
}
