//! The `Models` service: the embedded worker's versions, with their state, file and
//! model card; load, reload and unload them.

use std::sync::Arc;

use aviary::pb::admin::{
    ApproveRequest, DriftReport, DriftRequest, FeatureDrift, Lineage, ListModelsRequest,
    ListModelsResponse, ModelCard, ModelVersionInfo, StageResponse, UnloadVersionRequest,
    VersionDrift, VersionRequest, VersionResponse, VersionStage,
    models_server::{Models, ModelsServer},
};
use tonic::{Request, Response, Status};

use super::required;
use crate::{GatewayError, control::Control, routing::Routing};

/// The `Models` service over a gateway's [`Control`].
#[derive(Debug, Clone)]
pub struct ModelsService {
    control: Arc<Control>,
}

impl ModelsService {
    /// The service, ready to add to a server.
    pub fn server(control: Arc<Control>) -> ModelsServer<ModelsService> {
        ModelsServer::new(ModelsService { control })
    }

    fn version_info(&self, model: &str, version: &str) -> Option<ModelVersionInfo> {
        let routing = self.control.routing().load_full();
        model_versions(&self.control, &routing)
            .into_iter()
            .find(|v| v.model == model && v.version == version)
    }
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
                loaded_at_ms: loaded.as_ref().map_or(0, |m| aviary::unix_ms(m.loaded_at)),
                path: loaded
                    .as_ref()
                    .map(|m| m.path.display().to_string())
                    .unwrap_or_default(),
                sha256: loaded
                    .as_ref()
                    .map(|m| m.sha256.to_string())
                    .unwrap_or_default(),
                stage: control
                    .stage(&entry.name, &entry.version)
                    .map(version_stage),
                card: loaded
                    .as_ref()
                    .and_then(|m| m.card.as_ref())
                    .map(|c| ModelCard {
                        semver: c
                            .semver
                            .as_ref()
                            .map(ToString::to_string)
                            .unwrap_or_default(),
                        stated_sha256: c
                            .sha256
                            .as_ref()
                            .map(ToString::to_string)
                            .unwrap_or_default(),
                        lineage: c.lineage.as_ref().map(lineage),
                        description: c.description.clone(),
                        owner: c.owner.clone(),
                        intended_use: c.intended_use.clone(),
                        limitations: c.limitations.clone(),
                        training_data: c.training_data.clone(),
                        metrics: c.metrics.clone().into_iter().collect(),
                        input_rules: c
                            .input_rules
                            .as_ref()
                            .and_then(|r| serde_json::to_string(r).ok())
                            .unwrap_or_default(),
                    }),
                model: entry.name,
                version: entry.version,
            }
        })
        .collect()
}

/// A card's lineage as the admin API sends it.
fn lineage(lineage: &aviary_worker::registry::Lineage) -> Lineage {
    Lineage {
        dataset: lineage.dataset.clone(),
        dataset_sha256: lineage
            .dataset_sha256
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        code_revision: lineage.code_revision.clone(),
        training_run: lineage.training_run.clone(),
        hyperparameters: match lineage.hyperparameters.is_empty() {
            true => String::new(),
            // Plain JSON values: serialising cannot fail.
            false => serde_json::to_string(&lineage.hyperparameters).unwrap_or_default(),
        },
    }
}

/// A tracked version's drift as the admin API sends it.
fn version_drift(
    model: String,
    version: String,
    tracker: &aviary_worker::drift::DriftTracker,
) -> VersionDrift {
    let card = tracker.card();
    VersionDrift {
        model,
        version,
        alpha: card.alpha,
        max_psi: card.max_psi,
        min_samples: card.min_samples as u64,
        features: tracker
            .report()
            .into_iter()
            .map(|f| FeatureDrift {
                side: f.side.to_owned(),
                tensor: f.tensor,
                feature: f.feature,
                test: f.test.to_owned(),
                reference: f.reference as u64,
                window: f.window as u64,
                statistic: f.statistic,
                p_value: f.p_value,
                adjusted_p_value: f.adjusted_p_value,
                psi: f.psi,
                outliers: f.outliers,
                outliers_total: f.outliers_total,
                verdict: f.verdict.to_owned(),
            })
            .collect(),
    }
}

fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A stage as the admin API sends it.
fn version_stage(record: crate::registry::StageRecord) -> VersionStage {
    VersionStage {
        stage: record.stage.name().to_owned(),
        by: record.by,
        at_ms: record.at_ms,
        note: record.note,
    }
}

#[tonic::async_trait]
impl Models for ModelsService {
    async fn approve(
        &self,
        request: Request<ApproveRequest>,
    ) -> Result<Response<StageResponse>, Status> {
        let request = request.into_inner();
        let model = required("model", &request.model)?;
        let version = required("version", &request.version)?;
        let record = self.control.approve(model, version, &request.note).await?;
        Ok(Response::new(StageResponse {
            stage: Some(version_stage(record)),
            enforced: true,
            canary_cap_percent: self.control.registry().map_or(0, |r| r.cap_percent()),
        }))
    }

    async fn get_stage(
        &self,
        request: Request<VersionRequest>,
    ) -> Result<Response<StageResponse>, Status> {
        let request = request.into_inner();
        let model = required("model", &request.model)?;
        let version = required("version", &request.version)?;
        Ok(Response::new(StageResponse {
            stage: self.control.stage(model, version).map(version_stage),
            enforced: self.control.registry().is_some(),
            canary_cap_percent: self.control.registry().map_or(0, |r| r.cap_percent()),
        }))
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

    async fn get_drift(
        &self,
        request: Request<DriftRequest>,
    ) -> Result<Response<DriftReport>, Status> {
        let DriftRequest { model, version } = request.into_inner();
        if model.is_empty() && !version.is_empty() {
            return Err(Status::invalid_argument(
                "version: names a version of no model; set model too",
            ));
        }
        let Some(worker) = self.control.worker() else {
            return Err(Status::unimplemented(
                "this gateway has no embedded worker: read drift from each worker's /metrics (aviary_drift_*)",
            ));
        };
        let versions: Vec<VersionDrift> = worker
            .drift_tracked()
            .into_iter()
            .filter(|(m, v, _)| {
                (model.is_empty() || *m == model) && (version.is_empty() || *v == version)
            })
            .filter_map(|(m, v, loaded)| Some(version_drift(m, v, loaded.drift.as_ref()?)))
            .collect();
        if versions.is_empty() && !model.is_empty() {
            return Err(Status::not_found(format!(
                "no loaded version of model \"{model}\"{} tracks drift (a model card's [drift])",
                match version.is_empty() {
                    true => String::new(),
                    false => format!(" at version \"{version}\""),
                }
            )));
        }
        Ok(Response::new(DriftReport { versions }))
    }

    async fn load_version(
        &self,
        request: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        let request = request.into_inner();
        let model = required("model", &request.model)?;
        let version = required("version", &request.version)?;
        let (outcome, generation) = self
            .control
            .load_version(model, version)
            .await
            .inspect_err(|error| refused("load", model, version, error))?;
        tracing::info!(
            model,
            version,
            generation,
            load_ms = millis(outcome.load_time),
            "version loaded through the admin API"
        );
        Ok(Response::new(VersionResponse {
            version: self.version_info(model, version),
            generation,
            load_ms: millis(outcome.load_time),
        }))
    }

    async fn reload_version(
        &self,
        request: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        let request = request.into_inner();
        let model = required("model", &request.model)?;
        let version = required("version", &request.version)?;
        let outcome = self
            .control
            .reload_version(model, version)
            .await
            .inspect_err(|error| refused("reload", model, version, error))?;
        tracing::info!(
            model,
            version,
            load_ms = millis(outcome.load_time),
            "version reloaded through the admin API"
        );
        Ok(Response::new(VersionResponse {
            version: self.version_info(model, version),
            generation: self.control.routing().load().generation,
            load_ms: millis(outcome.load_time),
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
            .await
            .inspect_err(|error| refused("unload", model, version, error))?;
        tracing::info!(
            model,
            version,
            generation,
            force = request.force,
            "version unloaded through the admin API"
        );
        Ok(Response::new(VersionResponse {
            version: None,
            generation,
            load_ms: 0,
        }))
    }
}

/// Logs an admin change that did not happen, with why: the log is the audit trail of
/// what was asked as well as of what was done.
fn refused(what: &str, model: &str, version: &str, error: &GatewayError) {
    tracing::warn!(model, version, %error, "{what} through the admin API refused or failed");
}
