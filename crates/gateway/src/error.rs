//! The gateway's one error type, and its mapping to gRPC statuses (the only place the
//! gateway turns errors into `tonic::Status`).

use aviary_router::{RouteError, ValidationErrors, rollout::CommandError};
use aviary_worker::WorkerError;

/// Everything that can go wrong in the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No route, or the pinned version is not routable.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The in-process worker refused or failed the request.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// The client's request asks for something the gateway refuses: a parameter it
    /// does not know, a sequence it does not hold.
    #[error("{0}")]
    InvalidRequest(String),
    /// A request's shared memory region could not be read or written.
    #[error(transparent)]
    SharedMemory(#[from] aviary::shared_memory::SharedMemoryError),
    /// A remote worker answered with an error status.
    #[error("{}", .status.message())]
    Remote {
        /// The worker's address.
        endpoint: String,
        /// The worker's status, passed on with its code.
        status: tonic::Status,
    },
    /// The configuration file could not be read or is invalid.
    #[error("config {path}: {message}")]
    Config {
        /// The file.
        path: String,
        /// Every problem found, one per line.
        message: String,
    },
    /// The route table does not fit what the backends serve.
    #[error("invalid routes:\n{0}")]
    Routes(#[from] ValidationErrors),
    /// A compare-and-set route change lost the race.
    #[error(
        "route table is at generation {current}, not {expected}; read the routes again and retry"
    )]
    GenerationMismatch {
        /// The generation the caller expected.
        expected: u64,
        /// The table's generation.
        current: u64,
    },
    /// The change is valid but not allowed in the current state.
    #[error("{0}")]
    Refused(String),
    /// A route change would move weights that a running rollout holds.
    #[error(
        "model \"{model}\" is in a running rollout that holds its weights ({weights}); \
         promote or abort it first (aviary ctl rollout promote|abort; a paused rollout still holds them)"
    )]
    HeldByRollout {
        /// The model.
        model: String,
        /// The weights held.
        weights: String,
    },
    /// A version that is not approved would take more unpinned traffic than the
    /// registry's canary cap.
    #[error(
        "model \"{model}\" version {version} is at stage {stage}, not approved: it may take at most \
         {cap_percent}% of unpinned traffic ([registry] canary_cap_percent), not {share}%; \
         approve it first (aviary ctl approve {model} {version}), or pin or shadow it"
    )]
    NotApproved {
        /// The model.
        model: String,
        /// The version.
        version: String,
        /// Its stage.
        stage: &'static str,
        /// The share asked for, in percent.
        share: String,
        /// The cap, in percent.
        cap_percent: u32,
    },
    /// Fault injection failed this request on purpose.
    #[error(
        "injected fault: model \"{model}\" version \"{version}\" is configured to fail a share of requests"
    )]
    InjectedFault {
        /// The model.
        model: String,
        /// The version.
        version: String,
    },
    /// A rollout plan cannot start: every problem, each with its path.
    #[error("invalid rollout:\n{}", .0.join("\n"))]
    InvalidRollout(Vec<String>),
    /// An operator command the rollout's state does not allow.
    #[error(transparent)]
    RolloutCommand(#[from] CommandError),
    /// The model has no rollout.
    #[error("model \"{model}\" has no rollout; start one with `aviary ctl rollout start`")]
    NoRollout {
        /// The model.
        model: String,
    },
    /// The version has as many calls in flight and waiting as its limits allow.
    #[error(
        "model \"{model}\" version \"{version}\" is at its limit ({in_flight} requests in flight and {queued} waiting); retry later"
    )]
    Overloaded {
        /// The model.
        model: String,
        /// The version.
        version: String,
        /// Its `max_in_flight`.
        in_flight: usize,
        /// Its `max_queue`.
        queued: usize,
    },
    /// The version failed so often that calls to it fail fast for a while.
    #[error(
        "model \"{model}\" version \"{version}\" is failing: its circuit breaker is open (next try in {retry_in_ms} ms)"
    )]
    BreakerOpen {
        /// The model.
        model: String,
        /// The version.
        version: String,
        /// When a probe call will be let through.
        retry_in_ms: u128,
    },
    /// The call's deadline passed before the version answered.
    #[error(
        "model \"{model}\" version \"{version}\" did not answer within the deadline ({after_ms} ms)"
    )]
    DeadlineExceeded {
        /// The model.
        model: String,
        /// The version.
        version: String,
        /// How long the call ran.
        after_ms: u128,
    },
    /// Other servers (a controller's gateways) could not be reached.
    #[error("{0}")]
    Unreachable(String),
    /// A server (inference or admin) could not start or stopped with an error.
    #[error(transparent)]
    Serve(#[from] aviary::server::ServeError),
    /// The audit trail could not be read.
    #[error("audit trail: {0}")]
    AuditTrail(String),
    /// A model source (an MLflow registry) could not give a version.
    #[error("model source: {0}")]
    Source(#[from] crate::sources::SourceError),
    /// A routed version has no backend (a bug in building the routing snapshot).
    #[error("model \"{model}\" version \"{version}\" has no backend")]
    NoBackend {
        /// The model.
        model: String,
        /// The version.
        version: String,
    },
}

impl GatewayError {
    /// Whether the version itself failed the call (it is down, broken or too slow), as
    /// opposed to refusing a bad request: what a circuit breaker counts.
    pub fn is_backend_failure(&self) -> bool {
        use tonic::Code;
        match self {
            GatewayError::Remote { status, .. } => matches!(
                status.code(),
                Code::Unavailable | Code::Internal | Code::Unknown | Code::DeadlineExceeded
            ),
            GatewayError::Worker(error) => matches!(
                error.code(),
                Code::Unavailable | Code::Internal | Code::DeadlineExceeded
            ),
            GatewayError::InjectedFault { .. }
            | GatewayError::NoBackend { .. }
            | GatewayError::DeadlineExceeded { .. } => true,
            _ => false,
        }
    }

    /// Whether the call's deadline passed: the gateway's own timer, or the worker's
    /// answer to the deadline the gateway passed on.
    pub fn is_deadline(&self) -> bool {
        match self {
            GatewayError::DeadlineExceeded { .. } => true,
            GatewayError::Remote { status, .. } => status.code() == tonic::Code::DeadlineExceeded,
            GatewayError::Worker(error) => error.code() == tonic::Code::DeadlineExceeded,
            _ => false,
        }
    }
}

impl GatewayError {
    /// The status a client gets for this error (the one place the gateway maps them).
    pub fn status(&self) -> tonic::Status {
        let message = self.to_string();
        match self {
            // Only the registry makes a route pinned-only: a model none of whose
            // versions is approved yet.
            GatewayError::Route(RouteError::PinnedOnly { model, .. }) => {
                tonic::Status::failed_precondition(format!(
                    "{message} ([registry]: a version takes unpinned traffic once approved, \
                     aviary ctl approve {model} VERSION)"
                ))
            }
            GatewayError::Route(_) => tonic::Status::not_found(message),
            GatewayError::Worker(e) => tonic::Status::new(e.code(), message),
            GatewayError::SharedMemory(e) => tonic::Status::new(e.code(), message),
            GatewayError::InvalidRequest(_) => tonic::Status::invalid_argument(message),
            GatewayError::Remote { endpoint, status } => {
                if status.code() == tonic::Code::Unavailable {
                    tonic::Status::unavailable(format!(
                        "worker {endpoint} unavailable: {}",
                        status.message()
                    ))
                } else {
                    tonic::Status::new(status.code(), status.message())
                }
            }
            // Only route changes (admin API) reach a client with these: the change is invalid.
            GatewayError::Config { .. }
            | GatewayError::Routes(_)
            | GatewayError::InvalidRollout(_) => tonic::Status::invalid_argument(message),
            GatewayError::GenerationMismatch { .. }
            | GatewayError::Refused(_)
            | GatewayError::HeldByRollout { .. }
            | GatewayError::NotApproved { .. }
            | GatewayError::RolloutCommand(_) => tonic::Status::failed_precondition(message),
            GatewayError::NoRollout { .. } => tonic::Status::not_found(message),
            GatewayError::NoBackend { .. }
            | GatewayError::Unreachable(_)
            | GatewayError::BreakerOpen { .. } => tonic::Status::unavailable(message),
            GatewayError::Overloaded { .. } => tonic::Status::resource_exhausted(message),
            GatewayError::DeadlineExceeded { .. } => tonic::Status::deadline_exceeded(message),
            GatewayError::InjectedFault { .. }
            | GatewayError::Serve(_)
            | GatewayError::AuditTrail(_) => tonic::Status::internal(message),
            GatewayError::Source(error) => tonic::Status::new(error.code(), message),
        }
    }
}

impl From<aviary::parameters::ParameterError> for GatewayError {
    fn from(error: aviary::parameters::ParameterError) -> GatewayError {
        GatewayError::InvalidRequest(error.to_string())
    }
}

impl From<GatewayError> for tonic::Status {
    fn from(error: GatewayError) -> tonic::Status {
        error.status()
    }
}
