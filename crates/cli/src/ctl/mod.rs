//! `aviary ctl`: the operator's client of the admin API. Human tables by default;
//! `--json` prints the admin API's response messages as JSON (field names as in
//! `admin.proto`), for scripts.
//!
//! - `routes`: `routes`, `set-weights`, `set-limits`, `config-status`.
//! - `models`: `models`, `load`, `reload`, `unload`.
//! - `rollout`: `rollout start|pause|resume|promote|abort|status`.
//! - `experiment`: `experiment report`, `feedback`, `shadow`.
//! - `dlq`: `dlq list`, `dlq replay`.
//! - `drift`: `drift`.
//! - `audit`: `audit tail`, `audit query`.
//! - `table`: plain-text tables and times for people.

mod audit;
mod dlq;
mod drift;
mod experiment;
mod models;
mod rollout;
mod routes;
mod table;

use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;

/// What every admin client calls through: a connection that sends the API key.
type Channel = aviary::client::TokenChannel;

/// `aviary ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Admin API address of the gateway (or, for `rollout`, of a controller).
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
    /// API key for a gateway that requires one (sent as `authorization: Bearer`).
    #[arg(long, env = "AVIARY_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// TLS, for an `https://` admin address.
    #[command(flatten)]
    pub tls: crate::args::ClientTlsArgs,
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
    /// Change a route's limits, or one version's: `aviary ctl set-limits demo --version 2
    /// --max-in-flight 8`; settings not named stay as they are.
    SetLimits {
        /// Model name.
        model: String,
        /// Only this version (default: the route's own, which versions without their
        /// own settings take).
        #[arg(long)]
        version: Option<String>,
        /// The settings to change.
        #[command(flatten)]
        limits: LimitsArgs,
        /// Apply only if the table is still at this generation (compare-and-set).
        #[arg(long)]
        expect_generation: Option<u64>,
    },
    /// List model versions: state, weight, load time, file.
    Models {
        /// Only this model.
        model: Option<String>,
        /// Show the input rules each version's model card declares instead (ranges,
        /// allowed values, NaN and infinities, per feature) and their mode.
        #[arg(long)]
        schema: bool,
    },
    /// Approve a version for production traffic (a gateway with [registry]; admin
    /// role): past the canary cap, a version takes unpinned traffic only once approved.
    Approve {
        /// Model name.
        model: String,
        /// Version.
        version: String,
        /// Why: recorded with the stage and in the audit trail.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// One version's model card as a registry record: semantic version, the model
    /// file's SHA-256 (and the card's, when it states one), lineage, metrics, owner.
    Card {
        /// Model name.
        model: String,
        /// Version.
        version: String,
    },
    /// How far each tracked feature of a model's versions drifts from its reference
    /// (model cards with [drift]): test, adjusted p-value, PSI, outliers, verdict.
    Drift {
        /// Model name.
        model: String,
        /// Only this version.
        #[arg(long)]
        version: Option<String>,
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
    /// The dead-letter queue: requests that finally failed on routes with
    /// `dead_letters = true`.
    Dlq {
        /// What to do.
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// The audit trail: changes with who made them, and sampled predictions.
    Audit {
        /// What to do.
        #[command(subcommand)]
        command: AuditCommand,
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

/// `aviary ctl audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The newest records, oldest first.
    Tail {
        /// How many.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u32,
    },
    /// The newest records that match every filter given.
    Query {
        /// Only this model.
        #[arg(long)]
        model: Option<String>,
        /// Only this version.
        #[arg(long)]
        version: Option<String>,
        /// Only these kinds: call, route, model, rollout, config, prediction, data (repeatable).
        #[arg(long)]
        kind: Vec<String>,
        /// Only this actor: `key:<name>`, `peer:<address>`, `config-file`, `rollout-driver`, ...
        #[arg(long)]
        actor: Option<String>,
        /// Only records since: a time ago (90s, 15m, 2h, 7d) or ms since the epoch.
        #[arg(long)]
        since: Option<String>,
        /// The newest this many at most.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// `aviary ctl dlq` subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// The kept requests: id, when, model, version, error.
    List {
        /// Only this model.
        model: Option<String>,
    },
    /// Send the kept requests again; those answered are dropped, failures stay.
    Replay {
        /// Only this model.
        model: Option<String>,
        /// Send them to this version instead of routing them as usual.
        #[arg(long)]
        version: Option<String>,
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
        /// Largest allowed PSI of a canary output feature against the baseline's over
        /// the same recent traffic (both versions' cards need [drift]).
        #[arg(long)]
        max_output_drift_psi: Option<f64>,
        /// Smallest allowed adjusted p-value of the same comparison.
        #[arg(long)]
        min_output_ks_p: Option<f64>,
        /// Pause when either version's inputs drift from their reference.
        #[arg(long)]
        pause_on_input_drift: bool,
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

/// Limits to change; at least one.
#[derive(Debug, Args)]
#[group(required = true, multiple = true)]
pub struct LimitsArgs {
    /// Deadline of a call whose client sets none, in milliseconds.
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Longest deadline a client may set, in milliseconds.
    #[arg(long)]
    pub max_timeout_ms: Option<u64>,
    /// Calls in flight to a version at once.
    #[arg(long)]
    pub max_in_flight: Option<u64>,
    /// Calls waiting beyond those; more get RESOURCE_EXHAUSTED.
    #[arg(long)]
    pub max_queue: Option<u64>,
    /// Consecutive failures that open a version's breaker.
    #[arg(long)]
    pub breaker_failures: Option<u32>,
    /// How long an open breaker fails calls fast before a probe, in milliseconds.
    #[arg(long)]
    pub breaker_open_ms: Option<u64>,
    /// Attempts of a call over several replicas, the first included.
    #[arg(long)]
    pub retry_attempts: Option<u32>,
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
    /// `--token` cannot be sent as a header.
    #[error("--token: not a valid header value (printable ASCII only)")]
    Token,
    /// The TLS settings cannot be used.
    #[error("{0}")]
    Tls(String),
}

impl From<tonic::Status> for CtlError {
    fn from(status: tonic::Status) -> CtlError {
        unserved(
            "this server does not serve that part of the admin API \
             (a controller serves only `aviary ctl rollout`; ask a gateway)",
        )(status)
    }
}

/// The server's status as a `CtlError`, with tonic's bare "unimplemented" (the server
/// does not serve that admin service; no message) replaced by `hint`: what to do
/// instead. An UNIMPLEMENTED with a message of the server's own says it better.
fn unserved(hint: &'static str) -> impl Fn(tonic::Status) -> CtlError {
    move |status| CtlError::Status {
        code: status.code(),
        message: match status.code() {
            tonic::Code::Unimplemented if status.message().is_empty() => hint.to_owned(),
            _ => status.message().to_owned(),
        },
    }
}

/// Runs one `aviary ctl` command and returns what to print.
pub async fn run(args: &CtlArgs) -> Result<String, CtlError> {
    let channel = connect(&args.admin, args.token.as_deref(), &args.tls.files()).await?;
    let json = args.json;
    match &args.command {
        CtlCommand::Routes => routes::show(channel, json).await,
        CtlCommand::SetWeights {
            model,
            weights,
            expect_generation,
        } => routes::set_weights(channel, model, weights, *expect_generation, json).await,
        CtlCommand::SetLimits {
            model,
            version,
            limits,
            expect_generation,
        } => {
            let change = routes::LimitsChange {
                model,
                version: version.as_deref(),
                limits,
                expect_generation: *expect_generation,
            };
            routes::set_limits(channel, change, json).await
        }
        CtlCommand::ConfigStatus => routes::config_status(channel, json).await,
        CtlCommand::Drift { model, version } => {
            drift::report(channel, model, version.as_deref(), json).await
        }
        CtlCommand::Models { model, schema } => {
            models::list(channel, model.as_deref(), *schema, json).await
        }
        CtlCommand::Card { model, version } => models::card(channel, model, version, json).await,
        CtlCommand::Approve {
            model,
            version,
            note,
        } => models::approve(channel, model, version, note, json).await,
        CtlCommand::Load { model, version } => {
            models::load(channel, model, version, models::Load::Fresh, json).await
        }
        CtlCommand::Reload { model, version } => {
            models::load(channel, model, version, models::Load::Again, json).await
        }
        CtlCommand::Unload {
            model,
            version,
            force,
        } => models::unload(channel, model, version, *force, json).await,
        CtlCommand::Shadow { model } => experiment::shadow(channel, model, json).await,
        CtlCommand::Rollout { command } => rollout::run(channel, command, json).await,
        CtlCommand::Experiment {
            command: ExperimentCommand::Report { model, baseline },
        } => experiment::report(channel, model, baseline.as_deref(), json).await,
        CtlCommand::Dlq { command } => dlq::run(channel, command, json).await,
        CtlCommand::Audit { command } => audit::run(channel, command, json).await,
        CtlCommand::Feedback {
            model,
            version,
            request_id,
            correct,
            incorrect,
            reward,
        } => {
            let outcome = experiment::outcome(*correct, *incorrect, *reward)?;
            experiment::feedback(channel, model, version, request_id, outcome, json).await
        }
    }
}

async fn connect(
    addr: &str,
    token: Option<&str>,
    tls: &aviary::client::ClientTlsFiles,
) -> Result<Channel, CtlError> {
    let failed = |source| CtlError::Connect {
        addr: addr.to_owned(),
        source,
    };
    let endpoint = aviary::client::endpoint(addr, tls).map_err(|error| match error {
        aviary::client::ConnectError::Transport(source) => failed(source),
        other => CtlError::Tls(other.to_string()),
    })?;
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(failed)?;
    aviary::client::TokenChannel::new(channel, token).map_err(|_| CtlError::Token)
}

/// `message` as JSON, or what `human` makes of it.
fn print<M: Serialize>(message: &M, json: bool, human: impl FnOnce(&M) -> String) -> String {
    match json {
        // The admin messages are plain data (strings, numbers, lists, maps): they
        // always serialise.
        true => {
            serde_json::to_string(message).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
        }
        false => human(message),
    }
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
    fn feedback_takes_exactly_one_outcome() {
        use clap::Parser;

        use crate::args::{Cli, Command};

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
}
