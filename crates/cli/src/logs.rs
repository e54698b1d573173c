//! The process's `tracing` subscriber: log lines on stderr (text or JSON, filtered by
//! `AVIARY_LOG` or `RUST_LOG`) and, when trace export is on, the request spans sent to
//! the OTLP collector.

use aviary::telemetry::{SPAN_TARGET, Tracing, TracingSettings};
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{LevelFilter, Targets},
    fmt::{
        FmtContext, FormatEvent, FormatFields, MakeWriter,
        format::{self, Writer},
    },
    layer::SubscriberExt,
    registry::LookupSpan,
    util::SubscriberInitExt,
};

use crate::args::LogFormat;

/// Installs the subscriber: logs in `format`, and trace export per `settings` and the
/// `OTEL_*` environment (`role` names the service when nothing else does). Returns the
/// export pipeline to shut down at exit, when tracing is on. Call it once, inside the
/// runtime.
pub fn init(
    format: LogFormat,
    settings: Option<&TracingSettings>,
    role: &str,
) -> anyhow::Result<Option<Tracing>> {
    let tracing = match settings {
        Some(settings) => Tracing::start(settings, role)?,
        None => None,
    };
    let traces = tracing.as_ref().map(|tracing| {
        tracing_opentelemetry::layer()
            .with_tracer(tracing.tracer())
            // What a span says is its attributes, not where in the code it was made.
            .with_location(false)
            .with_threads(false)
            .with_level(false)
            .with_target(false)
            .with_filter(Targets::new().with_target(SPAN_TARGET, LevelFilter::INFO))
    });
    tracing_subscriber::registry()
        .with(logs(format, std::io::stderr))
        .with(traces)
        .init();
    if let Some(settings) = settings.filter(|_| tracing.is_some()) {
        tracing::info!(?settings, role, "exporting traces");
    }
    Ok(tracing)
}

/// Installs logs alone, for the commands that serve nothing.
pub fn init_logs(format: LogFormat) {
    tracing_subscriber::registry()
        .with(logs(format, std::io::stderr))
        .init();
}

/// The log layer, writing to `writer` (stderr): `AVIARY_LOG`, else `RUST_LOG`, else
/// `info,ort=warn`; never the request spans (one per request, for traces only).
fn logs<S, W>(format: LogFormat, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_env("AVIARY_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,ort=warn"))
        .add_directive(
            format!("{SPAN_TARGET}=off")
                .parse()
                .expect("a valid directive"),
        );
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    match format {
        LogFormat::Text => layer.with_filter(filter).boxed(),
        LogFormat::Json => layer
            .json()
            .event_format(WithTraceIds(
                format::Format::default()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true),
            ))
            .with_filter(filter)
            .boxed(),
    }
}

/// The JSON line of an event, with `trace_id` and `span_id` when it happened inside a
/// traced request, so a log search finds the trace and the other way round.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let Some((trace_id, span_id)) = aviary::telemetry::active_ids() else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        // The JSON formatter writes one object and a newline.
        match line.trim_end().strip_suffix('}') {
            Some(object) => writeln!(
                writer,
                "{object},\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}"
            ),
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider;

    use super::*;

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .expect("not poisoned")
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Captured {
        type Writer = Captured;

        fn make_writer(&'w self) -> Captured {
            self.clone()
        }
    }

    #[test]
    fn json_lines_in_a_traced_request_carry_its_trace_and_span_ids() {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let captured = Captured::default();
        let subscriber = tracing_subscriber::registry()
            .with(logs(LogFormat::Json, captured.clone()))
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let ids = tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside any request");
            let span = tracing::info_span!("request");
            let _entered = span.enter();
            tracing::info!(model = "demo", "inside a request");
            aviary::telemetry::active_ids().expect("the span is active")
        });
        let text =
            String::from_utf8(captured.0.lock().expect("not poisoned").clone()).expect("utf-8");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0].get("trace_id"), None);
        assert_eq!(lines[1]["fields"]["model"], "demo");
        assert_eq!(lines[1]["trace_id"], ids.0.as_str());
        assert_eq!(lines[1]["span_id"], ids.1.as_str());
        assert_eq!(ids.0.len(), 32);
    }

    #[test]
    fn text_lines_are_unchanged() {
        let captured = Captured::default();
        let subscriber =
            tracing_subscriber::registry().with(logs(LogFormat::Text, captured.clone()));
        tracing::subscriber::with_default(subscriber, || tracing::info!("plain"));
        let text =
            String::from_utf8(captured.0.lock().expect("not poisoned").clone()).expect("utf-8");
        assert!(text.contains("INFO") && text.contains("plain"), "{text}");
    }
}
