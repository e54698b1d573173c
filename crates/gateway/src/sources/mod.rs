//! Model sources beyond the local repository: versions fetched from elsewhere into the
//! repository, then loaded like any other.
//!
//! - [`mlflow`]: an MLflow Model Registry polled for the version an alias (or stage)
//!   names; its ONNX artifact downloaded, verified and written with a model card made
//!   from the registry's metadata.
//! - [`http`]: the HTTP/1.1 calls they make.

pub mod http;
pub mod mlflow;

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
