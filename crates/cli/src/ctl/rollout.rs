//! `aviary ctl rollout ...`: the `Rollouts` admin service, on a gateway or a controller.

use std::time::Duration;

use super::Channel;
use aviary::pb::admin::{
    GetRolloutRequest, RolloutCommandRequest, RolloutGates, RolloutMetrics, RolloutPlan,
    RolloutStatus, RolloutStep, rollouts_client::RolloutsClient,
};

use super::{
    CtlError, RolloutCommand, RolloutNote, print,
    table::{loaded_at, table},
    unserved,
};

/// Runs one rollout subcommand; prints the rollout's status after it.
pub(super) async fn run(
    channel: Channel,
    command: &RolloutCommand,
    json: bool,
) -> Result<String, CtlError> {
    let mut client = RolloutsClient::new(channel);
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
            max_output_drift_psi,
            min_output_ks_p,
            pause_on_input_drift,
        } => {
            let plan = RolloutPlan {
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
                    max_output_drift_psi: *max_output_drift_psi,
                    min_output_ks_p: *min_output_ks_p,
                    pause_on_input_drift: *pause_on_input_drift,
                    ..RolloutGates::default()
                }),
            };
            client.start_rollout(plan).await
        }
        RolloutCommand::Pause(n) => client.pause_rollout(note(n)).await,
        RolloutCommand::Resume(n) => client.resume_rollout(note(n)).await,
        RolloutCommand::Promote(n) => client.promote_rollout(note(n)).await,
        RolloutCommand::Abort(n) => client.abort_rollout(note(n)).await,
        RolloutCommand::Status { model, watch } => {
            let get = GetRolloutRequest {
                model: model.clone(),
            };
            let status = client
                .get_rollout(get.clone())
                .await
                .map_err(unserved(NO_ROLLOUTS))?;
            return match watch {
                true => watch_until_over(&mut client, get, status.into_inner(), json).await,
                false => Ok(print(&status.into_inner(), json, render_rollout)),
            };
        }
    }
    .map_err(unserved(NO_ROLLOUTS))?
    .into_inner();
    Ok(print(&status, json, render_rollout))
}

/// A gateway whose rollouts a controller drives does not serve the service.
const NO_ROLLOUTS: &str = "this server does not run rollouts (a gateway with [rollouts] controlled = true): \
                           ask the controller (--admin http://CONTROLLER:8004)";

/// Redraws the status every second until the rollout is over.
async fn watch_until_over(
    client: &mut RolloutsClient<Channel>,
    get: GetRolloutRequest,
    mut status: RolloutStatus,
    json: bool,
) -> Result<String, CtlError> {
    let clear = std::io::IsTerminal::is_terminal(&std::io::stdout()) && !json;
    while !status.terminal {
        if clear {
            // Clear the screen and home the cursor, so the table redraws in place.
            print!("\x1b[2J\x1b[H");
        }
        println!("{}\n", print(&status, json, render_rollout));
        tokio::time::sleep(Duration::from_secs(1)).await;
        status = client.get_rollout(get.clone()).await?.into_inner();
    }
    if clear {
        print!("\x1b[2J\x1b[H");
    }
    Ok(print(&status, json, render_rollout))
}

fn render_rollout(status: &RolloutStatus) -> String {
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
