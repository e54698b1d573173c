//! A model's route as the gateway works with it: its versions with their weights and
//! where each runs, the sticky key, match rules and shadow. Built from the config file
//! ([`RouteConfig`]) or from the admin API's message, and shown back as that message;
//! compiled into the router's [`RouteSpec`].

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use aviary::pb::admin as pb;
use aviary_router::{RouteSpec, RuleSpec, StickySpec, VersionWeight};

use crate::{
    config::{FaultConfig, LimitsConfig, RouteConfig, ShadowConfig},
    stack::{BreakerSettings, Limits},
};

/// Every model's route, by model name.
pub type Routes = BTreeMap<String, Route>;

/// One model's route.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Route {
    /// Versions in split order (the canary first for sticky routing).
    pub versions: Vec<RouteVersion>,
    /// Keeps each user on one version: the routing key's header or parameter.
    pub sticky: Option<StickySpec>,
    /// Header or parameter matches that pick a version before the split.
    pub rules: Vec<RuleSpec>,
    /// A version that also receives a share of the requests, off the request path.
    pub shadow: Option<ShadowConfig>,
    /// Deadlines, load shedding and the circuit breaker of its versions.
    pub limits: Limits,
    /// Where a failed call goes: (model, version); the model may be another one with
    /// the same signature.
    pub fallback: Option<(String, String)>,
    /// Whether requests that finally failed are kept in the dead-letter queue.
    pub dead_letters: bool,
}

/// One version of a route.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteVersion {
    /// Version name.
    pub version: String,
    /// Share of unpinned traffic, normalised by the sum of the route's weights.
    pub weight: u32,
    /// Remote worker replicas serving it (`http://host:port`, a DNS host standing for
    /// all its addresses); empty: the embedded worker.
    pub endpoints: Vec<String>,
    /// Injected failures and latency; `None`: none.
    pub fault: Option<FaultConfig>,
}

impl RouteVersion {
    /// A version of the embedded worker at `weight`, with no injected faults.
    pub fn new(version: &str, weight: u32) -> RouteVersion {
        RouteVersion {
            version: version.to_owned(),
            weight,
            endpoints: Vec::new(),
            fault: None,
        }
    }
}

impl From<&RouteConfig> for Route {
    fn from(config: &RouteConfig) -> Route {
        Route {
            versions: config
                .versions
                .iter()
                .map(|v| RouteVersion {
                    version: v.version.clone(),
                    weight: v.weight,
                    endpoints: v.endpoint.iter().chain(&v.endpoints).cloned().collect(),
                    fault: v.fault,
                })
                .collect(),
            sticky: config.sticky.clone(),
            rules: config.rules.clone(),
            shadow: config.shadow.clone(),
            limits: limits_from(&config.limits),
            fallback: None,
            dead_letters: config.dead_letters,
        }
    }
}

impl Route {
    /// The route of `model` as its config says, fallback included.
    pub fn configured(model: &str, config: &RouteConfig) -> Route {
        Route {
            fallback: config.fallback.as_ref().map(|f| {
                (
                    f.model.clone().unwrap_or_else(|| model.to_owned()),
                    f.version.clone(),
                )
            }),
            ..Route::from(config)
        }
    }
}

/// The limits a config asks for, with the defaults for what it leaves out.
fn limits_from(config: &LimitsConfig) -> Limits {
    let defaults = Limits::default();
    let millis = |ms: Option<u64>, default: Duration| ms.map_or(default, Duration::from_millis);
    Limits {
        timeout: millis(config.timeout_ms, defaults.timeout),
        max_timeout: millis(config.max_timeout_ms, defaults.max_timeout),
        max_in_flight: config.max_in_flight.unwrap_or(defaults.max_in_flight),
        max_queue: config.max_queue.unwrap_or(defaults.max_queue),
        breaker: BreakerSettings {
            failures: config.breaker_failures.unwrap_or(defaults.breaker.failures),
            open_for: millis(config.breaker_open_ms, defaults.breaker.open_for),
        },
    }
}

impl Route {
    /// The routes of a config file.
    pub fn all_from(config: &BTreeMap<String, RouteConfig>) -> Routes {
        config
            .iter()
            .map(|(model, route)| (model.clone(), Route::configured(model, route)))
            .collect()
    }

    /// The route `SetRoute` asks for: versions, weights and endpoints (several replicas
    /// comma-separated in one `endpoint`). What the message
    /// cannot say (sticky key, rules, shadow, faults) is empty here; the gateway keeps
    /// it from the route in force.
    pub fn from_message(message: &pb::Route) -> Route {
        Route {
            versions: message
                .versions
                .iter()
                .map(|v| RouteVersion {
                    endpoints: v
                        .endpoint
                        .split(',')
                        .map(str::trim)
                        .filter(|e| !e.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    ..RouteVersion::new(&v.version, v.weight)
                })
                .collect(),
            ..Route::default()
        }
    }

    /// The route as the admin API shows it.
    pub fn to_message(&self, model: &str) -> pb::Route {
        pb::Route {
            model: model.to_owned(),
            versions: self
                .versions
                .iter()
                .map(|v| pb::VersionWeight {
                    version: v.version.clone(),
                    weight: v.weight,
                    endpoint: v.endpoints.join(","),
                    ..pb::VersionWeight::default()
                })
                .collect(),
        }
    }

    /// The route of an embedded model without an explicit one: the newest version
    /// takes all unpinned traffic; older loaded versions stay reachable by pinning, as
    /// in Triton.
    pub fn implicit(versions: &BTreeSet<String>) -> Route {
        let mut sorted: Vec<&String> = versions.iter().collect();
        sorted.sort_by_key(|v| version_order(v));
        let newest = sorted.last().map(|v| v.as_str());
        Route {
            versions: sorted
                .iter()
                .map(|v| RouteVersion::new(v, u32::from(Some(v.as_str()) == newest)))
                .collect(),
            ..Route::default()
        }
    }

    /// The route as the router sees it.
    pub fn spec(&self) -> RouteSpec {
        RouteSpec {
            versions: self
                .versions
                .iter()
                .map(|v| VersionWeight {
                    version: v.version.clone(),
                    weight: v.weight,
                })
                .collect(),
            sticky: self.sticky.clone(),
            rules: self.rules.clone(),
        }
    }
}

/// Numeric versions sort numerically, others after them by name.
fn version_order(version: &str) -> (u64, String) {
    version
        .parse()
        .map_or((u64::MAX, version.to_owned()), |n| (n, String::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_numeric_version_takes_an_implicit_route() {
        let versions: BTreeSet<String> = ["2", "10", "1"].map(String::from).into();
        let route = Route::implicit(&versions);
        let weights: Vec<(&str, u32)> = route
            .versions
            .iter()
            .map(|v| (v.version.as_str(), v.weight))
            .collect();
        assert_eq!(weights, [("1", 0), ("2", 0), ("10", 1)]);
    }

    #[test]
    fn a_message_round_trips_with_its_endpoints() {
        let message = pb::Route {
            model: "demo".into(),
            versions: vec![
                pb::VersionWeight {
                    version: "1".into(),
                    weight: 90,
                    ..pb::VersionWeight::default()
                },
                pb::VersionWeight {
                    version: "2".into(),
                    weight: 10,
                    endpoint: "http://127.0.0.1:9,http://127.0.0.1:10".into(),
                    ..pb::VersionWeight::default()
                },
            ],
        };
        let route = Route::from_message(&message);
        assert!(route.versions[0].endpoints.is_empty());
        assert_eq!(
            route.versions[1].endpoints,
            ["http://127.0.0.1:9", "http://127.0.0.1:10"]
        );
        assert_eq!(route.to_message("demo"), message);
    }
}
