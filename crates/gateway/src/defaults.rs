//! The default predictions of the versions whose route opts in
//! (`default_prediction = true`), held by the gateway so that a call its version failed
//! can still be answered when the version's worker is gone.
//!
//! A version's default comes from its model card, which its worker reads and checks
//! when it loads the version and serves in the version's `ModelConfig` parameters (see
//! `aviary_worker::default_prediction`); the gateway fetches it from there, for the
//! embedded worker and remote workers alike. [`keep_fresh`] fetches them again every
//! [`REFRESH`] (a reloaded version's card may have changed) and keeps the last one
//! fetched while a worker does not answer.

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use aviary_worker::{DefaultPrediction, default_prediction::PARAMETER};
use tokio::sync::watch;

use crate::{control::Control, routing::Routing};

/// How often the defaults of opted-in versions are fetched again.
pub const REFRESH: Duration = Duration::from_secs(5);

/// Held default predictions by (model, version).
#[derive(Debug, Default)]
pub struct Defaults {
    held: RwLock<HashMap<(String, String), Arc<DefaultPrediction>>>,
}

impl Defaults {
    /// The default prediction held for `model` at `version`.
    pub fn get(&self, model: &str, version: &str) -> Option<Arc<DefaultPrediction>> {
        let held = self.held.read().unwrap_or_else(PoisonError::into_inner);
        held.get(&(model.to_owned(), version.to_owned())).cloned()
    }

    /// Fetches the default of every version whose route opts in, all at once; a version
    /// whose worker does not answer keeps what is held, one whose card states none (or
    /// no longer opted in) holds none.
    pub async fn refresh(&self, routing: &Routing) {
        let mut fetches = tokio::task::JoinSet::new();
        for (model, route) in routing.routes.iter().filter(|(_, r)| r.default_prediction) {
            for version in &route.versions {
                let Ok(backend) = routing.backend(model, &version.version) else {
                    continue;
                };
                let (backend, key) = (
                    Arc::clone(backend),
                    (model.clone(), version.version.clone()),
                );
                fetches.spawn(async move {
                    let config =
                        tokio::time::timeout(REFRESH, backend.config(key.0.clone(), key.1.clone()))
                            .await;
                    let fetched = match config {
                        Ok(Ok(config)) => Some(read(&key, config.parameters.get(PARAMETER))),
                        // Unreachable now: what is held stays, for exactly this case.
                        _ => None,
                    };
                    (key, fetched)
                });
            }
        }
        let mut fresh = HashMap::new();
        let mut unanswered = Vec::new();
        while let Some(Ok((key, fetched))) = fetches.join_next().await {
            match fetched {
                Some(Some(prediction)) => {
                    fresh.insert(key, Arc::new(prediction));
                }
                Some(None) => {}
                None => unanswered.push(key),
            }
        }
        let mut held = self.held.write().unwrap_or_else(PoisonError::into_inner);
        for key in unanswered {
            if let Some(kept) = held.remove(&key) {
                fresh.insert(key, kept);
            }
        }
        *held = fresh;
    }
}

/// A version's default from its config parameter; `None` (logged) when its card
/// states none or the parameter cannot be read.
fn read(
    (model, version): &(String, String),
    parameter: Option<&aviary::pb::inference::ModelParameter>,
) -> Option<DefaultPrediction> {
    let Some(parameter) = parameter else {
        tracing::debug!(
            model,
            version,
            "route opts in to default predictions, but the version's model card states none"
        );
        return None;
    };
    DefaultPrediction::from_json(&parameter.string_value)
        .inspect_err(|error| {
            tracing::warn!(model, version, %error, "default prediction unreadable; none held");
        })
        .ok()
}

/// Keeps `control`'s defaults fresh until `stop` turns true: at once, then every
/// [`REFRESH`].
pub async fn keep_fresh(control: Arc<Control>, mut stop: watch::Receiver<bool>) {
    loop {
        let routing = control.routing().load_full();
        control.defaults().refresh(&routing).await;
        tokio::select! {
            _ = tokio::time::sleep(REFRESH) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
