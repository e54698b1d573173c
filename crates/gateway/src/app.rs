//! Assembling and running a gateway: load the config's embedded worker (if any),
//! build the routing snapshot, keep readiness and gRPC health current, and serve until
//! shutdown.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use aviary_worker::{SessionOptions, Worker, WorkerConfig, server};
use tokio::net::TcpListener;
use tonic_health::server::HealthReporter;

use crate::{GatewayError, config::Config, front::Front, routing::Routing};

/// How often readiness of every routed version is re-checked.
const READINESS_INTERVAL: Duration = Duration::from_millis(500);

/// Whether the gateway runs models itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `aviary serve`: an embedded worker runs the `[repository]` models.
    Embedded,
    /// `aviary gateway`: every version runs on a remote worker.
    RemoteOnly,
}

/// A gateway ready to serve.
#[derive(Debug)]
pub struct Gateway {
    config: Config,
    routing: Arc<ArcSwap<Routing>>,
    ready: Arc<AtomicBool>,
    worker: Option<Arc<Worker>>,
}

impl Gateway {
    /// Loads the embedded worker (in [`Mode::Embedded`]) and builds the routes.
    pub async fn start(config: Config, mode: Mode) -> Result<Gateway, GatewayError> {
        let worker = match (mode, &config.repository) {
            (Mode::Embedded, Some(repository)) => {
                let defaults = SessionOptions::default();
                let worker_config = WorkerConfig {
                    repository: repository.path.clone(),
                    session: SessionOptions {
                        instances: repository.instances.unwrap_or(defaults.instances),
                        intra_op_threads: repository
                            .intra_op_threads
                            .unwrap_or(defaults.intra_op_threads),
                        inter_op_threads: repository
                            .inter_op_threads
                            .unwrap_or(defaults.inter_op_threads),
                    },
                };
                Some(Arc::new(Worker::open(worker_config).await?))
            }
            (Mode::Embedded, None) => None,
            (Mode::RemoteOnly, Some(_)) => {
                return Err(GatewayError::Config {
                    path: "repository".into(),
                    message: "`aviary gateway` runs no models itself; remove [repository] or use `aviary serve`".into(),
                });
            }
            (Mode::RemoteOnly, None) => None,
        };
        let routing = Routing::build(&config, worker.as_ref())?;
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
        Ok(Gateway {
            config,
            routing: Arc::new(ArcSwap::from_pointee(routing)),
            ready: Arc::new(AtomicBool::new(false)),
            worker,
        })
    }

    /// The embedded worker, if any.
    pub fn worker(&self) -> Option<&Arc<Worker>> {
        self.worker.as_ref()
    }

    /// Serves on `listener` until `shutdown` resolves; health turns NOT_SERVING first,
    /// then in-flight requests get up to `grace_period` to finish.
    pub async fn serve<F>(
        self,
        listener: TcpListener,
        grace_period: Duration,
        shutdown: F,
    ) -> Result<(), GatewayError>
    where
        F: Future<Output = ()> + Send,
    {
        let (health, _) = tonic_health::server::health_reporter();
        server::set_serving(&health, false).await;
        let readiness = tokio::spawn(track_readiness(
            Arc::clone(&self.routing),
            Arc::clone(&self.ready),
            health.clone(),
        ));
        let draining = {
            let health = health.clone();
            let readiness = readiness.abort_handle();
            async move {
                shutdown.await;
                readiness.abort();
                server::set_serving(&health, false).await;
                tracing::info!("shutting down: finishing in-flight requests");
            }
        };
        let front = Front::new(Arc::clone(&self.routing), Arc::clone(&self.ready));
        let options = server::ServeOptions {
            max_message_bytes: self.config.server.max_message_bytes,
            grace_period,
        };
        let result = server::serve(front, listener, options, health, draining).await;
        readiness.abort();
        Ok(result?)
    }
}

/// Keeps the ready flag and gRPC health equal to "every routed version is ready".
async fn track_readiness(
    routing: Arc<ArcSwap<Routing>>,
    ready: Arc<AtomicBool>,
    health: HealthReporter,
) {
    let mut last = None;
    loop {
        let snapshot = routing.load_full();
        let mut all_ready = true;
        for (model, version) in snapshot.routed_versions() {
            let Ok(backend) = snapshot.backend(model, version) else {
                all_ready = false;
                break;
            };
            if !backend.ready(model.to_owned(), version.to_owned()).await {
                tracing::debug!(
                    model,
                    version,
                    location = backend.location(),
                    "version not ready"
                );
                all_ready = false;
                break;
            }
        }
        ready.store(all_ready, Ordering::Relaxed);
        if last != Some(all_ready) {
            server::set_serving(&health, all_ready).await;
            tracing::info!(ready = all_ready, "readiness changed");
            last = Some(all_ready);
        }
        tokio::time::sleep(READINESS_INTERVAL).await;
    }
}
