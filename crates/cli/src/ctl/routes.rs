//! `aviary ctl routes | set-weights | set-limits | config-status`: the `Routes` admin
//! service.

use super::Channel;
use aviary::pb::admin::{
    ConfigStatus, GetConfigStatusRequest, GetRoutesRequest, GetRoutesResponse, Limits, Route,
    SetRouteRequest, VersionWeight, routes_client::RoutesClient,
};

use super::{
    CtlError, LimitsArgs, print,
    table::{loaded_at, shown, table},
};

/// Every route with its versions, weights, shares and endpoints.
pub(super) async fn show(channel: Channel, json: bool) -> Result<String, CtlError> {
    let routes = RoutesClient::new(channel)
        .get_routes(GetRoutesRequest {})
        .await?
        .into_inner();
    Ok(print(&routes, json, render_routes))
}

fn render_routes(routes: &GetRoutesResponse) -> String {
    let mut rows = vec![vec![
        "MODEL".into(),
        "VERSION".into(),
        "WEIGHT".into(),
        "SHARE".into(),
        "ENDPOINT".into(),
        "HEALTH".into(),
        "BREAKER".into(),
        "LIMITS".into(),
        "EVENTS".into(),
    ]];
    for route in &routes.routes {
        let total: u64 = route.versions.iter().map(|v| u64::from(v.weight)).sum();
        for v in &route.versions {
            let share = if total == 0 {
                0.0
            } else {
                f64::from(v.weight) * 100.0 / total as f64
            };
            rows.push(vec![
                route.model.clone(),
                v.version.clone(),
                v.weight.to_string(),
                format!("{share:.1}%"),
                render_location(v),
                dash_if_empty(&v.health),
                dash_if_empty(&v.breaker),
                v.limits
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), render_limits),
                dash_if_empty(&render_events(v)),
            ]);
        }
    }
    format!("generation {}\n{}", routes.generation, table(&rows))
}

/// Where a version runs: in-process, or its endpoint with the replicas it is balanced
/// over now when that is not just the endpoint itself.
fn render_location(v: &VersionWeight) -> String {
    match (v.endpoint.is_empty(), v.live_replicas.as_slice()) {
        (true, _) => "in-process".into(),
        (false, [only]) if *only == v.endpoint => v.endpoint.clone(),
        (false, live) => format!("{} ({} live)", v.endpoint, live.len()),
    }
}

/// A version's limits in one cell: in flight + queued, deadline (default / most),
/// breaker, attempts.
fn render_limits(limits: &Limits) -> String {
    let ms = |v: Option<u64>| v.map_or("?".to_owned(), |ms| format!("{}s", ms as f64 / 1000.0));
    let n = |v: Option<u64>| v.map_or("?".to_owned(), |n| n.to_string());
    format!(
        "{}+{} {}/{} br {}x{} try {}",
        n(limits.max_in_flight),
        n(limits.max_queue),
        ms(limits.timeout_ms),
        ms(limits.max_timeout_ms),
        n(limits.breaker_failures.map(u64::from)),
        ms(limits.breaker_open_ms),
        n(limits.retry_attempts.map(u64::from)),
    )
}

/// What the version's request path has done, the counters that are not zero.
fn render_events(v: &VersionWeight) -> String {
    [
        ("shed", v.shed),
        ("breaker opened", v.breaker_opened),
        ("retried", v.retries),
        ("ejected", v.ejections),
        ("fell back", v.fallbacks),
        ("defaulted", v.defaults),
        ("cache hit", v.cache_hits),
        ("redis hit", v.cache_redis_hits),
        ("cache miss", v.cache_misses),
        ("redis bypassed", v.cache_bypasses),
    ]
    .iter()
    .filter(|(_, n)| *n > 0)
    .map(|(what, n)| format!("{what} {n}"))
    .collect::<Vec<_>>()
    .join(", ")
}

fn dash_if_empty(text: &str) -> String {
    match text.is_empty() {
        true => "-".to_owned(),
        false => text.to_owned(),
    }
}

/// Sets a model's versions and weights, keeping where each version runs.
pub(super) async fn set_weights(
    channel: Channel,
    model: &str,
    weights: &[(String, u32)],
    expect_generation: Option<u64>,
    json: bool,
) -> Result<String, CtlError> {
    let mut client = RoutesClient::new(channel);
    let current = client.get_routes(GetRoutesRequest {}).await?.into_inner();
    let existing = current.routes.iter().find(|r| r.model == model);
    let versions = weights
        .iter()
        .map(|(version, weight)| VersionWeight {
            version: version.clone(),
            weight: *weight,
            // Keep where a version runs; set-weights changes only weights.
            endpoint: existing
                .and_then(|r| r.versions.iter().find(|v| &v.version == version))
                .map(|v| v.endpoint.clone())
                .unwrap_or_default(),
            ..VersionWeight::default()
        })
        .collect();
    let response = client
        .set_route(SetRouteRequest {
            route: Some(Route {
                model: model.to_owned(),
                versions,
                limits: None,
            }),
            expected_generation: expect_generation,
        })
        .await?
        .into_inner();
    Ok(print(&response, json, |r| {
        format!("route of {model} set (generation {})", r.generation)
    }))
}

/// A `set-limits` request: whose limits, and which to change.
pub(super) struct LimitsChange<'a> {
    pub model: &'a str,
    /// `None`: the route's own.
    pub version: Option<&'a str>,
    pub limits: &'a LimitsArgs,
    pub expect_generation: Option<u64>,
}

/// Changes the limits of a route or of one of its versions, keeping everything else:
/// the route goes back as it is with only the named settings.
pub(super) async fn set_limits(
    channel: Channel,
    change: LimitsChange<'_>,
    json: bool,
) -> Result<String, CtlError> {
    let LimitsChange {
        model,
        version,
        limits,
        expect_generation,
    } = change;
    let mut client = RoutesClient::new(channel);
    let current = client.get_routes(GetRoutesRequest {}).await?.into_inner();
    let missing = |what: String| CtlError::Status {
        code: tonic::Code::NotFound,
        message: what,
    };
    let existing = current
        .routes
        .iter()
        .find(|r| r.model == model)
        .ok_or_else(|| missing(format!("model \"{model}\" has no route")))?;
    if let Some(version) = version
        && !existing.versions.iter().any(|v| v.version == version)
    {
        return Err(missing(format!(
            "model \"{model}\" has no version \"{version}\" in its route"
        )));
    }
    let asked = Limits {
        timeout_ms: limits.timeout_ms,
        max_timeout_ms: limits.max_timeout_ms,
        max_in_flight: limits.max_in_flight,
        max_queue: limits.max_queue,
        breaker_failures: limits.breaker_failures,
        breaker_open_ms: limits.breaker_open_ms,
        retry_attempts: limits.retry_attempts,
    };
    let versions = existing
        .versions
        .iter()
        .map(|v| VersionWeight {
            version: v.version.clone(),
            weight: v.weight,
            endpoint: v.endpoint.clone(),
            limits: (Some(v.version.as_str()) == version).then_some(asked),
            ..VersionWeight::default()
        })
        .collect();
    let response = client
        .set_route(SetRouteRequest {
            route: Some(Route {
                model: model.to_owned(),
                versions,
                limits: version.is_none().then_some(asked),
            }),
            expected_generation: expect_generation.or(Some(current.generation)),
        })
        .await?
        .into_inner();
    let whose = version.map_or_else(
        || format!("route of {model}"),
        |v| format!("{model} version {v}"),
    );
    Ok(print(&response, json, |r| {
        format!("limits of {whose} set (generation {})", r.generation)
    }))
}

/// Whether the last config file change applied, its errors, and what of it is not in
/// force as written.
pub(super) async fn config_status(channel: Channel, json: bool) -> Result<String, CtlError> {
    let status = RoutesClient::new(channel)
        .get_config_status(GetConfigStatusRequest {})
        .await?
        .into_inner();
    Ok(print(&status, json, render_config_status))
}

fn render_config_status(status: &ConfigStatus) -> String {
    let mut out = if status.errors.is_empty() {
        format!(
            "config {}: applied {}",
            shown(&status.path),
            loaded_at(status.applied_at_ms)
        )
    } else {
        format!(
            "config {}: last change REJECTED {}; the last good config is serving\n  {}",
            shown(&status.path),
            loaded_at(status.rejected_at_ms),
            status.errors.join("\n  ")
        )
    };
    if !status.unreadable.is_empty() {
        out.push_str(&format!(
            "\nthe file cannot be used since {} ({}); the last good config keeps serving",
            loaded_at(status.unreadable_since_ms),
            status.unreadable
        ));
    }
    if !status.notes.is_empty() {
        out.push_str(&format!(
            "\nnot in force as written:\n  {}",
            status.notes.join("\n  ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_version_shows_how_many_replicas_it_is_balanced_over() {
        let version = |endpoint: &str, live: &[&str]| VersionWeight {
            endpoint: endpoint.into(),
            live_replicas: live.iter().map(|l| (*l).to_owned()).collect(),
            ..Default::default()
        };
        assert_eq!(render_location(&version("", &[])), "in-process");
        let ip = "http://10.0.0.7:8001";
        assert_eq!(
            render_location(&version(ip, &[ip])),
            ip,
            "one address is itself"
        );
        let name = "http://aviary-worker-demo-1:8001";
        assert_eq!(
            render_location(&version(
                name,
                &["http://10.0.0.7:8001", "http://10.0.0.8:8001"]
            )),
            "http://aviary-worker-demo-1:8001 (2 live)"
        );
        assert_eq!(
            render_location(&version(name, &[])),
            format!("{name} (0 live)")
        );
    }
}
