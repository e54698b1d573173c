//! `aviary ctl audit tail | query`: the `Audit` admin service. A table by default;
//! `--json` prints the records as the trail stores them, one JSON object a line.

use aviary::pb::admin::{AuditQuery, AuditRecords, audit_client::AuditClient};
use serde_json::Value;

use super::{
    AuditCommand, Channel, CtlError,
    table::{loaded_at, table},
    unserved,
};

/// A gateway serves `Audit` only with a trail.
const NO_TRAIL: &str = "this gateway keeps no audit trail: set [audit] dir in its config";

/// Runs one `audit` subcommand.
pub(super) async fn run(
    channel: Channel,
    command: &AuditCommand,
    json: bool,
) -> Result<String, CtlError> {
    let query = match command {
        AuditCommand::Tail { lines } => AuditQuery {
            limit: *lines,
            ..AuditQuery::default()
        },
        AuditCommand::Query {
            model,
            version,
            kind,
            actor,
            since,
            limit,
        } => AuditQuery {
            kinds: kind.clone(),
            model: model.clone().unwrap_or_default(),
            version: version.clone().unwrap_or_default(),
            actor: actor.clone().unwrap_or_default(),
            since_ms: match since {
                Some(since) => since_ms(since, aviary::unix_ms(std::time::SystemTime::now()))
                    .map_err(|message| CtlError::Status {
                        code: tonic::Code::InvalidArgument,
                        message,
                    })?,
                None => 0,
            },
            limit: *limit,
        },
    };
    let records = AuditClient::new(channel)
        .query_audit(query)
        .await
        .map_err(unserved(NO_TRAIL))?
        .into_inner();
    Ok(match json {
        true => records.records.join("\n"),
        false => render(&records),
    })
}

/// `--since`: a time ago (`90s`, `15m`, `2h`, `7d`) or milliseconds since the epoch,
/// as milliseconds since the epoch, given the time `now_ms`.
fn since_ms(since: &str, now_ms: u64) -> Result<u64, String> {
    let bad = || {
        format!(
            "--since: \"{since}\" is neither a time ago (90s, 15m, 2h, 7d) nor milliseconds since the epoch"
        )
    };
    if let Ok(at) = since.parse::<u64>() {
        return Ok(at);
    }
    let split = since.len().checked_sub(1).ok_or_else(bad)?;
    let (number, unit) = since.split_at(split);
    let seconds: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    let ago: u64 = number.parse().map_err(|_| bad())?;
    Ok(now_ms.saturating_sub(ago.saturating_mul(seconds).saturating_mul(1000)))
}

fn render(records: &AuditRecords) -> String {
    let mut rows = vec![
        [
            "WHEN", "KIND", "ACTOR", "ACTION", "MODEL", "VERSION", "STATUS", "DETAIL",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for line in &records.records {
        let Ok(Value::Object(record)) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let text = |field: &str| match record.get(field) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        let mut detail = Vec::new();
        if record.contains_key("before") || record.contains_key("after") {
            detail.push(format!("{} -> {}", text("before"), text("after")));
        }
        for field in ["reason", "fingerprint", "subject", "message"] {
            if record.contains_key(field) {
                detail.push(format!("{field}={}", text(field)));
            }
        }
        if let Some(us) = record.get("latency_us").and_then(Value::as_u64) {
            detail.push(format!("{:.2}ms", us as f64 / 1000.0));
        }
        rows.push(vec![
            loaded_at(record.get("time_ms").and_then(Value::as_u64).unwrap_or(0)),
            text("kind"),
            text("actor"),
            text("action"),
            text("model"),
            text("version"),
            text("status"),
            detail.join(" "),
        ]);
    }
    let more = match records.truncated {
        true => " (older ones matched too; narrow the query or raise --limit)",
        false => "",
    };
    format!("{} records{more}\n{}", records.records.len(), table(&rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_time_ago_or_an_instant() {
        let now = 10_000_000;
        assert_eq!(since_ms("90s", now), Ok(now - 90_000));
        assert_eq!(since_ms("15m", now), Ok(now - 900_000));
        assert_eq!(since_ms("2h", now), Ok(now - 7_200_000));
        assert_eq!(since_ms("7d", now), Ok(0));
        assert_eq!(since_ms("1700000000000", now), Ok(1_700_000_000_000));
        for bad in ["", "m", "5w", "-5m", "five minutes"] {
            let error = since_ms(bad, now).expect_err(bad);
            assert!(error.starts_with("--since:"), "{error}");
        }
    }

    #[test]
    fn records_render_as_a_table_with_their_details() {
        let records = AuditRecords {
            records: vec![
                r#"{"time_ms":0,"kind":"route","actor":"key:ops","action":"route-change","model":"demo","status":"OK","before":{"1":90,"2":10},"after":{"1":50,"2":50}}"#.into(),
                "not json".into(),
            ],
            truncated: false,
        };
        let shown = render(&records);
        assert!(shown.contains("key:ops"), "{shown}");
        assert!(
            shown.contains(r#"{"1":90,"2":10} -> {"1":50,"2":50}"#),
            "{shown}"
        );
    }
}
