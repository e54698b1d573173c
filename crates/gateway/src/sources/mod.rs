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

use std::time::Duration;

/// The shortest `poll_interval_ms` of a source.
pub const MIN_POLL_INTERVAL_MS: u64 = 100;

/// A source's `poll_interval_ms` when the config sets none.
pub(crate) fn default_poll_interval_ms() -> u64 {
    30_000
}

/// The longest wait between two looks after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// The wait before the next look after `failures` failed looks in a row: `interval`,
/// doubling with each failure (a server down, a download that keeps breaking) up to
/// ten minutes (or `interval`, if longer).
pub fn backoff(interval: Duration, failures: u32) -> Duration {
    (interval * 2u32.pow(failures.min(12))).min(MAX_BACKOFF.max(interval))
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
