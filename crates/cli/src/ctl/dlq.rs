//! `aviary ctl dlq list | replay`: the `DeadLetters` admin service.

use super::Channel;
use aviary::pb::admin::{
    ListDeadLettersRequest, ListDeadLettersResponse, ReplayDeadLettersRequest,
    ReplayDeadLettersResponse, dead_letters_client::DeadLettersClient,
};

use super::{
    CtlError, DlqCommand, print,
    table::{loaded_at, table},
    unserved,
};

/// A gateway opens its dead-letter queue at start, when a route asks for it.
const NO_QUEUE: &str = "this gateway keeps no dead letters: set `dead_letters = true` on a route \
                        (the queue opens when the gateway starts)";

/// Runs one `dlq` subcommand.
pub(super) async fn run(
    channel: Channel,
    command: &DlqCommand,
    json: bool,
) -> Result<String, CtlError> {
    let mut client = DeadLettersClient::new(channel);
    match command {
        DlqCommand::List { model } => {
            let list = client
                .list_dead_letters(ListDeadLettersRequest {
                    model: model.clone().unwrap_or_default(),
                })
                .await
                .map_err(unserved(NO_QUEUE))?
                .into_inner();
            Ok(print(&list, json, render_list))
        }
        DlqCommand::Replay { model, version } => {
            let replayed = client
                .replay_dead_letters(ReplayDeadLettersRequest {
                    model: model.clone().unwrap_or_default(),
                    version: version.clone().unwrap_or_default(),
                })
                .await
                .map_err(unserved(NO_QUEUE))?
                .into_inner();
            Ok(print(&replayed, json, render_replay))
        }
    }
}

fn render_list(list: &ListDeadLettersResponse) -> String {
    let mut rows = vec![
        ["ID", "WHEN", "MODEL", "VERSION", "ERROR"]
            .map(String::from)
            .to_vec(),
    ];
    for letter in &list.letters {
        rows.push(vec![
            letter.id.to_string(),
            loaded_at(letter.at_ms),
            letter.model.clone(),
            letter.version.clone(),
            letter.error.clone(),
        ]);
    }
    let redis = match list.redis_stream.as_str() {
        "" => String::new(),
        stream => format!("; {} not sent to Redis stream {stream}", list.dropped_redis),
    };
    format!(
        "{} kept ({} dropped by the size cap, {} while the writer was busy){redis}\n{}",
        list.letters.len(),
        list.dropped_oldest,
        list.dropped_busy,
        table(&rows)
    )
}

fn render_replay(replayed: &ReplayDeadLettersResponse) -> String {
    let answered = replayed.outcomes.iter().filter(|o| o.ok).count();
    let mut rows = vec![["ID", "OK", "DETAIL"].map(String::from).to_vec()];
    for outcome in &replayed.outcomes {
        rows.push(vec![
            outcome.id.to_string(),
            outcome.ok.to_string(),
            outcome.detail.clone(),
        ]);
    }
    format!(
        "{answered} of {} answered (and dropped from the queue)\n{}",
        replayed.outcomes.len(),
        table(&rows)
    )
}
