//! The routing snapshot: the compiled route table together with the backend of every
//! routed version. The gateway holds one behind an `ArcSwap`, so each request sees one
//! consistent pair of table and backends.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use aviary_router::{RouteSpec, RouteTable, VersionWeight};
use aviary_worker::Worker;

use crate::{
    GatewayError,
    backend::{Backend, InProcess, Remote},
    config::Config,
};

/// A compiled route table and the backends behind it.
#[derive(Debug)]
pub struct Routing {
    /// Which version serves which request.
    pub table: RouteTable,
    backends: BTreeMap<String, BTreeMap<String, Arc<dyn Backend>>>,
    distinct: Vec<Arc<dyn Backend>>,
}

impl Routing {
    /// Builds the routing from a config. With an embedded `worker`, versions without an
    /// `endpoint` run in-process, and every repository model without an explicit route
    /// gets one that sends unpinned traffic to its newest version and lets requests pin
    /// any loaded version.
    pub fn build(config: &Config, worker: Option<&Arc<Worker>>) -> Result<Routing, GatewayError> {
        let max_message_bytes = config.server.max_message_bytes;
        let mut specs = config.route_specs();
        let mut inventory: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut missing_endpoints = Vec::new();
        if let Some(worker) = worker {
            inventory = worker.inventory();
            for (model, versions) in &inventory {
                if specs.contains_key(model) {
                    continue;
                }
                // The newest version takes all unpinned traffic; older loaded versions stay
                // reachable by pinning, as in Triton.
                let mut sorted: Vec<&String> = versions.iter().collect();
                sorted.sort_by_key(|v| version_order(v));
                let newest = sorted.last().map(|v| v.as_str());
                let versions = sorted
                    .iter()
                    .map(|v| VersionWeight {
                        version: (*v).clone(),
                        weight: u32::from(Some(v.as_str()) == newest),
                    })
                    .collect();
                specs.insert(model.clone(), RouteSpec { versions });
            }
        }
        for (model, route) in &config.routes {
            for (i, version) in route.versions.iter().enumerate() {
                if version.endpoint.is_some() {
                    inventory
                        .entry(model.clone())
                        .or_default()
                        .insert(version.version.clone());
                } else if worker.is_none() {
                    missing_endpoints.push(format!(
                        "routes.{model}.versions[{i}].endpoint: required, since `aviary gateway` has no embedded worker \
                         (use `aviary serve` with a [repository] to run models in-process)"
                    ));
                }
            }
        }
        if !missing_endpoints.is_empty() {
            return Err(GatewayError::Config {
                path: "routes".into(),
                message: missing_endpoints.join("\n"),
            });
        }
        let table = RouteTable::compile(&specs, &inventory)?;

        let in_process: Option<Arc<dyn Backend>> =
            worker.map(|w| Arc::new(InProcess::new(Arc::clone(w))) as _);
        let mut remotes: BTreeMap<String, Arc<dyn Backend>> = BTreeMap::new();
        let mut backends: BTreeMap<String, BTreeMap<String, Arc<dyn Backend>>> = BTreeMap::new();
        for (model, spec) in &specs {
            for version in &spec.versions {
                let endpoint = config
                    .routes
                    .get(model)
                    .and_then(|r| r.versions.iter().find(|v| v.version == version.version))
                    .and_then(|v| v.endpoint.clone());
                let backend = match endpoint {
                    Some(endpoint) => match remotes.get(&endpoint) {
                        Some(existing) => Arc::clone(existing),
                        None => {
                            let remote: Arc<dyn Backend> =
                                Arc::new(Remote::connect_lazy(&endpoint, max_message_bytes)?);
                            remotes.insert(endpoint, Arc::clone(&remote));
                            remote
                        }
                    },
                    None => in_process.clone().ok_or_else(|| GatewayError::NoBackend {
                        model: model.clone(),
                        version: version.version.clone(),
                    })?,
                };
                backends
                    .entry(model.clone())
                    .or_default()
                    .insert(version.version.clone(), backend);
            }
        }
        let distinct = in_process
            .into_iter()
            .chain(remotes.into_values())
            .collect();
        Ok(Routing {
            table,
            backends,
            distinct,
        })
    }

    /// The backend serving `model` at `version`.
    pub fn backend(&self, model: &str, version: &str) -> Result<&Arc<dyn Backend>, GatewayError> {
        self.backends
            .get(model)
            .and_then(|v| v.get(version))
            .ok_or_else(|| GatewayError::NoBackend {
                model: model.to_owned(),
                version: version.to_owned(),
            })
    }

    /// The version that answers metadata and config questions about a model when the
    /// caller names none: the one with the largest share (the first on a tie).
    pub fn primary_version(&self, model: &str) -> Option<&str> {
        let route = self.table.route(model)?;
        let mut best: Option<(&str, u32)> = None;
        for (version, weight) in route.versions() {
            if best.is_none_or(|(_, w)| weight > w) {
                best = Some((version, weight));
            }
        }
        best.map(|(v, _)| v)
    }

    /// Every (model, version) the table routes, in order.
    pub fn routed_versions(&self) -> impl Iterator<Item = (&str, &str)> {
        self.table
            .models()
            .filter_map(|m| self.table.route(m).map(|r| (m, r)))
            .flat_map(|(m, r)| r.versions().map(move |(v, _)| (m, v)))
    }

    /// Each backend once.
    pub fn distinct_backends(&self) -> &[Arc<dyn Backend>] {
        &self.distinct
    }
}

/// Numeric versions sort numerically, others after them by name.
fn version_order(version: &str) -> (u64, String) {
    version
        .parse()
        .map_or((u64::MAX, version.to_owned()), |n| (n, String::new()))
}
