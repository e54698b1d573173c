//! The gateway's metrics on `/metrics`: read from [`Metrics`] and the routing
//! snapshot when scraped, so the request path keeps only its own counters. Names and
//! labels are listed in `docs/metrics.md`.

use std::{collections::BTreeMap, sync::Arc};

use aviary::metrics::{
    DURATION_BUCKETS, HistogramSnapshot, Labels, encode_counters, encode_gauge, encode_gauges,
    encode_histograms,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use crate::{
    audit::Audit,
    auth::Keys,
    control::{ConfigCounts, Control},
    metrics::{Metrics, VariantCounts},
    peer_limits::PeerLimits,
    rollouts::{Driver, RolloutGauges, Target},
    route::Routes,
    routing::Routing,
    shadow::ShadowReport,
};

/// The gateway's collector: per-version requests by code, durations, stand-ins and
/// cache use, every route's weights, and the config file's changes.
#[derive(Debug)]
pub struct GatewayCollector {
    metrics: Arc<Metrics>,
    control: Arc<Control>,
}

impl GatewayCollector {
    /// A collector over the gateway's metrics and its control plane (routing, config).
    pub fn new(metrics: Arc<Metrics>, control: Arc<Control>) -> GatewayCollector {
        GatewayCollector { metrics, control }
    }
}

/// Calls refused by rate limits: API keys' by key name (none without `[auth]`), and
/// peer addresses' in all (none without `[server] peer_rate_limit`).
#[derive(Debug)]
pub struct RateLimitCollector {
    keys: Option<Arc<Keys>>,
    peers: Option<Arc<PeerLimits>>,
}

impl RateLimitCollector {
    /// A collector over `keys`' and `peers`' refusals.
    pub fn new(keys: Option<Arc<Keys>>, peers: Option<Arc<PeerLimits>>) -> RateLimitCollector {
        RateLimitCollector { keys, peers }
    }
}

impl Collector for RateLimitCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let limited = self.keys.as_ref().map(|k| k.limited()).unwrap_or_default();
        encode_counters(
            &mut encoder,
            "aviary_rate_limited",
            "Calls refused with RESOURCE_EXHAUSTED because their API key was over its rate limit.",
            limited.into_iter().map(|(key, n)| (vec![("key", key)], n)),
        )?;
        aviary::metrics::encode_counter(
            &mut encoder,
            "aviary_peer_rate_limited",
            "Calls without a key refused with RESOURCE_EXHAUSTED because their address was over the per-address rate limit.",
            self.peers.as_ref().map_or(0, |p| p.limited()),
        )
    }
}

/// The audit trail's records by kind and outcome (nothing without `[audit]`).
#[derive(Debug)]
pub struct AuditCollector {
    audit: Audit,
}

impl AuditCollector {
    /// A collector over `audit`'s counts.
    pub fn new(audit: Audit) -> AuditCollector {
        AuditCollector { audit }
    }
}

impl Collector for AuditCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let counts = self.audit.counts().unwrap_or_default();
        encode_counters(
            &mut encoder,
            "aviary_audit_records",
            "Audit records by kind, and whether they were written, dropped (the writer's queue was full) or failed (the disk refused).",
            counts.into_iter().map(|(kind, outcome, n)| {
                (
                    vec![
                        ("kind", kind.as_str().to_owned()),
                        ("outcome", outcome.as_str().to_owned()),
                    ],
                    n,
                )
            }),
        )
    }
}

/// The rollouts a driver runs: a gateway's own, or the controller's for many gateways.
#[derive(Debug)]
pub struct RolloutsCollector<T> {
    driver: Arc<Driver<T>>,
}

impl<T> RolloutsCollector<T> {
    /// A collector over `driver`'s rollouts.
    pub fn new(driver: Arc<Driver<T>>) -> RolloutsCollector<T> {
        RolloutsCollector { driver }
    }
}

impl<T: Target + std::fmt::Debug + Send + Sync + 'static> Collector for RolloutsCollector<T> {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        encode_rollouts(&mut encoder, &self.driver.gauges())
    }
}

/// `(upper bound, count in that bucket alone)` of `DURATION_BUCKETS` plus +Inf (as
/// `f64::MAX`), the
/// sum in seconds, and the count, from a latency histogram in microseconds. The sum
/// is the histogram's (two significant digits per value), not an exact total.
pub fn duration_buckets(latency_us: &hdrhistogram::Histogram<u64>) -> HistogramSnapshot {
    let mut buckets = Vec::with_capacity(DURATION_BUCKETS.len() + 1);
    let mut below = 0;
    for bound in DURATION_BUCKETS {
        let bound_us = (bound * 1e6) as u64;
        let upto = latency_us.count_between(0, bound_us);
        buckets.push((bound, upto - below));
        below = upto;
    }
    let count = latency_us.len();
    // prometheus-client writes the bound f64::MAX as `+Inf`.
    buckets.push((f64::MAX, count - below));
    let sum = latency_us.mean() * count as f64 / 1e6;
    (buckets, sum, count)
}

impl Collector for GatewayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let counts = self.metrics.counts();
        let routing = self.control.routing().load();
        encode_requests(&mut encoder, &counts)?;
        encode_decisions(&mut encoder, &counts)?;
        encode_durations(&mut encoder, &counts)?;
        encode_stand_ins_and_cache(&mut encoder, &counts)?;
        encode_feedback(&mut encoder, &counts)?;
        encode_routing(&mut encoder, &routing)?;
        encode_gauges(
            &mut encoder,
            "aviary_version_role",
            "1 for each routed version's role: canary (of a running rollout), stable \
             (other versions with weight), shadow, fallback.",
            version_roles(&routing.routes, &self.control.canaries())
                .into_iter()
                .map(|(model, version, role)| {
                    (
                        vec![
                            ("model", model),
                            ("version", version),
                            ("role", role.to_owned()),
                        ],
                        1,
                    )
                }),
        )?;
        encode_shadows(&mut encoder, &routing)?;
        match self.control.config_counts() {
            Some(config) => encode_config(&mut encoder, config),
            None => Ok(()),
        }
    }
}

fn encode_config(
    encoder: &mut DescriptorEncoder<'_>,
    config: ConfigCounts,
) -> Result<(), std::fmt::Error> {
    encode_counters(
        encoder,
        "aviary_config_reloads",
        "Changes of the watched config file, by outcome: applied, or rejected (the last \
         good config kept serving).",
        [("applied", config.applied), ("rejected", config.rejected)]
            .map(|(outcome, n)| (vec![("outcome", outcome.to_owned())], n)),
    )?;
    encode_gauge(
        encoder,
        "aviary_config_last_reload_successful",
        "1 when the last change of the config file applied (or none was made yet), 0 \
         when it was rejected.",
        i64::from(config.last_applied),
    )?;
    encode_gauge(
        encoder,
        "aviary_config_file_readable",
        "1 when the watched config file could be read at the last look, 0 when it is \
         deleted, unreadable or empty (the last good config keeps serving).",
        i64::from(config.readable),
    )
}

/// The role of every version a route names, one per (model, version), the first that
/// applies: `canary` (of a running rollout), `stable` (any other version with weight),
/// `shadow` (a route's mirror target), `fallback` (where a route's failed calls go).
/// A version with no weight and no other part has none.
pub fn version_roles(
    routes: &Routes,
    canaries: &BTreeMap<String, String>,
) -> Vec<(String, String, &'static str)> {
    let mut roles: BTreeMap<(String, String), &'static str> = BTreeMap::new();
    let mut assign = |model: &str, version: &str, role: &'static str| {
        roles
            .entry((model.to_owned(), version.to_owned()))
            .or_insert(role);
    };
    for (model, route) in routes {
        if let Some(canary) = canaries.get(model) {
            assign(model, canary, "canary");
        }
        for version in route.versions.iter().filter(|v| v.weight > 0) {
            assign(model, &version.version, "stable");
        }
    }
    for (model, route) in routes {
        if let Some(shadow) = &route.shadow {
            assign(model, &shadow.version, "shadow");
        }
    }
    for route in routes.values() {
        if let Some((model, version)) = &route.fallback {
            assign(model, version, "fallback");
        }
    }
    roles
        .into_iter()
        .map(|((model, version), role)| (model, version, role))
        .collect()
}

/// The labels of a variant's samples, plus `extra`.
fn labels(variant: &VariantCounts, extra: (&'static str, &str)) -> Labels {
    vec![
        ("model", variant.model.clone()),
        ("version", variant.version.clone()),
        (extra.0, extra.1.to_owned()),
    ]
}

fn encode_requests(
    encoder: &mut DescriptorEncoder<'_>,
    counts: &[VariantCounts],
) -> Result<(), std::fmt::Error> {
    encode_counters(
        encoder,
        "aviary_requests",
        "Requests routed to a model version, by the gRPC code they ended with (before \
         any fallback or default prediction answered).",
        counts.iter().flat_map(|variant| {
            variant
                .codes
                .iter()
                .map(|(code, count)| (labels(variant, ("code", code_name(*code))), *count))
        }),
    )
}

fn encode_decisions(
    encoder: &mut DescriptorEncoder<'_>,
    counts: &[VariantCounts],
) -> Result<(), std::fmt::Error> {
    encode_counters(
        encoder,
        "aviary_routing_decisions",
        "Requests routed to a version, by why the router chose it: pinned (the request \
         named it), rule (a match rule), sticky (the routing key's segment), weighted \
         (drawn from the split), sequence (the version of the request's sequence).",
        counts.iter().flat_map(|variant| {
            variant
                .reasons
                .iter()
                .map(|(reason, count)| (labels(variant, ("reason", reason)), *count))
        }),
    )
}

fn encode_shadows(
    encoder: &mut DescriptorEncoder<'_>,
    routing: &Routing,
) -> Result<(), std::fmt::Error> {
    let reports: Vec<(&str, ShadowReport)> = routing
        .table
        .models()
        .filter_map(|model| Some((model, routing.mirror(model)?.report())))
        .collect();
    let mut family = encoder.encode_descriptor(
        "aviary_shadow_requests",
        "Requests mirrored to a model's shadow version, by what became of them: sent \
         (queued), dropped (the queue was full), failed (the shadow's call failed).",
        None,
        MetricType::Counter,
    )?;
    for (model, report) in &reports {
        for (outcome, count) in [
            ("sent", report.sent),
            ("dropped", report.dropped),
            ("failed", report.failed),
        ] {
            let labels = [
                ("model", *model),
                ("version", report.version.as_str()),
                ("outcome", outcome),
            ];
            ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
        }
    }
    let mut family = encoder.encode_descriptor(
        "aviary_shadow_comparisons",
        "Rows (classifier outputs) or responses compared between the primary and the \
         shadow, per output, by whether they agreed.",
        None,
        MetricType::Counter,
    )?;
    for (model, report) in &reports {
        for (output, comparison) in &report.outputs {
            for (result, count) in [
                ("agree", comparison.agreement_equal),
                (
                    "disagree",
                    comparison.agreement_total - comparison.agreement_equal,
                ),
            ] {
                let labels = [
                    ("model", *model),
                    ("version", report.version.as_str()),
                    ("output", output.as_str()),
                    ("result", result),
                ];
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
    }
    Ok(())
}

fn encode_rollouts(
    encoder: &mut DescriptorEncoder<'_>,
    gauges: &RolloutGauges,
) -> Result<(), std::fmt::Error> {
    const STATES: [&str; 6] = [
        "pending",
        "progressing",
        "paused",
        "promoted",
        "rolled back",
        "aborted",
    ];
    let mut family = encoder.encode_descriptor(
        "aviary_rollout_state",
        "1 for the state a model's last rollout is in (pending, progressing, paused, \
         promoted, rolled back, aborted), 0 for the others.",
        None,
        MetricType::Gauge,
    )?;
    for (model, (canary, now, _)) in &gauges.rollouts {
        for state in STATES {
            let labels = [
                ("model", model.as_str()),
                ("canary", canary.as_str()),
                ("state", state),
            ];
            ConstGauge::new(i64::from(state == *now)).encode(family.encode_family(&labels)?)?;
        }
    }
    let mut family = encoder.encode_descriptor(
        "aviary_rollout_step",
        "The step (from 0) a running or paused rollout is at.",
        None,
        MetricType::Gauge,
    )?;
    for (model, (canary, _, step)) in &gauges.rollouts {
        if let Some(step) = step {
            let labels = [("model", model.as_str()), ("canary", canary.as_str())];
            ConstGauge::new(i64::try_from(*step).unwrap_or(i64::MAX))
                .encode(family.encode_family(&labels)?)?;
        }
    }
    let mut family = encoder.encode_descriptor(
        "aviary_rollouts_ended",
        "Rollouts that ended since start-up, by how: promoted, rolled back, aborted.",
        None,
        MetricType::Counter,
    )?;
    for state in ["promoted", "rolled back", "aborted"] {
        let count = gauges.ended.get(state).copied().unwrap_or(0);
        ConstCounter::new(count).encode(family.encode_family(&[("outcome", state)])?)?;
    }
    Ok(())
}

fn encode_durations(
    encoder: &mut DescriptorEncoder<'_>,
    counts: &[VariantCounts],
) -> Result<(), std::fmt::Error> {
    encode_histograms(
        encoder,
        "aviary_request_duration_seconds",
        "Time from routing a request to its version's answer, at the gateway.",
        counts.iter().map(|variant| {
            let labels = vec![
                ("model", variant.model.clone()),
                ("version", variant.version.clone()),
            ];
            (labels, duration_buckets(&variant.latency_us))
        }),
    )
}

fn encode_feedback(
    encoder: &mut DescriptorEncoder<'_>,
    counts: &[VariantCounts],
) -> Result<(), std::fmt::Error> {
    encode_counters(
        encoder,
        "aviary_experiment_feedback",
        "Feedback reported on a version's predictions (aviary ctl feedback, the Feedback \
         RPC): correct, incorrect, or a numeric reward.",
        counts
            .iter()
            .filter(|variant| variant.outcomes.feedback > 0)
            .flat_map(|variant| {
                let o = &variant.outcomes;
                [
                    ("correct", o.correct),
                    ("incorrect", o.labelled - o.correct),
                    ("reward", o.rewards),
                ]
                .map(|(kind, n)| (labels(variant, ("kind", kind)), n))
            }),
    )?;
    let mut family = encoder.encode_descriptor(
        "aviary_experiment_reward_mean",
        "The mean of the numeric rewards reported on a version's predictions.",
        None,
        MetricType::Gauge,
    )?;
    for variant in counts.iter().filter(|v| v.outcomes.rewards > 0) {
        let labels = [
            ("model", variant.model.as_str()),
            ("version", variant.version.as_str()),
        ];
        ConstGauge::new(variant.outcomes.reward_mean).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn encode_stand_ins_and_cache(
    encoder: &mut DescriptorEncoder<'_>,
    counts: &[VariantCounts],
) -> Result<(), std::fmt::Error> {
    encode_counters(
        encoder,
        "aviary_stand_ins",
        "Requests a version failed that the route's fallback or the version's default \
         prediction then answered.",
        counts.iter().flat_map(|variant| {
            [
                ("fallback", variant.stand_ins.fallbacks),
                ("default", variant.stand_ins.defaults),
            ]
            .map(|(kind, count)| (labels(variant, ("kind", kind)), count))
        }),
    )?;
    encode_counters(
        encoder,
        "aviary_cache_lookups",
        "Prediction cache look-ups by result: hit (in this process or Redis), \
         redis_hit (of those, from Redis), miss, bypass (Redis skipped or too slow).",
        counts.iter().flat_map(|variant| {
            let cache = variant.cache;
            [
                ("hit", cache.hits),
                ("redis_hit", cache.redis_hits),
                ("miss", cache.misses),
                ("bypass", cache.bypasses),
            ]
            .map(|(result, count)| (labels(variant, ("result", result)), count))
        }),
    )
}

fn encode_routing(
    encoder: &mut DescriptorEncoder<'_>,
    routing: &Routing,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        "aviary_route_weight",
        "A version's weight in its model's route (unpinned traffic is split by weight).",
        None,
        MetricType::Gauge,
    )?;
    for model in routing.table.models() {
        let Some(route) = routing.table.route(model) else {
            continue;
        };
        for (version, weight) in route.versions() {
            let labels = [("model", model), ("version", version)];
            ConstGauge::new(i64::from(weight)).encode(family.encode_family(&labels)?)?;
        }
    }
    encode_gauge(
        encoder,
        "aviary_routing_generation",
        "The routing snapshot's generation: it goes up with every applied change.",
        i64::try_from(routing.generation).unwrap_or(i64::MAX),
    )
}

/// The code's name as gRPC writes it (`OK`, `INVALID_ARGUMENT`, …).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn each_version_gets_the_first_role_that_applies() {
        use crate::{
            config::ShadowConfig,
            route::{Route, RouteVersion},
        };
        let demo = Route {
            versions: vec![
                RouteVersion::new("1", 90),
                RouteVersion::new("2", 10),
                RouteVersion::new("3", 0),
            ],
            shadow: Some(ShadowConfig {
                version: "4".into(),
                percent: 10.0,
                endpoint: None,
                fault: None,
                queue: 64,
                concurrency: 1,
            }),
            fallback: Some(("small".into(), "1".into())),
            ..Route::default()
        };
        let small = Route {
            versions: vec![RouteVersion::new("1", 0)],
            ..Route::default()
        };
        let routes = Routes::from([("demo".to_owned(), demo), ("small".to_owned(), small)]);
        let canaries = BTreeMap::from([("demo".to_owned(), "2".to_owned())]);
        let roles = version_roles(&routes, &canaries);
        let role = |model: &str, version: &str| {
            roles
                .iter()
                .find(|(m, v, _)| m == model && v == version)
                .map(|(_, _, role)| *role)
        };
        assert_eq!(role("demo", "1"), Some("stable"));
        assert_eq!(role("demo", "2"), Some("canary"), "the canary, not stable");
        assert_eq!(role("demo", "3"), None, "no weight, no part");
        assert_eq!(role("demo", "4"), Some("shadow"));
        assert_eq!(role("small", "1"), Some("fallback"));
        assert_eq!(roles.len(), 4, "one role per version: {roles:?}");
        let without_rollout = version_roles(&routes, &BTreeMap::new());
        assert!(without_rollout.contains(&("demo".into(), "2".into(), "stable")));
    }

    #[test]
    fn duration_buckets_place_each_request_once_and_count_all() {
        let metrics = Metrics::default();
        for ms in [0.05, 0.3, 0.3, 2.0, 40.0, 20_000.0] {
            metrics.record_call(
                "m",
                "1",
                aviary_router::DecisionReason::Weighted,
                tonic::Code::Ok,
                Duration::from_secs_f64(ms / 1e3),
            );
        }
        let counts = metrics.counts();
        let (buckets, sum, count) = duration_buckets(&counts[0].latency_us);
        assert_eq!(count, 6);
        assert_eq!(buckets.iter().map(|(_, n)| n).sum::<u64>(), 6);
        let at = |bound: f64| buckets.iter().find(|(b, _)| *b == bound).map(|(_, n)| *n);
        assert_eq!(at(0.0001), Some(1), "50 µs");
        assert_eq!(at(0.0005), Some(2), "300 µs twice");
        assert_eq!(at(0.0025), Some(1), "2 ms");
        assert_eq!(at(0.05), Some(1), "40 ms");
        assert_eq!(at(f64::MAX), Some(1), "20 s is past the last bound");
        assert!((sum - 20.0427).abs() < 0.3, "sum {sum}");
    }

    #[test]
    fn every_code_has_its_grpc_name() {
        for number in 0..17 {
            let code = tonic::Code::from(number);
            let name = code_name(code);
            assert!(
                name.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                "{name}"
            );
        }
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
    }
}
