//! OpenTelemetry traces, received by an OTLP/gRPC collector the test runs (the
//! `TraceService` of `opentelemetry-proto`): one trace across a gateway and a worker
//! process, a client's `traceparent` continued, the trace id in a response header, the
//! embedded worker's stages, sampling, and requests that succeed while the collector is
//! down (its failures and a full queue's drops counted on `/metrics`).

mod support;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value as AnyValue,
    trace::v1::{Span, span::SpanKind},
};
use support::*;
use tonic::{Code, Request, Response, Status};

/// The trace id and span id of the client's own span, as a `traceparent` carries them.
const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

/// Upper bound for exported spans to arrive (hang protection only).
const SPANS_DEADLINE: Duration = Duration::from_secs(30);

/// A span as received, with the `service.name` of the process that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    fn attribute(&self, key: &str) -> Option<String> {
        let value = self.span.attributes.iter().find(|kv| kv.key == key)?;
        Some(match value.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => s.clone(),
            AnyValue::IntValue(i) => i.to_string(),
            AnyValue::BoolValue(b) => b.to_string(),
            AnyValue::DoubleValue(d) => d.to_string(),
            other => format!("{other:?}"),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The in-test collector: keeps every span it is sent.
#[derive(Debug, Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().expect("not poisoned");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans.into_iter().map(|span| Received {
                    service: service.clone(),
                    span,
                }));
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves the collector on 127.0.0.1 port 0 in `runtime`; returns its address.
    fn start(&self, runtime: &tokio::runtime::Runtime) -> SocketAddr {
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the collector");
        let addr = listener.local_addr().expect("bound");
        let service = TraceServiceServer::new(self.clone());
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }

    /// The spans of `trace_id` once `done` holds for them.
    fn trace(&self, trace_id: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let of_trace = || -> Vec<Received> {
            let spans = self.spans.lock().expect("not poisoned");
            spans
                .iter()
                .filter(|s| s.trace_id() == trace_id)
                .cloned()
                .collect()
        };
        assert!(
            eventually(SPANS_DEADLINE, || done(&of_trace())),
            "the collector got only {:#?}",
            of_trace()
        );
        of_trace()
    }

    fn count(&self) -> usize {
        self.spans.lock().expect("not poisoned").len()
    }
}

/// The one span named `name` sent by `service` (a server span, when the name is the
/// RPC's: a gateway's call to a worker has the same name).
fn one<'a>(spans: &'a [Received], service: &str, name: &str) -> &'a Received {
    let found: Vec<_> = spans
        .iter()
        .filter(|s| s.service == service && s.span.name == name)
        .filter(|s| name != SERVER_SPAN || s.span.kind == SERVER)
        .collect();
    assert_eq!(found.len(), 1, "one {name} from {service} in {spans:#?}");
    found[0]
}

fn has(spans: &[Received], service: &str, name: &str) -> bool {
    spans
        .iter()
        .any(|s| s.service == service && s.span.name == name)
}

/// A demo request carrying `traceparent`, if given; returns the response's trace id
/// header and the version that answered.
fn infer(
    runtime: &tokio::runtime::Runtime,
    addr: &str,
    traceparent: Option<&str>,
) -> Result<(String, String), Status> {
    runtime.block_on(async {
        let mut request = Request::new(demo_request());
        if let Some(traceparent) = traceparent {
            request
                .metadata_mut()
                .insert("traceparent", traceparent.parse().expect("ascii"));
        }
        let response = client(connect(addr).await).model_infer(request).await?;
        let trace_id = response
            .metadata()
            .get("x-aviary-trace-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok((trace_id, response.into_inner().model_version))
    })
}

const SERVER_SPAN: &str = "inference.GRPCInferenceService/ModelInfer";
/// OTLP's span kinds.
const SERVER: i32 = SpanKind::Server as i32;
const CLIENT: i32 = SpanKind::Client as i32;

/// Spans leave each process within 100 ms instead of the default 5 s.
const FAST_EXPORT: (&str, &str) = ("OTEL_BSP_SCHEDULE_DELAY", "100");

#[test]
fn one_trace_covers_the_gateway_and_the_remote_worker_and_continues_the_clients() {
    let runtime = runtime();
    let collector = Collector::default();
    let endpoint = format!("http://{}", collector.start(&runtime));
    // The worker is configured by the standard variables, the gateway by its file.
    let (worker, worker_addr) = traced_worker(&endpoint);
    let config = format!(
        "[tracing]\nendpoint = \"{endpoint}\"\nservice_name = \"edge-gateway\"\n\n\
         [routes.demo]\nversions = [ {{ version = \"1\", weight = 100, endpoint = \"{worker_addr}\" }} ]\n"
    );
    let gateway = Served::gateway_with_env(&config, &[], &[FAST_EXPORT]);

    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let (trace_id, version) =
        infer(&runtime, &gateway.addr, Some(&traceparent)).expect("the request succeeds");
    assert_eq!(version, "1");
    assert_eq!(
        trace_id, CLIENT_TRACE,
        "the gateway continued the client's trace"
    );

    let spans = collector.trace(CLIENT_TRACE, |spans| {
        has(spans, "aviary-worker", "onnxruntime.run")
            && has(spans, "edge-gateway", SERVER_SPAN)
            && spans.len() >= 6
    });
    // gateway server → gateway client → worker server → worker stages.
    let front = one(&spans, "edge-gateway", SERVER_SPAN);
    let call = spans
        .iter()
        .find(|s| s.service == "edge-gateway" && s.span.kind == CLIENT)
        .expect("the gateway's call to the worker");
    let served = one(&spans, "aviary-worker", SERVER_SPAN);
    assert_eq!(front.span.kind, SERVER);
    assert_eq!(
        front.parent_id(),
        CLIENT_SPAN,
        "the client's span is the parent"
    );
    assert_eq!(call.parent_id(), front.span_id());
    assert_eq!(served.span.kind, SERVER);
    assert_eq!(
        served.parent_id(),
        call.span_id(),
        "the worker continues the call"
    );
    for stage in ["aviary.validate", "aviary.queue", "onnxruntime.run"] {
        assert_eq!(
            one(&spans, "aviary-worker", stage).parent_id(),
            served.span_id(),
            "{stage} is a child of the worker's span"
        );
    }
    let attributes = [
        ("rpc.system", "grpc"),
        ("rpc.service", "inference.GRPCInferenceService"),
        ("rpc.method", "ModelInfer"),
        ("rpc.grpc.status_code", "0"),
        ("aviary.model", "demo"),
        ("aviary.version", "1"),
        ("aviary.route.reason", "weighted"),
        ("aviary.shadow", "false"),
    ];
    for (key, value) in attributes {
        assert_eq!(front.attribute(key).as_deref(), Some(value), "{key}");
    }
    assert_eq!(
        call.attribute("server.address").as_deref(),
        Some(worker_addr.as_str())
    );
    assert_eq!(
        served.attribute("rpc.grpc.status_code").as_deref(),
        Some("0")
    );
    assert_eq!(
        one(&spans, "aviary-worker", "onnxruntime.run")
            .attribute("aviary.rows")
            .as_deref(),
        Some("1")
    );

    // Without a traceparent the gateway starts a trace, and says which.
    let (fresh, _) = infer(&runtime, &gateway.addr, None).expect("the request succeeds");
    assert_eq!(fresh.len(), 32, "a trace id in the header: {fresh:?}");
    assert_ne!(fresh, CLIENT_TRACE);
    // The gateway's span ends last, so it may come in a later export than the worker's.
    let spans = collector.trace(&fresh, |spans| {
        has(spans, "aviary-worker", "onnxruntime.run") && has(spans, "edge-gateway", SERVER_SPAN)
    });
    assert!(
        one(&spans, "edge-gateway", SERVER_SPAN)
            .span
            .parent_span_id
            .is_empty(),
        "a root span"
    );
    drop(worker);
}

#[test]
fn the_embedded_worker_traces_its_stages_and_a_failed_request_says_why() {
    let runtime = runtime();
    let collector = Collector::default();
    let endpoint = format!("http://{}", collector.start(&runtime));
    let served = Served::start_with_env(
        &demo_config(),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "embedded"),
            FAST_EXPORT,
        ],
    );
    let (trace_id, _) = infer(&runtime, &served.addr, None).expect("the request succeeds");
    let spans = collector.trace(&trace_id, |spans| {
        has(spans, "embedded", "onnxruntime.run")
            && has(spans, "embedded", "aviary.worker")
            && has(spans, "embedded", SERVER_SPAN)
    });
    let front = one(&spans, "embedded", SERVER_SPAN);
    let worker = one(&spans, "embedded", "aviary.worker");
    assert_eq!(worker.parent_id(), front.span_id());
    assert_eq!(
        one(&spans, "embedded", "onnxruntime.run").parent_id(),
        worker.span_id()
    );

    // A request the worker refuses: the trace id comes back with the error.
    let failed = runtime.block_on(async {
        let mut request = demo_request();
        request.inputs[0].shape = vec![1, 3];
        client(connect(&served.addr).await)
            .model_infer(request)
            .await
            .expect_err("a wrong shape is refused")
    });
    assert_eq!(failed.code(), Code::InvalidArgument);
    let trace_id = failed
        .metadata()
        .get("x-aviary-trace-id")
        .and_then(|v| v.to_str().ok())
        .expect("the error carries the trace id")
        .to_owned();
    let spans = collector.trace(&trace_id, |spans| has(spans, "embedded", SERVER_SPAN));
    let front = one(&spans, "embedded", SERVER_SPAN);
    assert_eq!(
        front.attribute("rpc.grpc.status_code").as_deref(),
        Some("3"),
        "INVALID_ARGUMENT"
    );
    assert_eq!(
        front.span.status.as_ref().map(|s| s.code),
        Some(2),
        "an error status"
    );
}

/// `aviary worker` over tests/models exporting to `endpoint`; its `http://` address.
fn traced_worker(endpoint: &str) -> (Process, String) {
    let models = repo_root().join("tests/models");
    let mut worker = Process::spawn(
        &[
            "worker",
            "--repo",
            models.to_str().expect("utf-8 path"),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint), FAST_EXPORT],
    );
    let addr = format!("http://{}", worker.wait_listening());
    (worker, addr)
}

#[test]
fn a_trace_the_gateway_does_not_sample_is_not_recorded_by_its_worker_either() {
    let runtime = runtime();
    let collector = Collector::default();
    let endpoint = format!("http://{}", collector.start(&runtime));
    // The worker keeps every trace it starts itself (the default sampler).
    let (_worker, worker_addr) = traced_worker(&endpoint);
    let config = format!(
        "[tracing]\nendpoint = \"{endpoint}\"\nsample_ratio = 0.0\n\n\
         [routes.demo]\nversions = [ {{ version = \"1\", weight = 100, endpoint = \"{worker_addr}\" }} ]\n"
    );
    let gateway = Served::gateway_with_env(&config, &[], &[FAST_EXPORT]);
    for _ in 0..20 {
        let (trace_id, _) =
            infer(&runtime, &gateway.addr, None).expect("an unsampled request succeeds");
        assert_eq!(trace_id, "", "no trace id for a trace that is not recorded");
    }
    // The client's sampled flag wins over the ratio.
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    infer(&runtime, &gateway.addr, Some(&traceparent)).expect("the request succeeds");
    let spans = collector.trace(CLIENT_TRACE, |spans| {
        has(spans, "aviary-worker", "onnxruntime.run")
            && has(spans, "aviary-gateway", SERVER_SPAN)
            && spans.len() >= 6
    });
    assert_eq!(
        collector.count(),
        spans.len(),
        "no span of the 20 unsampled requests was exported, by either process"
    );
}

#[test]
fn requests_succeed_while_the_collector_is_down_and_lost_spans_are_counted() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let config = format!(
        "[tracing]\nendpoint = \"http://{closed}\"\nqueue_size = 2\n\n{}",
        demo_config()
    );
    // Exports every 100 ms, each failing; between two, a request's 5 spans overflow
    // the queue of 2.
    let mut served = Served::start_with_env(&config, &[], &[FAST_EXPORT]);
    let runtime = runtime();
    let mut by_version = BTreeMap::new();
    for _ in 0..50 {
        let (trace_id, version) =
            infer(&runtime, &served.addr, None).expect("tracing never fails a request");
        assert_eq!(trace_id.len(), 32);
        *by_version.entry(version).or_insert(0) += 1;
    }
    assert_eq!(by_version.values().sum::<u64>(), 50);
    let metrics = served.metrics_addr();
    let counted = |outcome: &str| {
        let (_, _, body) = scrape(metrics);
        parse_samples(&body)
            .get(&format!(
                "aviary_trace_spans_total{{outcome=\"{outcome}\"}}"
            ))
            .copied()
            .unwrap_or_default()
    };
    assert!(
        eventually(SPANS_DEADLINE, || counted("failed") > 0.0),
        "failed exports are counted"
    );
    assert!(counted("dropped") > 0.0, "a full queue's drops are counted");
    assert_eq!(counted("exported"), 0.0);
}
