//! The admin API (`aviary.admin.v1.Admin`) over [`Control`], on its own listener.

use std::{future::Future, sync::Arc, time::UNIX_EPOCH};

use aviary::pb::admin::{
    ConfigStatus, ExperimentReport, ExperimentReportRequest, FeedbackRequest, FeedbackResponse,
    GetConfigStatusRequest, GetRolloutRequest, GetRoutesRequest, GetRoutesResponse, LatencyBucket,
    ListModelsRequest, ListModelsResponse, ModelCard, ModelVersionInfo, OutputComparison,
    ResetVariantStatsResponse, RolloutCommandRequest, RolloutDecision, RolloutMetrics, Route,
    SetRouteRequest, SetRouteResponse, ShadowReport, ShadowReportRequest, StartRolloutRequest,
    UnloadVersionRequest, VariantStats, VariantStatsRequest, VariantStatsResponse, VersionRequest,
    VersionResponse, VersionWeight,
    admin_server::{Admin, AdminServer},
};
use aviary_router::rollout::{Gates, RolloutPlan, RolloutState, Step, StepMetrics};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::{
    GatewayError,
    config::{RouteConfig, VersionConfig},
    control::Control,
    experiment,
    metrics::{Metrics, Outcome},
    rollouts::{Command, RolloutStatus, Rollouts},
    routing::Routing,
};

/// Serves the admin API on `listener` until `shutdown` resolves.
pub async fn serve<F>(
    control: Arc<Control>,
    rollouts: Arc<Rollouts>,
    metrics: Arc<Metrics>,
    listener: TcpListener,
    shutdown: F,
) -> Result<(), GatewayError>
where
    F: Future<Output = ()> + Send,
{
    tonic::transport::Server::builder()
        .add_service(AdminServer::new(AdminService::new(
            control, rollouts, metrics,
        )))
        .serve_with_incoming_shutdown(aviary_worker::server::incoming(listener), shutdown)
        .await
        .map_err(|e| GatewayError::Refused(format!("admin server: {e}")))
}

/// The admin service.
#[derive(Debug, Clone)]
pub struct AdminService {
    control: Arc<Control>,
    rollouts: Arc<Rollouts>,
    metrics: Arc<Metrics>,
}

impl AdminService {
    /// An admin service over `control`, the rollout driver and the front's metrics.
    pub fn new(
        control: Arc<Control>,
        rollouts: Arc<Rollouts>,
        metrics: Arc<Metrics>,
    ) -> AdminService {
        AdminService {
            control,
            rollouts,
            metrics,
        }
    }

    /// The model's variants: the versions its route has now, then any others that
    /// served requests or got feedback since start-up (a version taken out of the
    /// route is still part of the experiment that ran on it).
    fn variants(&self, model: &str) -> Vec<String> {
        let routing = self.control.routing().load();
        let mut versions: Vec<String> = routing
            .table
            .route(model)
            .map(|r| r.versions().map(|(v, _)| v.to_owned()).collect())
            .unwrap_or_default();
        for seen in self.metrics.versions(model) {
            if !versions.contains(&seen) {
                versions.push(seen);
            }
        }
        versions
    }

    async fn rollout_command(
        &self,
        request: Request<RolloutCommandRequest>,
        command: Command,
    ) -> Result<Response<aviary::pb::admin::RolloutStatus>, Status> {
        let request = request.into_inner();
        let model = required("model", &request.model)?;
        let status = self.rollouts.command(model, command, &request.note).await?;
        Ok(Response::new(status_message(&status)))
    }

    fn version_info(&self, model: &str, version: &str) -> Option<ModelVersionInfo> {
        let routing = self.control.routing().load_full();
        model_versions(&self.control, &routing)
            .into_iter()
            .find(|v| v.model == model && v.version == version)
    }
}

fn routes_message(routing: &Routing) -> Vec<Route> {
    routing
        .routes
        .iter()
        .map(|(model, route)| Route {
            model: model.clone(),
            versions: route
                .versions
                .iter()
                .map(|v| VersionWeight {
                    version: v.version.clone(),
                    weight: v.weight,
                    endpoint: v.endpoint.clone().unwrap_or_default(),
                })
                .collect(),
        })
        .collect()
}

fn model_versions(control: &Control, routing: &Routing) -> Vec<ModelVersionInfo> {
    let Some(worker) = control.worker() else {
        return Vec::new();
    };
    worker
        .index(false)
        .into_iter()
        .map(|entry| {
            let loaded = worker
                .slot(&entry.name, &entry.version)
                .ok()
                .map(|s| s.current());
            let routed = routing
                .table
                .route(&entry.name)
                .is_some_and(|r| r.versions().any(|(v, _)| v == entry.version));
            ModelVersionInfo {
                weight: routing.weight(&entry.name, &entry.version),
                routed,
                state: entry.state,
                reason: entry.reason,
                loaded_at_ms: loaded
                    .as_ref()
                    .and_then(|m| m.loaded_at.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                path: loaded
                    .as_ref()
                    .map(|m| m.path.display().to_string())
                    .unwrap_or_default(),
                card: loaded
                    .as_ref()
                    .and_then(|m| m.card.as_ref())
                    .map(|c| ModelCard {
                        description: c.description.clone(),
                        owner: c.owner.clone(),
                        intended_use: c.intended_use.clone(),
                        limitations: c.limitations.clone(),
                        training_data: c.training_data.clone(),
                        metrics: c.metrics.clone().into_iter().collect(),
                    }),
                model: entry.name,
                version: entry.version,
            }
        })
        .collect()
}

fn route_config(route: &Route) -> RouteConfig {
    RouteConfig {
        versions: route
            .versions
            .iter()
            .map(|v| VersionConfig {
                version: v.version.clone(),
                weight: v.weight,
                endpoint: Some(v.endpoint.clone()).filter(|e| !e.is_empty()),
                fault: None,
            })
            .collect(),
        ..RouteConfig::default()
    }
}

pub(crate) fn plan_from(request: StartRolloutRequest) -> RolloutPlan {
    let defaults = Gates::error_rate(0.0);
    let gates = request.gates.unwrap_or_default();
    RolloutPlan {
        model: request.model,
        baseline: request.baseline,
        canary: request.canary,
        steps: request
            .steps
            .iter()
            .map(|s| Step {
                weight: s.weight,
                min_duration_ms: s.min_duration_ms,
                min_requests: s.min_requests,
            })
            .collect(),
        gates: Gates {
            max_error_rate_increase: gates.max_error_rate_increase,
            max_latency_ratio: gates.max_latency_ratio,
            max_accuracy_drop: gates.max_accuracy_drop,
            min_shadow_agreement: gates.min_shadow_agreement,
            min_distribution_p_value: gates.min_distribution_p_value,
            min_requests_for_rollback: gates
                .min_requests_for_rollback
                .unwrap_or(defaults.min_requests_for_rollback),
        },
    }
}

/// The 1-based step a state is at; 0 when at none.
fn step_of(state: &RolloutState) -> u32 {
    match state {
        RolloutState::Progressing { step, .. } | RolloutState::Paused { step, .. } => {
            u32::try_from(*step).map_or(u32::MAX, |s| s.saturating_add(1))
        }
        _ => 0,
    }
}

fn metrics_message(metrics: &StepMetrics) -> RolloutMetrics {
    RolloutMetrics {
        requests: metrics.requests,
        errors: metrics.errors,
        latency_p99_us: metrics.latency_p99_us.unwrap_or(0),
    }
}

pub(crate) fn status_message(status: &RolloutStatus) -> aviary::pb::admin::RolloutStatus {
    let rollout = &status.rollout;
    let plan = rollout.plan();
    aviary::pb::admin::RolloutStatus {
        model: plan.model.clone(),
        canary: plan.canary.clone(),
        baseline: plan.baseline.clone(),
        state: rollout.state().label().to_owned(),
        terminal: rollout.state().is_terminal(),
        step: step_of(rollout.state()),
        steps: u32::try_from(plan.steps.len()).unwrap_or(u32::MAX),
        canary_weight: rollout.canary_weight().unwrap_or(0),
        history: rollout
            .history()
            .iter()
            .map(|d| RolloutDecision {
                at_ms: d.at_ms,
                from: d.from.label().to_owned(),
                to: d.to.label().to_owned(),
                reason: d.reason.clone(),
                numbers: d.numbers.clone().into_iter().collect(),
                step: step_of(&d.to),
            })
            .collect(),
        canary_metrics: Some(metrics_message(&status.canary)),
        baseline_metrics: Some(metrics_message(&status.baseline)),
        waiting_for: status.waiting_for.clone(),
        plan_json: serde_json::to_string(plan).unwrap_or_default(),
    }
}

pub(crate) fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(value)
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_routes(
        &self,
        _: Request<GetRoutesRequest>,
    ) -> Result<Response<GetRoutesResponse>, Status> {
        let routing = self.control.routing().load_full();
        Ok(Response::new(GetRoutesResponse {
            generation: routing.generation,
            routes: routes_message(&routing),
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
        let model = required("route.model", &route.model)?;
        let generation = self
            .control
            .set_route(model, route_config(&route), request.expected_generation)
            .await?;
        tracing::info!(model, generation, "route set through the admin API");
        Ok(Response::new(SetRouteResponse { generation }))
    }

    async fn list_models(
        &self,
        request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let model = request.into_inner().model;
        let routing = self.control.routing().load_full();
        let versions = model_versions(&self.control, &routing)
            .into_iter()
            .filter(|v| model.is_empty() || v.model == model)
            .collect();
        Ok(Response::new(ListModelsResponse { versions }))
    }

    async fn load_version(
        &self,
        request: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        let request = request.into_inner();
        let model = required("model", &request.model)?;
        let version = required("version", &request.version)?;
        let (outcome, generation) = self.control.load_version(model, version).await?;
        Ok(Response::new(VersionResponse {
            version: self.version_info(model, version),
            generation,
            load_ms: u64::try_from(outcome.load_time.as_millis()).unwrap_or(u64::MAX),
        }))
    }

    async fn reload_version(
        &self,
        request: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        let request = request.into_inner();
        let model = required("model", &request.model)?;
        let version = required("version", &request.version)?;
        let outcome = self.control.reload_version(model, version).await?;
        Ok(Response::new(VersionResponse {
            version: self.version_info(model, version),
            generation: self.control.routing().load().generation,
            load_ms: u64::try_from(outcome.load_time.as_millis()).unwrap_or(u64::MAX),
        }))
    }

    async fn unload_version(
        &self,
        request: Request<UnloadVersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        let request = request.into_inner();
        let model = required("model", &request.model)?;
        let version = required("version", &request.version)?;
        let generation = self
            .control
            .unload_version(model, version, request.force)
            .await?;
        Ok(Response::new(VersionResponse {
            version: None,
            generation,
            load_ms: 0,
        }))
    }

    async fn get_shadow_report(
        &self,
        request: Request<ShadowReportRequest>,
    ) -> Result<Response<ShadowReport>, Status> {
        let model = request.into_inner().model;
        let routing = self.control.routing().load_full();
        let mirror = routing.mirror(required("model", &model)?).ok_or_else(|| {
            Status::not_found(format!(
                "model \"{model}\" has no shadow (set routes.{model}.shadow)"
            ))
        })?;
        let report = mirror.report();
        let outputs = report
            .outputs
            .iter()
            .map(|(name, c)| {
                let ks = aviary_router::stats::ks_two_sample(&c.primary_sample, &c.shadow_sample);
                OutputComparison {
                    output: name.clone(),
                    compared: c.compared,
                    agreement_total: c.agreement_total,
                    agreement: c.agreement().unwrap_or(0.0),
                    mean_abs_diff: c.mean_abs_diff().unwrap_or(0.0),
                    max_abs_diff: c.abs_diff_max,
                    mismatched: c.mismatched,
                    ks_statistic: ks.map_or(0.0, |t| t.statistic),
                    ks_p_value: ks.map_or(1.0, |t| t.p_value),
                    sample_size: c.primary_sample.len() as u64,
                }
            })
            .collect();
        Ok(Response::new(ShadowReport {
            model,
            version: report.version,
            percent: mirror.config().percent,
            sent: report.sent,
            dropped: report.dropped,
            failed: report.failed,
            outputs,
        }))
    }

    async fn get_config_status(
        &self,
        _: Request<GetConfigStatusRequest>,
    ) -> Result<Response<ConfigStatus>, Status> {
        let status = self.control.config_status();
        Ok(Response::new(ConfigStatus {
            path: status.path,
            applied_at_ms: status.applied_at_ms,
            errors: status.errors,
            rejected_at_ms: status.rejected_at_ms,
        }))
    }

    async fn start_rollout(
        &self,
        request: Request<StartRolloutRequest>,
    ) -> Result<Response<aviary::pb::admin::RolloutStatus>, Status> {
        let plan = plan_from(request.into_inner());
        let status = self.rollouts.start(plan).await?;
        Ok(Response::new(status_message(&status)))
    }

    async fn pause_rollout(
        &self,
        request: Request<RolloutCommandRequest>,
    ) -> Result<Response<aviary::pb::admin::RolloutStatus>, Status> {
        self.rollout_command(request, Command::Pause).await
    }

    async fn resume_rollout(
        &self,
        request: Request<RolloutCommandRequest>,
    ) -> Result<Response<aviary::pb::admin::RolloutStatus>, Status> {
        self.rollout_command(request, Command::Resume).await
    }

    async fn promote_rollout(
        &self,
        request: Request<RolloutCommandRequest>,
    ) -> Result<Response<aviary::pb::admin::RolloutStatus>, Status> {
        self.rollout_command(request, Command::Promote).await
    }

    async fn abort_rollout(
        &self,
        request: Request<RolloutCommandRequest>,
    ) -> Result<Response<aviary::pb::admin::RolloutStatus>, Status> {
        self.rollout_command(request, Command::Abort).await
    }

    async fn get_rollout(
        &self,
        request: Request<GetRolloutRequest>,
    ) -> Result<Response<aviary::pb::admin::RolloutStatus>, Status> {
        let model = request.into_inner().model;
        let status = self.rollouts.status(required("model", &model)?).await?;
        Ok(Response::new(status_message(&status)))
    }

    async fn feedback(
        &self,
        request: Request<FeedbackRequest>,
    ) -> Result<Response<FeedbackResponse>, Status> {
        use aviary::pb::admin::feedback_request::Outcome as Given;
        let request = request.into_inner();
        let model = required("model", &request.model)?;
        let version = required("version", &request.version)?;
        let outcome = match request.outcome {
            Some(Given::Correct(correct)) => Outcome::Correct(correct),
            Some(Given::Reward(reward)) if reward.is_finite() => Outcome::Reward(reward),
            Some(Given::Reward(reward)) => {
                return Err(Status::invalid_argument(format!(
                    "reward must be a finite number, got {reward}"
                )));
            }
            None => {
                return Err(Status::invalid_argument(
                    "outcome is required: correct or reward",
                ));
            }
        };
        if !self.variants(model).iter().any(|v| v == version) {
            return Err(Status::invalid_argument(format!(
                "model \"{model}\" has no variant \"{version}\": it is not routed and has served no requests"
            )));
        }
        let feedback = self.metrics.record_outcome(model, version, outcome);
        tracing::debug!(model, version, request_id = %request.request_id, "feedback recorded");
        Ok(Response::new(FeedbackResponse { feedback }))
    }

    async fn get_experiment_report(
        &self,
        request: Request<ExperimentReportRequest>,
    ) -> Result<Response<ExperimentReport>, Status> {
        let request = request.into_inner();
        let model = required("model", &request.model)?;
        let versions = self.variants(model);
        if versions.is_empty() {
            return Err(Status::not_found(format!(
                "model \"{model}\" is not routed and has served no requests"
            )));
        }
        let baseline = Some(request.baseline.as_str()).filter(|b| !b.is_empty());
        experiment::report(&self.metrics, model, &versions, baseline)
            .map(Response::new)
            .map_err(Status::invalid_argument)
    }

    async fn get_variant_stats(
        &self,
        request: Request<VariantStatsRequest>,
    ) -> Result<Response<VariantStatsResponse>, Status> {
        let model = request.into_inner().model;
        let model = required("model", &model)?;
        let versions = self
            .variants(model)
            .into_iter()
            .map(|version| {
                let window = self.metrics.step(model, &version);
                VariantStats {
                    requests: window.requests,
                    errors: window.errors,
                    latency: window
                        .latency_buckets()
                        .into_iter()
                        .map(|(value_us, count)| LatencyBucket { value_us, count })
                        .collect(),
                    labelled: window.labelled,
                    correct: window.correct,
                    version,
                }
            })
            .collect();
        Ok(Response::new(VariantStatsResponse { versions }))
    }

    async fn reset_variant_stats(
        &self,
        request: Request<VariantStatsRequest>,
    ) -> Result<Response<ResetVariantStatsResponse>, Status> {
        let model = request.into_inner().model;
        let model = required("model", &model)?;
        for version in self.variants(model) {
            self.metrics.reset_step(model, &version);
        }
        Ok(Response::new(ResetVariantStatsResponse {}))
    }
}
