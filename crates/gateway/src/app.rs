//! Assembling and running a gateway: load the config's embedded worker (if any),
//! build the routing and resume saved rollouts, then serve the v2 front and the admin
//! API while background tasks keep readiness current, drive rollouts, and watch the
//! config file and the repository.

use std::{
    collections::BTreeMap,
    future::Future,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use aviary::{
    calls::{CallAudit, CallChecks, CallGuard, Caller, acting_as},
    server,
    tls::ServerTls,
};
use aviary_worker::{SessionOptions, TensorLimits, Worker, WorkerConfig};
use tokio::{net::TcpListener, sync::watch};
use tonic_health::server::HealthReporter;

use crate::{
    GatewayError, admin,
    audit::Audit,
    auth::Keys,
    bandit::{
        self,
        driver::{LOCAL_TICK, LocalBandits},
    },
    cache::{self, PredictionCache},
    config::{Config, TlsConfig},
    control::Control,
    dead_letters::DeadLetters,
    defaults,
    front::Front,
    metrics::Metrics,
    peer_limits::PeerLimits,
    rollouts::{LocalGateway, Rollouts},
    routing::Routing,
    sequences::Sequences,
    sources::{bucket::BucketSource, mlflow::MlflowSource},
    stack::BreakerState,
    watch as watcher,
};

/// How often readiness of every routed version is re-checked.
const READINESS_INTERVAL: Duration = Duration::from_millis(500);

/// How long one version's readiness check may take before it counts as down.
const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether the gateway runs models itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `aviary serve`: an embedded worker runs the `[repository]` models.
    Embedded,
    /// `aviary gateway`: every version runs on a remote worker.
    RemoteOnly,
}

impl Mode {
    /// Whether `config` can run in this mode: `aviary gateway` runs no models itself,
    /// so a `[repository]` is refused. (Checked by a start and by `aviary
    /// check-config`.)
    pub fn check(self, config: &Config) -> Result<(), GatewayError> {
        match (self, &config.repository) {
            (Mode::RemoteOnly, Some(_)) => Err(GatewayError::Config {
                path: "repository".into(),
                message: "`aviary gateway` runs no models itself; remove [repository] or use `aviary serve`"
                    .into(),
            }),
            _ => Ok(()),
        }
    }
}

/// A gateway ready to serve.
#[derive(Debug)]
pub struct Gateway {
    config: Config,
    control: Arc<Control>,
    ready: Arc<AtomicBool>,
    config_path: Option<PathBuf>,
    metrics: Arc<Metrics>,
    /// `None` when a controller drives this gateway's rollouts.
    rollouts: Option<Arc<Rollouts>>,
    /// Kept when a route has `dead_letters = true` at start.
    dead_letters: Option<Arc<DeadLetters>>,
    /// Always there, so a route can opt in while running; empty until one does.
    cache: Arc<PredictionCache>,
    /// The API keys every call needs, when `[auth] keys_file` is set.
    keys: Option<Arc<Keys>>,
    /// Rate limits per client address, when `[server] peer_rate_limit` is set.
    peer_limits: Option<Arc<PeerLimits>>,
    /// TLS on the inference listener, when `[server] tls` is set.
    inference_tls: Option<Arc<ServerTls>>,
    /// TLS on the admin listener, when `[admin] tls` is set.
    admin_tls: Option<Arc<ServerTls>>,
    /// TLS on `/metrics`, when `[metrics] tls` is set.
    metrics_tls: Option<Arc<ServerTls>>,
    /// TLS on the HTTP/REST listener, when `[http] tls` is set.
    http_tls: Option<Arc<ServerTls>>,
}

/// The TLS of a listener configured by `tls` (at `field`) offering `alpn`, its files
/// read now.
fn open_tls(
    field: &str,
    tls: Option<&TlsConfig>,
    alpn: &[&[u8]],
) -> Result<Option<Arc<ServerTls>>, GatewayError> {
    tls.map(|tls| {
        ServerTls::open(tls.files(), alpn).map_err(|error| GatewayError::Config {
            path: field.to_owned(),
            message: error.to_string(),
        })
    })
    .transpose()
}

/// The listeners a gateway serves on.
#[derive(Debug)]
pub struct Listeners {
    /// The v2 inference API.
    pub inference: TcpListener,
    /// The admin API, if enabled.
    pub admin: Option<TcpListener>,
    /// `GET /metrics` (Prometheus), if enabled.
    pub metrics: Option<TcpListener>,
    /// The KServe v2 HTTP/REST API, if enabled.
    pub http: Option<TcpListener>,
}

impl Gateway {
    /// Loads the embedded worker (in [`Mode::Embedded`]) and builds the routes.
    pub async fn start(config: Config, mode: Mode) -> Result<Gateway, GatewayError> {
        let worker = match (mode, &config.repository) {
            (Mode::Embedded, Some(repository)) => {
                let defaults = SessionOptions::default();
                let mut worker_config = WorkerConfig::new(
                    repository.path.clone(),
                    SessionOptions {
                        instances: repository.instances.unwrap_or(defaults.instances),
                        intra_op_threads: repository
                            .intra_op_threads
                            .unwrap_or(defaults.intra_op_threads),
                        inter_op_threads: repository
                            .inter_op_threads
                            .unwrap_or(defaults.inter_op_threads),
                        inline_max: repository
                            .inline_max_us
                            .map_or(defaults.inline_max, Duration::from_micros),
                    },
                );
                worker_config.default_policy = repository.version_policy.clone();
                worker_config.policies = repository.policies.clone();
                let limits = TensorLimits::default();
                worker_config.limits = TensorLimits {
                    max_request_tensor_bytes: repository
                        .max_request_tensor_bytes
                        .unwrap_or(limits.max_request_tensor_bytes),
                    max_inflight_tensor_bytes: repository
                        .max_inflight_tensor_bytes
                        .unwrap_or(limits.max_inflight_tensor_bytes),
                };
                Some(Arc::new(Worker::open(worker_config).await?))
            }
            (Mode::Embedded, None) => None,
            (Mode::RemoteOnly, _) => {
                mode.check(&config)?;
                None
            }
        };
        let audit = Audit::open(&config.audit)?;
        let control = Control::new(&config, worker, audit.clone())?;
        let routing = control.routing().load_full();
        for (model, version) in routing.routed_versions() {
            let share = routing
                .table
                .route(model)
                .and_then(|r| r.share(version))
                .unwrap_or(0.0);
            let location = routing
                .backend(model, version)
                .map(|b| b.location().to_owned())
                .unwrap_or_default();
            tracing::info!(model, version, share = format!("{:.1}%", share * 100.0), %location, "route");
        }
        let control = Arc::new(control);
        let metrics = Arc::new(Metrics::default());
        let rollouts = match config.rollouts.controlled {
            true => None,
            false => {
                // Saved rollouts get their weights back before the first request is served.
                let target = LocalGateway::new(Arc::clone(&control), Arc::clone(&metrics));
                if config.rollouts.state_file.is_none() && !config.rollouts.plans.is_empty() {
                    tracing::warn!(
                        "[rollouts.plans] without [rollouts] state_file: the plans run again from \
                         their first step at every start"
                    );
                }
                let rollouts = Rollouts::open(target, config.rollouts.state_file.clone())
                    .await?
                    .with_audit(audit.clone());
                let started = rollouts.start_plans(&config.rollouts.plans);
                for note in acting_as(Caller::Process("config-file"), started).await? {
                    tracing::warn!(note, "configured rollout plan");
                }
                Some(Arc::new(rollouts))
            }
        };
        let dead_letters = match config.routes.values().any(|r| r.dead_letters) {
            true => Some(DeadLetters::open(&config.dead_letters)?),
            false => None,
        };
        let cache = Arc::new(PredictionCache::open(&config.cache)?);
        let keys = config
            .auth
            .keys_file
            .as_deref()
            .map(Keys::open)
            .transpose()?;
        let inference_tls = open_tls("server.tls", config.server.tls.as_ref(), &[b"h2"])?;
        let admin_tls = open_tls("admin.tls", config.admin.tls.as_ref(), &[b"h2"])?;
        let metrics_tls = open_tls(
            "metrics.tls",
            config.metrics.tls.as_ref(),
            aviary::metrics::ALPN,
        )?;
        let http_tls = open_tls("http.tls", config.http.tls.as_ref(), aviary::rest::ALPN)?;
        let peer_limits = config.server.peer_rate_limit.map(PeerLimits::new);
        Ok(Gateway {
            http_tls,
            peer_limits,
            inference_tls,
            admin_tls,
            metrics_tls,
            config,
            control,
            ready: Arc::new(AtomicBool::new(false)),
            config_path: None,
            metrics,
            rollouts,
            dead_letters,
            cache,
            keys,
        })
    }

    /// Watches `path` (the file this gateway's config came from) and applies route
    /// changes while running.
    pub fn watch_config(mut self, path: PathBuf) -> Gateway {
        // Said now, not when the watcher task first runs: the config status names the
        // file from the moment the gateway listens.
        self.control.watching_config(&path.display().to_string());
        self.config_path = Some(path);
        self
    }

    /// The live state: routes, versions, and the ways to change them.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Per-variant request metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The rollout driver; `None` when a controller drives this gateway's rollouts.
    pub fn rollouts(&self) -> Option<&Arc<Rollouts>> {
        self.rollouts.as_ref()
    }

    /// The embedded worker, if any.
    pub fn worker(&self) -> Option<&Arc<Worker>> {
        self.control.worker()
    }

    /// Serves until `shutdown` resolves. Then health turns NOT_SERVING, listeners
    /// close, and in-flight requests get up to `grace_period` to finish.
    pub async fn serve<F>(
        self,
        listeners: Listeners,
        grace_period: Duration,
        shutdown: F,
    ) -> Result<(), GatewayError>
    where
        F: Future<Output = ()> + Send,
    {
        let (health, _) = tonic_health::server::health_reporter();
        server::set_serving(&health, false).await;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for tls in [
            &self.inference_tls,
            &self.admin_tls,
            &self.metrics_tls,
            &self.http_tls,
        ]
        .into_iter()
        .flatten()
        {
            tasks.spawn(Arc::clone(tls).watch());
        }
        if let Some(tls) = self.control.worker_tls() {
            tasks.spawn(tls.watch());
        }
        if let Some(token) = self.control.worker_token_file() {
            tasks.spawn(token.watch());
        }
        tasks.spawn(track_readiness(
            Arc::clone(&self.control),
            Arc::clone(&self.ready),
            health.clone(),
        ));
        tasks.spawn(defaults::keep_fresh(
            Arc::clone(&self.control),
            stop_rx.clone(),
        ));
        tasks.spawn(cache::keep_fingerprints(
            Arc::clone(&self.control),
            Arc::clone(&self.cache),
            stop_rx.clone(),
        ));
        if let Some(path) = self.config_path.clone() {
            tasks.spawn(acting_as(
                Caller::Process("config-file"),
                watcher::watch_config(
                    path,
                    self.config.clone(),
                    Arc::clone(&self.control),
                    self.rollouts.clone(),
                    stop_rx.clone(),
                ),
            ));
        }
        if let Some(repository) = self.config.repository.as_ref().filter(|r| r.watch) {
            let interval = Duration::from_millis(repository.watch_interval_ms);
            tasks.spawn(acting_as(
                Caller::Process("repository-watch"),
                watcher::watch_repository(
                    repository.path.clone(),
                    interval,
                    Arc::clone(&self.control),
                    stop_rx.clone(),
                ),
            ));
        }
        if let (Some(worker), Some(repository)) = (self.control.worker(), &self.config.repository) {
            let audit = self.control.audit().clone();
            tasks.spawn(acting_as(
                Caller::Process("data-watch"),
                aviary_worker::data_watch::run(
                    Arc::clone(worker),
                    Duration::from_millis(repository.data_watch_interval_ms),
                    stop_rx.clone(),
                    move |event| audit.record_data(event),
                ),
            ));
        }
        if !self.config.rollouts.controlled {
            let target = LocalBandits::new(Arc::clone(&self.control), Arc::clone(&self.metrics));
            tasks.spawn(acting_as(
                Caller::Process("bandit"),
                Arc::new(bandit::driver::Driver::new(target)).run(LOCAL_TICK, stop_rx.clone()),
            ));
        }
        if let Some(repository) = &self.config.repository {
            for source in &self.config.mlflow {
                let source = MlflowSource::new(source.clone(), repository.path.clone());
                tasks.spawn(acting_as(
                    Caller::Process("mlflow"),
                    source.run(
                        Arc::clone(&self.control),
                        self.rollouts.clone(),
                        stop_rx.clone(),
                    ),
                ));
            }
            for source in &self.config.bucket {
                let source = BucketSource::new(source.clone(), repository.path.clone())?;
                tasks.spawn(acting_as(
                    Caller::Process("bucket"),
                    source.run(Arc::clone(&self.control), stop_rx.clone()),
                ));
            }
        }
        if let Some(rollouts) = &self.rollouts {
            tasks.spawn(acting_as(
                Caller::Process("rollout-driver"),
                Arc::clone(rollouts).run(
                    Duration::from_millis(self.config.rollouts.evaluate_interval_ms),
                    stop_rx.clone(),
                ),
            ));
        }
        let mut front = Front::new(
            Arc::clone(&self.control),
            Arc::clone(&self.ready),
            Arc::clone(&self.metrics),
            Arc::clone(&self.cache),
        );
        front = front
            .with_model_control(self.config.server.model_control)
            .with_message_limit(self.config.server.max_message_bytes)
            .with_sequences(Sequences::new(Duration::from_millis(
                self.config.server.sequence_idle_timeout_ms,
            )));
        if let Some(letters) = &self.dead_letters {
            front = front.with_dead_letters(Arc::clone(letters));
        }
        let audit = self.control.audit().clone();
        if let Some(keys) = &self.keys {
            tasks.spawn(Arc::clone(keys).watch());
        }
        let keys = self.keys.clone().map(|keys| keys as Arc<dyn CallGuard>);
        let peers = self
            .peer_limits
            .clone()
            .map(|peers| peers as Arc<dyn CallGuard>);
        let checks = CallChecks {
            guard: keys.or(peers),
            audit: audit
                .is_on()
                .then(|| Arc::new(audit.clone()) as Arc<dyn CallAudit>),
        };
        let options = server::ServeOptions {
            max_message_bytes: self.config.server.max_message_bytes,
            grace_period,
            tls: self.inference_tls.clone(),
            response_compression: self
                .config
                .server
                .response_compression
                .iter()
                .map(|c| c.encoding())
                .collect(),
        };
        if let Some(listener) = listeners.http {
            // The same service, checks and audit as the gRPC listener, called in process.
            let inference = aviary::rest::in_process(front.clone(), &options, checks.clone());
            let tls = self.http_tls.clone();
            let limit = options.max_message_bytes;
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await.map(|_| ());
                };
                if let Err(error) =
                    aviary::rest::serve(listener, tls, inference, limit, stopped).await
                {
                    tracing::error!(%error, "HTTP/REST endpoint stopped");
                }
            });
        }
        if let Some(listener) = listeners.admin {
            let parts = admin::AdminParts {
                tls: self.admin_tls.clone(),
                checks: checks.clone(),
                audit,
                control: Arc::clone(&self.control),
                rollouts: self.rollouts.clone(),
                metrics: Arc::clone(&self.metrics),
                dead_letters: self
                    .dead_letters
                    .as_ref()
                    .map(|letters| (Arc::clone(letters), front.clone())),
            };
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await.map(|_| ());
                };
                if let Err(error) = admin::serve(parts, listener, stopped).await {
                    tracing::error!(%error, "admin API stopped");
                }
            });
        }
        if let Some(listener) = listeners.metrics {
            let registry = Arc::new(self.registry());
            let tls = self.metrics_tls.clone();
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await.map(|_| ());
                };
                if let Err(error) = aviary::metrics::serve(listener, tls, registry, stopped).await {
                    tracing::error!(%error, "metrics endpoint stopped");
                }
            });
        }
        let draining = {
            let health = health.clone();
            async move {
                shutdown.await;
                let _ = stop_tx.send(true);
                server::set_serving(&health, false).await;
                tracing::info!("shutting down: finishing in-flight requests");
            }
        };
        let result = server::serve_guarded(
            front,
            listeners.inference,
            options,
            checks,
            health,
            draining,
        )
        .await;
        tasks.abort_all();
        Ok(result?)
    }
}

impl Gateway {
    /// What `/metrics` shows: the process, the gateway's requests and routes, and the
    /// embedded worker's statistics.
    pub fn registry(&self) -> prometheus_client::registry::Registry {
        let mut registry = aviary::metrics::registry();
        registry.register_collector(Box::new(crate::exposition::GatewayCollector::new(
            Arc::clone(&self.metrics),
            Arc::clone(&self.control),
        )));
        registry.register_collector(Box::new(crate::exposition::RateLimitCollector::new(
            self.keys.clone(),
            self.peer_limits.clone(),
        )));
        registry.register_collector(Box::new(crate::exposition::AuditCollector::new(
            self.control.audit().clone(),
        )));
        if let Some(rollouts) = &self.rollouts {
            registry.register_collector(Box::new(crate::exposition::RolloutsCollector::new(
                Arc::clone(rollouts),
            )));
        }
        if let Some(worker) = self.control.worker() {
            registry.register_collector(Box::new(aviary_worker::exposition::WorkerCollector::new(
                Arc::clone(worker),
            )));
        }
        registry
    }
}

/// Keeps the ready flag and gRPC health equal to "every routed model can serve its
/// unpinned traffic": at least one of its versions with weight is up. A canary whose
/// workers died degrades that version (its breaker, its errors), never the whole
/// gateway: a readiness probe must not pull every model out of service for one
/// version. Versions are checked concurrently, each with a timeout.
async fn track_readiness(control: Arc<Control>, ready: Arc<AtomicBool>, health: HealthReporter) {
    let mut last = None;
    loop {
        let snapshot = control.routing().load_full();
        let versions = check_versions(&snapshot).await;
        let now_ready = servable(&snapshot, &versions);
        control.record_health(versions);
        ready.store(now_ready, Ordering::Relaxed);
        if last != Some(now_ready) {
            server::set_serving(&health, now_ready).await;
            tracing::info!(ready = now_ready, "readiness changed");
            last = Some(now_ready);
        }
        tokio::time::sleep(READINESS_INTERVAL).await;
    }
}

/// Whether each routed version is up: its backend answers ready within
/// [`READY_CHECK_TIMEOUT`] and its breaker is not open. All are checked at once.
async fn check_versions(routing: &Routing) -> BTreeMap<(String, String), bool> {
    let mut checks = tokio::task::JoinSet::new();
    for (model, version) in routing.routed_versions() {
        let breaker_open = routing
            .guards(model, version)
            .is_some_and(|g| matches!(g.breaker().state(), BreakerState::Open { .. }));
        let Ok(backend) = routing.backend(model, version) else {
            continue;
        };
        let (backend, model, version) = (Arc::clone(backend), model.to_owned(), version.to_owned());
        checks.spawn(async move {
            let check = backend.ready(model.clone(), version.clone());
            let up = !breaker_open
                && tokio::time::timeout(READY_CHECK_TIMEOUT, check)
                    .await
                    .unwrap_or(false);
            if !up {
                tracing::debug!(
                    model,
                    version,
                    location = backend.location(),
                    "version down"
                );
            }
            ((model, version), up)
        });
    }
    let mut versions = BTreeMap::new();
    while let Some(Ok((key, up))) = checks.join_next().await {
        versions.insert(key, up);
    }
    versions
}

/// Whether every routed model with weight somewhere has a version with weight up.
fn servable(routing: &Routing, versions: &BTreeMap<(String, String), bool>) -> bool {
    routing.table.models().all(|model| {
        let Some(route) = routing.table.route(model) else {
            return true;
        };
        let mut weighted = route
            .versions()
            .filter(|(_, weight)| *weight > 0)
            .peekable();
        weighted.peek().is_none()
            || weighted.any(|(version, _)| {
                versions
                    .get(&(model.to_owned(), version.to_owned()))
                    .copied()
                    .unwrap_or(false)
            })
    })
}
