//! `aviary ctl routes | set-weights | config-status`: the `Routes` admin service.

use aviary::pb::admin::{
    ConfigStatus, GetConfigStatusRequest, GetRoutesRequest, GetRoutesResponse, Route,
    SetRouteRequest, VersionWeight, routes_client::RoutesClient,
};
use tonic::transport::Channel;

use super::{
    CtlError, print,
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
                if v.endpoint.is_empty() {
                    "in-process".into()
                } else {
                    v.endpoint.clone()
                },
                dash_if_empty(&v.health),
                dash_if_empty(&v.breaker),
            ]);
        }
    }
    format!("generation {}\n{}", routes.generation, table(&rows))
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
            }),
            expected_generation: expect_generation,
        })
        .await?
        .into_inner();
    Ok(print(&response, json, |r| {
        format!("route of {model} set (generation {})", r.generation)
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
