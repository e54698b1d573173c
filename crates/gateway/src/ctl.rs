//! `aviary ctl`: the operator's client of the admin API. Human tables by default,
//! `--json` for scripts.

use std::time::{Duration, UNIX_EPOCH};

use aviary::pb::admin::{
    ExperimentReport, ExperimentReportRequest, FeedbackRequest, GetConfigStatusRequest,
    GetRolloutRequest, GetRoutesRequest, ListModelsRequest, RolloutCommandRequest, RolloutGates,
    RolloutMetrics, RolloutStatus, RolloutStep, Route, SetRouteRequest, ShadowReportRequest,
    StartRolloutRequest, UnloadVersionRequest, VersionRequest, VersionWeight,
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
    /// Progressive rollouts: move traffic to a canary step by step, judged on its metrics.
    Rollout {
        /// What to do.
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// A/B experiments: per-variant outcomes and significance against a baseline.
    Experiment {
        /// What to do.
        #[command(subcommand)]
        command: ExperimentCommand,
    },
    /// Report ground truth for a prediction: `aviary ctl feedback demo 2 req-17 --correct`.
    Feedback {
        /// Model name.
        model: String,
        /// The version that answered.
        version: String,
        /// The request's id.
        request_id: String,
        /// The prediction was right.
        #[arg(long, group = "outcome")]
        correct: bool,
        /// The prediction was wrong.
        #[arg(long, group = "outcome")]
        incorrect: bool,
        /// The prediction earned this reward.
        #[arg(long, group = "outcome", allow_negative_numbers = true)]
        reward: Option<f64>,
    },
}

/// `aviary ctl experiment` subcommands.
#[derive(Debug, Subcommand)]
pub enum ExperimentCommand {
    /// Per-variant requests, errors, latency, accuracy and reward, and each variant
    /// tested against the baseline.
    Report {
        /// Model name.
        model: String,
        /// The version to compare with (default: the one with the most requests).
        #[arg(long)]
        baseline: Option<String>,
    },
}

/// `aviary ctl rollout` subcommands.
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start a rollout: `aviary ctl rollout start demo --canary 2 --baseline 1 --steps 5,25,50,100`.
    Start {
        /// Model name.
        model: String,
        /// The new version.
        #[arg(long)]
        canary: String,
        /// The version serving now.
        #[arg(long)]
        baseline: String,
        /// Canary weights in percent, strictly increasing, ending at 100.
        #[arg(long, value_delimiter = ',', default_value = "5,25,50,100")]
        steps: Vec<u32>,
        /// Minimum seconds per step.
        #[arg(long, default_value_t = 60)]
        step_duration: u64,
        /// Minimum canary requests per step.
        #[arg(long, default_value_t = 100)]
        step_requests: u64,
        /// Largest allowed canary error rate minus the baseline's (0 to 1).
        #[arg(long, default_value_t = 0.01)]
        max_error_rate_increase: f64,
        /// Largest allowed canary p99 latency over the baseline's.
        #[arg(long)]
        max_latency_ratio: Option<f64>,
    },
    /// Hold the current step (a failed gate still rolls back).
    Pause(RolloutNote),
    /// Carry on from a pause.
    Resume(RolloutNote),
    /// Give the canary all the traffic now.
    Promote(RolloutNote),
    /// Give the baseline all the traffic again.
    Abort(RolloutNote),
    /// State, step metrics and every decision with its reason.
    Status {
        /// Model name.
        model: String,
        /// Redraw every second until the rollout is over.
        #[arg(long)]
        watch: bool,
    },
}

/// A model and why the operator acts on its rollout.
#[derive(Debug, Args)]
pub struct RolloutNote {
    /// Model name.
    model: String,
    /// Why, kept in the rollout's history.
    #[arg(long, default_value = "")]
    note: String,
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
        CtlCommand::Rollout { command } => rollout(&mut admin, command, args.json).await?,
        CtlCommand::Experiment {
            command: ExperimentCommand::Report { model, baseline },
        } => {
            let report = admin
                .get_experiment_report(ExperimentReportRequest {
                    model: model.clone(),
                    baseline: baseline.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            if args.json {
                experiment_json(&report).to_string()
            } else {
                render_experiment(&report)
            }
        }
        CtlCommand::Feedback {
            model,
            version,
            request_id,
            correct,
            incorrect,
            reward,
        } => {
            use aviary::pb::admin::feedback_request::Outcome;
            let outcome = match (correct, incorrect, reward) {
                (_, _, Some(reward)) => Outcome::Reward(*reward),
                (true, _, None) => Outcome::Correct(true),
                (false, true, None) => Outcome::Correct(false),
                (false, false, None) => {
                    return Err(CtlError::Status {
                        code: tonic::Code::InvalidArgument,
                        message: "give --correct, --incorrect or --reward X".into(),
                    });
                }
            };
            let response = admin
                .feedback(FeedbackRequest {
                    request_id: request_id.clone(),
                    model: model.clone(),
                    version: version.clone(),
                    outcome: Some(outcome),
                })
                .await?
                .into_inner();
            if args.json {
                json!({ "feedback": response.feedback }).to_string()
            } else {
                format!(
                    "{model} version {version}: feedback recorded ({} so far)",
                    response.feedback
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

async fn rollout(
    admin: &mut AdminClient<tonic::transport::Channel>,
    command: &RolloutCommand,
    json: bool,
) -> Result<String, CtlError> {
    let note = |n: &RolloutNote| RolloutCommandRequest {
        model: n.model.clone(),
        note: n.note.clone(),
    };
    let status = match command {
        RolloutCommand::Start {
            model,
            canary,
            baseline,
            steps,
            step_duration,
            step_requests,
            max_error_rate_increase,
            max_latency_ratio,
        } => {
            let request = StartRolloutRequest {
                model: model.clone(),
                canary: canary.clone(),
                baseline: baseline.clone(),
                steps: steps
                    .iter()
                    .map(|&weight| RolloutStep {
                        weight,
                        min_duration_ms: step_duration.saturating_mul(1000),
                        min_requests: *step_requests,
                    })
                    .collect(),
                gates: Some(RolloutGates {
                    max_error_rate_increase: *max_error_rate_increase,
                    max_latency_ratio: *max_latency_ratio,
                    ..RolloutGates::default()
                }),
            };
            admin.start_rollout(request).await?.into_inner()
        }
        RolloutCommand::Pause(n) => admin.pause_rollout(note(n)).await?.into_inner(),
        RolloutCommand::Resume(n) => admin.resume_rollout(note(n)).await?.into_inner(),
        RolloutCommand::Promote(n) => admin.promote_rollout(note(n)).await?.into_inner(),
        RolloutCommand::Abort(n) => admin.abort_rollout(note(n)).await?.into_inner(),
        RolloutCommand::Status { model, watch } => {
            let get = GetRolloutRequest {
                model: model.clone(),
            };
            let mut status = admin.get_rollout(get.clone()).await?.into_inner();
            if *watch {
                let clear = std::io::IsTerminal::is_terminal(&std::io::stdout()) && !json;
                while !status.terminal {
                    if clear {
                        // Clear the screen and home the cursor, so the table redraws in place.
                        print!("\x1b[2J\x1b[H");
                    }
                    println!("{}\n", render_rollout(&status, json));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    status = admin.get_rollout(get.clone()).await?.into_inner();
                }
                if clear {
                    print!("\x1b[2J\x1b[H");
                }
            }
            status
        }
    };
    Ok(render_rollout(&status, json))
}

fn render_rollout(status: &RolloutStatus, json: bool) -> String {
    if json {
        return rollout_json(status).to_string();
    }
    let at = if status.step > 0 {
        format!(" at step {}/{}", status.step, status.steps)
    } else {
        String::new()
    };
    let mut out = format!(
        "{}: {}{at}; canary {} at {}%, baseline {} at {}%\n",
        status.model,
        status.state,
        status.canary,
        status.canary_weight,
        status.baseline,
        100 - status.canary_weight.min(100)
    );
    if !status.terminal {
        let metrics = |m: Option<&RolloutMetrics>| {
            let m = m.cloned().unwrap_or_default();
            let p99 = if m.latency_p99_us == 0 {
                "-".to_owned()
            } else {
                format!("{:.1} ms", m.latency_p99_us as f64 / 1000.0)
            };
            format!("{} requests, {} errors, p99 {p99}", m.requests, m.errors)
        };
        out.push_str(&format!(
            "this step: canary {}; baseline {}\n",
            metrics(status.canary_metrics.as_ref()),
            metrics(status.baseline_metrics.as_ref())
        ));
        if !status.waiting_for.is_empty() {
            out.push_str(&format!("waiting for: {}\n", status.waiting_for.join("; ")));
        }
    }
    let mut rows = vec![vec![
        "WHEN".into(),
        "FROM".into(),
        "TO".into(),
        "STEP".into(),
        "REASON".into(),
    ]];
    for d in &status.history {
        rows.push(vec![
            loaded_at(d.at_ms),
            d.from.clone(),
            d.to.clone(),
            if d.step == 0 {
                "-".into()
            } else {
                d.step.to_string()
            },
            d.reason.clone(),
        ]);
    }
    out.push_str(&table(&rows));
    out
}

fn rollout_json(status: &RolloutStatus) -> Value {
    let metrics = |m: Option<&RolloutMetrics>| {
        m.map(|m| {
            json!({
                "requests": m.requests,
                "errors": m.errors,
                "latency_p99_us": m.latency_p99_us,
            })
        })
    };
    json!({
        "model": status.model,
        "canary": status.canary,
        "baseline": status.baseline,
        "state": status.state,
        "terminal": status.terminal,
        "step": status.step,
        "steps": status.steps,
        "canary_weight": status.canary_weight,
        "canary_metrics": metrics(status.canary_metrics.as_ref()),
        "baseline_metrics": metrics(status.baseline_metrics.as_ref()),
        "waiting_for": status.waiting_for,
        "plan": serde_json::from_str::<Value>(&status.plan_json).unwrap_or(Value::Null),
        "history": status.history.iter().map(|d| json!({
            "at_ms": d.at_ms,
            "from": d.from,
            "to": d.to,
            "step": d.step,
            "reason": d.reason,
            "numbers": d.numbers,
        })).collect::<Vec<_>>(),
    })
}

/// `x` with `digits` decimals, or `-` when absent.
fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

fn render_experiment(report: &ExperimentReport) -> String {
    let mut rows = vec![
        [
            "VERSION",
            "REQUESTS",
            "ERRORS",
            "P50 µs",
            "P90 µs",
            "P99 µs",
            "FEEDBACK",
            "ACCURACY (95% CI)",
            "MEAN REWARD (95% CI)",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for v in &report.variants {
        let us = |x: Option<u64>| x.map_or_else(|| "-".into(), |x| x.to_string());
        let accuracy = match (v.accuracy, v.accuracy_interval) {
            (Some(a), Some(i)) => format!(
                "{:.2}% [{:.2}, {:.2}] of {}",
                a * 100.0,
                i.low * 100.0,
                i.high * 100.0,
                v.labelled
            ),
            _ => "-".into(),
        };
        let reward = match (v.mean_reward, v.reward_interval) {
            (Some(m), Some(i)) => format!("{m:.4} [{:.4}, {:.4}] of {}", i.low, i.high, v.rewards),
            (Some(m), None) => format!("{m:.4} of {}", v.rewards),
            _ => "-".into(),
        };
        rows.push(vec![
            if v.version == report.baseline {
                format!("{} (baseline)", v.version)
            } else {
                v.version.clone()
            },
            v.requests.to_string(),
            v.error_rate.map_or_else(
                || v.errors.to_string(),
                |r| format!("{} ({:.2}%)", v.errors, r * 100.0),
            ),
            us(v.latency_p50_us),
            us(v.latency_p90_us),
            us(v.latency_p99_us),
            v.feedback.to_string(),
            accuracy,
            reward,
        ]);
    }
    let mut tests = vec![
        [
            "VS BASELINE",
            "ERROR RATE z (p)",
            "LATENCY U (p)",
            "ACCURACY z (p)",
            "ACCURACY mSPRT p",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for c in &report.comparisons {
        let test = |t: Option<aviary::pb::admin::Significance>, digits: usize| {
            t.map_or_else(
                || "-".into(),
                |t| format!("{:.digits$} ({:.4})", t.statistic, t.p_value),
            )
        };
        tests.push(vec![
            c.version.clone(),
            test(c.error_rate, 3),
            test(c.latency, 0),
            test(c.accuracy, 3),
            opt(c.accuracy_msprt_p, 4),
        ]);
    }
    format!(
        "{} experiment, baseline {}\n{}\n\n{}\n(p: fixed-sample two-sided; mSPRT p stays valid however often it is read)",
        report.model,
        report.baseline,
        table(&rows),
        table(&tests)
    )
}

fn experiment_json(report: &ExperimentReport) -> Value {
    let interval = |i: Option<aviary::pb::admin::Interval>| i.map(|i| json!([i.low, i.high]));
    let test = |t: Option<aviary::pb::admin::Significance>| {
        t.map(|t| json!({ "statistic": t.statistic, "p_value": t.p_value }))
    };
    json!({
        "model": report.model,
        "baseline": report.baseline,
        "variants": report.variants.iter().map(|v| json!({
            "version": v.version,
            "requests": v.requests,
            "errors": v.errors,
            "error_rate": v.error_rate,
            "latency_p50_us": v.latency_p50_us,
            "latency_p90_us": v.latency_p90_us,
            "latency_p99_us": v.latency_p99_us,
            "feedback": v.feedback,
            "labelled": v.labelled,
            "correct": v.correct,
            "accuracy": v.accuracy,
            "accuracy_interval": interval(v.accuracy_interval),
            "rewards": v.rewards,
            "mean_reward": v.mean_reward,
            "reward_interval": interval(v.reward_interval),
            "latency_sample_size": v.latency_sample_size,
        })).collect::<Vec<_>>(),
        "comparisons": report.comparisons.iter().map(|c| json!({
            "version": c.version,
            "error_rate": test(c.error_rate),
            "latency": test(c.latency),
            "accuracy": test(c.accuracy),
            "accuracy_msprt_p": c.accuracy_msprt_p,
        })).collect::<Vec<_>>(),
    })
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

    #[test]
    fn feedback_takes_exactly_one_outcome() {
        use clap::Parser;

        use crate::cli::{Cli, Command};

        let parse = |args: &[&str]| {
            Cli::try_parse_from(
                ["aviary", "ctl", "feedback", "demo", "2", "req-1"]
                    .iter()
                    .chain(args),
            )
        };
        let Ok(Cli {
            command:
                Command::Ctl(CtlArgs {
                    command: CtlCommand::Feedback { reward, .. },
                    ..
                }),
            ..
        }) = parse(&["--reward", "-0.5"])
        else {
            panic!("--reward parses");
        };
        assert_eq!(reward, Some(-0.5));
        assert!(parse(&["--correct"]).is_ok());
        assert!(parse(&["--correct", "--incorrect"]).is_err());
    }

    #[test]
    fn experiment_tables_mark_the_baseline_and_absent_values() {
        use aviary::pb::admin::{VariantComparison, VariantReport};

        let report = ExperimentReport {
            model: "demo".into(),
            baseline: "1".into(),
            variants: vec![
                VariantReport {
                    version: "1".into(),
                    requests: 10,
                    error_rate: Some(0.1),
                    errors: 1,
                    ..Default::default()
                },
                VariantReport {
                    version: "2".into(),
                    ..Default::default()
                },
            ],
            comparisons: vec![VariantComparison {
                version: "2".into(),
                ..Default::default()
            }],
        };
        let text = render_experiment(&report);
        assert!(text.contains("1 (baseline)  10"), "{text}");
        assert!(text.contains("1 (10.00%)"), "{text}");
        assert!(
            text.contains("\n2             0         0           -"),
            "{text}"
        );
        let json = experiment_json(&report);
        assert_eq!(json["comparisons"][0]["accuracy"], Value::Null);
    }
}
