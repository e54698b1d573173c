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
    bandit::BanditConfig,
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
    /// Deadlines, load shedding, the circuit breaker and retries of its versions, as
    /// set (a version may set its own over them; see [`Route::limits_of`]).
    pub limits: LimitsConfig,
    /// Where a failed call goes: (model, version); the model may be another one with
    /// the same signature.
    pub fallback: Option<(String, String)>,
    /// Whether requests that finally failed are kept in the dead-letter queue.
    pub dead_letters: bool,
    /// Whether a call that finally failed is answered with its version's default
    /// prediction (from the model card), when it has one.
    pub default_prediction: bool,
    /// How long an answer of this route is served from the prediction cache; `None`:
    /// the route is not cached.
    pub cache_ttl: Option<Duration>,
    /// The input-rule mode its versions apply over their cards'; `None`: each card's.
    pub input_rules_mode: Option<aviary_worker::input_rules::RuleMode>,
    /// Every weight is 0 and unpinned requests are refused: an implicit route none of
    /// whose versions may take unpinned traffic yet (see [`Route::implicit`]).
    pub pinned_only: bool,
    /// The policy that learns the weights from feedback; `None`: the weights are fixed.
    pub bandit: Option<BanditConfig>,
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
    /// Its limits where they differ from the route's, as set.
    pub limits: LimitsConfig,
}

impl RouteVersion {
    /// A version of the embedded worker at `weight`, with no injected faults.
    pub fn new(version: &str, weight: u32) -> RouteVersion {
        RouteVersion {
            version: version.to_owned(),
            weight,
            endpoints: Vec::new(),
            fault: None,
            limits: LimitsConfig::default(),
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
                    limits: v.limits,
                })
                .collect(),
            sticky: config.sticky.clone(),
            rules: config.rules.clone(),
            shadow: config.shadow.clone(),
            limits: config.limits,
            fallback: None,
            dead_letters: config.dead_letters,
            default_prediction: config.default_prediction,
            cache_ttl: config.cache.map(|c| Duration::from_millis(c.ttl_ms)),
            input_rules_mode: config.input_rules_mode,
            pinned_only: false,
            bandit: config.bandit.clone(),
        }
    }
}

impl Route {
    /// The request parameters the route routes by: its sticky key's and its match
    /// rules'. The gateway consumes them; they are not passed on to workers.
    pub fn routing_parameters(&self) -> impl Iterator<Item = &str> {
        self.sticky
            .iter()
            .filter_map(|s| s.parameter.as_deref())
            .chain(self.rules.iter().filter_map(|r| r.parameter.as_deref()))
    }

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
pub fn limits_from(config: &LimitsConfig) -> Limits {
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
        retry_attempts: config.retry_attempts.unwrap_or(defaults.retry_attempts),
    }
}

/// `limits` as the admin API shows and takes them.
fn limits_message(limits: &LimitsConfig) -> pb::Limits {
    pb::Limits {
        timeout_ms: limits.timeout_ms,
        max_timeout_ms: limits.max_timeout_ms,
        max_in_flight: limits.max_in_flight.map(|n| n as u64),
        max_queue: limits.max_queue.map(|n| n as u64),
        breaker_failures: limits.breaker_failures,
        breaker_open_ms: limits.breaker_open_ms,
        retry_attempts: limits.retry_attempts,
    }
}

/// The limits an admin message sets (absent: none).
fn limits_of_message(message: Option<&pb::Limits>) -> LimitsConfig {
    let Some(m) = message else {
        return LimitsConfig::default();
    };
    // A count beyond usize cannot be a real limit; it saturates rather than wraps.
    let count = |n: Option<u64>| n.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    LimitsConfig {
        timeout_ms: m.timeout_ms,
        max_timeout_ms: m.max_timeout_ms,
        max_in_flight: count(m.max_in_flight),
        max_queue: count(m.max_queue),
        breaker_failures: m.breaker_failures,
        breaker_open_ms: m.breaker_open_ms,
        retry_attempts: m.retry_attempts,
    }
}

/// `limits` resolved, all set, as the admin API shows a version's limits in force.
fn resolved_message(limits: &Limits) -> pb::Limits {
    let millis = |d: Duration| Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    pb::Limits {
        timeout_ms: millis(limits.timeout),
        max_timeout_ms: millis(limits.max_timeout),
        max_in_flight: Some(limits.max_in_flight as u64),
        max_queue: Some(limits.max_queue as u64),
        breaker_failures: Some(limits.breaker.failures),
        breaker_open_ms: millis(limits.breaker.open_for),
        retry_attempts: Some(limits.retry_attempts),
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
    /// cannot say (sticky key, rules, shadow, faults, cache, bandit) is empty here; the gateway keeps
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
                    limits: limits_of_message(v.limits.as_ref()),
                    ..RouteVersion::new(&v.version, v.weight)
                })
                .collect(),
            limits: limits_of_message(message.limits.as_ref()),
            ..Route::default()
        }
    }

    /// The route as the admin API shows it: the route's limits as set, each version's
    /// as in force.
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
                    limits: Some(resolved_message(&self.limits_of(&v.version))),
                    ..pb::VersionWeight::default()
                })
                .collect(),
            limits: Some(limits_message(&self.limits)),
        }
    }

    /// The limits in force for `version`: its own settings, then the route's, then the
    /// defaults (a version the route does not list takes the route's).
    pub fn limits_of(&self, version: &str) -> Limits {
        let own = self
            .versions
            .iter()
            .find(|v| v.version == version)
            .map(|v| v.limits)
            .unwrap_or_default();
        limits_from(&self.limits.overlaid(own))
    }

    /// The first setting of the route's limits that cannot work, as (its path below
    /// the route, the reason).
    pub fn check_limits(&self) -> Result<(), (String, &'static str)> {
        if let Err((setting, reason)) = limits_from(&self.limits).check() {
            return Err((format!("limits.{setting}"), reason));
        }
        for (i, version) in self.versions.iter().enumerate() {
            if let Err((setting, reason)) = self.limits_of(&version.version).check() {
                return Err((format!("versions[{i}].limits.{setting}"), reason));
            }
        }
        Ok(())
    }

    /// The route of an embedded model without an explicit one: the newest version
    /// takes all unpinned traffic; older loaded versions stay reachable by pinning, as
    /// in Triton.
    ///
    /// The newest version `takes_unpinned` allows takes all unpinned traffic (with
    /// `[registry]`, the newest approved one); when it allows none, the route serves
    /// pinned requests only.
    pub fn implicit(versions: &BTreeSet<String>, takes_unpinned: impl Fn(&str) -> bool) -> Route {
        let mut sorted: Vec<&String> = versions.iter().collect();
        sorted.sort_by_key(|v| version_order(v));
        let newest = sorted
            .iter()
            .rev()
            .find(|v| takes_unpinned(v))
            .map(|v| v.as_str());
        Route {
            versions: sorted
                .iter()
                .map(|v| RouteVersion::new(v, u32::from(Some(v.as_str()) == newest)))
                .collect(),
            pinned_only: newest.is_none(),
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
            pinned_only: self.pinned_only,
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
        let weights = |route: &Route| -> Vec<(String, u32)> {
            route
                .versions
                .iter()
                .map(|v| (v.version.clone(), v.weight))
                .collect()
        };
        let every = Route::implicit(&versions, |_| true);
        assert_eq!(
            weights(&every),
            [("1".into(), 0), ("2".into(), 0), ("10".into(), 1)]
        );
        assert!(!every.pinned_only);
        // With [registry], the newest version that may take traffic.
        let approved = Route::implicit(&versions, |v| v != "10");
        assert_eq!(
            weights(&approved),
            [("1".into(), 0), ("2".into(), 1), ("10".into(), 0)]
        );
        let none = Route::implicit(&versions, |_| false);
        assert!(none.pinned_only && none.versions.iter().all(|v| v.weight == 0));
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
            limits: None,
        };
        let route = Route::from_message(&message);
        assert!(route.versions[0].endpoints.is_empty());
        assert_eq!(
            route.versions[1].endpoints,
            ["http://127.0.0.1:9", "http://127.0.0.1:10"]
        );
        let mut shown = route.to_message("demo");
        assert_eq!(
            shown.versions[1].limits,
            Some(resolved_message(&Limits::default())),
            "a version shows the limits in force"
        );
        assert_eq!(shown.limits, Some(pb::Limits::default()), "none set");
        shown.limits = None;
        for version in &mut shown.versions {
            version.limits = None;
        }
        assert_eq!(shown, message);
    }

    #[test]
    fn a_version_sets_its_limits_over_the_routes_over_the_defaults() {
        let route = Route {
            versions: vec![
                RouteVersion::new("1", 90),
                RouteVersion {
                    limits: LimitsConfig {
                        max_in_flight: Some(4),
                        retry_attempts: Some(1),
                        ..LimitsConfig::default()
                    },
                    ..RouteVersion::new("2", 10)
                },
            ],
            limits: LimitsConfig {
                max_in_flight: Some(32),
                timeout_ms: Some(1500),
                ..LimitsConfig::default()
            },
            ..Route::default()
        };
        let defaults = Limits::default();
        let one = route.limits_of("1");
        assert_eq!(
            (
                one.max_in_flight,
                one.timeout,
                one.max_queue,
                one.retry_attempts
            ),
            (32, Duration::from_millis(1500), defaults.max_queue, 3)
        );
        let two = route.limits_of("2");
        assert_eq!(
            (two.max_in_flight, two.timeout, two.retry_attempts),
            (4, Duration::from_millis(1500), 1)
        );
        assert_eq!(
            route.limits_of("9"),
            one,
            "an unlisted version takes the route's"
        );
        assert_eq!(route.check_limits(), Ok(()));
    }

    #[test]
    fn limits_that_cannot_work_are_named_with_their_path() {
        let mut route = Route {
            versions: vec![RouteVersion::new("1", 1), RouteVersion::new("2", 1)],
            ..Route::default()
        };
        route.versions[1].limits.max_in_flight = Some(0);
        assert_eq!(
            route.check_limits(),
            Err((
                "versions[1].limits.max_in_flight".to_owned(),
                "must be at least 1: no call could ever run"
            ))
        );
        route.versions[1].limits = LimitsConfig::default();
        route.limits.timeout_ms = Some(400_000);
        assert_eq!(
            route.check_limits().map_err(|(path, _)| path),
            Err("limits.max_timeout_ms".to_owned()),
            "a default deadline beyond the longest allowed"
        );
        route.limits = LimitsConfig {
            retry_attempts: Some(11),
            ..LimitsConfig::default()
        };
        assert_eq!(
            route.check_limits().map_err(|(path, _)| path),
            Err("limits.retry_attempts".to_owned())
        );
    }
}
