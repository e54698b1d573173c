//! The gateway's front v2 service: resolves each request's version from the current
//! routing snapshot, calls that version's backend, and says which version answered
//! (`model_version` and the `x-aviary-variant` response header).

use std::{
    cell::RefCell,
    collections::{BTreeSet, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use arc_swap::ArcSwap;
use aviary::pb::inference::{
    CudaSharedMemoryRegisterRequest, CudaSharedMemoryRegisterResponse,
    CudaSharedMemoryStatusRequest, CudaSharedMemoryStatusResponse,
    CudaSharedMemoryUnregisterRequest, CudaSharedMemoryUnregisterResponse, InferParameter,
    LogSettingsRequest, LogSettingsResponse, ModelConfigRequest, ModelConfigResponse,
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ModelRepositoryParameter, ModelStatisticsRequest,
    ModelStatisticsResponse, RepositoryIndexRequest, RepositoryIndexResponse,
    RepositoryModelLoadRequest, RepositoryModelLoadResponse, RepositoryModelUnloadRequest,
    RepositoryModelUnloadResponse, ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest,
    ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
    SystemSharedMemoryRegisterRequest, SystemSharedMemoryRegisterResponse,
    SystemSharedMemoryStatusRequest, SystemSharedMemoryStatusResponse,
    SystemSharedMemoryUnregisterRequest, SystemSharedMemoryUnregisterResponse, TraceSettingRequest,
    TraceSettingResponse, grpc_inference_service_server::GrpcInferenceService,
    model_repository_parameter,
};
use aviary::server::{InferStream, grpc_timeout, server_metadata, stream_responses};
use aviary::telemetry::{self, RequestTrace, TRACE_ID_HEADER};
use aviary::{parameters, shared_memory};
use aviary_router::{DecisionReason, RequestAttributes, RouteError};
use aviary_worker::ModelControl;
use rand::{SeedableRng, rngs::SmallRng};
use tonic::{
    Request, Response, Status, Streaming,
    metadata::{MetadataMap, MetadataValue},
};

use tower::ServiceExt;
use tracing::Instrument;

use crate::{
    GatewayError,
    audit::prediction::PendingPrediction,
    auth::Identity,
    cache::{CACHE_HEADER, CACHE_PARAMETER, PredictionCache, take_fingerprint},
    control::Control,
    dead_letters::DeadLetters,
    metrics::{Metrics, StandIn},
    route::Route,
    routing::Routing,
    sequences::{Placement, Sequences},
    stack::{Call, Deadline},
};

/// Response header naming the variant (version) that served the request.
pub const VARIANT_HEADER: &str = "x-aviary-variant";

/// Response parameter (and header) set when a fallback served the request: the
/// `model/version` that failed it.
pub const FALLBACK_PARAMETER: &str = "aviary_fallback_for";

/// Response header of a request a fallback served: the `model/version` that failed it.
pub const FALLBACK_HEADER: &str = "x-aviary-fallback-for";

/// Response parameter (and header) set when a call was answered with its version's
/// default prediction: the `model/version` that failed it.
pub const DEFAULT_PARAMETER: &str = "aviary_default_for";

/// Response header of a request answered with a default prediction.
pub const DEFAULT_HEADER: &str = "x-aviary-default-for";

/// Whether a finally failed request belongs in the dead-letter queue: anything the
/// gateway or its workers failed (sending it again later may work), not a request
/// that was wrong.
fn kept_as_dead_letter(error: &GatewayError) -> bool {
    matches!(
        error,
        GatewayError::DeadlineExceeded { .. } | GatewayError::Overloaded { .. }
    ) || falls_back(error)
}

/// Whether a failed call goes to the route's fallback: the version failed or could not
/// be reached. Not a bad request (the fallback would refuse it too), not an overload
/// (shedding is meant to be felt), not a passed deadline (nothing is left of it).
fn falls_back(error: &GatewayError) -> bool {
    match error {
        GatewayError::BreakerOpen { .. } | GatewayError::Unreachable(_) => true,
        GatewayError::DeadlineExceeded { .. } => false,
        other => other.is_backend_failure(),
    }
}

/// What the router decided for a request: its version and why, and Triton's `timeout`
/// parameter if it sent one.
struct Decided<'a> {
    version: &'a str,
    reason: DecisionReason,
    timeout: Option<std::time::Duration>,
}

/// What a default prediction needs of the request it answers: its id, its rows (the
/// first input's first dimension) and the outputs it asks for; and whether it asks for
/// classes, which a card's default outputs are not (such a request is not answered
/// with them).
struct DefaultShape {
    id: String,
    rows: i64,
    requested: Vec<String>,
    classified: bool,
}

impl DefaultShape {
    fn of(request: &ModelInferRequest) -> DefaultShape {
        DefaultShape {
            id: request.id.clone(),
            rows: request
                .inputs
                .first()
                .and_then(|input| input.shape.first())
                .copied()
                .unwrap_or(1),
            requested: request.outputs.iter().map(|o| o.name.clone()).collect(),
            classified: request
                .outputs
                .iter()
                .any(|o| o.parameters.contains_key(parameters::CLASSIFICATION)),
        }
    }
}

/// A response parameter holding `text`.
fn string_parameter(text: String) -> InferParameter {
    InferParameter {
        parameter_choice: Some(
            aviary::pb::inference::infer_parameter::ParameterChoice::StringParam(text),
        ),
    }
}

/// What match rules and sticky keys read from a request: gRPC headers and string
/// parameters.
struct RequestView<'a> {
    metadata: &'a MetadataMap,
    parameters: &'a HashMap<String, InferParameter>,
}

impl RequestAttributes for RequestView<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.metadata.get(name)?.to_str().ok()
    }

    fn parameter(&self, name: &str) -> Option<&str> {
        match self.parameters.get(name)?.parameter_choice.as_ref()? {
            aviary::pb::inference::infer_parameter::ParameterChoice::StringParam(value) => {
                Some(value)
            }
            _ => None,
        }
    }
}

thread_local! {
    // A fast per-thread generator for unpinned splits; seeded from the OS once per thread.
    static SPLIT_RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_os_rng());
}

/// The RepositoryModelUnload parameter (bool) that unloads a model whose versions
/// still have weight; its route comes back from the config file when it is loaded.
pub const FORCE_PARAMETER: &str = "force";

/// State the front service shares with the rest of the gateway.
#[derive(Debug, Clone)]
pub struct Front {
    routing: Arc<ArcSwap<Routing>>,
    control: Arc<Control>,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    dead_letters: Option<Arc<DeadLetters>>,
    cache: Arc<PredictionCache>,
    model_control: ModelControl,
    sequences: Sequences,
    shared_memory: Arc<shared_memory::Registry>,
}

impl Front {
    /// A front over `control`'s routing; `ready` is kept up to date by the readiness
    /// task, every routed request is counted in `metrics`, and routes that opt in are
    /// answered from `cache` when it holds their answer.
    pub fn new(
        control: Arc<Control>,
        ready: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
        cache: Arc<PredictionCache>,
    ) -> Front {
        Front {
            routing: Arc::clone(control.routing()),
            control,
            ready,
            metrics,
            dead_letters: None,
            cache,
            model_control: ModelControl::default(),
            sequences: Sequences::default(),
            shared_memory: Arc::default(),
        }
    }

    /// Holds what one request reads from shared memory to `bytes` (the message limit).
    pub fn with_message_limit(mut self, bytes: usize) -> Front {
        self.shared_memory = Arc::new(shared_memory::Registry::new(bytes as u64));
        self
    }

    /// Keeps sequences on their versions in `sequences` (its idle timeout).
    pub fn with_sequences(mut self, sequences: Sequences) -> Front {
        self.sequences = sequences;
        self
    }

    /// Serves Triton's RepositoryModelLoad and RepositoryModelUnload as
    /// `model_control` says (refused by default).
    pub fn with_model_control(mut self, model_control: ModelControl) -> Front {
        self.model_control = model_control;
        self
    }

    /// Keeps the requests that finally failed on routes with `dead_letters = true`.
    pub fn with_dead_letters(mut self, dead_letters: Arc<DeadLetters>) -> Front {
        self.dead_letters = Some(dead_letters);
        self
    }

    /// Routes and runs one inference. `metadata` (the call's gRPC headers) and the
    /// request's string parameters feed match rules and sticky routing keys.
    pub async fn infer(
        &self,
        metadata: &MetadataMap,
        request: ModelInferRequest,
    ) -> Result<ModelInferResponse, GatewayError> {
        let routing = self.routing.load_full();
        let route = routing.routes.get(&request.model_name);
        // Every parameter is one this gateway acts on, passes on to its worker, or
        // refuses: a route's routing parameters are known only on that route.
        let asked = parameters::read_request(&request.parameters, |name| {
            route.is_some_and(|r| r.routing_parameters().any(|p| p == name))
        })
        .map_err(GatewayError::from)?;
        let pinned = Some(request.model_version.as_str()).filter(|v| !v.is_empty());
        let placement = asked
            .sequence
            .as_ref()
            .map(|sequence| self.sequences.place(&request.model_name, sequence, pinned))
            .transpose()?;
        let (version, reason) = {
            let attributes = RequestView {
                metadata,
                parameters: &request.parameters,
            };
            let (version, reason) = SPLIT_RNG.with_borrow_mut(|rng| {
                let (pinned, reason) = match &placement {
                    Some(Placement::Continue(version)) => {
                        (Some(&**version), Some(DecisionReason::Sequence))
                    }
                    _ => (pinned, None),
                };
                routing
                    .table
                    .resolve_with(&request.model_name, pinned, &attributes, rng)
                    .map(|d| (d.version.to_owned(), reason.unwrap_or(d.reason)))
            })?;
            match (reason, route) {
                (DecisionReason::Sticky, Some(route)) if route.bandit.is_some() => (
                    self.kept_assignment(
                        &routing,
                        route,
                        &request.model_name,
                        &attributes,
                        version,
                    ),
                    reason,
                ),
                _ => (version, reason),
            }
        };
        if telemetry::tracing_on() {
            let span = tracing::Span::current();
            span.record("aviary.version", version.as_str());
            span.record("aviary.route.reason", reason.as_str());
        }
        let model = request.model_name.clone();
        let decided = Decided {
            version: &version,
            reason,
            timeout: asked.timeout,
        };
        let result = self.serve(&routing, metadata, request, decided).await;
        if let (Some(sequence), Ok(response)) = (&asked.sequence, &result) {
            // Held on the version only once it answered the start itself (not a
            // stand-in); released by any answer to the end.
            let answered_itself = response.model_name == model && response.model_version == version;
            let started = matches!(placement, Some(Placement::Start));
            self.sequences
                .settle(&model, sequence, &version, started && answered_itself);
        }
        result
    }

    /// Serves `request` on the version `decided` says: from the cache when it holds
    /// the answer, else through the version's request path, its fallback and its
    /// default prediction.
    async fn serve(
        &self,
        routing: &Routing,
        metadata: &MetadataMap,
        mut request: ModelInferRequest,
        decided: Decided<'_>,
    ) -> Result<ModelInferResponse, GatewayError> {
        let Decided {
            version,
            reason,
            timeout,
        } = decided;
        let route = routing.routes.get(&request.model_name);
        let attributes = RequestView {
            metadata,
            parameters: &request.parameters,
        };
        let audit = self.control.audit();
        let audited = audit.samples_prediction().then(|| {
            let compiled = routing.table.route(&request.model_name);
            PendingPrediction::begin(audit, compiled, &request, &attributes, reason.as_str())
        });
        let arrived = Instant::now();
        let cacheable = route.and_then(|r| PredictionCache::cacheable(r, &request));
        if let Some(cacheable) = &cacheable {
            let held = (request.model_name.as_str(), version);
            if let Some(hit) = self
                .cache
                .lookup(routing, cacheable, held, &self.metrics)
                .await
            {
                // Not a request the version served: its metrics judge real inferences.
                let hit = Ok(hit);
                if let Some(audited) = audited {
                    audited.finish(audit, &request.model_name, version, &hit, arrived.elapsed());
                }
                return hit;
            }
        }
        // The request as the client sent it, for the dead-letter queue if it fails.
        let original = self
            .dead_letters
            .as_ref()
            .filter(|_| route.is_some_and(|r| r.dead_letters))
            .map(|letters| (Arc::clone(letters), request.clone()));
        // From here on the request belongs to `version`: its outcome counts for it.
        let model = request.model_name.clone();
        let started = Instant::now();
        let limits = route.map(|r| r.limits_of(version)).unwrap_or_default();
        // Triton's `timeout` parameter is a deadline too; the earlier one counts.
        let client_timeout = match (grpc_timeout(metadata), timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let deadline = limits.deadline(client_timeout, started);
        request.model_version = version.to_owned();
        if let Some(route) = route {
            // Consumed here: no worker (the fallback's neither) has anything to do with
            // them.
            for name in route.routing_parameters() {
                request.parameters.remove(name);
            }
        }
        // Only a route with a fallback pays for a copy of the request.
        let fallback = route
            .and_then(|r| r.fallback.as_ref())
            .filter(|(m, v)| (m.as_str(), v.as_str()) != (model.as_str(), version))
            .map(|target| (target.clone(), request.clone()));
        let default_shape = route
            .filter(|r| r.default_prediction)
            .map(|_| DefaultShape::of(&request));
        apply_input_rules_mode(&mut request, route.and_then(|r| r.input_rules_mode));
        let mut result = self.call(routing, request, deadline).await;
        let code = result
            .as_ref()
            .map_or_else(|e| e.status().code(), |_| tonic::Code::Ok);
        self.metrics
            .record_call(&model, version, reason, code, started.elapsed());
        // Only the version's own successful answer is kept, never a stand-in's.
        if let (Ok(response), Some(cacheable)) = (&mut result, &cacheable) {
            let answered = (model.as_str(), version);
            self.cache
                .store(cacheable, answered, response, &self.metrics);
        }
        let result = self
            .fall_back(routing, result, fallback, deadline, &model, version)
            .await;
        // A call answered with a default prediction is kept too: its real prediction
        // is still missing.
        if let (Err(error), Some((letters, original))) = (&result, original)
            && kept_as_dead_letter(error)
        {
            letters.keep(&model, version, &error.status(), &original);
        }
        let mut result = match (result, default_shape) {
            (Err(error), Some(shape)) if falls_back(&error) && !shape.classified => {
                self.answer_default(error, shape, &model, version)
            }
            (result, _) => result,
        };
        if let Some(audited) = audited {
            audited.finish(audit, &model, version, &result, arrived.elapsed());
        }
        // Which weights answered is the gateway's business, not the client's.
        if let Ok(response) = &mut result {
            take_fingerprint(response);
        }
        result
    }

    /// [`Front::infer`], traced as the request's trace decision says: in a span of its
    /// own when its trace is recorded (whose id is returned too), else passing the
    /// caller's trace context on to the workers it calls.
    async fn infer_traced(
        &self,
        metadata: &MetadataMap,
        mut request: ModelInferRequest,
    ) -> (Result<ModelInferResponse, GatewayError>, Option<String>) {
        // Inputs in shared memory are read (and outputs placed) here, on the host the
        // client shares memory with, before routing: workers get plain requests.
        let placements = match self.shared_memory.take_inputs(&mut request) {
            Ok(placements) => placements,
            Err(error) => return (Err(error.into()), None),
        };
        let (result, trace_id) = self.infer_routed(metadata, request).await;
        let result = result.and_then(|mut response| {
            self.shared_memory
                .place_outputs(&mut response, &placements)
                .map(|()| response)
                .map_err(GatewayError::from)
        });
        (result, trace_id)
    }

    /// [`Front::infer`], traced as the request's trace decision says.
    async fn infer_routed(
        &self,
        metadata: &MetadataMap,
        request: ModelInferRequest,
    ) -> (Result<ModelInferResponse, GatewayError>, Option<String>) {
        match telemetry::decide(metadata.as_ref()) {
            None => (self.infer(metadata, request).await, None),
            Some(RequestTrace::Passed(passed)) => (
                telemetry::passing(passed, self.infer(metadata, request)).await,
                None,
            ),
            Some(RequestTrace::Recorded(parent)) => {
                let span = telemetry::infer_server_span(&request.model_name, None);
                telemetry::set_parent(&span, parent);
                let result = self.infer(metadata, request).instrument(span.clone()).await;
                end_span(&span, result.as_ref().err());
                (result, telemetry::trace_id(&span))
            }
        }
    }

    /// `result`, or when it failed and the route has a `fallback`, the fallback's
    /// answer, marked as such.
    async fn fall_back(
        &self,
        routing: &Routing,
        result: Result<ModelInferResponse, GatewayError>,
        fallback: Option<((String, String), ModelInferRequest)>,
        deadline: Deadline,
        model: &str,
        version: &str,
    ) -> Result<ModelInferResponse, GatewayError> {
        match (result, fallback) {
            (Err(error), Some(((to_model, to_version), mut copy))) if falls_back(&error) => {
                tracing::debug!(model, version, %error, to_model, to_version, "served by the fallback");
                apply_input_rules_mode(
                    &mut copy,
                    routing
                        .routes
                        .get(&to_model)
                        .and_then(|r| r.input_rules_mode),
                );
                copy.model_name = to_model;
                copy.model_version = to_version;
                let served = self.call(routing, copy, deadline).await;
                if served.is_ok() {
                    self.metrics
                        .record_stand_in(model, version, StandIn::Fallback);
                }
                served.map(|mut response| {
                    response.parameters.insert(
                        FALLBACK_PARAMETER.to_owned(),
                        string_parameter(format!("{model}/{version}")),
                    );
                    response
                })
            }
            (result, _) => result,
        }
    }

    /// On a bandit route, a sticky user stays on the version it was first given while
    /// that version still takes unpinned traffic; only new users follow the current
    /// shares (`decided`).
    fn kept_assignment(
        &self,
        routing: &Routing,
        route: &Route,
        model: &str,
        attributes: &RequestView<'_>,
        decided: String,
    ) -> String {
        let Some(key) = routing
            .table
            .route(model)
            .and_then(|r| r.sticky_key(attributes))
        else {
            return decided;
        };
        let bandits = self.control.bandits();
        let serves = |version: &str| {
            route
                .versions
                .iter()
                .any(|v| v.version == version && v.weight > 0)
                && bandits.keeps_users(model, version)
        };
        bandits.assignments().keep(model, key, &decided, serves)
    }

    /// The default prediction of `model` at `version` shaped for the failed request, or
    /// `error` when the gateway holds none (the card states none, or it was never
    /// fetched).
    fn answer_default(
        &self,
        error: GatewayError,
        shape: DefaultShape,
        model: &str,
        version: &str,
    ) -> Result<ModelInferResponse, GatewayError> {
        let Some(prediction) = self.control.defaults().get(model, version) else {
            return Err(error);
        };
        tracing::debug!(model, version, %error, "answered with the default prediction");
        self.metrics
            .record_stand_in(model, version, StandIn::Default);
        let (outputs, raw) = prediction
            .outputs(shape.rows, &shape.requested)
            .into_iter()
            .map(|(tensor, raw)| (tensor, raw.into()))
            .unzip();
        Ok(ModelInferResponse {
            model_name: model.to_owned(),
            model_version: version.to_owned(),
            id: shape.id,
            parameters: HashMap::from([(
                DEFAULT_PARAMETER.to_owned(),
                string_parameter(format!("{model}/{version}")),
            )]),
            outputs,
            raw_output_contents: raw,
        })
    }

    /// Calls the version the request names through its request path (deadline, load
    /// shedding, breaker), and mirrors it if chosen.
    async fn call(
        &self,
        routing: &Routing,
        request: ModelInferRequest,
        deadline: Deadline,
    ) -> Result<ModelInferResponse, GatewayError> {
        let service = routing
            .service(&request.model_name, &request.model_version)?
            .clone();
        // The shadow coin is flipped first so only mirrored requests are copied.
        let mirror = routing
            .mirror(&request.model_name)
            .filter(|mirror| SPLIT_RNG.with_borrow_mut(|rng| mirror.chosen(rng)));
        let copy = mirror.map(|_| request.clone());
        if telemetry::tracing_on() {
            tracing::Span::current().record("aviary.shadow", mirror.is_some());
        }
        let response = service.oneshot(Call::new(request, Some(deadline))).await?;
        if let (Some(mirror), Some(copy)) = (mirror, copy) {
            mirror.enqueue(copy, &response);
        }
        Ok(response)
    }

    fn resolve_version(
        &self,
        routing: &Routing,
        model: &str,
        version: &str,
    ) -> Result<String, GatewayError> {
        if version.is_empty() {
            return routing
                .primary_version(model)
                .map(str::to_owned)
                .ok_or_else(|| {
                    GatewayError::Route(RouteError::UnknownModel {
                        model: model.to_owned(),
                    })
                });
        }
        let route = routing
            .table
            .route(model)
            .ok_or_else(|| RouteError::UnknownModel {
                model: model.to_owned(),
            })?;
        if route.versions().any(|(v, _)| v == version) {
            Ok(version.to_owned())
        } else {
            Err(GatewayError::Route(RouteError::UnknownVersion {
                model: model.to_owned(),
                version: version.to_owned(),
                routable: route.versions().map(|(v, _)| v.to_owned()).collect(),
            }))
        }
    }
}

/// Sets a route's input-rule mode on a request for its version's worker; without one,
/// the request carries none (a client's own was refused), and the card's mode holds.
fn apply_input_rules_mode(
    request: &mut ModelInferRequest,
    mode: Option<aviary_worker::input_rules::RuleMode>,
) {
    use aviary_worker::input_rules::MODE_PARAMETER;
    match mode {
        Some(mode) => {
            request.parameters.insert(
                MODE_PARAMETER.to_owned(),
                InferParameter {
                    parameter_choice: Some(
                        aviary::pb::inference::infer_parameter::ParameterChoice::StringParam(
                            mode.as_str().to_owned(),
                        ),
                    ),
                },
            );
        }
        None => {
            request.parameters.remove(MODE_PARAMETER);
        }
    }
}

/// Records how the request of `span` ended.
fn end_span(span: &tracing::Span, error: Option<&GatewayError>) {
    match error {
        None => telemetry::record_outcome(span, tonic::Code::Ok, ""),
        Some(error) => {
            let status = error.status();
            telemetry::record_outcome(span, status.code(), status.message());
        }
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Front {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        let ready = self.ready.load(Ordering::Relaxed);
        Ok(Response::new(ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        let routing = self.routing.load_full();
        let versions: Vec<String> = if request.version.is_empty() {
            routing
                .table
                .route(&request.name)
                .map(|r| {
                    r.versions()
                        .filter(|(_, w)| *w > 0)
                        .map(|(v, _)| v.to_owned())
                        .collect()
                })
                .unwrap_or_default()
        } else {
            self.resolve_version(&routing, &request.name, &request.version)
                .map(|v| vec![v])
                .unwrap_or_default()
        };
        let mut ready = !versions.is_empty();
        for version in versions {
            let Ok(backend) = routing.backend(&request.name, &version) else {
                ready = false;
                break;
            };
            if !backend.ready(request.name.clone(), version).await {
                ready = false;
                break;
            }
        }
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(server_metadata()))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let routing = self.routing.load_full();
        let version = self.resolve_version(&routing, &request.name, &request.version)?;
        let backend = routing.backend(&request.name, &version)?;
        let mut metadata = backend.metadata(request.name.clone(), version).await?;
        // Clients see the versions the gateway routes, not what one worker holds.
        metadata.versions = routing
            .table
            .route(&request.name)
            .map(|r| r.versions().map(|(v, _)| v.to_owned()).collect())
            .unwrap_or_default();
        Ok(Response::new(metadata))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let (metadata, extensions, request) = request.into_parts();
        if let Some(caller) = extensions.get::<Arc<Identity>>() {
            caller.may_infer(&request.model_name)?;
        }
        let (result, trace_id) = self.infer_traced(&metadata, request).await;
        let trace_id = trace_id.and_then(|id| MetadataValue::try_from(id).ok());
        let response = match (result, trace_id.clone()) {
            (Ok(response), _) => response,
            (Err(error), trace_id) => {
                let mut status = Status::from(error);
                if let Some(id) = trace_id {
                    status.metadata_mut().insert(TRACE_ID_HEADER, id);
                }
                return Err(status);
            }
        };
        let variant = MetadataValue::try_from(response.model_version.as_str())
            .map_err(|_| Status::internal("version is not a valid header value"))?;
        // A stand-in's or the cache's answer says so in a header too, for clients that
        // read headers.
        let marks: Vec<_> = [
            (FALLBACK_PARAMETER, FALLBACK_HEADER),
            (DEFAULT_PARAMETER, DEFAULT_HEADER),
            (CACHE_PARAMETER, CACHE_HEADER),
        ]
        .into_iter()
        .filter_map(
            |(parameter, header)| match response.parameters.get(parameter) {
                Some(InferParameter {
                    parameter_choice:
                        Some(aviary::pb::inference::infer_parameter::ParameterChoice::StringParam(
                            failed,
                        )),
                }) => Some((header, MetadataValue::try_from(failed.as_str()).ok()?)),
                _ => None,
            },
        )
        .collect();
        let mut response = Response::new(response);
        response.metadata_mut().insert(VARIANT_HEADER, variant);
        if let Some(id) = trace_id {
            response.metadata_mut().insert(TRACE_ID_HEADER, id);
        }
        for (header, value) in marks {
            response.metadata_mut().insert(header, value);
        }
        Ok(response)
    }

    type ModelStreamInferStream = InferStream;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<InferStream>, Status> {
        let front = self.clone();
        // The stream's headers apply to every request on it.
        let (metadata, extensions, inbound) = request.into_parts();
        let metadata = Arc::new(metadata);
        let caller = extensions.get::<Arc<Identity>>().cloned();
        // The stream's requests are served after this call returns: they run as its caller.
        let who = aviary::calls::caller();
        Ok(Response::new(stream_responses(inbound, move |r| {
            let (front, metadata, caller) = (front.clone(), Arc::clone(&metadata), caller.clone());
            let served = async move {
                if let Some(caller) = caller {
                    caller.may_infer(&r.model_name)?;
                }
                front
                    .infer_traced(&metadata, r)
                    .await
                    .0
                    .map_err(Status::from)
            };
            aviary::calls::acting_as(who.clone(), served)
        })))
    }

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        let request = request.into_inner();
        let routing = self.routing.load_full();
        let version = self.resolve_version(&routing, &request.name, &request.version)?;
        let backend = routing.backend(&request.name, &version)?;
        let config = backend.config(request.name, version).await?;
        Ok(Response::new(ModelConfigResponse {
            config: Some(config),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let request = request.into_inner();
        let routing = self.routing.load_full();
        let wanted: Vec<(String, String)> = if request.name.is_empty() {
            routing
                .routed_versions()
                .map(|(m, v)| (m.to_owned(), v.to_owned()))
                .collect()
        } else if request.version.is_empty() {
            let route = routing.table.route(&request.name).ok_or_else(|| {
                GatewayError::Route(RouteError::UnknownModel {
                    model: request.name.clone(),
                })
            })?;
            route
                .versions()
                .map(|(v, _)| (request.name.clone(), v.to_owned()))
                .collect()
        } else {
            let version = self.resolve_version(&routing, &request.name, &request.version)?;
            vec![(request.name.clone(), version)]
        };
        let mut model_stats = Vec::with_capacity(wanted.len());
        for (model, version) in wanted {
            let backend = routing.backend(&model, &version)?;
            model_stats.extend(backend.statistics(model, version).await?);
        }
        Ok(Response::new(ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let ready_only = request.into_inner().ready;
        let routing = self.routing.load_full();
        let mut seen = BTreeSet::new();
        let mut models = Vec::new();
        let mut entries = routing.worker().map(|w| w.index(false)).unwrap_or_default();
        for backend in routing.remotes() {
            entries.extend(backend.index().await?);
        }
        {
            for entry in entries {
                if ready_only && entry.state != "READY" {
                    continue;
                }
                if seen.insert((entry.name.clone(), entry.version.clone())) {
                    models.push(entry);
                }
            }
        }
        models.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        let request = request.into_inner();
        let model = request.model_name;
        self.model_control
            .allow("RepositoryModelLoad", &model)
            .map_err(GatewayError::from)?;
        let load = aviary_worker::load_request::read(
            &model,
            &request.repository_name,
            &request.parameters,
        )
        .map_err(GatewayError::from)?;
        let generation = self.control.load_model(&model, load).await?;
        tracing::info!(%model, generation, "model loaded through RepositoryModelLoad");
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        let request = request.into_inner();
        let model = request.model_name;
        self.model_control
            .allow("RepositoryModelUnload", &model)
            .map_err(GatewayError::from)?;
        // Triton's request has no force flag; a parameter carries it.
        let force = matches!(
            request.parameters.get(FORCE_PARAMETER),
            Some(ModelRepositoryParameter {
                parameter_choice: Some(model_repository_parameter::ParameterChoice::BoolParam(
                    true
                )),
            })
        );
        let generation = self.control.unload_model(&model, force).await?;
        tracing::info!(%model, generation, "model unloaded through RepositoryModelUnload");
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }

    async fn system_shared_memory_status(
        &self,
        request: Request<SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<SystemSharedMemoryStatusResponse>, Status> {
        self.shared_memory.status_call(request)
    }

    async fn system_shared_memory_register(
        &self,
        request: Request<SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<SystemSharedMemoryRegisterResponse>, Status> {
        self.shared_memory.register_call(request)
    }

    async fn system_shared_memory_unregister(
        &self,
        request: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<SystemSharedMemoryUnregisterResponse>, Status> {
        self.shared_memory.unregister_call(request)
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<CudaSharedMemoryStatusResponse>, Status> {
        Err(shared_memory::cuda_unimplemented())
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<CudaSharedMemoryRegisterResponse>, Status> {
        Err(shared_memory::cuda_unimplemented())
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<CudaSharedMemoryUnregisterResponse>, Status> {
        Err(shared_memory::cuda_unimplemented())
    }

    async fn trace_setting(
        &self,
        _: Request<TraceSettingRequest>,
    ) -> Result<Response<TraceSettingResponse>, Status> {
        Err(aviary::server::trace_setting_unimplemented())
    }

    async fn log_settings(
        &self,
        _: Request<LogSettingsRequest>,
    ) -> Result<Response<LogSettingsResponse>, Status> {
        Err(aviary::server::log_settings_unimplemented())
    }
}
