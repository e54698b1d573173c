//! Distributed tracing for every Aviary server: the OTLP/gRPC export pipeline, the W3C
//! trace context in and out of gRPC metadata, spans built from a request's measured
//! stage times, and the counts of spans exported, dropped and failed (on `/metrics`).
//!
//! Tracing is off unless an OTLP endpoint is configured (`[tracing] endpoint` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`): [`tracing_on`] is then false and the request path
//! makes no span at all. When on, spans go through a bounded queue to a background
//! exporter: a full queue drops spans (counted) and an unreachable collector fails
//! exports (counted); neither ever blocks or fails a request.
//!
//! The request spans themselves are `tracing` spans of target [`SPAN_TARGET`], which
//! `tracing-opentelemetry` turns into OpenTelemetry spans; the servers' logs leave that
//! target out.

use std::{
    future::Future,
    sync::{
        OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{Span as _, SpanKind, TraceContextExt, Tracer, TracerProvider},
};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    propagation::TraceContextPropagator,
    trace::{
        BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, Span,
        SpanData, SpanExporter, SpanProcessor,
    },
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of every request span (filtered out of the logs, kept for traces).
pub const SPAN_TARGET: &str = "aviary::trace";

/// The response header that carries the trace id of the request's trace.
pub const TRACE_ID_HEADER: &str = "x-aviary-trace-id";

/// Spans a batch export sends at most.
const EXPORT_BATCH: usize = 512;

/// Spans waiting for export at most, unless `[tracing] queue_size` or
/// `OTEL_BSP_MAX_QUEUE_SIZE` says otherwise.
const DEFAULT_QUEUE: usize = 2048;

static ON: AtomicBool = AtomicBool::new(false);
static TRACER: OnceLock<SdkTracer> = OnceLock::new();
static SAMPLING: OnceLock<Sampling> = OnceLock::new();
static EXPORTED: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);

/// Whether this process exports traces: the request path makes spans only then.
#[inline]
pub fn tracing_on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// How a process exports traces; each field left `None` falls to the standard
/// `OTEL_*` environment variable, then to the default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TracingSettings {
    /// The OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`
    /// (`OTEL_EXPORTER_OTLP_ENDPOINT`). Tracing is off when neither is set.
    pub endpoint: Option<String>,
    /// `service.name` of the spans (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`;
    /// default: the process's role, e.g. `aviary-gateway`).
    pub service_name: Option<String>,
    /// The share of traces started here that are kept, 0 to 1; a client's or a
    /// gateway's sampling decision is followed (`OTEL_TRACES_SAMPLER`/`_ARG`;
    /// default: all).
    pub sample_ratio: Option<f64>,
    /// Spans waiting for export at most; more are dropped and counted
    /// (`OTEL_BSP_MAX_QUEUE_SIZE`; default 2048).
    pub queue_size: Option<usize>,
}

/// A setting the exporter cannot work with.
#[derive(Debug, thiserror::Error)]
#[error("tracing: {0}")]
pub struct TracingError(String);

/// The running export pipeline; [`Tracing::shutdown`] sends what is still queued.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Starts exporting per `settings` and the `OTEL_*` environment, or `None` when
    /// no endpoint is configured (or `OTEL_SDK_DISABLED=true`,
    /// `OTEL_TRACES_EXPORTER=none`). Runs inside the tokio runtime the exporter's
    /// connection lives on. `role` names the service when nothing else does.
    pub fn start(settings: &TracingSettings, role: &str) -> Result<Option<Tracing>, TracingError> {
        let env = &|name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        match env("OTEL_TRACES_EXPORTER").as_deref() {
            None | Some("otlp") => {}
            Some("none") => return Ok(None),
            Some(other) => {
                return Err(TracingError(format!(
                    "OTEL_TRACES_EXPORTER={other}: only \"otlp\" (over gRPC) and \"none\" are supported"
                )));
            }
        }
        for name in [
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ] {
            if let Some(protocol) = env(name).filter(|p| p != "grpc") {
                return Err(TracingError(format!(
                    "{name}={protocol}: only \"grpc\" is supported"
                )));
            }
        }
        let endpoint = settings
            .endpoint
            .clone()
            .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
        let Some(endpoint) = endpoint else {
            return Ok(None);
        };
        if !endpoint.starts_with("http://") {
            // Built without TLS: every export to an https:// collector would fail.
            return Err(TracingError(format!(
                "the OTLP endpoint \"{endpoint}\" is not an http:// URL (OTLP over TLS is not supported yet)"
            )));
        }
        let queue = match (settings.queue_size, env("OTEL_BSP_MAX_QUEUE_SIZE")) {
            (Some(size), _) => size,
            (None, Some(text)) => text.parse().map_err(|_| {
                TracingError(format!(
                    "OTEL_BSP_MAX_QUEUE_SIZE={text}: not a whole number"
                ))
            })?,
            (None, None) => DEFAULT_QUEUE,
        };
        if queue == 0 {
            return Err(TracingError("queue_size: must be at least 1".into()));
        }
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| TracingError(format!("the OTLP exporter: {e}")))?;
        let sampling = Sampling::configured(settings.sample_ratio, env)?;
        // Every span made is one [`decide`] chose to record, and its children.
        let provider = SdkTracerProvider::builder()
            .with_span_processor(CountingProcessor::new(exporter, queue))
            .with_resource(resource(settings, role))
            .with_sampler(Sampler::AlwaysOn)
            .build();
        let _ = SAMPLING.set(sampling);
        let _ = TRACER.set(provider.tracer("aviary"));
        ON.store(true, Ordering::Relaxed);
        Ok(Some(Tracing { provider }))
    }

    /// The tracer `tracing-opentelemetry`'s layer sends spans to.
    pub fn tracer(&self) -> SdkTracer {
        self.provider.tracer("aviary")
    }

    /// Stops making spans and sends the queued ones (for at most five seconds).
    pub async fn shutdown(self) {
        ON.store(false, Ordering::Relaxed);
        // The exporter's own thread waits on this runtime's connection: never block
        // the runtime's threads while it sends.
        let provider = self.provider;
        let sent = tokio::task::spawn_blocking(move || {
            provider.shutdown_with_timeout(Duration::from_secs(5))
        })
        .await;
        if let Ok(Err(error)) = sent {
            tracing::warn!(%error, "sending the last spans failed");
        }
    }
}

/// The resource every span carries: `service.name` from the settings, else the
/// environment (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`), else `role`.
fn resource(settings: &TracingSettings, role: &str) -> Resource {
    let from_env = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
            v.split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    let builder = Resource::builder();
    match (&settings.service_name, from_env) {
        (Some(name), _) => builder.with_service_name(name.clone()),
        (None, true) => builder,
        (None, false) => builder.with_service_name(role.to_owned()),
    }
    .build()
}

/// Spans exported, dropped because the queue was full, and lost to failed exports,
/// since the process started.
pub fn span_counts() -> [(&'static str, u64); 3] {
    [
        ("exported", EXPORTED.load(Ordering::Relaxed)),
        ("dropped", DROPPED.load(Ordering::Relaxed)),
        ("failed", FAILED.load(Ordering::Relaxed)),
    ]
}

/// The SDK's batch processor with a queue bound this side can count against: the SDK
/// drops spans from a full queue without saying how many. Spans are counted in when
/// queued and out when their export starts, so the inner queue (one batch larger)
/// never fills and every drop is one counted here.
#[derive(Debug)]
struct CountingProcessor {
    inner: BatchSpanProcessor,
    queued: std::sync::Arc<AtomicU64>,
    bound: u64,
}

impl CountingProcessor {
    fn new(exporter: opentelemetry_otlp::SpanExporter, bound: usize) -> CountingProcessor {
        let queued = std::sync::Arc::new(AtomicU64::new(0));
        let exporter = CountingExporter {
            inner: exporter,
            queued: std::sync::Arc::clone(&queued),
        };
        let config = BatchConfigBuilder::default()
            .with_max_queue_size(bound + EXPORT_BATCH)
            .with_max_export_batch_size(EXPORT_BATCH)
            .build();
        CountingProcessor {
            inner: BatchSpanProcessor::builder(exporter)
                .with_batch_config(config)
                .build(),
            queued,
            bound: bound as u64,
        }
    }
}

impl SpanProcessor for CountingProcessor {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= self.bound {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, counting what it sends and what fails.
#[derive(Debug)]
struct CountingExporter {
    inner: opentelemetry_otlp::SpanExporter,
    queued: std::sync::Arc<AtomicU64>,
}

impl SpanExporter for CountingExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        self.queued.fetch_sub(spans, Ordering::Relaxed);
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => EXPORTED.fetch_add(spans, Ordering::Relaxed),
            Err(_) => FAILED.fetch_add(spans, Ordering::Relaxed),
        };
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// How the traces that reach or start in this process are sampled. The decision is
/// this side's, made once per request before any span exists: a request whose trace
/// is not kept then costs no span at all (the SDK's own sampler would run only after
/// `tracing` had built the span).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sampling {
    /// A caller's sampled flag decides for its trace.
    parent_based: bool,
    /// The share of the other traces that are kept.
    ratio: f64,
}

impl Sampling {
    /// `[tracing] sample_ratio` (parent-based), else `OTEL_TRACES_SAMPLER`/`_ARG`, else
    /// `parentbased_always_on`.
    fn configured(
        ratio: Option<f64>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Sampling, TracingError> {
        let checked = |ratio: f64, what: &str| {
            if (0.0..=1.0).contains(&ratio) {
                Ok(ratio)
            } else {
                Err(TracingError(format!(
                    "{what}: {ratio} is not between 0 and 1"
                )))
            }
        };
        if let Some(ratio) = ratio {
            return Ok(Sampling {
                parent_based: true,
                ratio: checked(ratio, "sample_ratio")?,
            });
        }
        let argument = || match env("OTEL_TRACES_SAMPLER_ARG") {
            None => Ok(1.0),
            Some(text) => match text.trim().parse::<f64>() {
                Ok(ratio) => checked(ratio, "OTEL_TRACES_SAMPLER_ARG"),
                Err(_) => Err(TracingError(format!(
                    "OTEL_TRACES_SAMPLER_ARG={text}: not a number"
                ))),
            },
        };
        let (parent_based, ratio) = match env("OTEL_TRACES_SAMPLER").as_deref() {
            None | Some("parentbased_always_on") => (true, 1.0),
            Some("parentbased_always_off") => (true, 0.0),
            Some("parentbased_traceidratio") => (true, argument()?),
            Some("always_on") => (false, 1.0),
            Some("always_off") => (false, 0.0),
            Some("traceidratio") => (false, argument()?),
            Some(other) => {
                return Err(TracingError(format!(
                    "OTEL_TRACES_SAMPLER={other}: not supported (always_on, always_off, \
                     traceidratio and their parentbased_ forms are)"
                )));
            }
        };
        Ok(Sampling {
            parent_based,
            ratio,
        })
    }

    /// Whether to record a trace whose caller sampled it (`Some(true)`), did not
    /// (`Some(false)`), or sent none.
    fn keeps(self, caller_sampled: Option<bool>) -> bool {
        match caller_sampled {
            Some(sampled) if self.parent_based => sampled,
            _ => self.ratio >= 1.0 || (self.ratio > 0.0 && rand::random::<f64>() < self.ratio),
        }
    }
}

/// What one request does about tracing, decided when it arrives ([`decide`]).
#[derive(Debug)]
pub enum RequestTrace {
    /// Its spans are recorded, children of this context (the caller's span, or none:
    /// the request starts a trace).
    Recorded(Context),
    /// Not recorded here: the trace context to pass on to the processes it calls
    /// ([`passing`]), saying "not sampled" so they do not record a part of it either.
    Passed(Passed),
}

/// What an unrecorded request passes on to the processes it calls.
#[derive(Debug, Clone)]
pub enum Passed {
    /// The caller's trace context, as it came.
    Caller {
        /// Its `traceparent`.
        traceparent: http::HeaderValue,
        /// Its `tracestate`, if any.
        tracestate: Option<http::HeaderValue>,
    },
    /// A new trace, not sampled; its ids are drawn only when a call carries them (an
    /// embedded worker needs none).
    Unsampled,
}

tokio::task_local! {
    /// The trace context of the unrecorded request this task is serving.
    static PASSED: Passed;
}

/// Whether and how the request with `headers` is traced: `None` while tracing is off.
pub fn decide(headers: &http::HeaderMap) -> Option<RequestTrace> {
    if !tracing_on() {
        return None;
    }
    let sampling = *SAMPLING.get()?;
    let caller = headers
        .contains_key("traceparent")
        .then(|| TraceContextPropagator::new().extract(&HeaderCarrier(headers)))
        .filter(|cx| cx.span().span_context().is_valid());
    let caller_sampled = caller
        .as_ref()
        .map(|cx| cx.span().span_context().is_sampled());
    if sampling.keeps(caller_sampled) {
        return Some(RequestTrace::Recorded(caller.unwrap_or_default()));
    }
    let passed = match caller {
        Some(_) => Passed::Caller {
            traceparent: headers.get("traceparent")?.clone(),
            tracestate: headers.get("tracestate").cloned(),
        },
        None => Passed::Unsampled,
    };
    Some(RequestTrace::Passed(passed))
}

/// Runs `request` with `passed` as the trace context its calls to other processes
/// carry.
pub async fn passing<F: Future>(passed: Passed, request: F) -> F::Output {
    PASSED.scope(passed, request).await
}

/// Makes `span` a child of `parent` (a caller's span; an empty context: a new trace).
pub fn set_parent(span: &tracing::Span, parent: Context) {
    if parent.span().span_context().is_valid() {
        // Fails only when the span is not traced (its target filtered out).
        let _ = span.set_parent(parent);
    }
}

/// Whether the current task serves a request whose spans are recorded: a span made
/// now has a recorded parent (a shadow copy or a background call has none).
pub fn in_recorded_request() -> bool {
    tracing_on() && !tracing::Span::current().is_disabled()
}

/// The W3C trace context for a call the current request makes to another process:
/// the current span's (`traceparent`, `tracestate`) when it is recorded, else what an
/// unrecorded request passes on.
pub fn outgoing_headers(headers: &mut http::HeaderMap) {
    match PASSED.try_with(Passed::clone) {
        Ok(Passed::Caller {
            traceparent,
            tracestate,
        }) => {
            headers.insert("traceparent", traceparent);
            if let Some(state) = tracestate {
                headers.insert("tracestate", state);
            }
            return;
        }
        // A process this request calls must not decide alone to record a part of it.
        Ok(Passed::Unsampled) => {
            let trace_id = rand::random::<u128>().max(1);
            let span_id = rand::random::<u64>().max(1);
            let text = format!("00-{trace_id:032x}-{span_id:016x}-00");
            if let Ok(value) = http::HeaderValue::from_str(&text) {
                headers.insert("traceparent", value);
            }
            return;
        }
        Err(_) => {}
    }
    if in_recorded_request() {
        let cx = tracing::Span::current().context();
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderCarrierMut(headers));
    }
}

/// The span of one `ModelInfer` this process serves (kind server), with the RPC
/// semantic conventions' attributes. `version` is the one asked for, when known; a
/// gateway records the version it routes to, the route reason and whether it
/// mirrored (`aviary.version`, `aviary.route.reason`, `aviary.shadow`) as it decides
/// them, and [`record_outcome`] the status.
pub fn infer_server_span(model: &str, version: Option<&str>) -> tracing::Span {
    tracing::info_span!(
        target: SPAN_TARGET,
        "ModelInfer",
        otel.name = "inference.GRPCInferenceService/ModelInfer",
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = "inference.GRPCInferenceService",
        rpc.method = "ModelInfer",
        rpc.grpc.status_code = tracing::field::Empty,
        aviary.model = model,
        aviary.version = version.filter(|v| !v.is_empty()),
        aviary.route.reason = tracing::field::Empty,
        aviary.shadow = tracing::field::Empty,
    )
}

/// The span of one `ModelInfer` call this process makes to the worker at `server`
/// (kind client: one per attempt).
pub fn infer_client_span(model: &str, version: &str, server: &str) -> tracing::Span {
    tracing::info_span!(
        target: SPAN_TARGET,
        "ModelInfer call",
        otel.name = "inference.GRPCInferenceService/ModelInfer",
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = "inference.GRPCInferenceService",
        rpc.method = "ModelInfer",
        rpc.grpc.status_code = tracing::field::Empty,
        server.address = server,
        aviary.model = model,
        aviary.version = version,
    )
}

/// Records how the call of `span` ended: its gRPC `code`, and when it failed an error
/// status with `message`.
pub fn record_outcome(span: &tracing::Span, code: tonic::Code, message: &str) {
    span.record("rpc.grpc.status_code", code as i64);
    if code != tonic::Code::Ok {
        span.record("otel.status_code", "error");
        span.record("otel.status_description", message);
    }
}

/// The trace id of `span`, in the 32 hex digits of `traceparent`, when it has one.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let span = cx.span();
    let context = span.span_context();
    context.is_valid().then(|| context.trace_id().to_string())
}

/// The trace and span ids of the OpenTelemetry span active on this thread, for log
/// lines written inside it.
pub fn active_ids() -> Option<(String, String)> {
    let cx = Context::current();
    let span = cx.span();
    let context = span.span_context();
    context.is_valid().then(|| {
        (
            context.trace_id().to_string(),
            context.span_id().to_string(),
        )
    })
}

/// One stage of a request, timed by the code that ran it.
#[derive(Debug, Clone)]
pub struct Stage {
    /// The span's name, e.g. `aviary.queue`.
    pub name: &'static str,
    /// When the stage began.
    pub start: Instant,
    /// When it ended.
    pub end: Instant,
    /// What the span says beside its times.
    pub attributes: Vec<KeyValue>,
}

/// Records `stages` as children of the current span when that span's trace is
/// sampled. Built from times already measured, they cost nothing to a request whose
/// trace is not kept, and a batched request's queue and run are where they happened.
pub fn record_stages(stages: impl FnOnce() -> Vec<Stage>) {
    let Some(tracer) = TRACER.get().filter(|_| in_recorded_request()) else {
        return;
    };
    let parent = tracing::Span::current().context();
    if !parent.span().span_context().is_sampled() {
        return;
    }
    // Instants have no epoch: place them by the wall clock read once, now.
    let (wall, now) = (SystemTime::now(), Instant::now());
    let at = |instant: Instant| wall - now.saturating_duration_since(instant);
    for stage in stages() {
        let mut span = tracer
            .span_builder(stage.name)
            .with_kind(SpanKind::Internal)
            .with_start_time(at(stage.start))
            .with_attributes(stage.attributes)
            .start_with_context(tracer, &parent);
        span.end_with_timestamp(at(stage.end));
    }
}

/// A value for a span attribute.
pub fn attribute(key: &'static str, value: impl Into<opentelemetry::Value>) -> KeyValue {
    KeyValue::new(key, value)
}

struct HeaderCarrier<'a>(&'a http::HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderCarrierMut<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderCarrierMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_context_survives_headers_out_and_in() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        );
        headers.insert("tracestate", http::HeaderValue::from_static("vendor=x"));
        let cx = TraceContextPropagator::new().extract(&HeaderCarrier(&headers));
        let mut out = http::HeaderMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderCarrierMut(&mut out));
        assert_eq!(out.get("traceparent"), headers.get("traceparent"));
        assert_eq!(out.get("tracestate"), headers.get("tracestate"));
    }

    fn sampling(vars: &[(&str, &str)]) -> Result<Sampling, TracingError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Sampling::configured(None, &move |name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn samplers_follow_the_standard_variables() {
        let on = |parent_based, ratio| Sampling {
            parent_based,
            ratio,
        };
        assert_eq!(sampling(&[]).ok(), Some(on(true, 1.0)));
        assert_eq!(
            sampling(&[
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25")
            ])
            .ok(),
            Some(on(true, 0.25))
        );
        assert_eq!(
            sampling(&[("OTEL_TRACES_SAMPLER", "always_off")]).ok(),
            Some(on(false, 0.0))
        );
        assert_eq!(
            Sampling::configured(Some(0.01), &|_| Some("always_on".into())).ok(),
            Some(on(true, 0.01)),
            "the config file wins"
        );
        for bad in [
            &[("OTEL_TRACES_SAMPLER", "jaeger_remote")][..],
            &[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "2"),
            ],
            &[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "x"),
            ],
        ] {
            assert!(sampling(bad).is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn a_parent_based_sampler_follows_the_caller_and_a_ratio_decides_the_rest() {
        let never = Sampling {
            parent_based: true,
            ratio: 0.0,
        };
        assert!(never.keeps(Some(true)));
        assert!(!never.keeps(Some(false)));
        assert!(!never.keeps(None));
        let always = Sampling {
            parent_based: false,
            ratio: 1.0,
        };
        assert!(
            always.keeps(Some(false)),
            "not parent-based: the ratio decides"
        );
        let half = Sampling {
            parent_based: true,
            ratio: 0.5,
        };
        let kept = (0..10_000).filter(|_| half.keeps(None)).count();
        // Binomial(10 000, 0.5): 4 500..5 500 is 10 standard deviations wide.
        assert!((4_500..=5_500).contains(&kept), "{kept}");
    }

    #[test]
    fn a_malformed_traceparent_starts_no_trace() {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", http::HeaderValue::from_static("00-zz-01"));
        let cx = TraceContextPropagator::new().extract(&HeaderCarrier(&headers));
        assert!(!cx.span().span_context().is_valid());
    }
}
