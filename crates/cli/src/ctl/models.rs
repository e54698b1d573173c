//! `aviary ctl models | load | reload | unload`: the `Models` admin service.

use super::Channel;
use aviary::pb::admin::{
    ListModelsRequest, ListModelsResponse, UnloadVersionRequest, VersionRequest,
    models_client::ModelsClient,
};

use super::{
    CtlError, print,
    table::{loaded_at, table},
};

/// Model versions: state, weight, load time, file.
pub(super) async fn list(
    channel: Channel,
    model: Option<&str>,
    json: bool,
) -> Result<String, CtlError> {
    let list = ModelsClient::new(channel)
        .list_models(ListModelsRequest {
            model: model.unwrap_or_default().to_owned(),
        })
        .await?
        .into_inner();
    Ok(print(&list, json, render_models))
}

fn render_models(list: &ListModelsResponse) -> String {
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
