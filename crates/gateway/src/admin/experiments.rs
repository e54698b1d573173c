//! The `Experiments` service: ground-truth feedback, A/B experiment reports and shadow
//! comparisons.

use std::sync::Arc;

use aviary::pb::admin::{
    ExperimentReport, ExperimentReportRequest, FeedbackRequest, FeedbackResponse, OutputComparison,
    ShadowReport, ShadowReportRequest,
    experiments_server::{Experiments, ExperimentsServer},
};
use tonic::{Request, Response, Status};

use super::{required, variants};
use crate::{
    bandit::driver::pending_report,
    control::Control,
    experiment,
    metrics::{Metrics, Outcome},
};

/// The `Experiments` service over a gateway's routes and request metrics.
#[derive(Debug, Clone)]
pub struct ExperimentsService {
    control: Arc<Control>,
    metrics: Arc<Metrics>,
}

impl ExperimentsService {
    /// The service, ready to add to a server.
    pub fn server(
        control: Arc<Control>,
        metrics: Arc<Metrics>,
    ) -> ExperimentsServer<ExperimentsService> {
        ExperimentsServer::new(ExperimentsService { control, metrics })
    }

    fn variants(&self, model: &str) -> Vec<String> {
        variants(&self.control, &self.metrics, model)
    }
}

#[tonic::async_trait]
impl Experiments for ExperimentsService {
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
        let mut report = experiment::report(&self.metrics, model, &versions, baseline)
            .map_err(Status::invalid_argument)?;
        report.bandit = self
            .control
            .routing()
            .load()
            .routes
            .get(model)
            .and_then(|route| route.bandit.as_ref())
            .map(|config| {
                self.control
                    .bandits()
                    .report(model)
                    .unwrap_or_else(|| pending_report(config))
            });
        Ok(Response::new(report))
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
}
