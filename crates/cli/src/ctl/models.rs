//! `aviary ctl models | card | approve | load | reload | unload`: the `Models` admin
//! service.

use super::Channel;
use aviary::pb::admin::{
    ApproveRequest, ListModelsRequest, ListModelsResponse, ModelVersionInfo, UnloadVersionRequest,
    VersionRequest, models_client::ModelsClient,
};
use aviary_worker::input_rules::{Allowed, InputRulesCard, Policy};

use super::{
    CtlError, print,
    table::{loaded_at, table},
};

/// Model versions: state, weight, load time, file.
pub(super) async fn list(
    channel: Channel,
    model: Option<&str>,
    schema: bool,
    json: bool,
) -> Result<String, CtlError> {
    let list = ModelsClient::new(channel)
        .list_models(ListModelsRequest {
            model: model.unwrap_or_default().to_owned(),
        })
        .await?
        .into_inner();
    Ok(match schema {
        true => print(&list, json, render_input_rules),
        false => print(&list, json, render_models),
    })
}

/// One row per declared feature (or whole input) of every version whose card has
/// input rules.
fn render_input_rules(list: &ListModelsResponse) -> String {
    let mut rows = vec![
        [
            "MODEL", "VERSION", "MODE", "INPUT", "FEATURE", "MIN", "MAX", "ALLOWED", "NAN", "INF",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for v in &list.versions {
        let Some(text) = v
            .card
            .as_ref()
            .map(|c| &c.input_rules)
            .filter(|t| !t.is_empty())
        else {
            continue;
        };
        let Ok(card) = serde_json::from_str::<InputRulesCard>(text) else {
            rows.push(vec![
                v.model.clone(),
                v.version.clone(),
                format!("unreadable rules: {text}"),
            ]);
            continue;
        };
        let mode = format!("{:?}", card.mode).to_lowercase();
        for (name, input) in &card.inputs {
            for rule in input.effective_features(name) {
                let label = match input.features.is_empty() {
                    true => "(every element)".to_owned(),
                    false => rule.name.clone().unwrap_or_default(),
                };
                let number = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:?}"));
                let policy = |p: Option<Policy>| match p {
                    Some(Policy::Allow) => "allow",
                    _ => "reject",
                };
                rows.push(vec![
                    v.model.clone(),
                    v.version.clone(),
                    mode.clone(),
                    name.clone(),
                    label,
                    number(rule.min),
                    number(rule.max),
                    match &rule.allowed {
                        Some(Allowed::Numbers(n)) => n
                            .iter()
                            .map(|v| format!("{v:?}"))
                            .collect::<Vec<_>>()
                            .join(","),
                        Some(Allowed::Strings(s)) => s.join(","),
                        None => "-".to_owned(),
                    },
                    policy(rule.nan).to_owned(),
                    policy(rule.inf).to_owned(),
                ]);
            }
        }
    }
    match rows.len() {
        1 => "no model card declares input rules".to_owned(),
        _ => table(&rows),
    }
}

fn render_models(list: &ListModelsResponse) -> String {
    let mut rows = vec![vec![
        "MODEL".into(),
        "VERSION".into(),
        "SEMVER".into(),
        "STAGE".into(),
        "STATE".into(),
        "WEIGHT".into(),
        "LOADED".into(),
        "PATH / REASON".into(),
    ]];
    for v in &list.versions {
        let semver = v
            .card
            .as_ref()
            .map(|c| c.semver.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "-".into());
        let stage = v
            .stage
            .as_ref()
            .map_or_else(|| "-".into(), |s| s.stage.clone());
        rows.push(vec![
            v.model.clone(),
            v.version.clone(),
            semver,
            stage,
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

/// Approves a version for production traffic.
pub(super) async fn approve(
    channel: Channel,
    model: &str,
    version: &str,
    note: &str,
    json: bool,
) -> Result<String, CtlError> {
    let answer = ModelsClient::new(channel)
        .approve(ApproveRequest {
            model: model.to_owned(),
            version: version.to_owned(),
            note: note.to_owned(),
        })
        .await?
        .into_inner();
    Ok(print(&answer, json, |answer| {
        let stage = answer.stage.clone().unwrap_or_default();
        format!("{model} {version}: {} (by {})", stage.stage, stage.by)
    }))
}

/// One version's card as a registry record.
pub(super) async fn card(
    channel: Channel,
    model: &str,
    version: &str,
    json: bool,
) -> Result<String, CtlError> {
    let list = ModelsClient::new(channel)
        .list_models(ListModelsRequest {
            model: model.to_owned(),
        })
        .await?
        .into_inner();
    if list.versions.is_empty() {
        // The admin API lists the embedded worker's versions; `aviary gateway` has none.
        return Err(CtlError::Status {
            code: tonic::Code::NotFound,
            message: format!(
                "the gateway lists no versions of model \"{model}\": it has none in its own \
                 repository (a gateway without an embedded worker lists none; a remote \
                 version's record is in its ModelConfig parameters card.* and model.sha256)"
            ),
        });
    }
    let found = list
        .versions
        .into_iter()
        .find(|v| v.version == version)
        .ok_or_else(|| CtlError::Status {
            code: tonic::Code::NotFound,
            message: format!("the gateway has no version {version} of model \"{model}\""),
        })?;
    Ok(print(&found, json, render_card))
}

/// A version's record, one field per line; what the card does not state is left out.
fn render_card(v: &ModelVersionInfo) -> String {
    let mut lines = vec![
        ("model", v.model.clone()),
        ("version", v.version.clone()),
        ("state", v.state.clone()),
        ("reason", v.reason.clone()),
        ("file", v.path.clone()),
        ("file sha256", v.sha256.clone()),
    ];
    if let Some(stage) = &v.stage {
        let since = match stage.at_ms {
            0 => String::new(),
            at => format!(", {}", loaded_at(at)),
        };
        lines.push(("stage", format!("{} (by {}{since})", stage.stage, stage.by)));
        lines.push(("stage note", stage.note.clone()));
    }
    match &v.card {
        // What is known of a version comes from its running copy.
        None if v.path.is_empty() => {
            lines.push(("card", "unknown: the version is not loaded".to_owned()));
        }
        None => lines.push(("card", "none (no model.toml beside the model)".to_owned())),
        Some(card) => {
            lines.extend([
                ("semver", card.semver.clone()),
                ("card sha256", card.stated_sha256.clone()),
                ("owner", card.owner.clone()),
                ("description", card.description.clone()),
                ("training data", card.training_data.clone()),
            ]);
            if let Some(l) = &card.lineage {
                lines.extend([
                    ("dataset", l.dataset.clone()),
                    ("dataset sha256", l.dataset_sha256.clone()),
                    ("code revision", l.code_revision.clone()),
                    ("training run", l.training_run.clone()),
                    ("hyperparameters", l.hyperparameters.clone()),
                ]);
            }
            let mut metrics: Vec<_> = card.metrics.iter().collect();
            metrics.sort_by(|a, b| a.0.cmp(b.0));
            let metrics: Vec<String> = metrics.iter().map(|(k, v)| format!("{k}={v}")).collect();
            lines.push(("metrics", metrics.join(", ")));
        }
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    lines
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(key, value)| format!("{key:<width$}  {value}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether a load reads a version for the first time or again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Load {
    /// `load`: from the repository, without touching routes.
    Fresh,
    /// `reload`: the running version's file again, swapped in when ready.
    Again,
}

/// Loads or reloads a version.
pub(super) async fn load(
    channel: Channel,
    model: &str,
    version: &str,
    load: Load,
    json: bool,
) -> Result<String, CtlError> {
    let mut client = ModelsClient::new(channel);
    let request = VersionRequest {
        model: model.to_owned(),
        version: version.to_owned(),
    };
    let (response, verb) = match load {
        Load::Fresh => (client.load_version(request).await?, "loaded"),
        Load::Again => (client.reload_version(request).await?, "reloaded"),
    };
    Ok(print(&response.into_inner(), json, |r| {
        format!("{model} version {version} {verb} in {} ms", r.load_ms)
    }))
}

/// Unloads a version.
pub(super) async fn unload(
    channel: Channel,
    model: &str,
    version: &str,
    force: bool,
    json: bool,
) -> Result<String, CtlError> {
    let response = ModelsClient::new(channel)
        .unload_version(UnloadVersionRequest {
            model: model.to_owned(),
            version: version.to_owned(),
            force,
        })
        .await?
        .into_inner();
    Ok(print(&response, json, |r| {
        format!(
            "{model} version {version} unloaded (routes at generation {})",
            r.generation
        )
    }))
}
