//! Bandit routes' weights in [`Control`]: the routes the driver replans, and the
//! weights it chose laid over the routes' own.
//!
//! A policy's weights are kept apart from the routes (the writer's `bandit`), so the
//! configured weights stay the warm-up's and come back when the bandit is removed; a
//! config edit to the route keeps the learnt weights while the arms stay the same. A
//! running rollout's hold lies above them.

use std::collections::BTreeSet;

use super::{Control, takes_unpinned};
use crate::{
    GatewayError,
    bandit::{BanditConfig, WEIGHT_SCALE, moved},
    route::{Route, Routes},
    routing::Routing,
};

/// A bandit route as the driver plans it.
#[derive(Debug, Clone, PartialEq)]
pub struct BanditRoute {
    /// The model.
    pub model: String,
    /// Its policy.
    pub config: BanditConfig,
    /// The arms: the versions the route weights, with their configured weights.
    pub arms: Vec<(String, u32)>,
}

/// What became of a policy's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BanditApplied {
    /// Published as this generation.
    Published(u64),
    /// The shares in force are within a point of them: nothing published.
    Unchanged,
    /// A running rollout holds the route's weights: nothing published.
    Held,
}

/// The versions `route` weights, with their weights.
fn arms(route: &Route) -> Vec<(String, u32)> {
    route
        .versions
        .iter()
        .filter(|v| v.weight > 0)
        .map(|v| (v.version.clone(), v.weight))
        .collect()
}

/// Whether `weights` name exactly the arms of `route` (in any order).
pub(super) fn same_arms(route: &Route, weights: &[(String, u32)]) -> bool {
    let mut arms: Vec<String> = arms(route).into_iter().map(|(v, _)| v).collect();
    let mut named: Vec<&String> = weights.iter().map(|(v, _)| v).collect();
    arms.sort();
    named.sort();
    arms.iter().eq(named)
}

/// `weights` as shares out of [`WEIGHT_SCALE`], the weighted ones only, by version.
fn shares(weights: impl IntoIterator<Item = (String, u32)>) -> Vec<(String, u32)> {
    let mut weighted: Vec<(String, u32)> = weights.into_iter().filter(|(_, w)| *w > 0).collect();
    weighted.sort();
    let total: u64 = weighted.iter().map(|(_, w)| u64::from(*w)).sum();
    weighted
        .into_iter()
        .map(|(v, w)| {
            let share = u64::from(w) * u64::from(WEIGHT_SCALE) / total.max(1);
            (v, u32::try_from(share).unwrap_or(WEIGHT_SCALE))
        })
        .collect()
}

/// Lays each policy's weights over its route in `routes`, when the route is still a
/// bandit over the same arms (else its own weights stand until the next plan).
pub(super) fn lay_over(
    routes: &mut Routes,
    chosen: &std::collections::BTreeMap<String, Vec<(String, u32)>>,
) {
    for (model, weights) in chosen {
        let Some(route) = routes.get_mut(model).filter(|r| r.bandit.is_some()) else {
            continue;
        };
        if !same_arms(route, weights) {
            continue;
        }
        for version in &mut route.versions {
            if let Some((_, weight)) = weights.iter().find(|(v, _)| *v == version.version) {
                version.weight = *weight;
            }
        }
    }
}

/// For `SetRoute` on a bandit route: the shares it asks for must be the ones in force
/// (it may change limits and endpoints, not the policy's weights), and the route keeps
/// its configured weights under the policy's.
pub(super) fn keep_configured_weights(
    model: &str,
    route: &mut Route,
    configured: &Route,
    routing: &Routing,
) -> Result<(), GatewayError> {
    let asked = shares(route.versions.iter().map(|v| (v.version.clone(), v.weight)));
    let in_force = routing
        .routes
        .get(model)
        .map(|r| shares(r.versions.iter().map(|v| (v.version.clone(), v.weight))))
        .unwrap_or_default();
    if moved(&in_force, &asked) {
        return Err(GatewayError::Refused(format!(
            "routes.{model}: its weights are learnt by its bandit policy (routes.{model}.bandit \
             in the config file); SetRoute may change its limits and endpoints with the weights \
             in force, not the weights"
        )));
    }
    for version in &mut route.versions {
        version.weight = configured
            .versions
            .iter()
            .find(|v| v.version == version.version)
            .map_or(0, |v| v.weight);
    }
    // An arm at weight 0 in force (starved, or capped at 0) is in no share list, so
    // the check above lets it leave; a bandit needs two.
    if arms(route).len() < 2 {
        return Err(GatewayError::Refused(format!(
            "routes.{model}: a bandit needs at least two versions with weight (its arms); \
             this change leaves {}",
            arms(route).len()
        )));
    }
    Ok(())
}

impl Control {
    /// The bandit routes, with their configured arms.
    pub async fn bandit_routes(&self) -> Vec<BanditRoute> {
        // Read without the writer's lock first: most gateways have no bandit.
        if !self
            .routing
            .load()
            .routes
            .values()
            .any(|r| r.bandit.is_some())
        {
            return Vec::new();
        }
        let writer = self.writer.lock().await;
        writer
            .routes
            .iter()
            .filter_map(|(model, route)| {
                Some(BanditRoute {
                    model: model.clone(),
                    config: route.bandit.clone()?,
                    arms: arms(route),
                })
            })
            .collect()
    }

    /// The greatest share `model` `version` may take as a bandit's arm: with
    /// `[registry]`, the canary cap when it is not approved; `None`: no bound.
    pub fn arm_cap(&self, model: &str, version: &str) -> Option<f64> {
        let registry = self.registry.as_deref()?;
        let approved = takes_unpinned(Some(registry), self.worker.as_ref(), model, version);
        (!approved).then(|| f64::from(registry.cap_percent()) / 100.0)
    }

    /// Gives `model`'s arms the weights its policy chose (out of [`WEIGHT_SCALE`]),
    /// unless a rollout holds them or the shares in force are within a point of them.
    /// Refused like any routing change (a registry's cap).
    pub async fn set_bandit_weights(
        &self,
        model: &str,
        weights: Vec<(String, u32)>,
    ) -> Result<BanditApplied, GatewayError> {
        let mut writer = self.writer.lock().await;
        self.expire_holds(&mut writer);
        if writer.holds.contains_key(model) {
            return Ok(BanditApplied::Held);
        }
        // The arms may have changed (a config edit) since the weights were chosen.
        let current = writer.routes.get(model).filter(|r| r.bandit.is_some());
        if !current.is_some_and(|route| same_arms(route, &weights)) {
            return Err(GatewayError::Refused(format!(
                "routes.{model}: its bandit's arms changed since these weights were chosen"
            )));
        }
        let in_force = self
            .routing
            .load()
            .routes
            .get(model)
            .map(|r| shares(r.versions.iter().map(|v| (v.version.clone(), v.weight))))
            .unwrap_or_default();
        if !moved(&in_force, &shares(weights.clone())) {
            return Ok(BanditApplied::Unchanged);
        }
        let previous = writer.bandit.insert(model.to_owned(), weights);
        let routes = writer.routes.clone();
        match self.publish(&mut writer, routes, &BTreeSet::new()) {
            Ok(generation) => Ok(BanditApplied::Published(generation)),
            Err(error) => {
                match previous {
                    Some(previous) => writer.bandit.insert(model.to_owned(), previous),
                    None => writer.bandit.remove(model),
                };
                Err(error)
            }
        }
    }
}
