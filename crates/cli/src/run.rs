//! What each subcommand does: servers bind their listeners (printing each bound
//! address, which tests and scripts read when they ask for port 0) and run until
//! SIGTERM or SIGINT; clients run once and print.

use std::{collections::BTreeMap, io::Write, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use aviary::{client, pb::inference::ModelMetadataRequest};
use aviary_gateway::{
    Config, Gateway, Listeners, Mode,
    controller::{ControllerOptions, run_controller},
    front::VARIANT_HEADER,
    rollouts::Gateways,
};
use aviary_worker::{SessionOptions, TensorLimits, Worker, WorkerConfig, server};
use tokio::net::TcpListener;

use aviary::telemetry::Tracing;

use crate::{
    args::{
        BenchArgs, CheckConfigArgs, CheckMode, Cli, Command, ControllerArgs, InferArgs, LogFormat,
        ServeArgs, ServerTlsArgs, WorkerArgs,
    },
    bench::{self, BenchOptions},
    logs,
};

/// Runs the command line `cli` to its end.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = runtime(cli.async_threads)?;
    let format = cli.log_format;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args, Mode::Embedded, format).await,
            Command::Gateway(args) => serve(args, Mode::RemoteOnly, format).await,
            Command::Worker(args) => {
                let tracing = logs::init(format, Some(&Default::default()), "aviary-worker")?;
                finish(worker(args).await, tracing).await
            }
            Command::Controller(args) => {
                let tracing = logs::init(format, Some(&Default::default()), "aviary-controller")?;
                finish(controller(args).await, tracing).await
            }
            Command::Infer(args) => {
                logs::init_logs(format);
                infer(args).await
            }
            Command::Bench(args) => {
                logs::init_logs(format);
                bench(args).await
            }
            Command::CheckConfig(args) => {
                logs::init_logs(format);
                check_config(&args)
            }
            Command::Ctl(args) => {
                logs::init_logs(format);
                println!("{}", crate::ctl::run(&args).await?);
                Ok(())
            }
        }
    })
}

/// `check-config`: "valid" on stdout, or every problem on stderr and an error.
fn check_config(args: &CheckConfigArgs) -> anyhow::Result<()> {
    use aviary_gateway::check;
    let mode = args.mode.map(|mode| match mode {
        CheckMode::Serve => Mode::Embedded,
        CheckMode::Gateway => Mode::RemoteOnly,
    });
    let problems = check::check_config_file(&args.config, mode, args.repo.as_deref());
    if problems.is_empty() {
        println!("{}: valid", args.config.display());
        return Ok(());
    }
    for problem in &problems {
        eprintln!("{problem}");
    }
    bail!(
        "{}: {} problem{}",
        args.config.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    )
}

/// `result`, once the spans still queued for export are sent.
async fn finish(result: anyhow::Result<()>, tracing: Option<Tracing>) -> anyhow::Result<()> {
    if let Some(tracing) = tracing {
        tracing.shutdown().await;
    }
    result
}

/// The async runtime: `threads` of them, or one per core the process may use.
///
/// Not fewer by default: model runs cheaper than a hand-off to the blocking pool run
/// inline on these threads, so they are the worker's compute too (`mlp` at c=32 loses
/// 12–18 % on 2 cores with one thread). A gateway without models that shares its
/// cores does better with one: each hand-off between tasks on a multi-thread runtime
/// may wake a parked thread (a futex wake and a context switch, more than the work
/// itself); measured on 2 cores, one thread serves the gateway hop in 60 µs of CPU per
/// request where two take 75 (docs/benchmarks.md).
fn runtime(threads: Option<u16>) -> std::io::Result<tokio::runtime::Runtime> {
    // The cores this process may use (a container's CPU quota counts).
    let threads = threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, usize::from),
        usize::from,
    );
    match threads {
        // No work stealing to pay for when there is nobody to steal from.
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        threads => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build(),
    }
}

/// Where a worker serves `/metrics` unless told otherwise (8002, Triton's metrics
/// port, is the worker's own gRPC port).
const WORKER_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8005);

/// Where a controller serves `/metrics` unless told otherwise (beside its admin API's
/// 8004; 8005 is a worker's).
const CONTROLLER_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8006);

/// The metrics listener: see [`bind_or_default`].
async fn bind_metrics(
    configured: Option<SocketAddr>,
    default: SocketAddr,
) -> anyhow::Result<Option<TcpListener>> {
    bind_or_default(configured, default, "metrics").await
}

/// A secondary listener (metrics, HTTP/REST): at `configured`, which must bind; or at
/// `default` if it is free. Two Aviary processes on one host would otherwise fail on
/// the second's default, so a taken default costs that endpoint, with a warning, not
/// the process.
async fn bind_or_default(
    configured: Option<SocketAddr>,
    default: SocketAddr,
    what: &str,
) -> anyhow::Result<Option<TcpListener>> {
    match configured {
        Some(addr) => Ok(Some(bind(addr, what).await?)),
        None => match bind(default, what).await {
            Ok(listener) => Ok(Some(listener)),
            Err(error) => {
                tracing::warn!(%default, error = %format!("{error:#}"), what, "the default address is taken; not serving this endpoint (set --{what}-listen)");
                Ok(None)
            }
        },
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} listener to {addr}"))?;
    let local = listener.local_addr()?;
    // Tests and scripts read these lines to learn the ports when asked for port 0.
    let prefix = match what {
        "admin" => "admin ",
        "metrics" => "metrics ",
        "http" => "http ",
        _ => "",
    };
    println!("aviary: {prefix}listening on {local}");
    std::io::stdout().flush()?;
    tracing::info!(%local, what, "listening");
    Ok(listener)
}

fn grace_period(seconds: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(seconds).map_err(|_| {
        anyhow::anyhow!("--grace-period: {seconds} is not a non-negative number of seconds")
    })
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not
/// when the future is first polled: call it before printing the listening lines, or a
/// signal sent as soon as they appear would kill the process with its default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let listen = |kind: SignalKind, name: &'static str| match signal(kind) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::error!(%error, name, "cannot listen for the signal");
            None
        }
    };
    let mut terminate = listen(SignalKind::terminate(), "SIGTERM");
    let mut interrupt = listen(SignalKind::interrupt(), "SIGINT");
    async move {
        let received = |signal: &mut Option<tokio::signal::unix::Signal>| {
            let signal = signal.take();
            async move {
                match signal {
                    Some(mut signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
        };
        tokio::select! {
            _ = received(&mut terminate) => tracing::info!("SIGTERM received"),
            _ = received(&mut interrupt) => tracing::info!("SIGINT received"),
        }
    }
}

async fn serve(args: ServeArgs, mode: Mode, format: LogFormat) -> anyhow::Result<()> {
    // The flags override where to listen without changing the config: the watcher
    // compares the file with the config as the file said it.
    let config = Config::load(&args.config)?;
    let tracing = logs::init(format, Some(&config.tracing.settings()), "aviary-gateway")?;
    finish(serve_with(args, mode, config).await, tracing).await
}

async fn serve_with(args: ServeArgs, mode: Mode, config: Config) -> anyhow::Result<()> {
    let listen = args.listen.unwrap_or(config.server.listen);
    let admin_listen = args.admin_listen.unwrap_or(config.admin.listen);
    let admin_enabled = config.admin.enabled;
    let metrics_listen = args.metrics_listen.or(config.metrics.listen);
    let metrics_enabled = config.metrics.enabled;
    let http_listen = args.http_listen.or(config.http.listen);
    let http_enabled = config.http.enabled;
    let gateway = Gateway::start(config, mode)
        .await?
        .watch_config(args.config.clone());
    let shutdown = shutdown_signal();
    let inference = bind(listen, "inference").await?;
    let admin = match admin_enabled {
        true => Some(bind(admin_listen, "admin").await?),
        false => None,
    };
    let metrics = match metrics_enabled {
        true => {
            bind_metrics(
                metrics_listen,
                aviary_gateway::config::DEFAULT_METRICS_LISTEN,
            )
            .await?
        }
        false => None,
    };
    let http = match http_enabled {
        true => {
            bind_or_default(
                http_listen,
                aviary_gateway::config::DEFAULT_HTTP_LISTEN,
                "http",
            )
            .await?
        }
        false => None,
    };
    gateway
        .serve(
            Listeners {
                inference,
                admin,
                metrics,
                http,
            },
            grace_period(args.grace_period)?,
            shutdown,
        )
        .await?;
    Ok(())
}

async fn controller(args: ControllerArgs) -> anyhow::Result<()> {
    if args.evaluate_interval_ms == 0 {
        bail!("--evaluate-interval-ms: must be at least 1");
    }
    let gateways = match args.gateways_dns {
        Some(name) => Gateways::Dns(name),
        None => Gateways::List(args.gateways),
    };
    let audit = open_audit(args.audit_dir)?;
    let options = ControllerOptions {
        evaluate_interval: Duration::from_millis(args.evaluate_interval_ms),
        state_file: args.state_file,
        tls: open_tls(&args.tls)?,
        metrics_tls: open_metrics_tls(&args.tls)?,
        checks: key_checks(args.keys_file.as_deref(), &audit)?,
        audit,
        gateway_authorization: match args.gateway_token_file.as_deref() {
            Some(path) => {
                let file = aviary_gateway::auth::TokenFile::open(path, "--gateway-token-file")?;
                tokio::spawn(Arc::clone(&file).watch());
                file.authorization()
            }
            None => aviary::client::Authorization::default(),
        },
        gateway_tls: args
            .gateway_tls_ca
            .map(|ca| aviary::client::ClientTlsFiles {
                ca: Some(ca),
                cert: args.gateway_tls_cert,
                key: args.gateway_tls_key,
            }),
    };
    let shutdown = shutdown_signal();
    let admin = bind(args.admin_listen, "admin").await?;
    let metrics = bind_metrics(args.metrics_listen, CONTROLLER_METRICS_LISTEN).await?;
    run_controller(gateways, options, admin, metrics, shutdown).await?;
    Ok(())
}

/// A listener's checks: the API keys in `keys_file` (none without a file; the file
/// watched from here on), and `audit` recording the calls that change something.
fn key_checks(
    keys_file: Option<&std::path::Path>,
    audit: &aviary_gateway::audit::Audit,
) -> anyhow::Result<aviary::calls::CallChecks> {
    let mut checks = aviary::calls::CallChecks::default();
    if let Some(path) = keys_file {
        let keys = aviary_gateway::auth::Keys::open(path)?;
        tokio::spawn(Arc::clone(&keys).watch());
        checks.guard = Some(keys as Arc<dyn aviary::calls::CallGuard>);
    }
    if audit.is_on() {
        checks.audit = Some(Arc::new(audit.clone()) as Arc<dyn aviary::calls::CallAudit>);
    }
    Ok(checks)
}

/// The audit trail in `dir` (the gateway's defaults for everything else); off without.
fn open_audit(dir: Option<std::path::PathBuf>) -> anyhow::Result<aviary_gateway::audit::Audit> {
    let config = aviary_gateway::config::AuditConfig {
        dir,
        ..aviary_gateway::config::AuditConfig::default()
    };
    aviary_gateway::audit::Audit::open(&config).context("--audit-dir")
}

/// The TLS of the gRPC listener `args` ask for, its files read now and watched from
/// here on.
fn open_tls(args: &ServerTlsArgs) -> anyhow::Result<Option<Arc<aviary::tls::ServerTls>>> {
    open_tls_for(args, &[b"h2"])
}

/// The TLS of `/metrics`, with `--metrics-tls`.
fn open_metrics_tls(args: &ServerTlsArgs) -> anyhow::Result<Option<Arc<aviary::tls::ServerTls>>> {
    match args.metrics_tls {
        true => open_tls_for(args, aviary::metrics::ALPN),
        false => Ok(None),
    }
}

fn open_tls_for(
    args: &ServerTlsArgs,
    alpn: &[&[u8]],
) -> anyhow::Result<Option<Arc<aviary::tls::ServerTls>>> {
    let Some(files) = args.files() else {
        return Ok(None);
    };
    let tls = aviary::tls::ServerTls::open(files, alpn).context("--tls-cert/--tls-key")?;
    tokio::spawn(Arc::clone(&tls).watch());
    Ok(Some(tls))
}

async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let defaults = SessionOptions::default();
    let mut config = WorkerConfig::new(
        args.repo,
        SessionOptions {
            instances: args.instances.unwrap_or(defaults.instances),
            intra_op_threads: args.intra_op_threads,
            inter_op_threads: args.inter_op_threads,
            inline_max: std::time::Duration::from_micros(args.inline_max_us),
        },
    );
    config.limits = TensorLimits {
        max_request_tensor_bytes: args.max_request_tensor_bytes,
        max_inflight_tensor_bytes: args.max_inflight_tensor_bytes,
    };
    let worker = Arc::new(Worker::open(config).await?);
    let shutdown = shutdown_signal();
    let listener = bind(args.listen, "inference").await?;
    if let Some(metrics) = bind_metrics(args.metrics_listen, WORKER_METRICS_LISTEN).await? {
        let mut registry = aviary::metrics::registry();
        registry.register_collector(Box::new(aviary_worker::exposition::WorkerCollector::new(
            Arc::clone(&worker),
        )));
        // Ends with the process: the worker's runner returns only when it stops.
        tokio::spawn(aviary::metrics::serve(
            metrics,
            open_metrics_tls(&args.tls)?,
            Arc::new(registry),
            std::future::pending(),
        ));
    }
    let tls = open_tls(&args.tls)?;
    let options = aviary::server::ServeOptions {
        max_message_bytes: args.max_message_bytes,
        grace_period: grace_period(args.grace_period)?,
        tls,
        ..aviary::server::ServeOptions::default()
    };
    let audit = open_audit(args.audit_dir)?;
    let checks = key_checks(args.keys_file.as_deref(), &audit)?;
    // Ends with the process: its stop sender lives until the runner returns.
    let (_stop_data_watch, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(aviary::calls::acting_as(
        aviary::calls::Caller::Process("data-watch"),
        aviary_worker::data_watch::run(
            Arc::clone(&worker),
            Duration::from_millis(args.data_watch_interval_ms),
            stop,
            move |event| audit.record_data(event),
        ),
    ));
    server::run_worker(
        worker,
        listener,
        options,
        args.model_control,
        checks,
        shutdown,
    )
    .await?;
    Ok(())
}

async fn infer(args: InferArgs) -> anyhow::Result<()> {
    let target = &args.target;
    let mut grpc = client::connect(&target.addr, target.token.as_deref(), &target.tls.files())
        .await
        .with_context(|| format!("connecting to {}", target.addr))?;
    let metadata = grpc
        .model_metadata(ModelMetadataRequest {
            name: target.model.clone(),
            version: target.version.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut inputs = BTreeMap::new();
    for text in &args.inputs {
        let (name, json) = match text.split_once('=') {
            Some((name, json)) if !name.trim_start().starts_with('[') => (name.to_owned(), json),
            _ => match metadata.inputs.as_slice() {
                [only] => (only.name.clone(), text.as_str()),
                _ => bail!(
                    "model \"{}\" has several inputs: write --input NAME=JSON",
                    target.model
                ),
            },
        };
        let value: serde_json::Value =
            serde_json::from_str(json).with_context(|| format!("input \"{name}\": not JSON"))?;
        inputs.insert(name, value);
    }
    let request = client::build_request(&metadata, target.version.as_deref(), &inputs)?;

    let mut by_version: BTreeMap<String, u64> = BTreeMap::new();
    let mut first: BTreeMap<String, Vec<client::DecodedTensor>> = BTreeMap::new();
    let mut elapsed = Duration::ZERO;
    for _ in 0..args.repeat.max(1) {
        let started = std::time::Instant::now();
        let response = grpc
            .model_infer(request.clone())
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?;
        elapsed += started.elapsed();
        let variant = response
            .metadata()
            .get(VARIANT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let response = response.into_inner();
        let version = variant.unwrap_or_else(|| response.model_version.clone());
        *by_version.entry(version.clone()).or_default() += 1;
        if let std::collections::btree_map::Entry::Vacant(slot) = first.entry(version) {
            slot.insert(client::decode_response(&response).map_err(anyhow::Error::msg)?);
        }
    }

    if args.json {
        let report = serde_json::json!({
            "model": target.model,
            "requests": args.repeat.max(1),
            "versions": by_version,
            "outputs": first,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mean = elapsed / u32::try_from(args.repeat.max(1)).unwrap_or(u32::MAX);
    for (version, outputs) in &first {
        println!("model {} version {version}", target.model);
        for output in outputs {
            println!(
                "  {} {} {:?} = {}",
                output.name,
                output.datatype,
                output.shape,
                client::render(&output.shape, &output.data, 8)
            );
        }
    }
    if args.repeat > 1 {
        println!(
            "{} requests, mean latency {:.2} ms",
            args.repeat,
            mean.as_secs_f64() * 1e3
        );
        for (version, count) in &by_version {
            let share = *count as f64 * 100.0 / args.repeat as f64;
            println!("  version {version}: {count} ({share:.1}%)");
        }
    }
    Ok(())
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let options = BenchOptions {
        addr: args.target.addr,
        model: args.target.model,
        version: args.target.version,
        token: args.target.token,
        tls: args.target.tls.files(),
        concurrency: args.concurrency,
        duration: Duration::from_secs_f64(args.duration),
        warmup: Duration::from_secs_f64(args.warmup),
        batch: args.batch,
        headers: args.headers,
        random_header: args.random_header,
        reload: args
            .reload_version
            .zip(args.admin)
            .map(|(version, admin)| bench::Reload {
                admin,
                version,
                every: Duration::from_millis(args.reload_every_ms),
            }),
    };
    let report = bench::run(&options)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "model {} concurrency {}: {:.0} req/s over {:.1}s, p50 {} µs, p90 {} µs, p99 {} µs, max {} µs, errors {}",
            report.model,
            report.concurrency,
            report.throughput,
            report.seconds,
            report.p50_us,
            report.p90_us,
            report.p99_us,
            report.max_us,
            report.error_count()
        );
        if !report.errors.is_empty() {
            println!("  errors by code: {:?}", report.errors);
        }
        if let Some(reloads) = &report.reloads {
            println!(
                "  {} reloads, load + swap median {} ms, max {} ms, failed {}",
                reloads.done, reloads.load_ms_p50, reloads.load_ms_max, reloads.failed
            );
        }
    }
    Ok(())
}
