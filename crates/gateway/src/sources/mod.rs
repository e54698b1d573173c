//! Model sources beyond the local repository: versions fetched from elsewhere into the
//! repository, then loaded like any other.
//!
//! - [`mlflow`]: an MLflow Model Registry polled for the version an alias (or stage)
//!   names; its ONNX artifact downloaded, verified and written with a model card made
//!   from the registry's metadata.
//! - [`bucket`]: an S3 or S3-compatible bucket listed for versions laid out as in
//!   the repository; each downloaded (resumably), verified and renamed into place.
//! - [`http`]: the HTTP/1.1 calls the MLflow source makes.
//!
//! Both poll, back off after failures ([`backoff`]) and keep serving what the gateway
//! has while their source is down.

pub mod bucket;
pub mod http;
pub mod mlflow;

use std::{future::Future, time::Duration};

use tokio::sync::watch;

/// The shortest `poll_interval_ms` of a source.
const MIN_POLL_INTERVAL_MS: u64 = 100;

/// A source's `poll_interval_ms` when the config sets none.
pub(crate) fn default_poll_interval_ms() -> u64 {
    30_000
}

/// The longest wait between two looks after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// The wait before the next look after `failures` failed looks in a row: `interval`,
/// doubling with each failure (a server down, a download that keeps breaking) up to
/// ten minutes (or `interval`, if longer).
fn backoff(interval: Duration, failures: u32) -> Duration {
    (interval * 2u32.pow(failures.min(12))).min(MAX_BACKOFF.max(interval))
}

/// Takes a `look` every `interval` until `stop` turns true. A look answers whether it
/// went well; after one that failed, the next waits longer ([`backoff`]).
pub async fn look_every<F, Fut>(interval: Duration, mut stop: watch::Receiver<bool>, mut look: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut failures: u32 = 0;
    loop {
        failures = match look().await {
            true => 0,
            false => failures.saturating_add(1),
        };
        tokio::select! {
            _ = tokio::time::sleep(backoff(interval, failures)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// The problems every source's section can have: `path` is the section
/// (`mlflow[0]`), `has_repository` whether `[repository]` is set.
pub(crate) fn common_problems(
    path: &str,
    has_repository: bool,
    poll_interval_ms: u64,
) -> Vec<String> {
    let mut problems = Vec::new();
    if !has_repository {
        problems.push(format!(
            "{path}: needs [repository]: versions are written into it and loaded by the \
             embedded worker (aviary serve)"
        ));
    }
    if poll_interval_ms < MIN_POLL_INTERVAL_MS {
        problems.push(format!(
            "{path}.poll_interval_ms: {poll_interval_ms} is below the least, \
             {MIN_POLL_INTERVAL_MS}"
        ));
    }
    problems
}

/// Why a source could not give a version.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source did not answer, or answered with an error.
    #[error("{0}")]
    Unreachable(String),
    /// The source has no such model, alias or version.
    #[error("{0}")]
    NotFound(String),
    /// The source answered with something that is not what it should be (a file whose
    /// SHA-256 differs from the one the registry states, a model that does not load).
    #[error("{0}")]
    Invalid(String),
    /// The repository could not be written.
    #[error("{0}")]
    Storage(String),
}

impl SourceError {
    /// The gRPC code of the failure, should it reach a client.
    pub fn code(&self) -> tonic::Code {
        match self {
            SourceError::Unreachable(_) => tonic::Code::Unavailable,
            SourceError::NotFound(_) => tonic::Code::NotFound,
            SourceError::Invalid(_) => tonic::Code::FailedPrecondition,
            SourceError::Storage(_) => tonic::Code::Internal,
        }
    }
}

/// Asserts that every one of `expected` starts one of the problems `found`.
#[cfg(test)]
fn assert_named(found: &[String], expected: &[&str]) {
    for expected in expected {
        assert!(
            found.iter().any(|p| p.starts_with(expected)),
            "{expected} in {found:#?}"
        );
    }
}
