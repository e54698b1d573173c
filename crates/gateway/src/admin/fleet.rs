//! The `Fleet` service: what `aviary controller` uses on each gateway whose rollouts it
//! drives: the step windows' counters, a new step window, and the rollout's weights;
//! and for bandit routes, the arms' feedback and the policy's weights.

use std::{sync::Arc, time::Duration};

use aviary::pb::admin::{
    BanditFeedbackRequest, BanditFeedbackResponse, BanditWeights, LatencyBucket,
    ResetVariantStatsResponse, RolloutWeights as WeightsMessage, SetRouteResponse, VariantStats,
    VariantStatsRequest, VariantStatsResponse,
    fleet_server::{Fleet, FleetServer},
};
use tonic::{Request, Response, Status};

use super::{required, variants};
use crate::{
    bandit::{
        WEIGHT_SCALE,
        driver::{apply_local, local_inputs},
        fleet::feedback_message,
    },
    control::{BanditApplied, Control, Holding, RolloutWeights},
    metrics::Metrics,
};

/// The `Fleet` service over a gateway's routes and request metrics.
#[derive(Debug, Clone)]
pub struct FleetService {
    control: Arc<Control>,
    metrics: Arc<Metrics>,
}

impl FleetService {
    /// The service, ready to add to a server.
    pub fn server(control: Arc<Control>, metrics: Arc<Metrics>) -> FleetServer<FleetService> {
        FleetServer::new(FleetService { control, metrics })
    }
}

#[tonic::async_trait]
impl Fleet for FleetService {
    async fn get_variant_stats(
        &self,
        request: Request<VariantStatsRequest>,
    ) -> Result<Response<VariantStatsResponse>, Status> {
        let model = request.into_inner().model;
        let model = required("model", &model)?;
        let versions = variants(&self.control, &self.metrics, model)
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
        for version in variants(&self.control, &self.metrics, model) {
            self.metrics.reset_step(model, &version);
        }
        Ok(Response::new(ResetVariantStatsResponse {}))
    }

    async fn set_rollout_weights(
        &self,
        request: Request<WeightsMessage>,
    ) -> Result<Response<SetRouteResponse>, Status> {
        let request = request.into_inner();
        let model = required("model", &request.model)?;
        if request.held
            && let Some(route) = self.control.routing().load().routes.get(model)
            && route.bandit.is_some()
        {
            return Err(Status::failed_precondition(format!(
                "routes.{model}.bandit: this gateway learns the model's weights with a bandit \
                 policy; a rollout would fight it"
            )));
        }
        required("canary", &request.canary)?;
        required("baseline", &request.baseline)?;
        for (field, weight) in [
            ("canary_weight", request.canary_weight),
            ("baseline_weight", request.baseline_weight),
        ] {
            if weight > 100 {
                return Err(Status::invalid_argument(format!(
                    "{field}: {weight} is over 100"
                )));
            }
        }
        let holding = match request.held {
            true => Holding::Running {
                lease: Some(Duration::from_millis(request.lease_ms))
                    .filter(|lease| !lease.is_zero()),
            },
            false => Holding::Ended,
        };
        let weights = RolloutWeights {
            canary: request.canary,
            canary_weight: request.canary_weight,
            baseline: request.baseline,
            baseline_weight: request.baseline_weight,
        };
        let generation = self
            .control
            .set_rollout_weights(model, weights, holding)
            .await?;
        Ok(Response::new(SetRouteResponse { generation }))
    }

    async fn get_bandit_feedback(
        &self,
        _request: Request<BanditFeedbackRequest>,
    ) -> Result<Response<BanditFeedbackResponse>, Status> {
        let routes = local_inputs(&self.control, &self.metrics)
            .await
            .iter()
            .map(feedback_message)
            .collect();
        Ok(Response::new(BanditFeedbackResponse { routes }))
    }

    async fn set_bandit_weights(
        &self,
        request: Request<BanditWeights>,
    ) -> Result<Response<SetRouteResponse>, Status> {
        let request = request.into_inner();
        let model = required("model", &request.model)?;
        if !self.control.bandits().controlled() {
            return Err(Status::failed_precondition(
                "this gateway plans its bandit routes itself; set [rollouts] controlled = true \
                 for aviary controller to plan them",
            ));
        }
        let routes = self.control.bandit_routes().await;
        let Some(route) = routes.iter().find(|r| r.model == model) else {
            return Err(Status::failed_precondition(format!(
                "routes.{model} has no bandit on this gateway"
            )));
        };
        let mut asked: Vec<&str> = request.weights.iter().map(|w| w.version.as_str()).collect();
        let mut arms: Vec<&str> = route.arms.iter().map(|(v, _)| v.as_str()).collect();
        asked.sort_unstable();
        arms.sort_unstable();
        if asked != arms {
            return Err(Status::invalid_argument(format!(
                "weights: versions {asked:?} are not the route's arms {arms:?}"
            )));
        }
        let total: u64 = request.weights.iter().map(|w| u64::from(w.weight)).sum();
        if total != u64::from(WEIGHT_SCALE) {
            return Err(Status::invalid_argument(format!(
                "weights: they sum to {total}, not {WEIGHT_SCALE}"
            )));
        }
        let weights = request
            .weights
            .into_iter()
            .map(|w| (w.version, w.weight))
            .collect();
        let report = request.report.unwrap_or_default();
        let generation = match apply_local(&self.control, model, weights, report).await? {
            BanditApplied::Published(generation) => generation,
            BanditApplied::Unchanged | BanditApplied::Held => {
                self.control.routing().load().generation
            }
        };
        Ok(Response::new(SetRouteResponse { generation }))
    }
}
