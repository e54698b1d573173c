//! The configuration file (`aviary.toml`): server settings, the embedded model
//! repository, and a route per model naming its versions, their weights and, for
//! remote workers, where each version is served.
//!
//! Relative paths are resolved against the file's folder, so a config works from any
//! current directory. These are plain data, as the file says them; the gateway builds
//! its own types from them (a route: [`crate::route::Route`]).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use aviary_router::{
    RuleSpec, StickySpec,
    rollout::{Gates, RolloutPlan, Step},
};
use aviary_worker::{ModelControl, VersionPolicy};

use serde::Deserialize;

use crate::GatewayError;

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listener and protocol limits.
    #[serde(default)]
    pub server: ServerConfig,
    /// The admin API listener.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The Prometheus endpoint's listener.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The KServe v2 HTTP/REST endpoint's listener.
    #[serde(default)]
    pub http: HttpConfig,
    /// The approval workflow (see `crate::registry`); absent: versions take traffic
    /// whatever their stage.
    #[serde(default)]
    pub registry: Option<RegistryConfig>,
    /// OpenTelemetry trace export (off unless an endpoint is set here or in
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`).
    #[serde(default)]
    pub tracing: TracingConfig,
    /// API keys and roles (off unless a keys file is set).
    #[serde(default)]
    pub auth: AuthConfig,
    /// The audit trail (off unless a folder is set).
    #[serde(default)]
    pub audit: AuditConfig,
    /// How the gateway calls its remote workers.
    #[serde(default)]
    pub workers: WorkersConfig,
    /// The embedded worker's model repository (`aviary serve`).
    pub repository: Option<RepositoryConfig>,
    /// MLflow Model Registries whose versions are fetched into the repository.
    #[serde(default)]
    pub mlflow: Vec<crate::sources::mlflow::MlflowConfig>,
    /// S3 or S3-compatible buckets whose versions are fetched into the repository.
    #[serde(default)]
    pub bucket: Vec<crate::sources::bucket::BucketConfig>,
    /// Routes by model name.
    #[serde(default)]
    pub routes: BTreeMap<String, RouteConfig>,
    /// The progressive rollout driver.
    #[serde(default)]
    pub rollouts: RolloutsConfig,
    /// Where routes with `dead_letters = true` keep the requests that finally failed.
    #[serde(default)]
    pub dead_letters: DeadLettersConfig,
    /// The prediction cache of routes with `cache = { .. }`: its size bound and its
    /// optional shared Redis tier.
    #[serde(default)]
    pub cache: CacheConfig,
}

/// The prediction cache's in-process bound and its optional Redis tier (`[cache]`).
/// Set `max_entries` or `max_bytes`, not both; neither: `max_bytes` 256 MiB.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// The most answers held in this process.
    pub max_entries: Option<u64>,
    /// The most bytes of answers held in this process (each weighs its encoded size).
    pub max_bytes: Option<u64>,
    /// A Redis server shared by several gateways, asked after an in-process miss.
    #[serde(default)]
    pub redis: Option<CacheRedisConfig>,
}

/// The prediction cache's shared Redis tier (`[cache] redis = { .. }`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRedisConfig {
    /// `redis://[user:password@]host[:port][/db]` (or `redis+unix:///path`).
    pub url: String,
    /// How long Redis keeps an answer, in milliseconds; absent: the route's `ttl_ms`.
    pub ttl_ms: Option<u64>,
    /// The longest a look-up may take before the request goes on without it, in
    /// milliseconds.
    #[serde(default = "default_cache_redis_timeout_ms")]
    pub timeout_ms: u64,
    /// Prefix of every key, so several deployments can share one Redis.
    #[serde(default = "default_cache_key_prefix")]
    pub key_prefix: String,
}

fn default_cache_redis_timeout_ms() -> u64 {
    20
}

fn default_cache_key_prefix() -> String {
    "aviary:cache:".to_owned()
}

/// The in-process bound when `[cache]` sets none.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// A route's prediction cache (`cache = { ttl_ms = 60000 }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheConfig {
    /// How long an answer is served from the cache, in milliseconds.
    #[serde(default = "default_route_cache_ttl_ms")]
    pub ttl_ms: u64,
}

fn default_route_cache_ttl_ms() -> u64 {
    60_000
}

/// The dead-letter queue's folder and size cap, and its optional Redis sink.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLettersConfig {
    /// The folder, relative to the config file.
    #[serde(default = "default_dead_letters_folder")]
    pub folder: PathBuf,
    /// The most bytes kept; beyond it the oldest letters are dropped (and counted).
    #[serde(default = "default_dead_letters_max_bytes")]
    pub max_bytes: u64,
    /// A Redis stream each letter is also added to; the folder stays the record that
    /// `aviary ctl dlq list|replay` reads.
    #[serde(default)]
    pub redis: Option<RedisSinkConfig>,
}

impl Default for DeadLettersConfig {
    fn default() -> Self {
        DeadLettersConfig {
            folder: default_dead_letters_folder(),
            max_bytes: default_dead_letters_max_bytes(),
            redis: None,
        }
    }
}

/// The Redis stream dead letters are also sent to (`[dead_letters] redis = { .. }`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSinkConfig {
    /// `redis://[user:password@]host[:port][/db]` (or `redis+unix:///path`).
    pub url: String,
    /// The stream's key.
    #[serde(default = "default_redis_stream")]
    pub stream: String,
    /// About how many entries the stream keeps (`XADD MAXLEN ~`): Redis trims the
    /// oldest past it, in whole nodes, so the stream may briefly hold a few more.
    #[serde(default = "default_redis_max_len")]
    pub max_len: u64,
}

fn default_redis_stream() -> String {
    "aviary:dead-letters".to_owned()
}

fn default_redis_max_len() -> u64 {
    100_000
}

fn default_dead_letters_folder() -> PathBuf {
    PathBuf::from("dead-letters")
}

fn default_dead_letters_max_bytes() -> u64 {
    256 * 1024 * 1024
}

/// How this gateway drives progressive rollouts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutsConfig {
    /// How often active rollouts are judged on their step metrics, in milliseconds.
    #[serde(default = "default_evaluate_interval_ms")]
    pub evaluate_interval_ms: u64,
    /// Where rollouts are kept across restarts, relative to the config file; absent:
    /// rollouts live only as long as the process.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// Rollouts started when the gateway starts, by model (`[rollouts.plans.demo]`).
    #[serde(default)]
    pub plans: BTreeMap<String, PlanConfig>,
    /// An `aviary controller` runs the rollouts of many gateways: this one drives none
    /// and refuses rollout commands, and only serves its stats and takes route changes.
    #[serde(default)]
    pub controlled: bool,
}

/// `[registry]`: versions not approved take at most the canary cap of unpinned traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// The largest share (percent, 0 to 100) of a model's unpinned traffic a version
    /// that is not approved may take; default 0 (pinned and shadow traffic only).
    #[serde(default)]
    pub canary_cap_percent: u32,
    /// Where stages set while running (approvals, promotions) are kept, relative to
    /// the config file; absent: they last as long as the process.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
}

impl Default for RolloutsConfig {
    fn default() -> Self {
        RolloutsConfig {
            evaluate_interval_ms: default_evaluate_interval_ms(),
            state_file: None,
            plans: BTreeMap::new(),
            controlled: false,
        }
    }
}

/// A rollout plan in the config file; the model is its key under `rollouts.plans`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// The version serving today.
    pub baseline: String,
    /// The version being rolled out.
    pub canary: String,
    /// Canary weights in order; strictly increasing, the last one 100.
    pub steps: Vec<Step>,
    /// What the canary must keep to within to go on.
    pub gates: Gates,
}

impl PlanConfig {
    /// The plan for `model`.
    pub fn plan(&self, model: &str) -> RolloutPlan {
        RolloutPlan {
            model: model.to_owned(),
            baseline: self.baseline.clone(),
            canary: self.canary.clone(),
            steps: self.steps.clone(),
            gates: self.gates.clone(),
        }
    }
}

fn default_evaluate_interval_ms() -> u64 {
    1000
}

/// Listener and protocol limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listen address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Largest request or response message, in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Whether Triton's RepositoryModelLoad and RepositoryModelUnload are served on
    /// the inference port: `none` (the default) refuses them; `explicit` serves them.
    #[serde(default)]
    pub model_control: ModelControl,
    /// Compressions of inference responses for clients that accept them
    /// (`grpc-accept-encoding`), in order of preference: `gzip`, `deflate`; empty (the
    /// default): uncompressed. Compressed requests are accepted either way.
    #[serde(default)]
    pub response_compression: Vec<Compression>,
    /// TLS on the inference listener; absent: plaintext.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// A rate limit per client address, for a gateway without `[auth]` (with keys,
    /// each key's `rate_limit` applies instead).
    #[serde(default)]
    pub peer_rate_limit: Option<PeerRateLimit>,
    /// How long an open sequence (Triton's `sequence_id`) keeps its version without a
    /// request, in milliseconds; then it is forgotten and its next request refused.
    #[serde(default = "default_sequence_idle_timeout_ms")]
    pub sequence_idle_timeout_ms: u64,
}

fn default_sequence_idle_timeout_ms() -> u64 {
    crate::sequences::DEFAULT_IDLE_TIMEOUT.as_millis() as u64
}

/// A gRPC message compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// `gzip`.
    Gzip,
    /// `deflate` (zlib).
    Deflate,
}

impl Compression {
    /// tonic's name for it.
    pub fn encoding(self) -> tonic::codec::CompressionEncoding {
        match self {
            Compression::Gzip => tonic::codec::CompressionEncoding::Gzip,
            Compression::Deflate => tonic::codec::CompressionEncoding::Deflate,
        }
    }
}

/// `peer_rate_limit = { per_second = 200, burst = 400 }`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerRateLimit {
    /// Calls a second each address may make.
    pub per_second: f64,
    /// Calls an address may make at once after a quiet spell (default: one second's worth).
    pub burst: Option<f64>,
}

impl PeerRateLimit {
    /// The burst in force.
    pub fn burst(&self) -> f64 {
        self.burst.unwrap_or(self.per_second.max(1.0))
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            max_message_bytes: default_max_message_bytes(),
            model_control: ModelControl::default(),
            response_compression: Vec::new(),
            tls: None,
            peer_rate_limit: None,
            sequence_idle_timeout_ms: default_sequence_idle_timeout_ms(),
        }
    }
}

/// A listener's TLS: `tls = { cert = "tls/tls.crt", key = "tls/tls.key" }`, paths
/// relative to this file; the files are read again when they change.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs (PEM).
    pub client_ca: Option<PathBuf>,
}

impl TlsConfig {
    /// The files, as the TLS layer takes them.
    pub fn files(&self) -> aviary::tls::TlsFiles {
        aviary::tls::TlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            client_ca: self.client_ca.clone(),
        }
    }

    fn resolve(&mut self, base: &Path) {
        for path in [
            Some(&mut self.cert),
            Some(&mut self.key),
            self.client_ca.as_mut(),
        ]
        .into_iter()
        .flatten()
        .filter(|p| p.is_relative())
        {
            *path = base.join(&*path);
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8001))
}

fn default_max_message_bytes() -> usize {
    aviary::server::DEFAULT_MAX_MESSAGE_BYTES
}

/// The admin API (`aviary ctl` talks to it).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen address; `--admin-listen` overrides it. Keep it on loopback or a
    /// private network: the admin API changes what the gateway serves.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// Whether to serve the admin API at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// TLS on the admin listener (with `client_ca`, only clients with a certificate
    /// it signed get in); absent: plaintext.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            enabled: true,
            tls: None,
        }
    }
}

/// `GET /metrics` for Prometheus (see docs/metrics.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Listen address; `--metrics-listen` overrides it. Unset: Triton's metrics port,
    /// [`DEFAULT_METRICS_LISTEN`], when it is free (another Aviary process on the same
    /// host may hold it; then this one serves no metrics and says so).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Whether to serve `/metrics` at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// HTTPS, and with `client_ca` scrapers must present a certificate; unset:
    /// plaintext.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: None,
            enabled: true,
            tls: None,
        }
    }
}

/// `[http]`: the KServe v2 HTTP/REST endpoint (see docs/protocol.md, "HTTP/REST"):
/// the same calls, checks and routing as the gRPC listener, as JSON.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address; `--http-listen` overrides it. Unset: Triton's HTTP port,
    /// [`DEFAULT_HTTP_LISTEN`], when it is free (another Aviary process on the same
    /// host may hold it; then this one serves no HTTP/REST and says so).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Whether to serve HTTP/REST at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// HTTPS, and with `client_ca` clients must present a certificate (their names
    /// are identities for `[auth]`, as on the gRPC listener); unset: plaintext.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: None,
            enabled: true,
            tls: None,
        }
    }
}

/// `[auth]`: who may call what (see `crate::auth`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The keys file (relative to this file): every call but health checks then needs
    /// a key with the right role. Read again when it changes.
    pub keys_file: Option<PathBuf>,
}

/// `[workers]`: how the gateway calls its remote workers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    /// A file holding the API key sent to every worker (relative to this file), for
    /// workers started with `--keys-file`; read at start.
    pub token_file: Option<PathBuf>,
    /// TLS to workers with `https://` endpoints.
    pub tls: Option<WorkersTlsConfig>,
}

/// `[workers] tls = { ca = "tls/ca.crt" }`, and `cert`/`key` for workers that want a
/// client certificate (`--tls-client-ca`); PEM files relative to this file, read at start.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersTlsConfig {
    /// The CA the workers' certificates chain to.
    pub ca: PathBuf,
    /// The gateway's client certificate chain.
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
}

/// `[audit]`: the audit trail's folder, what it records and how long it keeps it (see
/// `crate::audit`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The folder of the trail's files (relative to this file); absent: no trail.
    pub dir: Option<PathBuf>,
    /// The share of predictions recorded, 0 (none, the default) to 1 (every one).
    #[serde(default)]
    pub predictions: f64,
    /// Whether a recorded prediction carries its inputs and outputs (as JSON values),
    /// for debugging; each is left out, with its size said, when its JSON is over
    /// `max_payload_bytes`.
    #[serde(default)]
    pub payloads: bool,
    /// The largest inputs (and, apart, outputs) a prediction record carries, in bytes
    /// of JSON.
    #[serde(default = "default_audit_max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// Records waiting to be written at most; more are dropped and counted (the
    /// request path never waits for the disk).
    #[serde(default = "default_audit_queue")]
    pub queue: usize,
    /// The current file is closed and a new one started past this size.
    #[serde(default = "default_audit_max_file_bytes")]
    pub max_file_bytes: u64,
    /// The most the trail's files take in all; the oldest go first.
    #[serde(default = "default_audit_max_total_bytes")]
    pub max_total_bytes: u64,
    /// Closed files older than this many days are deleted.
    #[serde(default = "default_audit_retention_days")]
    pub retention_days: u64,
    /// The secret sticky keys are pseudonymised with (HMAC-SHA256), relative to this
    /// file; absent: one is generated in `dir` (`hmac.key`, readable only by its owner).
    pub hmac_key_file: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            dir: None,
            predictions: 0.0,
            payloads: false,
            max_payload_bytes: default_audit_max_payload_bytes(),
            queue: default_audit_queue(),
            max_file_bytes: default_audit_max_file_bytes(),
            max_total_bytes: default_audit_max_total_bytes(),
            retention_days: default_audit_retention_days(),
            hmac_key_file: None,
        }
    }
}

fn default_audit_max_payload_bytes() -> usize {
    16 * 1024
}

fn default_audit_queue() -> usize {
    10_000
}

fn default_audit_max_file_bytes() -> u64 {
    64 * 1024 * 1024
}

fn default_audit_max_total_bytes() -> u64 {
    1024 * 1024 * 1024
}

fn default_audit_retention_days() -> u64 {
    30
}

/// `[tracing]`: where and how the process exports its traces. Each key left out falls
/// to its standard `OTEL_*` environment variable.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`
    /// (`OTEL_EXPORTER_OTLP_ENDPOINT`); plain HTTP/2 only.
    pub endpoint: Option<String>,
    /// The spans' `service.name` (`OTEL_SERVICE_NAME`; default `aviary-gateway`).
    pub service_name: Option<String>,
    /// The share of the traces started here that are kept, 0 to 1; a client's
    /// sampling decision in its `traceparent` is followed (`OTEL_TRACES_SAMPLER`/`_ARG`;
    /// default 1).
    pub sample_ratio: Option<f64>,
    /// Spans waiting for export at most; more are dropped and counted
    /// (`OTEL_BSP_MAX_QUEUE_SIZE`; default 2048).
    pub queue_size: Option<usize>,
}

impl TracingConfig {
    /// The settings the trace exporter takes.
    pub fn settings(&self) -> aviary::telemetry::TracingSettings {
        aviary::telemetry::TracingSettings {
            endpoint: self.endpoint.clone(),
            service_name: self.service_name.clone(),
            sample_ratio: self.sample_ratio,
            queue_size: self.queue_size,
        }
    }
}

/// Why the HTTP/REST listener would let in what the gRPC listener keeps out, if it
/// would: both serve the same calls, so plaintext HTTP beside TLS gRPC sends keys and
/// tensors in the clear, and HTTP without the client CA gRPC requires lets in callers
/// without a certificate.
fn http_weaker_than_grpc(config: &Config) -> Option<String> {
    let grpc = config.server.tls.as_ref()?;
    if !config.http.enabled {
        return None;
    }
    match &config.http.tls {
        None => Some(
            "http: [server] tls protects the gRPC listener but the HTTP/REST listener, which \
             serves the same calls, would be plaintext; set [http] tls (or [http] enabled = false)"
                .to_owned(),
        ),
        Some(http) if grpc.client_ca.is_some() && http.client_ca.is_none() => Some(
            "http.tls: [server] tls requires client certificates but the HTTP/REST listener, \
             which serves the same calls, would not; set http.tls.client_ca"
                .to_owned(),
        ),
        Some(_) => None,
    }
}

/// Where a gateway serves HTTP/REST unless told otherwise: Triton's HTTP port.
pub const DEFAULT_HTTP_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8000);

/// Where a gateway serves `/metrics` unless told otherwise.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8002);

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8003))
}

fn default_true() -> bool {
    true
}

/// The embedded worker's repository and session settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// Repository root, relative to the config file.
    pub path: PathBuf,
    /// ONNX Runtime sessions per version (concurrent inferences per version).
    pub instances: Option<usize>,
    /// ORT threads inside one operator.
    pub intra_op_threads: Option<usize>,
    /// ORT threads across operators.
    pub inter_op_threads: Option<usize>,
    /// Requests expected to run at most this long (measured at load) run inline on
    /// the async thread instead of the blocking pool, in microseconds (default 100;
    /// 0: never).
    pub inline_max_us: Option<u64>,
    /// Which versions to keep loaded, unless a model has its own policy.
    #[serde(default)]
    pub version_policy: VersionPolicy,
    /// Version policy per model, e.g. `demo = { latest = 2 }`.
    #[serde(default)]
    pub policies: BTreeMap<String, VersionPolicy>,
    /// Pick up new and changed version folders while running (see docs/configuration.md
    /// for how to publish a version so it is never read half-written).
    #[serde(default)]
    pub watch: bool,
    /// How often watch mode scans the repository, in milliseconds.
    #[serde(default = "default_watch_interval_ms")]
    pub watch_interval_ms: u64,
    /// How often the data watch looks for features crossing into drift and values
    /// flag-mode input rules let through, in milliseconds (logged, and audited as
    /// `data` records).
    #[serde(default = "default_data_watch_interval_ms")]
    pub data_watch_interval_ms: u64,
    /// Largest decoded size of one request's input tensors, in bytes (default 256 MiB).
    pub max_request_tensor_bytes: Option<u64>,
    /// Largest decoded size of the input tensors of all requests being decoded or run
    /// at once, in bytes (default 1 GiB).
    pub max_inflight_tensor_bytes: Option<u64>,
}

fn default_watch_interval_ms() -> u64 {
    1000
}

fn default_data_watch_interval_ms() -> u64 {
    10_000
}

/// A model's route: its versions and their weights.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Versions in split order; with `sticky`, list the canary first.
    pub versions: Vec<VersionConfig>,
    /// Keeps each user on one version: the routing key's header or parameter.
    #[serde(default)]
    pub sticky: Option<StickySpec>,
    /// Header or parameter matches that pick a version before the split.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    /// A version that also receives a share of the requests, off the request path.
    #[serde(default)]
    pub shadow: Option<ShadowConfig>,
    /// Deadlines, load shedding and the circuit breaker of the route's versions.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Where a call goes when its version fails (breaker open, no replica up, failed
    /// after retries): another version of this model, or of another model with the
    /// same inputs and outputs.
    #[serde(default)]
    pub fallback: Option<FallbackConfig>,
    /// Keep the requests that finally failed in the dead-letter queue.
    #[serde(default)]
    pub dead_letters: bool,
    /// Answer a call that finally failed (after its fallback) with the default
    /// prediction of its version's model card, when the card states one.
    #[serde(default)]
    pub default_prediction: bool,
    /// Answer repeated requests from the prediction cache (absent: never cached).
    #[serde(default)]
    pub cache: Option<RouteCacheConfig>,
    /// What a request breaking its version's model-card input rules gets on this route,
    /// over the card's own `mode`: `reject` or `flag` (absent: each card's).
    #[serde(default)]
    pub input_rules_mode: Option<aviary_worker::input_rules::RuleMode>,
    /// Learn the weights from feedback (a multi-armed bandit over the weighted
    /// versions); absent: the weights are fixed.
    #[serde(default)]
    pub bandit: Option<crate::bandit::BanditConfig>,
}

/// A route's fallback.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// The model; absent: the route's own.
    pub model: Option<String>,
    /// The version.
    pub version: String,
}

/// The limits of a route's versions, or of one version over its route's; each absent
/// setting takes the route's (for a version) or the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Deadline of a request whose client sets none, in milliseconds (default 30000).
    pub timeout_ms: Option<u64>,
    /// Longest deadline a client may set, in milliseconds (default 300000).
    pub max_timeout_ms: Option<u64>,
    /// Requests in flight to a version at once (default 64).
    pub max_in_flight: Option<usize>,
    /// Requests waiting for a version beyond those (default 256); more are refused
    /// with RESOURCE_EXHAUSTED.
    pub max_queue: Option<usize>,
    /// Consecutive failures that open a version's circuit breaker (default 5).
    pub breaker_failures: Option<u32>,
    /// How long an open breaker fails calls fast before a probe, in milliseconds
    /// (default 5000).
    pub breaker_open_ms: Option<u64>,
    /// Attempts of a call to a version with several replicas, the first included; an
    /// unreachable replica's call is tried again on another (default 3; 1: no retry).
    pub retry_attempts: Option<u32>,
}

impl LimitsConfig {
    /// These settings, with `over`'s where it sets them.
    pub fn overlaid(self, over: LimitsConfig) -> LimitsConfig {
        LimitsConfig {
            timeout_ms: over.timeout_ms.or(self.timeout_ms),
            max_timeout_ms: over.max_timeout_ms.or(self.max_timeout_ms),
            max_in_flight: over.max_in_flight.or(self.max_in_flight),
            max_queue: over.max_queue.or(self.max_queue),
            breaker_failures: over.breaker_failures.or(self.breaker_failures),
            breaker_open_ms: over.breaker_open_ms.or(self.breaker_open_ms),
            retry_attempts: over.retry_attempts.or(self.retry_attempts),
        }
    }
}

/// One version of a route.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionConfig {
    /// Version name (the repository's numeric folder).
    pub version: String,
    /// Share of unpinned traffic, normalised by the sum of the route's weights.
    pub weight: u32,
    /// Remote worker serving this version (`http://host:port`; a DNS name stands for
    /// every address it resolves to); absent, with no `endpoints`: the embedded worker.
    pub endpoint: Option<String>,
    /// Several worker replicas serving this version, balanced (instead of `endpoint`).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Injected failures and latency, for tests and game days; off unless set.
    pub fault: Option<FaultConfig>,
    /// This version's limits where they differ from the route's.
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// Faults injected into one version's requests.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    /// Share of requests answered with an injected `INTERNAL` error, 0.0 to 1.0.
    #[serde(default)]
    pub error_rate: f64,
    /// Delay added before each request runs, in milliseconds.
    #[serde(default)]
    pub delay_ms: u64,
}

/// A route's shadow: which version, how much traffic, how much buffering.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// The shadow version (loaded like any routed version, or on `endpoint`).
    pub version: String,
    /// Percentage of the model's requests mirrored, 0 to 100.
    pub percent: f64,
    /// Remote worker serving the shadow; absent: the embedded worker.
    pub endpoint: Option<String>,
    /// Faults injected into the shadow's calls (a slow or failing shadow on purpose).
    pub fault: Option<FaultConfig>,
    /// Mirrors waiting for the shadow; beyond this they are dropped and counted.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Shadow calls in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

fn default_queue() -> usize {
    64
}

fn default_concurrency() -> usize {
    1
}

/// Every model and version name in the routes that is not one (`aviary::names`), each
/// with its path.
fn name_problems(config: &Config) -> Vec<String> {
    use aviary::names::{model_name_problem, version_name_problem};
    let mut problems = Vec::new();
    for (model, route) in &config.routes {
        if let Some(problem) = model_name_problem(model) {
            problems.push(format!("routes.{model:?}: not a model name: {problem}"));
        }
        for (i, version) in route.versions.iter().enumerate() {
            if let Some(problem) = version_name_problem(&version.version) {
                problems.push(format!(
                    "routes.{model}.versions[{i}].version: {:?} is not a version name: {problem}",
                    version.version
                ));
            }
        }
        if let Some(problem) = route
            .shadow
            .as_ref()
            .and_then(|s| version_name_problem(&s.version))
        {
            problems.push(format!(
                "routes.{model}.shadow.version: not a version name: {problem}"
            ));
        }
    }
    problems
}

/// What is wrong with `[cache]` and the routes' `cache` settings, each with its path.
fn cache_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let cache = &config.cache;
    if cache.max_entries.is_some() && cache.max_bytes.is_some() {
        problems.push("cache.max_entries: set max_entries or max_bytes, not both".to_owned());
    }
    for (field, value) in [
        ("max_entries", cache.max_entries),
        ("max_bytes", cache.max_bytes),
    ] {
        if value == Some(0) {
            problems.push(format!("cache.{field}: must be at least 1"));
        }
    }
    if let Some(redis) = &cache.redis {
        // Checked here so a mistyped URL stops the start; nothing connects yet.
        if let Err(error) = redis::Client::open(redis.url.as_str()) {
            // The URL itself is not repeated: it may hold a password.
            problems.push(format!(
                "cache.redis.url: not a Redis URL ({error}); expected \
                 redis://[user:password@]host[:port][/db]"
            ));
        }
        if redis.ttl_ms == Some(0) {
            problems.push("cache.redis.ttl_ms: must be at least 1".to_owned());
        }
        if redis.timeout_ms == 0 {
            problems.push("cache.redis.timeout_ms: must be at least 1".to_owned());
        }
    }
    for (model, route) in &config.routes {
        if route.cache.is_some_and(|c| c.ttl_ms == 0) {
            problems.push(format!("routes.{model}.cache.ttl_ms: must be at least 1"));
        }
    }
    problems
}

impl Config {
    /// Reads and parses `path`, resolving relative paths against its folder.
    pub fn load(path: &Path) -> Result<Config, GatewayError> {
        let text = std::fs::read_to_string(path).map_err(|e| GatewayError::Config {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Config::from_text(&text, path)
    }

    /// Parses `text` as the contents of the file at `path` (relative paths resolve
    /// against its folder).
    pub fn from_text(text: &str, path: &Path) -> Result<Config, GatewayError> {
        let mut config = Config::parse(text).map_err(|message| GatewayError::Config {
            path: path.display().to_string(),
            message,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(repository) = config.repository.as_mut().filter(|r| r.path.is_relative()) {
            repository.path = base.join(&repository.path);
        }
        if let Some(keys) = config.auth.keys_file.as_mut().filter(|p| p.is_relative()) {
            *keys = base.join(&*keys);
        }
        for tls in [
            config.server.tls.as_mut(),
            config.admin.tls.as_mut(),
            config.metrics.tls.as_mut(),
            config.http.tls.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            tls.resolve(base);
        }
        if let Some(tls) = config.workers.tls.as_mut() {
            for path in [Some(&mut tls.ca), tls.cert.as_mut(), tls.key.as_mut()]
                .into_iter()
                .flatten()
                .filter(|p| p.is_relative())
            {
                *path = base.join(&*path);
            }
        }
        for path in [
            &mut config.audit.dir,
            &mut config.audit.hmac_key_file,
            &mut config.workers.token_file,
        ]
        .into_iter()
        .flatten()
        .filter(|p| p.is_relative())
        {
            *path = base.join(&*path);
        }
        if config.dead_letters.folder.is_relative() {
            config.dead_letters.folder = base.join(&config.dead_letters.folder);
        }
        if let Some(state_file) = config
            .rollouts
            .state_file
            .as_mut()
            .filter(|p| p.is_relative())
        {
            *state_file = base.join(&*state_file);
        }
        if let Some(state_file) = config
            .registry
            .as_mut()
            .and_then(|r| r.state_file.as_mut())
            .filter(|p| p.is_relative())
        {
            *state_file = base.join(&*state_file);
        }
        Ok(config)
    }

    /// Parses and checks a config text. A syntax error or unknown key stops parsing
    /// and is reported with its line; once the text parses, every remaining problem is
    /// listed, one per line, each with its path.
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
        let mut problems = Vec::new();
        if config.server.max_message_bytes < 1024 {
            problems.push(format!(
                "server.max_message_bytes: {} is too small (at least 1024)",
                config.server.max_message_bytes
            ));
        }
        // From a millisecond to a week: 0 would refuse every continuation, and far
        // beyond a week the cache's timer cannot hold it.
        if !(1..=7 * 24 * 3600 * 1000).contains(&config.server.sequence_idle_timeout_ms) {
            problems.push(format!(
                "server.sequence_idle_timeout_ms: {} is outside 1 to 604800000 (a week)",
                config.server.sequence_idle_timeout_ms
            ));
        }
        if let Some(ratio) = config.tracing.sample_ratio
            && !(0.0..=1.0).contains(&ratio)
        {
            problems.push(format!(
                "tracing.sample_ratio: {ratio} is not between 0 and 1"
            ));
        }
        if let Some(tls) = &config.workers.tls
            && tls.cert.is_some() != tls.key.is_some()
        {
            problems.push(
                "workers.tls: give both cert and key (the gateway's client certificate), or neither"
                    .to_owned(),
            );
        }
        if let Some(registry) = &config.registry
            && registry.canary_cap_percent > 100
        {
            problems.push(format!(
                "registry.canary_cap_percent: {} is over 100",
                registry.canary_cap_percent
            ));
        }
        if let Some(problem) = http_weaker_than_grpc(&config) {
            problems.push(problem);
        }
        if let Some(limit) = &config.server.peer_rate_limit {
            if !(limit.per_second > 0.0 && limit.per_second.is_finite()) {
                problems.push(format!(
                    "server.peer_rate_limit.per_second: {} is not a positive number",
                    limit.per_second
                ));
            }
            if let Some(burst) = limit.burst
                && !(burst >= 1.0 && burst.is_finite())
            {
                problems.push(format!(
                    "server.peer_rate_limit.burst: {burst} is less than 1"
                ));
            }
            if config.auth.keys_file.is_some() {
                problems.push(
                    "server.peer_rate_limit: for gateways without [auth]; with keys, every call \
                     carries one: limit it with the key's rate_limit"
                        .to_owned(),
                );
            }
        }
        let audit = &config.audit;
        if !(0.0..=1.0).contains(&audit.predictions) {
            problems.push(format!(
                "audit.predictions: {} is not between 0 and 1",
                audit.predictions
            ));
        }
        if audit.queue == 0 {
            problems.push("audit.queue: must be at least 1".to_owned());
        }
        if audit.max_file_bytes < 4096 {
            problems.push(format!(
                "audit.max_file_bytes: {} is too small (at least 4096)",
                audit.max_file_bytes
            ));
        }
        if audit.max_total_bytes < audit.max_file_bytes {
            problems.push(format!(
                "audit.max_total_bytes: {} is less than max_file_bytes ({})",
                audit.max_total_bytes, audit.max_file_bytes
            ));
        }
        if audit.retention_days == 0 {
            problems.push("audit.retention_days: must be at least 1".to_owned());
        }
        if audit.dir.is_none() && (audit.predictions > 0.0 || audit.hmac_key_file.is_some()) {
            problems.push(
                "audit.dir: required to record predictions or pseudonymise keys (the trail has nowhere to go)"
                    .to_owned(),
            );
        }
        if config.tracing.queue_size == Some(0) {
            problems.push("tracing.queue_size: must be at least 1".to_owned());
        }
        if let Some(endpoint) = &config.tracing.endpoint
            && !endpoint.starts_with("http://")
        {
            // The exporter is built without TLS: an https:// collector would fail every
            // export, so it is refused here.
            problems.push(format!(
                "tracing.endpoint: \"{endpoint}\" is not an http:// URL (OTLP over TLS is not supported yet)"
            ));
        }
        if let Some(repository) = &config.repository {
            for (field, value) in [
                ("instances", repository.instances),
                ("intra_op_threads", repository.intra_op_threads),
                ("inter_op_threads", repository.inter_op_threads),
            ] {
                if value == Some(0) {
                    problems.push(format!("repository.{field}: must be at least 1"));
                }
            }
            for (field, value) in [
                (
                    "max_request_tensor_bytes",
                    repository.max_request_tensor_bytes,
                ),
                (
                    "max_inflight_tensor_bytes",
                    repository.max_inflight_tensor_bytes,
                ),
            ] {
                if value == Some(0) {
                    problems.push(format!("repository.{field}: must be at least 1"));
                }
            }
            for (field, value) in [
                ("watch_interval_ms", repository.watch_interval_ms),
                ("data_watch_interval_ms", repository.data_watch_interval_ms),
            ] {
                if value == 0 {
                    problems.push(format!("repository.{field}: must be at least 1"));
                }
            }
        }
        if config.dead_letters.max_bytes < 4096 {
            problems.push(format!(
                "dead_letters.max_bytes: {} is too small (at least 4096)",
                config.dead_letters.max_bytes
            ));
        }
        if let Some(redis) = &config.dead_letters.redis {
            // Checked here so a mistyped URL stops the start instead of failing every
            // letter later; nothing connects yet.
            if let Err(error) = redis::Client::open(redis.url.as_str()) {
                // The URL itself is not repeated: it may hold a password.
                problems.push(format!(
                    "dead_letters.redis.url: not a Redis URL ({error}); expected \
                     redis://[user:password@]host[:port][/db]"
                ));
            }
            if redis.stream.is_empty() {
                problems.push("dead_letters.redis.stream: must not be empty".to_owned());
            }
            if redis.max_len == 0 {
                problems.push("dead_letters.redis.max_len: must be at least 1".to_owned());
            }
        }
        problems.extend(cache_problems(&config));
        for (model, route) in &config.routes {
            problems.extend(crate::bandit::problems(model, route));
        }
        problems.extend(crate::sources::mlflow::problems(
            &config.mlflow,
            config.repository.as_ref(),
            config.rollouts.controlled,
        ));
        problems.extend(crate::sources::bucket::problems(
            &config.bucket,
            config.repository.as_ref(),
        ));
        problems.extend(name_problems(&config));
        if config.rollouts.evaluate_interval_ms == 0 {
            problems.push("rollouts.evaluate_interval_ms: must be at least 1".to_owned());
        }
        if config.rollouts.controlled && !config.rollouts.plans.is_empty() {
            problems.push(
                "rollouts.plans: a controlled gateway runs no rollouts; start them on the controller"
                    .to_owned(),
            );
        }
        for (model, plan) in &config.rollouts.plans {
            let path = format!("rollouts.plans.{model}");
            if let Err(errors) = plan.plan(model).validate() {
                problems.extend(errors.errors().iter().map(|e| format!("{path}.{e}")));
            }
            match config.routes.get(model) {
                None => problems.push(format!(
                    "{path}: no route for model \"{model}\"; add [routes.{model}] with both versions"
                )),
                Some(route) => {
                    for (field, version) in [("canary", &plan.canary), ("baseline", &plan.baseline)] {
                        if !version.is_empty() && !route.versions.iter().any(|v| &v.version == version) {
                            problems.push(format!(
                                "{path}.{field}: version \"{version}\" is not in routes.{model}.versions"
                            ));
                        }
                    }
                }
            }
        }
        for (model, route) in &config.routes {
            if let Some(shadow) = &route.shadow {
                let path = format!("routes.{model}.shadow");
                if !(0.0..=100.0).contains(&shadow.percent) {
                    problems.push(format!(
                        "{path}.percent: {} is not between 0 and 100",
                        shadow.percent
                    ));
                }
                if shadow.queue == 0 {
                    problems.push(format!("{path}.queue: must be at least 1"));
                }
                if shadow.concurrency == 0 {
                    problems.push(format!("{path}.concurrency: must be at least 1"));
                }
                if route
                    .versions
                    .iter()
                    .any(|v| v.version == shadow.version && v.weight > 0)
                {
                    problems.push(format!(
                        "{path}.version: \"{}\" also has weight in the route; a shadow must be a version \
                         without unpinned traffic",
                        shadow.version
                    ));
                }
            }
            for (i, version) in route.versions.iter().enumerate() {
                if let Some(fault) = &version.fault
                    && !(0.0..=1.0).contains(&fault.error_rate)
                {
                    problems.push(format!(
                        "routes.{model}.versions[{i}].fault.error_rate: {} is not between 0 and 1",
                        fault.error_rate
                    ));
                }
                if version.endpoint.is_some() && !version.endpoints.is_empty() {
                    problems.push(format!(
                        "routes.{model}.versions[{i}]: give `endpoint` or `endpoints`, not both"
                    ));
                }
                let named = version.endpoint.iter().map(|e| ("endpoint".to_owned(), e));
                let listed = version
                    .endpoints
                    .iter()
                    .enumerate()
                    .map(|(j, e)| (format!("endpoints[{j}]"), e));
                for (field, endpoint) in named.chain(listed) {
                    match crate::replicas::Configured::parse(endpoint) {
                        Err(problem) => {
                            problems
                                .push(format!("routes.{model}.versions[{i}].{field}: {problem}"));
                        }
                        Ok(configured) if configured.is_tls() && config.workers.tls.is_none() => {
                            problems.push(format!(
                                "routes.{model}.versions[{i}].{field}: \"{endpoint}\" is https:// but there \
                                 is no [workers] tls (the CA the worker's certificate chains to)"
                            ));
                        }
                        Ok(_) => {}
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems.join("\n"))
        }
    }
}

/// One line: `line L, column C: message` (toml's own text spreads over several lines
/// of source excerpt, which reads badly in logs and the admin API).
fn syntax_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim();
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_demo_config() -> Result<(), String> {
        let config = Config::parse(
            r#"
            [server]
            listen = "127.0.0.1:8001"
            [repository]
            path = "models"
            instances = 2
            [routes.demo]
            versions = [ { version = "1", weight = 90 }, { version = "2", weight = 10, endpoint = "http://w:9001" } ]
            "#,
        )?;
        assert_eq!(config.server.max_message_bytes, 64 * 1024 * 1024);
        assert_eq!(config.routes["demo"].versions[1].weight, 10);
        assert_eq!(
            config.routes["demo"].versions[1].endpoint.as_deref(),
            Some("http://w:9001")
        );
        Ok(())
    }

    #[test]
    fn the_redis_sink_takes_defaults_and_rejects_a_bad_url_by_its_field() {
        let config =
            Config::parse("[dead_letters]\nredis = { url = \"redis://127.0.0.1:6379/0\" }\n")
                .expect("a valid sink");
        let redis = config.dead_letters.redis.expect("the sink");
        assert_eq!(redis.stream, "aviary:dead-letters");
        assert_eq!(redis.max_len, 100_000);

        for url in [
            "http://127.0.0.1:6379",
            "127.0.0.1:6379",
            "redis://:secret@[::1",
        ] {
            let err = Config::parse(&format!(
                "[dead_letters]\nredis = {{ url = \"{url}\", stream = \"\", max_len = 0 }}\n"
            ))
            .expect_err("a bad URL");
            assert!(
                err.contains("dead_letters.redis.url: not a Redis URL"),
                "{err}"
            );
            assert!(!err.contains("secret"), "the password is not echoed: {err}");
            assert!(
                err.contains("dead_letters.redis.stream: must not be empty"),
                "{err}"
            );
            assert!(
                err.contains("dead_letters.redis.max_len: must be at least 1"),
                "{err}"
            );
        }
        let err = Config::parse("[dead_letters]\nredis = { url = \"redis://x\", maxlen = 5 }\n")
            .expect_err("an unknown key");
        assert!(err.contains("maxlen"), "{err}");
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name_and_line() {
        let err = Config::parse("[routes.demo]\nversions = [ { version = \"1\", wieght = 1 } ]\n")
            .expect_err("typo must be rejected");
        assert!(err.contains("wieght"), "{err}");
        assert!(err.starts_with("line 2, column"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    #[test]
    fn a_routes_input_rules_mode_is_reject_or_flag() {
        let config = Config::parse(
            "[routes.demo]\ninput_rules_mode = \"flag\"\nversions = [ { version = \"1\", weight = 1 } ]\n",
        )
        .expect("valid");
        assert_eq!(
            config.routes["demo"].input_rules_mode,
            Some(aviary_worker::input_rules::RuleMode::Flag)
        );
        let err = Config::parse(
            "[routes.demo]\ninput_rules_mode = \"warn\"\nversions = [ { version = \"1\", weight = 1 } ]\n",
        )
        .expect_err("an unknown mode");
        assert!(
            err.contains("unknown variant `warn`, expected `reject` or `flag`"),
            "{err}"
        );
        assert!(err.starts_with("line 2, column"), "{err}");
    }

    #[test]
    fn every_problem_is_listed() {
        let err = Config::parse(
            r#"
            [server]
            max_message_bytes = 10
            sequence_idle_timeout_ms = 0
            [repository]
            path = "m"
            instances = 0
            max_request_tensor_bytes = 0
            max_inflight_tensor_bytes = 0
            [routes.demo]
            versions = [ { version = "1", weight = 1, endpoint = "grpc://x" } ]
            "#,
        )
        .expect_err("five problems");
        assert!(err.contains("server.max_message_bytes"), "{err}");
        assert!(
            err.contains("server.sequence_idle_timeout_ms: 0 is outside"),
            "{err}"
        );
        assert!(err.contains("repository.instances"), "{err}");
        assert!(
            err.contains("repository.max_request_tensor_bytes: must be at least 1"),
            "{err}"
        );
        assert!(
            err.contains("repository.max_inflight_tensor_bytes: must be at least 1"),
            "{err}"
        );
        assert!(err.contains("routes.demo.versions[0].endpoint"), "{err}");
    }

    #[test]
    fn a_controlled_gateway_takes_no_rollout_plans() {
        let route = "[routes.demo]\nversions = [ { version = \"1\", weight = 100 }, { version = \"2\", weight = 0 } ]\n";
        let plan = "[rollouts.plans.demo]\ncanary = \"2\"\nbaseline = \"1\"\n\
             steps = [ { weight = 100, min_duration_ms = 10, min_requests = 5 } ]\n\
             gates = { max_error_rate_increase = 0.01 }\n";
        let controlled = format!("[rollouts]\ncontrolled = true\n{route}");
        assert!(
            Config::parse(&controlled)
                .expect("valid")
                .rollouts
                .controlled
        );
        let err = Config::parse(&format!("[rollouts]\ncontrolled = true\n{plan}{route}"))
            .expect_err("plans belong on the controller");
        assert!(
            err.contains("rollouts.plans: a controlled gateway"),
            "{err}"
        );
    }

    #[test]
    fn rollout_plans_list_every_problem_with_its_path() {
        let route = "[routes.demo]\nversions = [ { version = \"1\", weight = 100 }, { version = \"2\", weight = 0 } ]\n";
        let good = format!(
            "{route}[rollouts.plans.demo]\ncanary = \"2\"\nbaseline = \"1\"\n\
             steps = [ {{ weight = 50, min_duration_ms = 10, min_requests = 5 }}, {{ weight = 100, min_duration_ms = 10, min_requests = 5 }} ]\n\
             gates = {{ max_error_rate_increase = 0.01, max_accuracy_drop = 0.05 }}\n"
        );
        let config = Config::parse(&good).expect("valid plan");
        let plan = config.rollouts.plans["demo"].plan("demo");
        assert_eq!((plan.model.as_str(), plan.steps[1].weight), ("demo", 100));
        assert_eq!(plan.gates.max_accuracy_drop, Some(0.05));

        let bad = format!(
            "{route}[rollouts.plans.demo]\ncanary = \"7\"\nbaseline = \"1\"\n\
             steps = [ {{ weight = 50, min_duration_ms = 10, min_requests = 5 }}, {{ weight = 90, min_duration_ms = 10, min_requests = 5 }} ]\n\
             gates = {{ max_error_rate_increase = 0.01 }}\n\
             [rollouts.plans.other]\ncanary = \"2\"\nbaseline = \"1\"\nsteps = []\ngates = {{ max_error_rate_increase = 0.01 }}\n"
        );
        let err = Config::parse(&bad).expect_err("invalid plans");
        for path in [
            "rollouts.plans.demo.steps[1].weight",
            "rollouts.plans.demo.canary: version \"7\"",
            "rollouts.plans.other.steps",
            "rollouts.plans.other: no route",
        ] {
            assert!(err.contains(path), "{path} missing from: {err}");
        }
    }

    #[test]
    fn relative_repository_resolves_against_the_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("aviary.toml");
        std::fs::write(&path, "[repository]\npath = \"models\"\n")?;
        let config = Config::load(&path)?;
        assert_eq!(
            config.repository.map(|r| r.path),
            Some(dir.path().join("models"))
        );
        Ok(())
    }

    #[test]
    fn cache_settings_parse_with_their_defaults() {
        let config = Config::parse(
            "[cache]\nmax_entries = 1000\nredis = { url = \"redis://127.0.0.1:6379/0\" }\n\n\
             [routes.demo]\nversions = [ { version = \"1\", weight = 1 } ]\ncache = {}\n",
        )
        .expect("valid");
        assert_eq!(config.cache.max_entries, Some(1000));
        let redis = config.cache.redis.expect("the Redis tier");
        assert_eq!((redis.timeout_ms, redis.ttl_ms), (20, None));
        assert_eq!(redis.key_prefix, "aviary:cache:");
        assert_eq!(config.routes["demo"].cache.map(|c| c.ttl_ms), Some(60_000));
        let route = crate::route::Route::configured("demo", &config.routes["demo"]);
        assert_eq!(route.cache_ttl, Some(std::time::Duration::from_secs(60)));
    }

    #[test]
    fn cache_problems_name_their_field() {
        let err = Config::parse(
            "[cache]\nmax_entries = 10\nmax_bytes = 0\n\
             redis = { url = \"http://x\", ttl_ms = 0, timeout_ms = 0 }\n\n\
             [routes.demo]\nversions = [ { version = \"1\", weight = 1 } ]\ncache = { ttl_ms = 0 }\n",
        )
        .expect_err("invalid");
        for expected in [
            "cache.max_entries: set max_entries or max_bytes, not both",
            "cache.max_bytes: must be at least 1",
            "cache.redis.url: not a Redis URL",
            "cache.redis.ttl_ms: must be at least 1",
            "cache.redis.timeout_ms: must be at least 1",
            "routes.demo.cache.ttl_ms: must be at least 1",
        ] {
            assert!(err.contains(expected), "{expected} in {err}");
        }
        let err = Config::parse(
            "[routes.demo]\nversions = [ { version = \"1\", weight = 1 } ]\ncache = { ttl = 5 }\n",
        )
        .expect_err("unknown field");
        assert!(err.contains("ttl"), "{err}");
    }

    #[test]
    fn tracing_problems_name_their_field() {
        let err = Config::parse(
            "[tracing]\nendpoint = \"https://collector:4317\"\nsample_ratio = 1.5\nqueue_size = 0\n",
        )
        .expect_err("invalid");
        for expected in [
            "tracing.endpoint: \"https://collector:4317\" is not an http:// URL",
            "tracing.sample_ratio: 1.5 is not between 0 and 1",
            "tracing.queue_size: must be at least 1",
        ] {
            assert!(err.contains(expected), "{expected} in {err}");
        }
        let config =
            Config::parse("[tracing]\nendpoint = \"http://127.0.0.1:4317\"\nsample_ratio = 0.01\n")
                .expect("valid");
        let settings = config.tracing.settings();
        assert_eq!(settings.endpoint.as_deref(), Some("http://127.0.0.1:4317"));
        assert_eq!(settings.sample_ratio, Some(0.01));
        assert_eq!(settings.queue_size, None, "left to OTEL_BSP_MAX_QUEUE_SIZE");
    }

    #[test]
    fn model_and_version_names_that_could_leave_the_repository_are_refused() {
        let err = Config::parse(
            "[routes.\"../x\"]\nversions = [ { version = \"1\", weight = 1 } ]\n\n\
             [routes.demo]\nversions = [ { version = \"/etc\", weight = 1 } ]\n",
        )
        .expect_err("invalid");
        assert!(
            err.contains("routes.\"../x\": not a model name: it contains a path separator"),
            "{err}"
        );
        assert!(
            err.contains("routes.demo.versions[0].version: \"/etc\" is not a version name"),
            "{err}"
        );
    }

    #[test]
    fn audit_and_peer_limit_settings_that_cannot_work_are_named() {
        let err = Config::parse(
            "[audit]\npredictions = 1.5\nqueue = 0\nmax_file_bytes = 100\nretention_days = 0\n",
        )
        .expect_err("refused");
        for expected in [
            "audit.predictions: 1.5 is not between 0 and 1",
            "audit.queue: must be at least 1",
            "audit.max_file_bytes: 100 is too small",
            "audit.retention_days: must be at least 1",
            "audit.dir: required to record predictions",
        ] {
            assert!(err.contains(expected), "{expected} in {err}");
        }
        let err = Config::parse(
            "[auth]\nkeys_file = \"keys.toml\"\n\n[server]\npeer_rate_limit = { per_second = 0, burst = 0.5 }\n",
        )
        .expect_err("refused");
        for expected in [
            "server.peer_rate_limit.per_second: 0 is not a positive number",
            "server.peer_rate_limit.burst: 0.5 is less than 1",
            "server.peer_rate_limit: for gateways without [auth]",
        ] {
            assert!(err.contains(expected), "{expected} in {err}");
        }
        assert!(
            Config::parse("[audit]\ndir = \"audit\"\npredictions = 0.01\n\n[server]\npeer_rate_limit = { per_second = 10 }\n")
                .is_ok()
        );
    }

    #[test]
    fn an_https_endpoint_needs_workers_tls_rather_than_going_plaintext() {
        let route = "[routes.demo]\nversions = [ { version = \"1\", weight = 1, endpoint = \"https://w:9001\" } ]\n";
        let err = Config::parse(route).expect_err("refused");
        assert!(
            err.contains(
                "routes.demo.versions[0].endpoint: \"https://w:9001\" is https:// but there is no [workers] tls"
            ),
            "{err}"
        );
        let with_tls = format!("[workers]\ntls = {{ ca = \"ca.crt\" }}\n\n{route}");
        assert!(Config::parse(&with_tls).is_ok());
        let half = "[workers]\ntls = { ca = \"ca.crt\", cert = \"gw.crt\" }\n";
        let err = Config::parse(half).expect_err("a certificate without its key");
        assert!(err.contains("workers.tls: give both cert and key"), "{err}");
    }

    #[test]
    fn http_rest_is_never_weaker_than_the_grpc_listener() {
        let tls = "{ cert = \"s.crt\", key = \"s.key\" }";
        let mtls = "{ cert = \"s.crt\", key = \"s.key\", client_ca = \"c.crt\" }";
        let config =
            |server: &str, http: &str| format!("[server]\ntls = {server}\n\n[http]\n{http}\n");
        let err = Config::parse(&config(tls, "")).expect_err("plaintext HTTP beside TLS gRPC");
        assert!(
            err.contains("http: [server] tls protects the gRPC listener"),
            "{err}"
        );
        let err = Config::parse(&config(mtls, &format!("tls = {tls}"))).expect_err("no client CA");
        assert!(
            err.contains("http.tls: [server] tls requires client certificates"),
            "{err}"
        );
        for (server, http) in [
            (tls, format!("tls = {tls}")),
            (mtls, format!("tls = {mtls}")),
            (mtls, "enabled = false".to_owned()),
        ] {
            assert!(
                Config::parse(&config(server, &http)).is_ok(),
                "{server} {http}"
            );
        }
        // Without TLS on gRPC, HTTP may be plaintext (the default).
        assert!(Config::parse("[http]\nlisten = \"127.0.0.1:8000\"\n").is_ok());
    }
}
