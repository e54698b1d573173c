//! Admin API look-ups and changes the tests share, and the rollout plan they run.

use aviary::pb::admin::{
    ConfigStatus, GetConfigStatusRequest, GetRolloutRequest, GetRoutesRequest, GetRoutesResponse,
    ListModelsRequest, ModelVersionInfo, RolloutGates, RolloutPlan, RolloutStatus, RolloutStep,
    Route, SetRouteRequest, ShadowReport, ShadowReportRequest, VersionWeight,
};

use super::Admin;

impl Admin {
    /// GetRoutes.
    /// The route table without each version's health, which the readiness check
    /// changes on its own time: two reads compare equal when the table is the same.
    pub async fn get_routes(&self) -> GetRoutesResponse {
        let mut routes = self
            .routes()
            .get_routes(GetRoutesRequest {})
            .await
            .expect("GetRoutes")
            .into_inner();
        for version in routes.routes.iter_mut().flat_map(|r| r.versions.iter_mut()) {
            version.health.clear();
        }
        routes
    }

    /// `model`'s route as (version, weight) pairs in split order; empty when it has none.
    pub async fn weights(&self, model: &str) -> Vec<(String, u32)> {
        route_weights(&self.get_routes().await, model)
    }

    /// Sets `model`'s route to these (version, weight) pairs; returns the generation.
    pub async fn set_weights(&self, model: &str, weights: &[(&str, u32)]) -> u64 {
        self.routes()
            .set_route(SetRouteRequest {
                route: Some(route(model, weights)),
                expected_generation: None,
            })
            .await
            .unwrap_or_else(|s| panic!("SetRoute {model} {weights:?} failed: {s:?}"))
            .into_inner()
            .generation
    }

    /// GetConfigStatus.
    pub async fn config_status(&self) -> ConfigStatus {
        self.routes()
            .get_config_status(GetConfigStatusRequest {})
            .await
            .expect("GetConfigStatus")
            .into_inner()
    }

    /// ListModels of `model` ("" for all).
    pub async fn list_models(&self, model: &str) -> Vec<ModelVersionInfo> {
        self.models()
            .list_models(ListModelsRequest {
                model: model.into(),
            })
            .await
            .expect("ListModels")
            .into_inner()
            .versions
    }

    /// GetRollout of `model`, which must have one.
    pub async fn rollout(&self, model: &str) -> RolloutStatus {
        self.rollouts()
            .get_rollout(GetRolloutRequest {
                model: model.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("{model} has a rollout: {s:?}"))
            .into_inner()
    }

    /// GetShadowReport of `model`, which must have a shadow.
    pub async fn shadow_report(&self, model: &str) -> ShadowReport {
        self.experiments()
            .get_shadow_report(ShadowReportRequest {
                model: model.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("{model} has a shadow: {s:?}"))
            .into_inner()
    }

    /// The bandit policy's state in `demo`'s experiment report (`None`: not a bandit
    /// route).
    pub async fn demo_bandit(&self) -> Option<aviary::pb::admin::BanditReport> {
        self.experiments()
            .get_experiment_report(aviary::pb::admin::ExperimentReportRequest {
                model: "demo".into(),
                baseline: String::new(),
            })
            .await
            .expect("demo's experiment report")
            .into_inner()
            .bandit
    }

    /// `of` pieces of feedback on `version` of `demo`, the first `correct` of them
    /// correct, the rest incorrect.
    pub async fn feedback_on_demo(&self, version: &str, correct: u32, of: u32) {
        use aviary::pb::admin::{FeedbackRequest, feedback_request::Outcome};
        for i in 0..of {
            self.experiments()
                .feedback(FeedbackRequest {
                    request_id: format!("req-{version}-{i}"),
                    model: "demo".into(),
                    version: version.into(),
                    outcome: Some(Outcome::Correct(i < correct)),
                })
                .await
                .unwrap_or_else(|s| panic!("feedback on demo {version}: {s:?}"));
        }
    }
}

/// A route for `model` with these (version, weight) pairs and no endpoints.
pub fn route(model: &str, weights: &[(&str, u32)]) -> Route {
    Route {
        model: model.into(),
        versions: weights
            .iter()
            .map(|&(version, weight)| VersionWeight {
                version: version.into(),
                weight,
                ..VersionWeight::default()
            })
            .collect(),
        limits: None,
    }
}

/// `model`'s (version, weight) pairs in `routes`; empty when it has no route.
pub fn route_weights(routes: &GetRoutesResponse, model: &str) -> Vec<(String, u32)> {
    routes
        .routes
        .iter()
        .find(|r| r.model == model)
        .map(|r| {
            r.versions
                .iter()
                .map(|v| (v.version.clone(), v.weight))
                .collect()
        })
        .unwrap_or_default()
}

/// Owned (version, weight) pairs, to compare with [`Admin::weights`].
pub fn owned(weights: &[(&str, u32)]) -> Vec<(String, u32)> {
    weights.iter().map(|&(v, w)| (v.to_owned(), w)).collect()
}

/// The weight of `version` in (version, weight) pairs; 0 when it is not listed.
pub fn weight_of(weights: &[(String, u32)], version: &str) -> u32 {
    weights
        .iter()
        .find(|(v, _)| v == version)
        .map_or(0, |(_, w)| *w)
}

/// A rollout of demo 2 over demo 1 in two steps (50, then 100), each lasting at least
/// `min_duration_ms` and 20 canary requests, gated on a 5-point error rate increase.
pub fn demo_plan(min_duration_ms: u64) -> RolloutPlan {
    RolloutPlan {
        model: "demo".into(),
        canary: "2".into(),
        baseline: "1".into(),
        steps: [50, 100]
            .into_iter()
            .map(|weight| RolloutStep {
                weight,
                min_duration_ms,
                min_requests: 20,
            })
            .collect(),
        gates: Some(RolloutGates {
            max_error_rate_increase: 0.05,
            ..Default::default()
        }),
    }
}
