//! The `Rollouts` service over any rollout [`Driver`]: a gateway's own, or the
//! controller's for many gateways. Also the conversions between the admin messages and
//! the router's rollout types.

use std::sync::Arc;

use aviary::pb::admin::{
    self as pb, GetRolloutRequest, RolloutCommandRequest,
    rollouts_server::{Rollouts, RolloutsServer},
};
use aviary_router::rollout::{Gates, RolloutPlan, RolloutState, Step, StepMetrics};
use tonic::{Request, Response, Status};

use super::required;
use crate::rollouts::{Command, Driver, RolloutStatus, Target};

/// The `Rollouts` service over a driver.
#[derive(Debug)]
pub struct RolloutsService<T> {
    driver: Arc<Driver<T>>,
}

impl<T: Target> RolloutsService<T> {
    /// The service, ready to add to a server.
    pub fn server(driver: Arc<Driver<T>>) -> RolloutsServer<RolloutsService<T>> {
        RolloutsServer::new(RolloutsService { driver })
    }

    async fn command(
        &self,
        request: Request<RolloutCommandRequest>,
        command: Command,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let request = request.into_inner();
        let model = required("model", &request.model)?;
        let status = self.driver.command(model, command, &request.note).await?;
        Ok(Response::new(status_message(&status)))
    }
}

#[tonic::async_trait]
impl<T: Target> Rollouts for RolloutsService<T> {
    async fn start_rollout(
        &self,
        request: Request<pb::RolloutPlan>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let status = self
            .driver
            .start(plan_from_message(request.into_inner()))
            .await?;
        Ok(Response::new(status_message(&status)))
    }

    async fn pause_rollout(
        &self,
        request: Request<RolloutCommandRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.command(request, Command::Pause).await
    }

    async fn resume_rollout(
        &self,
        request: Request<RolloutCommandRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.command(request, Command::Resume).await
    }

    async fn promote_rollout(
        &self,
        request: Request<RolloutCommandRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.command(request, Command::Promote).await
    }

    async fn abort_rollout(
        &self,
        request: Request<RolloutCommandRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.command(request, Command::Abort).await
    }

    async fn get_rollout(
        &self,
        request: Request<GetRolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let model = request.into_inner().model;
        let status = self.driver.status(required("model", &model)?).await?;
        Ok(Response::new(status_message(&status)))
    }
}

/// The router's plan from the admin message; an absent gate is the router's default.
pub fn plan_from_message(message: pb::RolloutPlan) -> RolloutPlan {
    let defaults = Gates::error_rate(0.0);
    let gates = message.gates.unwrap_or_default();
    RolloutPlan {
        model: message.model,
        baseline: message.baseline,
        canary: message.canary,
        steps: message
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
            max_output_drift_psi: gates.max_output_drift_psi,
            min_output_ks_p: gates.min_output_ks_p,
            pause_on_input_drift: gates.pause_on_input_drift,
            min_requests_for_rollback: gates
                .min_requests_for_rollback
                .unwrap_or(defaults.min_requests_for_rollback),
        },
    }
}

/// The admin message of a plan.
fn plan_message(plan: &RolloutPlan) -> pb::RolloutPlan {
    let gates = &plan.gates;
    pb::RolloutPlan {
        model: plan.model.clone(),
        canary: plan.canary.clone(),
        baseline: plan.baseline.clone(),
        steps: plan
            .steps
            .iter()
            .map(|s| pb::RolloutStep {
                weight: s.weight,
                min_duration_ms: s.min_duration_ms,
                min_requests: s.min_requests,
            })
            .collect(),
        gates: Some(pb::RolloutGates {
            max_error_rate_increase: gates.max_error_rate_increase,
            max_latency_ratio: gates.max_latency_ratio,
            min_requests_for_rollback: Some(gates.min_requests_for_rollback),
            max_accuracy_drop: gates.max_accuracy_drop,
            min_shadow_agreement: gates.min_shadow_agreement,
            min_distribution_p_value: gates.min_distribution_p_value,
            max_output_drift_psi: gates.max_output_drift_psi,
            min_output_ks_p: gates.min_output_ks_p,
            pause_on_input_drift: gates.pause_on_input_drift,
        }),
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

fn metrics_message(metrics: &StepMetrics) -> pb::RolloutMetrics {
    pb::RolloutMetrics {
        requests: metrics.requests,
        errors: metrics.errors,
        latency_p99_us: metrics.latency_p99_us.unwrap_or(0),
    }
}

fn status_message(status: &RolloutStatus) -> pb::RolloutStatus {
    let rollout = &status.rollout;
    let plan = rollout.plan();
    pb::RolloutStatus {
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
            .map(|d| pb::RolloutDecision {
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
        plan: Some(plan_message(plan)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_survives_the_round_trip_through_its_message() {
        let plan = RolloutPlan {
            model: "demo".into(),
            baseline: "1".into(),
            canary: "2".into(),
            steps: vec![Step {
                weight: 100,
                min_duration_ms: 5,
                min_requests: 7,
            }],
            gates: Gates {
                max_latency_ratio: Some(1.5),
                max_accuracy_drop: Some(0.02),
                ..Gates::error_rate(0.01)
            },
        };
        assert_eq!(plan_from_message(plan_message(&plan)), plan);
    }
}
