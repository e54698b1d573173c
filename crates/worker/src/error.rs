//! The worker's one error type, and its mapping to gRPC statuses.

use std::path::PathBuf;

/// Everything that can go wrong in the worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The request named a model the repository does not serve.
    #[error("model \"{model}\" is not served (available: {available})")]
    UnknownModel {
        /// The requested model.
        model: String,
        /// Comma-separated list of served models.
        available: String,
    },
    /// The request named a version the model does not have loaded.
    #[error("model \"{model}\" has no version \"{version}\" (available: {available})")]
    UnknownVersion {
        /// The model.
        model: String,
        /// The requested version.
        version: String,
        /// Comma-separated list of loaded versions.
        available: String,
    },
    /// The request does not fit the model's inputs or outputs.
    #[error("{0}")]
    InvalidRequest(String),
    /// The model repository or a model file could not be read or loaded.
    #[error("loading {path}: {reason}")]
    Load {
        /// The file or folder.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The ONNX Runtime shared library could not be found or initialised.
    #[error("{0}")]
    Runtime(String),
    /// ONNX Runtime failed while running a model that accepted the inputs.
    #[error("model \"{model}\" version \"{version}\" failed: {reason}")]
    Inference {
        /// The model.
        model: String,
        /// The version.
        version: String,
        /// ONNX Runtime's message.
        reason: String,
    },
    /// The gRPC server could not be built or stopped with an error.
    #[error("server: {0}")]
    Serve(String),
    /// The worker is shutting down or an inference task was lost.
    #[error("worker unavailable: {0}")]
    Unavailable(String),
}

impl WorkerError {
    pub(crate) fn invalid(message: impl Into<String>) -> WorkerError {
        WorkerError::InvalidRequest(message.into())
    }
}

impl From<WorkerError> for tonic::Status {
    fn from(error: WorkerError) -> tonic::Status {
        let message = error.to_string();
        match error {
            WorkerError::UnknownModel { .. } | WorkerError::UnknownVersion { .. } => {
                tonic::Status::not_found(message)
            }
            WorkerError::InvalidRequest(_) => tonic::Status::invalid_argument(message),
            WorkerError::Load { .. } | WorkerError::Runtime(_) => {
                tonic::Status::failed_precondition(message)
            }
            WorkerError::Inference { .. } | WorkerError::Serve(_) => {
                tonic::Status::internal(message)
            }
            WorkerError::Unavailable(_) => tonic::Status::unavailable(message),
        }
    }
}
