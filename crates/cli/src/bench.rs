//! `aviary bench`: a closed-loop load generator for any v2 server. `concurrency` tasks
//! each send one request at a time over one shared HTTP/2 connection for `duration`,
//! after a warm-up; latencies go into an HDR histogram.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use aviary::client::TokenChannel;
use aviary::{
    pb::admin::{VersionRequest, models_client::ModelsClient},
    pb::inference::{
        ModelInferRequest, ModelMetadataRequest,
        grpc_inference_service_client::GrpcInferenceServiceClient,
        model_infer_request::InferInputTensor,
    },
    tensor::{self, Datatype},
};
use bytes::Bytes;
use hdrhistogram::Histogram;
use rand::Rng;
use serde::Serialize;

/// What to load and how hard.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Server address, `http://host:port`.
    pub addr: String,
    /// Model name.
    pub model: String,
    /// Pinned version, or the server's choice.
    pub version: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured time before it.
    pub warmup: Duration,
    /// Size given to every variable dimension of the inputs.
    pub batch: i64,
    /// gRPC headers sent with every request.
    pub headers: Vec<(String, String)>,
    /// A header sent with a fresh random value on every request (a sticky routing key
    /// for many distinct users).
    pub random_header: Option<String>,
    /// Hot swaps to drive while measuring.
    pub reload: Option<Reload>,
    /// API key for a server that requires one.
    pub token: Option<String>,
    /// TLS, for an `https://` address.
    pub tls: aviary::client::ClientTlsFiles,
}

/// Reloads of one version through the admin API during the measured time.
#[derive(Debug, Clone)]
pub struct Reload {
    /// The admin API, `http://host:port`.
    pub admin: String,
    /// The version of the benchmarked model to reload.
    pub version: String,
    /// From the start of one reload to the start of the next.
    pub every: Duration,
}

/// What the reloads during a run did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// Reloads that succeeded.
    pub done: u64,
    /// Reloads the server refused or failed.
    pub failed: u64,
    /// Median load + warm-up + swap time the server reported, in milliseconds.
    pub load_ms_p50: u64,
    /// The longest.
    pub load_ms_max: u64,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Model name.
    pub model: String,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Measured seconds.
    pub seconds: f64,
    /// Successful requests.
    pub requests: u64,
    /// Failed requests, by gRPC code.
    pub errors: BTreeMap<String, u64>,
    /// Successful requests per second.
    pub throughput: f64,
    /// Latency percentiles in microseconds.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Slowest request.
    pub max_us: u64,
    /// Successful responses by the version that served them.
    pub versions: BTreeMap<String, u64>,
    /// The hot swaps driven during the run, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reloads: Option<ReloadReport>,
}

impl BenchReport {
    /// Total failed requests.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// A request with random inputs shaped from the model's metadata.
pub async fn random_request(
    client: &mut GrpcInferenceServiceClient<TokenChannel>,
    model: &str,
    version: Option<&str>,
    batch: i64,
) -> Result<ModelInferRequest, tonic::Status> {
    let metadata = client
        .model_metadata(ModelMetadataRequest {
            name: model.to_owned(),
            version: version.unwrap_or_default().to_owned(),
        })
        .await?
        .into_inner();
    let mut rng = rand::rng();
    let mut request = ModelInferRequest {
        model_name: model.to_owned(),
        model_version: version.unwrap_or_default().to_owned(),
        ..Default::default()
    };
    for input in metadata.inputs {
        let shape: Vec<i64> = input
            .shape
            .iter()
            .map(|&d| if d < 0 { batch } else { d })
            .collect();
        let count = tensor::element_count(&shape).ok_or_else(|| {
            tonic::Status::invalid_argument(format!("input \"{}\": shape {shape:?}", input.name))
        })?;
        let datatype = Datatype::parse(&input.datatype).ok_or_else(|| {
            tonic::Status::invalid_argument(format!(
                "input \"{}\": datatype {}",
                input.name, input.datatype
            ))
        })?;
        let raw = match datatype {
            Datatype::Bytes => {
                tensor::encode_bytes_elements((0..count).map(|i| format!("item-{i}")))
            }
            Datatype::Bool => {
                tensor::to_raw(&(0..count).map(|_| rng.random::<bool>()).collect::<Vec<_>>())
            }
            Datatype::Fp32 => tensor::to_raw(
                &(0..count)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect::<Vec<_>>(),
            ),
            Datatype::Fp64 => tensor::to_raw(
                &(0..count)
                    .map(|_| rng.random_range(-1.0f64..1.0))
                    .collect::<Vec<_>>(),
            ),
            other => {
                // Small non-negative integers (and their half-float bit patterns) are valid for
                // every remaining type.
                let size = other.element_size().unwrap_or(1);
                let mut raw = vec![0u8; count * size];
                raw.chunks_exact_mut(size)
                    .for_each(|c| c[0] = rng.random_range(0..8));
                raw
            }
        };
        request.inputs.push(InferInputTensor {
            name: input.name,
            datatype: input.datatype,
            shape,
            ..Default::default()
        });
        request.raw_input_contents.push(Bytes::from(raw));
    }
    Ok(request)
}

type Headers = Vec<(
    tonic::metadata::MetadataKey<tonic::metadata::Ascii>,
    tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
)>;

fn parse_headers(headers: &[(String, String)]) -> Result<Headers, String> {
    headers
        .iter()
        .map(|(name, value)| {
            let key = tonic::metadata::MetadataKey::from_bytes(name.as_bytes())
                .map_err(|_| format!("--header: \"{name}\" is not a valid gRPC header name"))?;
            let value = value
                .parse()
                .map_err(|_| format!("--header: the value of \"{name}\" is not valid ASCII"))?;
            Ok((key, value))
        })
        .collect()
}

/// Runs the load and reports what it measured.
pub async fn run(
    options: &BenchOptions,
) -> Result<BenchReport, Box<dyn std::error::Error + Send + Sync>> {
    let mut client =
        aviary::client::connect(&options.addr, options.token.as_deref(), &options.tls).await?;
    let request = random_request(
        &mut client,
        &options.model,
        options.version.as_deref(),
        options.batch,
    )
    .await?;
    let headers = parse_headers(&options.headers)?;
    let random_header = options
        .random_header
        .as_deref()
        .map(|name| {
            tonic::metadata::MetadataKey::<tonic::metadata::Ascii>::from_bytes(name.as_bytes())
                .map_err(|_| format!("--random-header: \"{name}\" is not a valid gRPC header name"))
        })
        .transpose()?;
    let warmup_end = Instant::now() + options.warmup;
    let end = warmup_end + options.duration;
    let reloads = options.reload.as_ref().map(|reload| {
        tokio::spawn(drive_reloads(
            reload.clone(),
            options.model.clone(),
            warmup_end,
            end,
        ))
    });

    let mut tasks = Vec::with_capacity(options.concurrency);
    for _ in 0..options.concurrency.max(1) {
        let mut client = client.clone();
        let request = request.clone();
        let headers = headers.clone();
        let random_header = random_header.clone();
        tasks.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut versions: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                let started = Instant::now();
                if started >= end {
                    break;
                }
                let mut call = tonic::Request::new(request.clone());
                for (name, value) in &headers {
                    call.metadata_mut().insert(name.clone(), value.clone());
                }
                if let Some(name) = &random_header {
                    let user = rand::random::<u64>().to_string();
                    if let Ok(value) = user.parse() {
                        call.metadata_mut().insert(name.clone(), value);
                    }
                }
                let result = client.model_infer(call).await;
                if started < warmup_end {
                    continue;
                }
                match result {
                    Ok(response) => {
                        let micros =
                            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                        histogram.saturating_record(micros.max(1));
                        *versions
                            .entry(response.into_inner().model_version)
                            .or_default() += 1;
                    }
                    Err(status) => *errors.entry(format!("{:?}", status.code())).or_default() += 1,
                }
            }
            Ok::<_, hdrhistogram::CreationError>((histogram, errors, versions))
        }));
    }

    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = BTreeMap::new();
    let mut versions = BTreeMap::new();
    for task in tasks {
        let (h, e, v) = task.await??;
        histogram.add(h)?;
        e.into_iter()
            .for_each(|(k, n)| *errors.entry(k).or_default() += n);
        v.into_iter()
            .for_each(|(k, n)| *versions.entry(k).or_default() += n);
    }
    let reloads = match reloads {
        Some(task) => Some(task.await??),
        None => None,
    };
    let seconds = options.duration.as_secs_f64();
    Ok(BenchReport {
        model: options.model.clone(),
        concurrency: options.concurrency,
        seconds,
        requests: histogram.len(),
        errors,
        throughput: histogram.len() as f64 / seconds,
        p50_us: histogram.value_at_quantile(0.50),
        p90_us: histogram.value_at_quantile(0.90),
        p99_us: histogram.value_at_quantile(0.99),
        max_us: histogram.max(),
        versions,
        reloads,
    })
}

/// Reloads `reload.version` of `model` every `reload.every` from `start` to `end`.
async fn drive_reloads(
    reload: Reload,
    model: String,
    start: Instant,
    end: Instant,
) -> Result<ReloadReport, Box<dyn std::error::Error + Send + Sync>> {
    let channel = tonic::transport::Endpoint::from_shared(reload.admin.clone())?
        .connect()
        .await?;
    let mut client = ModelsClient::new(channel);
    let mut ticks = tokio::time::interval_at(start.into(), reload.every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut load_ms = Vec::new();
    let mut failed = 0;
    loop {
        ticks.tick().await;
        if Instant::now() >= end {
            break;
        }
        let request = VersionRequest {
            model: model.clone(),
            version: reload.version.clone(),
        };
        match client.reload_version(request).await {
            Ok(response) => load_ms.push(response.into_inner().load_ms),
            Err(status) => {
                failed += 1;
                tracing::warn!(%status, "reload failed");
            }
        }
    }
    load_ms.sort_unstable();
    Ok(ReloadReport {
        done: load_ms.len() as u64,
        failed,
        load_ms_p50: load_ms.get(load_ms.len() / 2).copied().unwrap_or(0),
        load_ms_max: load_ms.last().copied().unwrap_or(0),
    })
}
