//! `aviary ctl`: the operator's client of the admin API. Human tables by default,
//! `--json` for scripts.

use std::time::{Duration, UNIX_EPOCH};

use aviary::pb::admin::{
    GetConfigStatusRequest, GetRoutesRequest, ListModelsRequest, Route, SetRouteRequest,
    ShadowReportRequest, UnloadVersionRequest, VersionRequest, VersionWeight,
    admin_client::AdminClient,
};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tonic::transport::Endpoint;

/// `aviary ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Admin API address of the gateway.
    #[arg(
        long,
        env = "AVIARY_ADMIN",
        default_value = "http://127.0.0.1:8003",
        global = true
    )]
    pub admin: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `aviary ctl` subcommands.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Show every route: versions, weights, shares, endpoints, and the table's generation.
    Routes,
    /// Set a model's route: `aviary ctl set-weights demo 1=90 2=10` (versions not named leave the route).
    SetWeights {
        /// Model name.
        model: String,
        /// `VERSION=WEIGHT` pairs, in split order.
        #[arg(required = true, value_parser = parse_weight)]
        weights: Vec<(String, u32)>,
        /// Apply only if the table is still at this generation (compare-and-set).
        #[arg(long)]
        expect_generation: Option<u64>,
    },
    /// List model versions: state, weight, load time, file.
    Models {
        /// Only this model.
        model: Option<String>,
    },
    /// Load a version from the repository (and warm it up).
    Load {
        /// Model name.
        model: String,
        /// Version.
        version: String,
    },
    /// Load a version's file again and swap it in; the running copy serves until then.
    Reload {
        /// Model name.
        model: String,
        /// Version.
        version: String,
    },
    /// Unload a version (refused while it has weight, unless --force).
    Unload {
        /// Model name.
        model: String,
        /// Version.
        version: String,
        /// Remove it from its route first.
        #[arg(long)]
        force: bool,
    },
    /// Whether the last config file change applied, and its errors.
    ConfigStatus,
    /// How a model's shadow version compares with the versions that answered.
    Shadow {
        /// Model name.
        model: String,
    },
}

fn parse_weight(text: &str) -> Result<(String, u32), String> {
    let (version, weight) = text
        .split_once('=')
        .ok_or_else(|| format!("\"{text}\": write VERSION=WEIGHT, e.g. 2=10"))?;
    let weight = weight
        .parse()
        .map_err(|_| format!("\"{text}\": weight must be a non-negative integer"))?;
    if version.is_empty() {
        return Err(format!("\"{text}\": version is empty"));
    }
    Ok((version.to_owned(), weight))
}

/// An error from the admin API or the connection, for people.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The gateway could not be reached.
    #[error("cannot reach the admin API at {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The gateway refused the request.
    #[error("{code:?}: {message}")]
    Status {
        /// gRPC code.
        code: tonic::Code,
        /// The gateway's explanation.
        message: String,
    },
}

impl From<tonic::Status> for CtlError {
    fn from(status: tonic::Status) -> CtlError {
        CtlError::Status {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// Runs one `aviary ctl` command and returns what to print.
pub async fn run(args: &CtlArgs) -> Result<String, CtlError> {
    let channel = Endpoint::from_shared(args.admin.clone())
        .map_err(|source| CtlError::Connect {
            addr: args.admin.clone(),
            source,
        })?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|source| CtlError::Connect {
            addr: args.admin.clone(),
            source,
        })?;
    let mut admin = AdminClient::new(channel);
    let output = match &args.command {
        CtlCommand::Routes => {
            let routes = admin.get_routes(GetRoutesRequest {}).await?.into_inner();
            if args.json {
                json!({ "generation": routes.generation, "routes": routes.routes.iter().map(route_json).collect::<Vec<_>>() })
                    .to_string()
            } else {
                let mut rows = vec![vec![
                    "MODEL".into(),
                    "VERSION".into(),
                    "WEIGHT".into(),
                    "SHARE".into(),
                    "ENDPOINT".into(),
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
                        ]);
                    }
                }
                format!("generation {}\n{}", routes.generation, table(&rows))
            }
        }
        CtlCommand::SetWeights {
            model,
            weights,
            expect_generation,
        } => {
            let current = admin.get_routes(GetRoutesRequest {}).await?.into_inner();
            let existing = current.routes.iter().find(|r| &r.model == model);
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
                })
                .collect();
            let response = admin
                .set_route(SetRouteRequest {
                    route: Some(Route {
                        model: model.clone(),
                        versions,
                    }),
                    expected_generation: *expect_generation,
                })
                .await?
                .into_inner();
            if args.json {
                json!({ "model": model, "generation": response.generation }).to_string()
            } else {
                format!("route of {model} set (generation {})", response.generation)
            }
        }
        CtlCommand::Models { model } => {
            let list = admin
                .list_models(ListModelsRequest {
                    model: model.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            if args.json {
                Value::Array(list.versions.iter().map(version_json).collect()).to_string()
            } else {
                let mut rows = vec![vec![
                    "MODEL".into(),
                    "VERSION".into(),
                    "STATE".into(),
                    "WEIGHT".into(),
                    "LOADED".into(),
                    "PATH / REASON".into(),
                ]];
                for v in &list.versions {
                    rows.push(vec![
                        v.model.clone(),
                        v.version.clone(),
                        v.state.clone(),
                        if v.routed {
                            v.weight.to_string()
                        } else {
                            "-".into()
                        },
                        loaded_at(v.loaded_at_ms),
                        if v.reason.is_empty() {
                            v.path.clone()
                        } else {
                            v.reason.clone()
                        },
                    ]);
                }
                table(&rows)
            }
        }
        CtlCommand::Load { model, version } | CtlCommand::Reload { model, version } => {
            let request = VersionRequest {
                model: model.clone(),
                version: version.clone(),
            };
            let reload = matches!(args.command, CtlCommand::Reload { .. });
            let response = if reload {
                admin.reload_version(request).await?
            } else {
                admin.load_version(request).await?
            }
            .into_inner();
            let verb = if reload { "reloaded" } else { "loaded" };
            if args.json {
                json!({ "model": model, "version": version, "action": verb, "load_ms": response.load_ms, "generation": response.generation })
                    .to_string()
            } else {
                format!(
                    "{model} version {version} {verb} in {} ms",
                    response.load_ms
                )
            }
        }
        CtlCommand::Unload {
            model,
            version,
            force,
        } => {
            let response = admin
                .unload_version(UnloadVersionRequest {
                    model: model.clone(),
                    version: version.clone(),
                    force: *force,
                })
                .await?
                .into_inner();
            if args.json {
                json!({ "model": model, "version": version, "action": "unloaded", "generation": response.generation })
                    .to_string()
            } else {
                format!(
                    "{model} version {version} unloaded (routes at generation {})",
                    response.generation
                )
            }
        }
        CtlCommand::Shadow { model } => {
            let report = admin
                .get_shadow_report(ShadowReportRequest {
                    model: model.clone(),
                })
                .await?
                .into_inner();
            if args.json {
                json!({
                    "model": report.model,
                    "version": report.version,
                    "percent": report.percent,
                    "sent": report.sent,
                    "dropped": report.dropped,
                    "failed": report.failed,
                    "outputs": report.outputs.iter().map(|o| json!({
                        "output": o.output,
                        "compared": o.compared,
                        "agreement": o.agreement,
                        "agreement_total": o.agreement_total,
                        "mean_abs_diff": o.mean_abs_diff,
                        "max_abs_diff": o.max_abs_diff,
                        "mismatched": o.mismatched,
                        "ks_statistic": o.ks_statistic,
                        "ks_p_value": o.ks_p_value,
                        "sample_size": o.sample_size,
                    })).collect::<Vec<_>>(),
                })
                .to_string()
            } else {
                let mut rows = vec![vec![
                    "OUTPUT".into(),
                    "COMPARED".into(),
                    "AGREEMENT".into(),
                    "MEAN |Δ|".into(),
                    "MAX |Δ|".into(),
                    "KS D".into(),
                    "KS p".into(),
                ]];
                for o in &report.outputs {
                    rows.push(vec![
                        o.output.clone(),
                        o.compared.to_string(),
                        format!("{:.2}% of {}", o.agreement * 100.0, o.agreement_total),
                        format!("{:.6}", o.mean_abs_diff),
                        format!("{:.6}", o.max_abs_diff),
                        format!("{:.4}", o.ks_statistic),
                        format!("{:.4}", o.ks_p_value),
                    ]);
                }
                format!(
                    "{} shadow version {} at {}%: {} mirrored, {} dropped (shadow too slow), {} failed\n{}",
                    report.model,
                    report.version,
                    report.percent,
                    report.sent,
                    report.dropped,
                    report.failed,
                    table(&rows)
                )
            }
        }
        CtlCommand::ConfigStatus => {
            let status = admin
                .get_config_status(GetConfigStatusRequest {})
                .await?
                .into_inner();
            if args.json {
                json!({
                    "path": status.path,
                    "applied_at_ms": status.applied_at_ms,
                    "rejected_at_ms": status.rejected_at_ms,
                    "errors": status.errors,
                })
                .to_string()
            } else if status.errors.is_empty() {
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
            }
        }
    };
    Ok(output)
}

fn shown(path: &str) -> &str {
    if path.is_empty() {
        "(not watched yet)"
    } else {
        path
    }
}

fn route_json(route: &Route) -> Value {
    json!({
        "model": route.model,
        "versions": route.versions.iter().map(|v| json!({
            "version": v.version,
            "weight": v.weight,
            "endpoint": if v.endpoint.is_empty() { Value::Null } else { Value::from(v.endpoint.clone()) },
        })).collect::<Vec<_>>(),
    })
}

fn version_json(v: &aviary::pb::admin::ModelVersionInfo) -> Value {
    json!({
        "model": v.model,
        "version": v.version,
        "state": v.state,
        "reason": v.reason,
        "weight": v.weight,
        "routed": v.routed,
        "loaded_at_ms": v.loaded_at_ms,
        "path": v.path,
        "card": v.card.as_ref().map(|c| json!({
            "description": c.description,
            "owner": c.owner,
            "intended_use": c.intended_use,
            "limitations": c.limitations,
            "training_data": c.training_data,
            "metrics": c.metrics,
        })),
    })
}

fn loaded_at(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let age = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH + Duration::from_millis(ms))
        .unwrap_or_default();
    format!("{}s ago", age.as_secs())
}

/// Left-aligned columns separated by two spaces.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_parse_with_clear_errors() {
        assert_eq!(parse_weight("2=10"), Ok(("2".into(), 10)));
        assert!(
            parse_weight("2")
                .expect_err("no =")
                .contains("VERSION=WEIGHT")
        );
        assert!(
            parse_weight("2=-1")
                .expect_err("negative")
                .contains("non-negative")
        );
        assert!(
            parse_weight("=3")
                .expect_err("empty version")
                .contains("empty")
        );
    }

    #[test]
    fn tables_align_columns() {
        let rows = vec![
            vec!["A".to_owned(), "LONG".to_owned()],
            vec!["wide".to_owned(), "x".to_owned()],
        ];
        assert_eq!(table(&rows), "A     LONG\nwide  x");
    }
}
