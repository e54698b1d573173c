//! The worker's one error type, and its mapping to gRPC statuses.

use std::path::PathBuf;

use aviary::tensor::format_bytes;

/// Everything that can go wrong in the worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The request named a model the repository does not serve. The messages of this
    /// and the next open with Triton's wording, which its clients match on.
    #[error("Request for unknown model: '{model}' is not found (loaded models: {available})")]
    UnknownModel {
        /// The requested model.
        model: String,
        /// Comma-separated list of served models.
        available: String,
    },
    /// The request named a version the model does not have loaded.
    #[error(
        "Request for unknown model: '{model}' version {version} is not found (loaded versions: {available})"
    )]
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
    /// The request's deadline passed before a session was free: it was not run.
    #[error(
        "model \"{model}\" version \"{version}\": the request's deadline passed after {waited_ms} ms waiting for a free session; it was not run"
    )]
    DeadlineExceeded {
        /// The model.
        model: String,
        /// The version.
        version: String,
        /// How long it waited, in milliseconds.
        waited_ms: u128,
    },
    /// Decoding the request's input tensors would go over a memory budget: it was
    /// refused before anything was decoded.
    #[error(
        "request needs {} of decoded tensors{}; the limit is {limit} = {}{}",
        format_bytes(*.needed),
        .held.map(|h| format!(" and requests in flight hold {}", format_bytes(Some(h)))).unwrap_or_default(),
        format_bytes(Some(*.limit_bytes)),
        if .held.is_some() { " (retry later)" } else { "" }
    )]
    OverBudget {
        /// Decoded bytes the request needs; `None`: more than a `u64`.
        needed: Option<u64>,
        /// For the process budget: bytes the requests in flight held at that moment.
        held: Option<u64>,
        /// The setting that refused it.
        limit: &'static str,
        /// Its value, in bytes.
        limit_bytes: u64,
    },
    /// The request asks for something Aviary does not implement (a protocol
    /// extension or parameter), named in the message.
    #[error("{0}")]
    Unimplemented(String),
    /// The worker's settings do not hold together: every problem, one per line.
    #[error("invalid worker settings:\n{0}")]
    Config(String),
    /// The worker is shutting down or an inference task was lost.
    #[error("worker unavailable: {0}")]
    Unavailable(String),
    /// RepositoryModelLoad or RepositoryModelUnload on a port whose model control mode
    /// is `none`.
    #[error(
        "{rpc} of model \"{model}\" refused: model control is off on this port \
         (model_control = \"none\", the default, as Triton's); load and unload through \
         the admin API (aviary ctl), or start the server with model control \"explicit\""
    )]
    ModelControlOff {
        /// The refused RPC.
        rpc: &'static str,
        /// The model it named.
        model: String,
    },
}

impl WorkerError {
    pub(crate) fn invalid(message: impl Into<String>) -> WorkerError {
        WorkerError::InvalidRequest(message.into())
    }
}

impl WorkerError {
    /// The gRPC code a client gets for this error.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            WorkerError::UnknownModel { .. } | WorkerError::UnknownVersion { .. } => Code::NotFound,
            WorkerError::InvalidRequest(_) | WorkerError::Config(_) => Code::InvalidArgument,
            WorkerError::OverBudget { .. } => Code::ResourceExhausted,
            WorkerError::Load { .. } | WorkerError::Runtime(_) => Code::FailedPrecondition,
            WorkerError::Inference { .. } | WorkerError::Serve(_) => Code::Internal,
            WorkerError::Unavailable(_) | WorkerError::ModelControlOff { .. } => Code::Unavailable,
            WorkerError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            WorkerError::Unimplemented(_) => Code::Unimplemented,
        }
    }
}

impl From<aviary::parameters::ParameterError> for WorkerError {
    fn from(error: aviary::parameters::ParameterError) -> WorkerError {
        WorkerError::InvalidRequest(error.to_string())
    }
}

impl From<WorkerError> for tonic::Status {
    fn from(error: WorkerError) -> tonic::Status {
        tonic::Status::new(error.code(), error.to_string())
    }
}
