//! `aviary controller`: the rollout driver for many gateways. It is the same
//! [`Driver`] a single gateway runs, over [`RemoteGateways`]: every evaluate interval
//! it reads the gateways' step windows, sums them, runs the state machine, and sends
//! its weights to every gateway (which hold them while the rollout runs). Rollouts are
//! kept in the controller's state file, so a restarted controller carries on.
//!
//! It also plans the gateways' bandit routes (on gateways with `[rollouts] controlled
//! = true`): every evaluate interval it sums their feedback and, for each route whose
//! `interval_ms` is due, sends one policy's weights to every gateway
//! ([`bandit::fleet`]).
//!
//! The controller serves only the `Rollouts` admin service, so `aviary ctl --admin
//! <controller> rollout ...` works as with one gateway, and `/metrics` (its process and
//! the rollouts it drives).

use std::{future::Future, path::PathBuf, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};

use crate::{
    GatewayError,
    admin::RolloutsService,
    backend::WatchedTls,
    bandit::{self, fleet::FleetBandits},
    exposition::RolloutsCollector,
    rollouts::{Driver, Gateways, RemoteGateways},
};

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// How often active rollouts are judged on the summed stats.
    pub evaluate_interval: Duration,
    /// Where rollouts are kept across restarts; `None`: in memory only.
    pub state_file: Option<PathBuf>,
    /// TLS on the admin listener; `None`: plaintext.
    pub tls: Option<Arc<aviary::tls::ServerTls>>,
    /// TLS on `/metrics`; `None`: plaintext.
    pub metrics_tls: Option<Arc<aviary::tls::ServerTls>>,
    /// What checks every call to the admin listener (API keys).
    pub checks: aviary::calls::CallChecks,
    /// The `authorization` header sent to the gateways (an `admin` key of theirs).
    pub gateway_authorization: aviary::client::Authorization,
    /// TLS to the gateways' admin listeners; `None`: plaintext.
    pub gateway_tls: Option<aviary::client::ClientTlsFiles>,
    /// Where rollout starts, commands and decisions are recorded (off: nowhere).
    pub audit: crate::audit::Audit,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            evaluate_interval: Duration::from_secs(5),
            tls: None,
            metrics_tls: None,
            checks: aviary::calls::CallChecks::default(),
            gateway_authorization: aviary::client::Authorization::default(),
            gateway_tls: None,
            audit: crate::audit::Audit::off(),
            state_file: None,
        }
    }
}

/// The rollouts of many gateways, one per model (the last one started).
pub type Controller = Driver<RemoteGateways>;

/// Opens the controller's rollouts (resuming those in the state file), then judges
/// them every evaluate interval and serves the `Rollouts` admin service on `listener`
/// (and `/metrics` on `metrics`: the process and the rollouts) until `shutdown`
/// resolves.
pub async fn run_controller<F>(
    gateways: Gateways,
    options: ControllerOptions,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: F,
) -> Result<(), GatewayError>
where
    F: Future<Output = ()> + Send,
{
    let tls = match options.gateway_tls {
        Some(files) => {
            let tls = WatchedTls::open(files).map_err(|message| GatewayError::Config {
                path: "--gateway-tls-ca/--gateway-tls-cert/--gateway-tls-key".into(),
                message,
            })?;
            let tls = Arc::new(tls);
            tokio::spawn(Arc::clone(&tls).watch());
            Some(tls)
        }
        None => None,
    };
    // The rollouts' and the bandits' calls to the gateways, each with its channels.
    let reach = || {
        let gateways = RemoteGateways::new(gateways.clone(), options.evaluate_interval)
            .with_authorization(options.gateway_authorization.clone());
        match &tls {
            Some(tls) => gateways.with_tls(Arc::clone(tls)),
            None => gateways,
        }
    };
    let target = reach();
    let bandits = Arc::new(bandit::driver::Driver::new(FleetBandits::new(Arc::new(
        reach(),
    ))));
    let controller = Arc::new(
        Driver::open(target, options.state_file)
            .await?
            .with_audit(options.audit),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(metrics) = metrics {
        let mut registry = aviary::metrics::registry();
        registry.register_collector(Box::new(RolloutsCollector::new(Arc::clone(&controller))));
        let mut stopped = stop_rx.clone();
        tokio::spawn(aviary::metrics::serve(
            metrics,
            options.metrics_tls,
            Arc::new(registry),
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            },
        ));
    }
    let driver =
        tokio::spawn(Arc::clone(&controller).run(options.evaluate_interval, stop_rx.clone()));
    let bandit_driver = tokio::spawn(bandits.run(options.evaluate_interval, stop_rx));
    // Ready once the state file is read (above); NOT_SERVING as soon as shutdown begins,
    // while `liveness` stays SERVING (probes: docs/operations.md).
    let (health, health_service) = tonic_health::server::health_reporter();
    aviary::server::set_live(&health).await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let shutdown = async move {
        shutdown.await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    };
    let served = tonic::transport::Server::builder()
        .add_service(aviary::calls::Guarded::new(
            health_service,
            options.checks.clone(),
        ))
        .add_service(aviary::calls::Guarded::new(
            RolloutsService::server(controller),
            options.checks,
        ))
        .serve_with_incoming_shutdown(aviary::tls::incoming(listener, options.tls), shutdown)
        .await
        .map_err(|e| aviary::server::ServeError::new(format!("controller admin API: {e}")).into());
    let _ = stop_tx.send(true);
    let _ = driver.await;
    let _ = bandit_driver.await;
    served
}
