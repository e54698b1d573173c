//! The `Routes` service: the route table (read and compare-and-set one model's route)
//! and the watched config file's status.

use std::sync::Arc;

use aviary::pb::admin::{
    self as pb, GetConfigStatusRequest, GetRoutesRequest, GetRoutesResponse, SetRouteRequest,
    SetRouteResponse,
    routes_server::{Routes, RoutesServer},
};
use tonic::{Request, Response, Status};

use super::required;
use crate::{control::Control, metrics::Metrics, route::Route};

/// The `Routes` service over a gateway's [`Control`].
#[derive(Debug, Clone)]
pub struct RoutesService {
    control: Arc<Control>,
    metrics: Arc<Metrics>,
}

impl RoutesService {
    /// The service, ready to add to a server.
    pub fn server(control: Arc<Control>, metrics: Arc<Metrics>) -> RoutesServer<RoutesService> {
        RoutesServer::new(RoutesService { control, metrics })
    }
}

#[tonic::async_trait]
impl Routes for RoutesService {
    async fn get_routes(
        &self,
        _: Request<GetRoutesRequest>,
    ) -> Result<Response<GetRoutesResponse>, Status> {
        let routing = self.control.routing().load_full();
        Ok(Response::new(GetRoutesResponse {
            generation: routing.generation,
            routes: routing
                .routes
                .iter()
                .map(|(model, route)| {
                    let mut message = route.to_message(model);
                    for version in &mut message.versions {
                        version.health = match self.control.version_up(model, &version.version) {
                            Some(true) => "up".to_owned(),
                            Some(false) => "down".to_owned(),
                            None => String::new(),
                        };
                        if let Some(guards) = routing.guards(model, &version.version) {
                            version.breaker = guards.breaker().state().label().to_owned();
                            version.breaker_opened = guards.breaker().opened();
                            version.shed = guards.shed();
                        }
                        if let Ok(backend) = routing.backend(model, &version.version) {
                            let counts = backend.replica_counts();
                            version.retries = counts.retries;
                            version.ejections = counts.ejections;
                            version.live_replicas = backend.live_replicas();
                        }
                        let stand_ins = self.metrics.stand_ins(model, &version.version);
                        version.fallbacks = stand_ins.fallbacks;
                        version.defaults = stand_ins.defaults;
                        let cache = self.metrics.cache_counts(model, &version.version);
                        version.cache_hits = cache.hits;
                        version.cache_redis_hits = cache.redis_hits;
                        version.cache_misses = cache.misses;
                        version.cache_bypasses = cache.bypasses;
                        version.default_ready = self
                            .control
                            .defaults()
                            .get(model, &version.version)
                            .is_some();
                    }
                    message
                })
                .collect(),
        }))
    }

    async fn set_route(
        &self,
        request: Request<SetRouteRequest>,
    ) -> Result<Response<SetRouteResponse>, Status> {
        let request = request.into_inner();
        let route = request
            .route
            .ok_or_else(|| Status::invalid_argument("route is required"))?;
        let model = required("route.model", &route.model)?.to_owned();
        let generation = self
            .control
            .set_route(
                &model,
                Route::from_message(&route),
                request.expected_generation,
            )
            .await?;
        tracing::info!(model, generation, "route set through the admin API");
        Ok(Response::new(SetRouteResponse { generation }))
    }

    async fn get_config_status(
        &self,
        _: Request<GetConfigStatusRequest>,
    ) -> Result<Response<pb::ConfigStatus>, Status> {
        let status = self.control.config_status().await;
        Ok(Response::new(pb::ConfigStatus {
            path: status.path,
            applied_at_ms: status.applied_at_ms,
            errors: status.errors,
            rejected_at_ms: status.rejected_at_ms,
            notes: status.notes,
            unreadable: status.unreadable,
            unreadable_since_ms: status.unreadable_since_ms,
        }))
    }
}
