//! What `aviary check-config` reports: every problem a gateway would refuse a config
//! file for, found without starting anything (no model is loaded, nothing listens),
//! so a CI pipeline or a `kubectl edit` guard can run it where the models are not.
//!
//! It checks what a start and a live re-read check: the file parses and every value is
//! valid (each problem with its path), the routes fit the versions there are (the
//! repository's version folders under its version policy, plus remote endpoints), and
//! every rollout plan can run on those routes. Files the config names besides the
//! repository (keys, certificates) are read only by a start and are not checked here.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use aviary_worker::{VersionPolicy, repository};

use crate::{
    GatewayError, Mode,
    config::Config,
    rollouts::plan_problems,
    route::Route,
    routing::{check_routes, with_implicit_routes},
};

/// Every problem of the config file at `path`, one line each, starting with its path
/// in the file; empty when a gateway would start with it. `mode` defaults to `serve`
/// when the file has a `[repository]`; `repository` replaces its path (to check a
/// file written for a container against a copy of the models).
pub fn check_config_file(
    path: &Path,
    mode: Option<Mode>,
    repository: Option<&Path>,
) -> Vec<String> {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => return lines(error),
    };
    let mode = mode.unwrap_or(match config.repository {
        Some(_) => Mode::Embedded,
        None => Mode::RemoteOnly,
    });
    if let Err(error) = mode.check(&config) {
        return lines(error);
    }
    // `aviary serve` without a [repository] (and no --repo) runs no models either.
    let embedded = mode == Mode::Embedded && (config.repository.is_some() || repository.is_some());
    let served = match embedded {
        false => BTreeMap::new(),
        true => match served_versions(&config, repository) {
            Ok(served) => served,
            Err(problem) => return vec![problem],
        },
    };
    let routes = Route::all_from(&config.routes);
    // Stages are not judged here: they live in the cards and the running gateway's
    // [registry] state file, and a start checks them.
    let (routes, inventory) = with_implicit_routes(&routes, served, &|_, _| true);
    let table = match check_routes(&routes, embedded, &inventory) {
        Ok(table) => table,
        Err(error) => return lines(error),
    };
    // Each plan's own rules were checked by `Config::load`; here, against the routes.
    let mut problems = Vec::new();
    for (model, plan_config) in &config.rollouts.plans {
        let plan = plan_config.plan(model);
        let shadow = routes
            .get(model)
            .and_then(|r| r.shadow.as_ref())
            .map(|s| s.version.as_str());
        problems.extend(
            plan_problems(&plan, &table, shadow)
                .into_iter()
                .map(|p| format!("rollouts.plans.{model}.{p}")),
        );
    }
    problems
}

/// The versions the embedded worker would load: the repository's version folders,
/// each model's kept by its version policy.
fn served_versions(
    config: &Config,
    repository: Option<&Path>,
) -> Result<BTreeMap<String, BTreeSet<String>>, String> {
    let Some(root) = repository
        .map(Path::to_path_buf)
        .or_else(|| config.repository.as_ref().map(|r| r.path.clone()))
    else {
        return Ok(BTreeMap::new());
    };
    let entries = repository::scan(&root).map_err(|e| {
        format!(
            "repository.path: {} cannot be read: {e}{}",
            root.display(),
            hint(repository)
        )
    })?;
    let mut present: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for entry in entries {
        present
            .entry(entry.model)
            .or_default()
            .insert(entry.version);
    }
    let default_policy = VersionPolicy::default();
    let (policies, policy) = match &config.repository {
        Some(r) => (&r.policies, &r.version_policy),
        None => (&BTreeMap::new(), &default_policy),
    };
    Ok(present
        .into_iter()
        .map(|(model, versions)| {
            let kept = policies.get(&model).unwrap_or(policy).select(&versions);
            (model, kept.iter().map(u64::to_string).collect())
        })
        .collect())
}

/// How to check a file written for another machine.
fn hint(repository: Option<&Path>) -> &'static str {
    match repository {
        Some(_) => "",
        None => {
            " (to check a file written for a container here, give --repo with a copy of its models)"
        }
    }
}

/// A config error as problem lines: each of its lines, prefixed with its path unless
/// the line already starts with one; a heading line ("invalid routes:") is dropped.
fn lines(error: GatewayError) -> Vec<String> {
    let (path, message) = match error {
        GatewayError::Config { path, message } => (Some(path), message),
        other => (None, other.to_string()),
    };
    message
        .lines()
        .filter(|line| !line.trim().is_empty() && !line.ends_with(':'))
        .map(|line| match (line.split_once(':'), &path) {
            (Some((head, _)), _) if !head.contains(' ') => line.to_owned(),
            (_, Some(path)) => format!("{path}: {line}"),
            (_, None) => line.to_owned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// A repository of empty model files (a scan reads only names and metadata) and a
    /// config beside it.
    fn setup(config: &str, versions: &[(&str, u64)]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        for (model, version) in versions {
            let folder = dir
                .path()
                .join("models")
                .join(model)
                .join(version.to_string());
            fs::create_dir_all(&folder).expect("version folder");
            fs::write(folder.join("model.onnx"), b"").expect("model file");
        }
        let path = dir.path().join("aviary.toml");
        fs::write(&path, config).expect("config file");
        (dir, path)
    }

    const SERVE: &str = r#"
[repository]
path = "models"
version_policy = { latest = 2 }

[routes.demo]
versions = [{ version = "1", weight = 90 }, { version = "2", weight = 10 }]
"#;

    #[test]
    fn a_file_a_start_accepts_has_no_problems() {
        let (_dir, path) = setup(SERVE, &[("demo", 1), ("demo", 2)]);
        assert_eq!(check_config_file(&path, None, None), Vec::<String>::new());
    }

    #[test]
    fn routes_are_judged_by_the_versions_the_policy_keeps() {
        // Versions 1..3 exist; `latest = 2` keeps 2 and 3, so version 1 is not servable.
        let (_dir, path) = setup(SERVE, &[("demo", 1), ("demo", 2), ("demo", 3)]);
        assert_eq!(
            check_config_file(&path, None, None),
            vec![
                r#"routes.demo.versions[0].version: model "demo" has no version "1" in the repository"#
            ]
        );
    }

    #[test]
    fn another_repository_stands_in_for_the_files() {
        let (dir, path) = setup(
            &SERVE.replace("\"models\"", "\"/nowhere\""),
            &[("demo", 1), ("demo", 2)],
        );
        let problems = check_config_file(&path, None, None);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("repository.path: /nowhere cannot be read"),
            "{problems:?}"
        );
        assert!(problems[0].contains("--repo"), "{problems:?}");
        let models = dir.path().join("models");
        assert_eq!(
            check_config_file(&path, None, Some(&models)),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_gateway_file_needs_every_endpoint_and_no_repository() {
        let (_dir, path) = setup(SERVE, &[("demo", 1), ("demo", 2)]);
        assert_eq!(
            check_config_file(&path, Some(Mode::RemoteOnly), None),
            vec![
                "repository: `aviary gateway` runs no models itself; remove [repository] or use `aviary serve`"
            ]
        );
        let routes_only = SERVE
            .split_once("[routes.demo]")
            .map(|(_, routes)| format!("[routes.demo]{routes}"))
            .expect("the routes");
        let (_dir, path) = setup(&routes_only, &[]);
        let problems = check_config_file(&path, Some(Mode::RemoteOnly), None);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("routes.demo.versions[0].endpoint: required"),
            "{problems:?}"
        );
        // `aviary serve` without a repository runs no models either: the same problems.
        assert_eq!(
            check_config_file(&path, Some(Mode::Embedded), None),
            problems
        );
        let remote = r#"
[routes.demo]
versions = [
  { version = "1", weight = 90, endpoint = "http://aviary-worker-demo-1:8001" },
  { version = "2", weight = 10, endpoint = "http://aviary-worker-demo-2:8001" },
]
"#;
        let (_dir, path) = setup(remote, &[]);
        assert_eq!(check_config_file(&path, None, None), Vec::<String>::new());
    }

    #[test]
    fn every_value_problem_is_listed_with_its_path() {
        let text =
            format!("{SERVE}\n[server]\nmax_message_bytes = 10\n[tracing]\nsample_ratio = 2.0\n");
        let (_dir, path) = setup(&text, &[("demo", 1), ("demo", 2)]);
        assert_eq!(
            check_config_file(&path, None, None),
            vec![
                "server.max_message_bytes: 10 is too small (at least 1024)",
                "tracing.sample_ratio: 2 is not between 0 and 1",
            ]
        );
    }

    #[test]
    fn plans_are_checked_against_the_routes() {
        let plan = r#"
[rollouts.plans.demo]
canary = "2"
baseline = "1"
steps = [{ weight = 20, min_duration_ms = 10, min_requests = 1 }, { weight = 100, min_duration_ms = 10, min_requests = 1 }]
gates = { max_error_rate_increase = 0.05, min_shadow_agreement = 0.9 }
"#;
        let (_dir, path) = setup(&format!("{SERVE}{plan}"), &[("demo", 1), ("demo", 2)]);
        let problems = check_config_file(&path, None, None);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with(
                "rollouts.plans.demo.gates.min_shadow_agreement: needs the canary's answers"
            ),
            "{problems:?}"
        );
    }
}
