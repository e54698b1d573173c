//! `aviary ctl experiment report | feedback | shadow`: the `Experiments` admin service.

use super::Channel;
use aviary::pb::admin::{
    BanditReport, ExperimentReport, ExperimentReportRequest, FeedbackRequest, ShadowReport,
    ShadowReportRequest, experiments_client::ExperimentsClient, feedback_request::Outcome,
};

use super::{
    CtlError, print,
    table::{opt, table},
};

/// Per-variant outcomes and significance against a baseline.
pub(super) async fn report(
    channel: Channel,
    model: &str,
    baseline: Option<&str>,
    json: bool,
) -> Result<String, CtlError> {
    let report = ExperimentsClient::new(channel)
        .get_experiment_report(ExperimentReportRequest {
            model: model.to_owned(),
            baseline: baseline.unwrap_or_default().to_owned(),
        })
        .await?
        .into_inner();
    Ok(print(&report, json, render_experiment))
}

/// The one outcome the flags give.
pub(super) fn outcome(
    correct: bool,
    incorrect: bool,
    reward: Option<f64>,
) -> Result<Outcome, CtlError> {
    match (correct, incorrect, reward) {
        (_, _, Some(reward)) => Ok(Outcome::Reward(reward)),
        (true, _, None) => Ok(Outcome::Correct(true)),
        (false, true, None) => Ok(Outcome::Correct(false)),
        (false, false, None) => Err(CtlError::Status {
            code: tonic::Code::InvalidArgument,
            message: "give --correct, --incorrect or --reward X".into(),
        }),
    }
}

/// Reports ground truth for a prediction.
pub(super) async fn feedback(
    channel: Channel,
    model: &str,
    version: &str,
    request_id: &str,
    outcome: Outcome,
    json: bool,
) -> Result<String, CtlError> {
    let response = ExperimentsClient::new(channel)
        .feedback(FeedbackRequest {
            request_id: request_id.to_owned(),
            model: model.to_owned(),
            version: version.to_owned(),
            outcome: Some(outcome),
        })
        .await?
        .into_inner();
    Ok(print(&response, json, |r| {
        format!(
            "{model} version {version}: feedback recorded ({} so far)",
            r.feedback
        )
    }))
}

/// How the model's shadow version compares with the versions that answered.
pub(super) async fn shadow(channel: Channel, model: &str, json: bool) -> Result<String, CtlError> {
    let report = ExperimentsClient::new(channel)
        .get_shadow_report(ShadowReportRequest {
            model: model.to_owned(),
        })
        .await?
        .into_inner();
    Ok(print(&report, json, render_shadow))
}

fn render_shadow(report: &ShadowReport) -> String {
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
    let bandit = report
        .bandit
        .as_ref()
        .map(render_bandit)
        .unwrap_or_default();
    format!(
        "{} experiment, baseline {}\n{}\n\n{}\n(p: fixed-sample two-sided; mSPRT p stays valid however often it is read){bandit}",
        report.model,
        report.baseline,
        table(&rows),
        table(&tests)
    )
}

/// The bandit policy's section: its state, and each arm's share and posterior.
fn render_bandit(bandit: &BanditReport) -> String {
    let mut rows = vec![
        [
            "ARM",
            "SHARE",
            "MAX SHARE",
            "REWARDS",
            "MEAN REWARD",
            "POSTERIOR",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for arm in &bandit.arms {
        let posterior = match bandit.reward.as_str() {
            "correct" => format!(
                "Beta({}, {}) mean {:.4}",
                arm.posterior_alpha, arm.posterior_beta, arm.posterior_mean
            ),
            _ => format!(
                "Normal({:.4}, sd {:.4})",
                arm.posterior_mean, arm.posterior_sd
            ),
        };
        rows.push(vec![
            arm.version.clone(),
            format!("{:.2}%", arm.share * 100.0),
            arm.max_share
                .map_or_else(|| "-".into(), |m| format!("{:.2}%", m * 100.0)),
            arm.rewards.to_string(),
            opt(arm.mean_reward, 4),
            posterior,
        ]);
    }
    let state = match (bandit.updated_unix_ms, bandit.warming_up) {
        (0, _) => "not updated yet".to_owned(),
        (_, true) => format!(
            "warming up: {} of {} rewards, configured weights",
            bandit.rewards, bandit.warmup
        ),
        (_, false) => format!("{} rewards, learnt shares", bandit.rewards),
    };
    let applied = match bandit.not_applied.as_str() {
        "" => String::new(),
        reason => format!("\nnot applied: {reason}"),
    };
    format!(
        "\n\nbandit: {} on {} feedback, min share {:.2}%; {state}{applied}\n{}",
        bandit.strategy,
        bandit.reward,
        bandit.min_share * 100.0,
        table(&rows)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
            bandit: None,
        };
        let text = render_experiment(&report);
        assert!(text.contains("1 (baseline)  10"), "{text}");
        assert!(text.contains("1 (10.00%)"), "{text}");
        assert!(
            text.contains("\n2             0         0           -"),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&print(&report, true, render_experiment)).expect("JSON");
        assert_eq!(json["comparisons"][0]["accuracy"], serde_json::Value::Null);
        assert_eq!(json["variants"][0]["error_rate"], 0.1);
    }

    #[test]
    fn the_bandit_section_shows_shares_posteriors_and_why_weights_did_not_apply() {
        use aviary::pb::admin::BanditArm;

        let bandit = BanditReport {
            strategy: "epsilon-greedy".into(),
            reward: "numeric".into(),
            warmup: 100,
            rewards: 40,
            warming_up: true,
            min_share: 0.05,
            arms: vec![BanditArm {
                version: "2".into(),
                share: 0.1,
                rewards: 40,
                mean_reward: Some(1.5),
                posterior_mean: 1.5,
                posterior_sd: 0.25,
                max_share: Some(0.1),
                ..Default::default()
            }],
            updated_unix_ms: 1,
            not_applied: "a running rollout holds the weights".into(),
        };
        let text = render_bandit(&bandit);
        for expected in [
            "bandit: epsilon-greedy on numeric feedback, min share 5.00%; warming up: 40 of 100 rewards",
            "not applied: a running rollout holds the weights",
            "2    10.00%  10.00%     40",
            "Normal(1.5000, sd 0.2500)",
        ] {
            assert!(text.contains(expected), "{expected:?} in:\n{text}");
        }
    }
}
