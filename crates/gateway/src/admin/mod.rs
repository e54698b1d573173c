//! The admin API on its own listener: seven gRPC services, one per concern (see
//! `proto/aviary/admin/v1/admin.proto`). A gateway serves them (`Rollouts` only while
//! it drives its own rollouts, `DeadLetters` only when it keeps them, `Audit` only
//! with a trail); `aviary controller` serves `Rollouts`. Every call passes the
//! gateway's [`CallChecks`]: API keys and roles, and the audit of changes.
//!
//! - `routes`: the route table and the config file's status.
//! - `models`: the embedded worker's versions: list, load, reload, unload.
//! - `rollouts`: start, commands and status of a rollout driver's rollouts.
//! - `experiments`: feedback, experiment reports and shadow comparisons.
//! - `fleet`: what a controller uses on the gateways it drives.
//! - `dead_letters`: list and replay the requests kept after they finally failed.
//! - `audit`: queries over the audit trail.
//!
//! The conversions from a request message to what it asks for ([`plan_from_message`],
//! [`filter_of`]) are pure and public: the fuzz targets run them on arbitrary messages.

mod audit;
mod dead_letters;
mod experiments;
mod fleet;
mod models;
mod rollouts;
mod routes;

use std::{future::Future, sync::Arc};

use aviary::calls::{CallChecks, Guarded};
use tokio::net::TcpListener;
use tonic::Status;

pub use audit::{AuditService, filter_of};
pub use dead_letters::DeadLettersService;
pub use experiments::ExperimentsService;
pub use fleet::FleetService;
pub use models::ModelsService;
pub use rollouts::{RolloutsService, plan_from_message};
pub use routes::RoutesService;

use crate::{
    GatewayError, audit::Audit as AuditTrail, control::Control,
    dead_letters::DeadLetters as DeadLetterQueue, front::Front, metrics::Metrics,
    rollouts::Rollouts,
};

/// What a gateway's admin API serves.
#[derive(Debug)]
pub struct AdminParts {
    /// Routes and models.
    pub control: Arc<Control>,
    /// The gateway's own rollouts; `None` when a controller drives them.
    pub rollouts: Option<Arc<Rollouts>>,
    /// Request metrics.
    pub metrics: Arc<Metrics>,
    /// The dead-letter queue and the front it replays through, when kept.
    pub dead_letters: Option<(Arc<DeadLetterQueue>, Front)>,
    /// What every call passes: API keys and roles, and the audit of changes.
    pub checks: CallChecks,
    /// The audit trail `Audit` queries (served only when it is on).
    pub audit: AuditTrail,
    /// TLS on the listener; `None`: plaintext.
    pub tls: Option<Arc<aviary::tls::ServerTls>>,
}

/// Serves a gateway's admin API on `listener` until `shutdown` resolves; the
/// `Rollouts` service only when the gateway drives its own rollouts, `DeadLetters`
/// only when it keeps them.
pub async fn serve<F>(
    parts: AdminParts,
    listener: TcpListener,
    shutdown: F,
) -> Result<(), GatewayError>
where
    F: Future<Output = ()> + Send,
{
    let AdminParts {
        control,
        rollouts,
        metrics,
        dead_letters,
        checks,
        audit,
        tls,
    } = parts;
    tonic::transport::Server::builder()
        .add_service(Guarded::new(
            RoutesService::server(Arc::clone(&control), Arc::clone(&metrics)),
            checks.clone(),
        ))
        .add_service(Guarded::new(
            ModelsService::server(Arc::clone(&control)),
            checks.clone(),
        ))
        .add_service(Guarded::new(
            ExperimentsService::server(Arc::clone(&control), Arc::clone(&metrics)),
            checks.clone(),
        ))
        .add_service(Guarded::new(
            FleetService::server(control, metrics),
            checks.clone(),
        ))
        .add_optional_service(
            rollouts.map(|r| Guarded::new(RolloutsService::server(r), checks.clone())),
        )
        .add_optional_service(dead_letters.map(|(letters, front)| {
            Guarded::new(DeadLettersService::server(letters, front), checks.clone())
        }))
        .add_optional_service(
            audit
                .is_on()
                .then(|| Guarded::new(AuditService::server(audit), checks.clone())),
        )
        .serve_with_incoming_shutdown(aviary::tls::incoming(listener, tls), shutdown)
        .await
        .map_err(|e| aviary::server::ServeError::new(format!("admin API: {e}")).into())
}

/// `value`, or INVALID_ARGUMENT naming `field` when it is empty.
fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(value)
    }
}

/// The model's variants: the versions its route has now, then any others that served
/// requests or got feedback since start-up (a version taken out of the route is still
/// part of the experiment that ran on it).
fn variants(control: &Control, metrics: &Metrics, model: &str) -> Vec<String> {
    let routing = control.routing().load();
    let mut versions: Vec<String> = routing
        .table
        .route(model)
        .map(|r| r.versions().map(|(v, _)| v.to_owned()).collect())
        .unwrap_or_default();
    for seen in metrics.versions(model) {
        if !versions.contains(&seen) {
            versions.push(seen);
        }
    }
    versions
}
