//! The Prometheus endpoint every Aviary server has: `GET /metrics` on a listener of its
//! own, in the text exposition format (`prometheus-client`'s OpenMetrics encoding), and
//! the process metrics every one of them reports.
//!
//! With [`ServerTls`] the endpoint speaks HTTPS (and, with a client CA, requires a
//! scraper's certificate), from the same rotating PEM files as the gRPC listeners.
//!
//! Each process registers [`Collector`]s that read its own state when scraped
//! (the gateway's per-version counters, the worker's statistics), so serving requests
//! pays nothing for the endpoint; see `docs/metrics.md` for every name.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Router, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::tls::ServerTls;

/// What `/metrics` answers with: OpenMetrics text, which Prometheus reads.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry holding the process metrics, for a server to add its own collectors to.
pub fn registry() -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ProcessCollector));
    registry.register_collector(Box::new(TraceSpansCollector));
    registry
}

/// What happened to the spans this process made (all zero while tracing is off).
#[derive(Debug)]
struct TraceSpansCollector;

impl Collector for TraceSpansCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        encode_counters(
            &mut encoder,
            "aviary_trace_spans",
            "Spans by outcome: exported to the OTLP collector, dropped from a full export queue, or lost to a failed export.",
            crate::telemetry::span_counts()
                .into_iter()
                .map(|(outcome, n)| (vec![("outcome", outcome.to_owned())], n)),
        )
    }
}

/// The whole exposition of `registry`, as `/metrics` answers it.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail; a collector's own error leaves what it wrote.
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::warn!(%error, "a metrics collector failed");
    }
    text
}

/// The ALPN protocol the endpoint offers over TLS: it speaks HTTP/1.1 only.
pub const ALPN: &[&[u8]] = &[b"http/1.1"];

/// Serves `GET /metrics` for `registry` on `listener` until `shutdown` resolves; over
/// TLS when `tls` is set (opened with [`ALPN`]).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = crate::tls::HttpIncoming::new(listener, tls)?;
    let app =
        Router::new().route(
            "/metrics",
            get(move || {
                let registry = Arc::clone(&registry);
                async move {
                    ([(header::CONTENT_TYPE, CONTENT_TYPE)], render(&registry)).into_response()
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Upper bounds of every duration histogram's buckets, in seconds: 100 µs to 10 s,
/// the span from a cached answer to a large model's run.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A histogram of durations over [`DURATION_BUCKETS`], kept with atomics: recording
/// one is two increments and an add, never a lock, so the request path can afford it.
#[derive(Debug, Default)]
pub struct DurationHistogram {
    /// Per bucket (the last is +Inf), the durations in it and no lower one.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// What a histogram held when read: `(upper bound, count in that bucket alone)` with
/// +Inf as `f64::MAX`, the sum in seconds, and the count.
pub type HistogramSnapshot = (Vec<(f64, u64)>, f64, u64);

impl DurationHistogram {
    /// Counts one `duration`.
    pub fn record(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        // Prometheus buckets are "less than or equal to" their bound.
        let bucket = DURATION_BUCKETS.partition_point(|&bound| bound < seconds);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The buckets, sum and count now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let bounds = DURATION_BUCKETS.iter().copied().chain([f64::MAX]);
        let buckets: Vec<(f64, u64)> = bounds
            .zip(&self.buckets)
            .map(|(bound, count)| (bound, count.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (buckets, sum, count)
    }
}

/// One histogram family, `name` with a histogram per `(labels, snapshot)`.
pub fn encode_histograms(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, HistogramSnapshot)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, (buckets, sum, count)) in samples {
        family
            .encode_family(&labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                sum, count, &buckets, None,
            )?;
    }
    Ok(())
}

/// One gauge without labels.
pub fn encode_gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

/// One counter without labels (OpenMetrics adds `_total` to the sample's name).
pub fn encode_counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(value).encode(encoder.encode_descriptor(
        name,
        help,
        None,
        MetricType::Counter,
    )?)
}

/// Labels of one sample: names and values.
pub type Labels = Vec<(&'static str, String)>;

/// One counter family, `name` with a sample per `(labels, value)` (OpenMetrics adds
/// `_total` to the samples' names).
pub fn encode_counters<N>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, N)>,
) -> Result<(), std::fmt::Error>
where
    ConstCounter<N>: EncodeMetric,
{
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One gauge family, `name` with a sample per `(labels, value)` (integers or `f64`).
pub fn encode_gauges<N>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, N)>,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<N>: EncodeMetric,
{
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The standard `process_*` metrics, read from `/proc/self` when scraped (Linux; on
/// other systems they are left out).
#[derive(Debug)]
struct ProcessCollector;

/// What `/proc/self` says about this process.
#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    threads: u64,
    start_time_seconds: f64,
    open_fds: u64,
}

/// The process's resident memory now (`VmRSS`), or `None` where `/proc` says nothing;
/// what a model's load added is measured as the difference across it.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = kib.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// Clock ticks per second in `/proc/self/stat`: USER_HZ, 100 on every Linux ABI.
const TICKS_PER_SECOND: f64 = 100.0;

impl ProcessStats {
    fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs_f64();
        let uptime: f64 = uptime.split_whitespace().next()?.parse().ok()?;
        let mut stats = ProcessStats::parse(&stat, &status)?;
        // Field 22 counts ticks since boot: the start time is now - uptime + that.
        stats.start_time_seconds += now - uptime;
        stats.open_fds = open_fds;
        Some(stats)
    }

    /// Parses `/proc/self/stat` and `/proc/self/status` (see proc(5));
    /// `start_time_seconds` is since boot.
    fn parse(stat: &str, status: &str) -> Option<ProcessStats> {
        // The command name (field 2) is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
        // `fields[0]` is field 3 of proc(5).
        let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
        let kib = |key: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            line[key.len()..].split_whitespace().next()?.parse().ok()
        };
        Some(ProcessStats {
            cpu_seconds: (field(14)? + field(15)?) as f64 / TICKS_PER_SECOND,
            threads: field(20)?,
            start_time_seconds: field(22)? as f64 / TICKS_PER_SECOND,
            virtual_bytes: kib("VmSize:")? * 1024,
            resident_bytes: kib("VmRSS:")? * 1024,
            open_fds: 0,
        })
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(stats) = ProcessStats::read() else {
            return Ok(());
        };
        let counter = ConstCounter::new(stats.cpu_seconds);
        counter.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds.",
            None,
            counter.metric_type(),
        )?)?;
        let gauges: [(&str, &str, f64); 5] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size, in bytes.",
                stats.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size, in bytes.",
                stats.virtual_bytes as f64,
            ),
            (
                "process_open_fds",
                "Open file descriptors.",
                stats.open_fds as f64,
            ),
            ("process_threads", "OS threads.", stats.threads as f64),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds.",
                stats.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_fall_in_the_first_bucket_whose_bound_holds_them() {
        let histogram = DurationHistogram::default();
        for micros in [50, 100, 101, 2_000, 20_000_000] {
            histogram.record(Duration::from_micros(micros));
        }
        let (buckets, sum, count) = histogram.snapshot();
        assert_eq!(count, 5);
        assert!((sum - 20.002251).abs() < 1e-9, "{sum}");
        let at = |bound: f64| buckets.iter().find(|(b, _)| *b == bound).map(|(_, n)| *n);
        assert_eq!(at(0.0001), Some(2), "50 µs and exactly 100 µs");
        assert_eq!(at(0.00025), Some(1), "101 µs");
        assert_eq!(at(0.0025), Some(1), "2 ms");
        assert_eq!(at(f64::MAX), Some(1), "20 s is above every bound");
        let mut registry = Registry::default();
        #[derive(Debug)]
        struct One(Arc<DurationHistogram>);
        impl Collector for One {
            fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
                encode_histograms(
                    &mut encoder,
                    "t_seconds",
                    "test",
                    [(vec![("model", "m".to_owned())], self.0.snapshot())],
                )
            }
        }
        registry.register_collector(Box::new(One(Arc::new(histogram))));
        let text = render(&registry);
        assert!(
            text.contains("t_seconds_bucket{le=\"0.0001\",model=\"m\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("t_seconds_bucket{le=\"+Inf\",model=\"m\"} 5"),
            "{text}"
        );
        assert!(text.contains("t_seconds_count{model=\"m\"} 5"), "{text}");
    }

    #[test]
    fn proc_files_are_read_past_a_command_name_with_spaces_and_parentheses() {
        // Fields 3.. of a real line, behind a name that would break a naive split.
        let line = "1234 (tokio (rt) w) S 1 1234 1234 0 -1 4194560 2000 0 0 0 \
                    250 50 0 0 20 0 7 0 4200 123456789 3000 18446744073709551615";
        let status = "Name:\tx\nVmSize:\t  120560 kB\nVmRSS:\t   12000 kB\n";
        let stats = ProcessStats::parse(line, status).expect("parses");
        assert_eq!(
            stats,
            ProcessStats {
                cpu_seconds: 3.0,
                threads: 7,
                start_time_seconds: 42.0,
                virtual_bytes: 120_560 * 1024,
                resident_bytes: 12_000 * 1024,
                open_fds: 0,
            }
        );
    }

    #[test]
    fn the_exposition_has_the_process_metrics_and_ends_as_openmetrics_requires() {
        let text = render(&registry());
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_threads",
            "process_start_time_seconds",
        ] {
            assert!(text.contains(&format!("\n{name} ")), "{name} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
