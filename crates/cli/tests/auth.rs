//! API keys and roles on a gateway's inference and admin listeners, through the binary:
//! no key or a wrong one is UNAUTHENTICATED, a key beyond its role or its models is
//! PERMISSION_DENIED naming what it lacks, probes need no key, and a key removed from
//! the watched keys file stops working without a restart. Without keys, each client
//! address has a rate limit of its own. Workers and the controller take keys too, and
//! the gateway and the controller send theirs.

mod support;

use std::{path::Path, time::Duration};

use support::*;
use tonic::{Code, Request};

const APP_KEY: &str = "app-key-7f3a";
const OPS_KEY: &str = "ops-key-91c2";

/// How soon a changed keys file is in force (hang protection; it polls every second).
const KEYS_DEADLINE: Duration = Duration::from_secs(15);

/// A keys file: `app` may infer on demo only; `ops` is admin. Without `app` when
/// `revoked`.
fn write_keys(path: &Path, revoked: bool) {
    let mut text = key_entry("ops", OPS_KEY, r#"roles = ["admin"]"#);
    if !revoked {
        text.push_str(&key_entry(
            "app",
            APP_KEY,
            "roles = [\"infer\"]\nmodels = [\"demo\"]",
        ));
    }
    // A new file renamed over the old one, as a Secret volume update does.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write keys");
    std::fs::rename(&tmp, path).expect("replace keys");
}

/// The code of a demo (or `model`) inference with `key`.
fn infer_code(addr: &str, model: &str, key: Option<&str>) -> Code {
    runtime().block_on(async {
        let mut request = demo_request();
        request.model_name = model.into();
        let mut request = Request::new(request);
        if let Some(key) = key {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {key}").parse().expect("ascii"),
            );
        }
        match client(connect(addr).await).model_infer(request).await {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        }
    })
}

#[test]
fn keys_and_roles_decide_who_may_call_what_and_a_revoked_key_stops_working() {
    let keys_dir = tempfile::tempdir().expect("temp dir");
    let keys = keys_dir.path().join("keys.toml");
    write_keys(&keys, false);
    let config = format!(
        "[auth]\nkeys_file = \"{}\"\n\n{}",
        keys.display(),
        demo_config()
    );
    let served = Served::start(&config, &[]);

    // Inference: no key, a wrong key, the right key on its model and on another.
    assert_eq!(
        infer_code(&served.addr, "demo", None),
        Code::Unauthenticated
    );
    assert_eq!(
        infer_code(&served.addr, "demo", Some("wrong")),
        Code::Unauthenticated
    );
    assert_eq!(infer_code(&served.addr, "demo", Some(APP_KEY)), Code::Ok);
    assert_eq!(
        infer_code(&served.addr, "mlp", Some(APP_KEY)),
        Code::PermissionDenied
    );
    // An admin key reaches mlp (which then refuses demo's row as its input).
    assert_eq!(
        infer_code(&served.addr, "mlp", Some(OPS_KEY)),
        Code::InvalidArgument
    );
    // `aviary infer` sends --token.
    let answered = infer_demo(&served.addr, &["--token", APP_KEY]).ok();
    assert!(answered.stdout.contains("demo"), "{answered:?}");
    let refused = infer_demo(&served.addr, &[]).failed();
    assert!(refused.stderr.contains("Unauthenticated"), "{refused:?}");

    // The admin API: an infer key may not change routes, nor read them; ops may.
    let ctl = |key: Option<&str>, args: &[&str]| {
        let mut all = vec!["ctl", "--admin", served.admin.as_str()];
        if let Some(key) = key {
            all.extend(["--token", key]);
        }
        all.extend_from_slice(args);
        run(&all, &[])
    };
    let denied = ctl(Some(APP_KEY), &["set-weights", "demo", "1=50", "2=50"]).failed();
    assert!(
        denied.stderr.contains("PermissionDenied")
            && denied
                .stderr
                .contains("key \"app\" may not call /aviary.admin.v1.Routes/")
            && denied.stderr.contains("it needs the role"),
        "{denied:?}"
    );
    let anonymous = ctl(None, &["routes"]).failed();
    assert!(
        anonymous.stderr.contains("Unauthenticated"),
        "{anonymous:?}"
    );
    ctl(Some(OPS_KEY), &["set-weights", "demo", "1=50", "2=50"]).ok();
    let routes = ctl(Some(OPS_KEY), &["routes", "--json"]).json();
    assert_eq!(route_of(&routes, "demo"), pairs(&[("1", 50), ("2", 50)]));

    // Probes need no key.
    runtime().block_on(async {
        let channel = connect(&served.addr).await;
        let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect("health without a key");
        assert_eq!(health.into_inner().status, 1, "SERVING");
        let ready = client(channel)
            .server_ready(aviary::pb::inference::ServerReadyRequest {})
            .await
            .expect("ServerReady without a key");
        assert!(ready.into_inner().ready);
    });

    // Revoked in the file: refused within seconds, no restart; the other key works on.
    write_keys(&keys, true);
    assert!(
        eventually(KEYS_DEADLINE, || infer_code(
            &served.addr,
            "demo",
            Some(APP_KEY)
        ) == Code::Unauthenticated),
        "the revoked key is refused"
    );
    assert_eq!(infer_code(&served.addr, "demo", Some(OPS_KEY)), Code::Ok);
}

#[test]
fn a_bad_keys_file_stops_the_start_and_says_why() {
    let keys_dir = tempfile::tempdir().expect("temp dir");
    let keys = keys_dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        "[[keys]]\nname = \"x\"\nsha256 = \"abc\"\nroles = [\"infer\"]\n",
    )
    .expect("write keys");
    let config_dir = tempfile::tempdir().expect("temp dir");
    let config = config_dir.path().join("aviary.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nkeys_file = \"{}\"\n\n{}",
            keys.display(),
            demo_config()
        ),
    )
    .expect("write config");
    let mut args = vec!["serve", "--config", config.to_str().expect("utf-8")];
    args.extend(LOOPBACK_LISTENERS);
    let failed = run(&args, &[]).failed();
    assert!(
        failed
            .stderr
            .contains("keys[0] (\"x\").sha256: not 64 hex digits"),
        "{failed:?}"
    );
}

#[test]
fn a_key_over_its_rate_limit_is_refused_with_a_retry_hint_and_other_keys_are_not() {
    const RATE: f64 = 20.0;
    const BURST: f64 = 5.0;
    const SENT: usize = 100;
    let keys_dir = tempfile::tempdir().expect("temp dir");
    let keys = keys_dir.path().join("keys.toml");
    let limited =
        format!("roles = [\"infer\"]\nrate_limit = {{ per_second = {RATE}, burst = {BURST} }}");
    const PER_MODEL_KEY: &str = "per-model-key-0c4e";
    std::fs::write(
        &keys,
        key_entry("limited", APP_KEY, &limited)
            + &key_entry("ops", OPS_KEY, r#"roles = ["admin"]"#)
            + &key_entry(
                "per-model",
                PER_MODEL_KEY,
                "roles = [\"infer\"]\nmodel_rate_limits = { demo = { per_second = 0.001, burst = 3 } }",
            ),
    )
    .expect("write keys");
    let config = format!(
        "[auth]\nkeys_file = \"{}\"\n\n{}",
        keys.display(),
        demo_config()
    );
    let mut served = Served::start(&config, &[]);
    let metrics = served.metrics_addr();
    let (answered, refused, hints, elapsed) = runtime().block_on(async {
        let mut client = client(connect(&served.addr).await);
        let started = std::time::Instant::now();
        let (mut answered, mut refused, mut hints) = (0usize, 0usize, 0usize);
        for _ in 0..SENT {
            let mut request = Request::new(demo_request());
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {APP_KEY}").parse().expect("ascii"),
            );
            match client.model_infer(request).await {
                Ok(_) => answered += 1,
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    refused += 1;
                    if status.metadata().get("grpc-retry-pushback-ms").is_some() {
                        hints += 1;
                    }
                }
            }
        }
        (answered, refused, hints, started.elapsed())
    });
    // The burst, plus what the rate refilled while the requests were sent (one more
    // for the refill at the edges).
    let most = BURST + RATE * elapsed.as_secs_f64() + 1.0;
    assert!(
        answered >= BURST as usize && answered as f64 <= most,
        "{answered} answered in {elapsed:?} (at most {most:.1})"
    );
    assert_eq!(answered + refused, SENT);
    assert!(
        refused > 0,
        "{SENT} requests in {elapsed:?} overran {RATE}/s"
    );
    assert_eq!(hints, refused, "every refusal says when to retry");
    // Another key is not limited by this one.
    for _ in 0..20 {
        assert_eq!(infer_code(&served.addr, "demo", Some(OPS_KEY)), Code::Ok);
    }
    let samples = parse_samples(&scrape(metrics).2);
    assert_eq!(
        samples.get("aviary_rate_limited_total{key=\"limited\"}"),
        Some(&(refused as f64))
    );

    // A limit on one model: its burst, then refusals naming the model.
    let codes: Vec<Code> = (0..6)
        .map(|_| infer_code(&served.addr, "demo", Some(PER_MODEL_KEY)))
        .collect();
    assert_eq!(
        codes,
        [[Code::Ok; 3], [Code::ResourceExhausted; 3]].concat(),
        "burst 3 on demo"
    );
    let samples = parse_samples(&scrape(metrics).2);
    assert_eq!(
        samples.get("aviary_rate_limited_total{key=\"per-model\"}"),
        Some(&3.0)
    );
}

/// A client of `addr` whose connection comes from `local` (any 127.x address is loopback).
async fn client_from(
    addr: &str,
    local: &str,
) -> aviary::pb::inference::grpc_inference_service_client::GrpcInferenceServiceClient<
    tonic::transport::Channel,
> {
    let channel = tonic::transport::Endpoint::from_shared(addr.to_owned())
        .expect("valid url")
        .local_address(Some(local.parse().expect("an address")))
        .connect()
        .await
        .expect("the server accepts connections");
    client(channel)
}

#[test]
fn callers_without_keys_are_limited_per_address() {
    const CALLS: usize = 40;
    let config = demo_config().replace(
        "[server]\n",
        "[server]\npeer_rate_limit = { per_second = 5, burst = 5 }\n",
    );
    let mut served = Served::start(&config, &[]);
    runtime().block_on(async {
        let mut busy = client_from(&served.addr, "127.0.0.1").await;
        let started = std::time::Instant::now();
        let (mut answered, mut refused) = (0, 0);
        for _ in 0..CALLS {
            match busy.model_infer(demo_request()).await {
                Ok(_) => answered += 1,
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    assert!(
                        status.metadata().get("grpc-retry-pushback-ms").is_some(),
                        "a retry hint: {status:?}"
                    );
                    refused += 1;
                }
            }
        }
        // The burst, plus what refilled while the calls ran (and one for rounding).
        let allowed = 5 + (5.0 * started.elapsed().as_secs_f64()) as usize + 1;
        assert!(
            (5..=allowed).contains(&answered),
            "{answered} answered, {refused} refused"
        );
        assert_eq!(answered + refused, CALLS);
        // Another address has its own bucket; probes are never limited.
        let mut quiet = client_from(&served.addr, "127.0.0.2").await;
        quiet
            .model_infer(demo_request())
            .await
            .expect("another address is not limited");
        busy.server_ready(aviary::pb::inference::ServerReadyRequest {})
            .await
            .expect("readiness is never limited");
    });
    let (_, _, body) = scrape(served.metrics_addr());
    let limited = parse_samples(&body)
        .get("aviary_peer_rate_limited_total")
        .copied();
    assert!(
        limited >= Some(1.0),
        "{:?}",
        body.lines()
            .filter(|l| l.contains("peer"))
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_worker_with_keys_answers_only_gateways_that_send_theirs() {
    const GATEWAY_KEY: &str = "gateway-key-3b9f";
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = dir.path().join("worker-keys.toml");
    std::fs::write(
        &keys,
        key_entry("gateway", GATEWAY_KEY, r#"roles = ["infer", "read"]"#),
    )
    .expect("write keys");
    let token = dir.path().join("worker-token");
    std::fs::write(&token, format!("{GATEWAY_KEY}\n")).expect("write token");
    let models = repo_root().join("deploy/local/models");
    let keys_arg = keys.display().to_string();
    let (_worker, worker_addr) = start_worker_args(&models, 1, &["--keys-file", &keys_arg]);

    // The worker's own port: no key, no answer; probes stay open.
    assert_eq!(
        infer_code(&worker_addr, "demo", None),
        Code::Unauthenticated
    );
    assert_eq!(
        infer_code(&worker_addr, "demo", Some(GATEWAY_KEY)),
        Code::Ok
    );

    // A gateway that sends the key is served; one that does not gets the refusal.
    let route = format!(
        "[routes.demo]\nversions = [ {{ version = \"1\", weight = 100, endpoint = \"{worker_addr}\" }} ]\n"
    );
    let mut keyed = Served::gateway(
        &format!("[workers]\ntoken_file = \"{}\"\n\n{route}", token.display()),
        &[],
    );
    assert_eq!(infer_code(&keyed.addr, "demo", None), Code::Ok);
    let keyless = Served::gateway(&route, &[]);
    assert_eq!(
        infer_code(&keyless.addr, "demo", None),
        Code::Unauthenticated
    );

    // Rotation: the worker accepts only the new key, the token file holds it; the
    // gateway sends it from then on, without a restart.
    const NEW_KEY: &str = "gateway-key-e51d";
    std::fs::write(&token, format!("{NEW_KEY}\n")).expect("write token");
    std::fs::write(
        &keys,
        key_entry("gateway", NEW_KEY, r#"roles = ["infer", "read"]"#),
    )
    .expect("write keys");
    let rotated = eventually(KEYS_DEADLINE, || {
        infer_code(&keyed.addr, "demo", None) == Code::Ok
            && infer_code(&worker_addr, "demo", Some(GATEWAY_KEY)) == Code::Unauthenticated
    });
    assert!(rotated, "the gateway sends the rotated key");
    assert!(keyed.server.exited().is_none(), "no restart");
}

#[test]
fn a_controller_takes_keys_and_sends_its_own_to_the_gateways() {
    const CONTROLLER_KEY: &str = "controller-key-77e0";
    let dir = tempfile::tempdir().expect("temp dir");
    // The gateway knows ops and the controller (both admin); the controller knows ops.
    let gateway_keys = dir.path().join("gateway-keys.toml");
    let admin = r#"roles = ["admin"]"#;
    std::fs::write(
        &gateway_keys,
        key_entry("ops", OPS_KEY, admin) + &key_entry("controller", CONTROLLER_KEY, admin),
    )
    .expect("write keys");
    let controller_keys = dir.path().join("controller-keys.toml");
    std::fs::write(&controller_keys, key_entry("ops", OPS_KEY, admin)).expect("write keys");
    let token = dir.path().join("controller-token");
    std::fs::write(&token, CONTROLLER_KEY).expect("write token");
    let config = format!(
        "[auth]\nkeys_file = \"{}\"\n\n[rollouts]\ncontrolled = true\n\n{}",
        gateway_keys.display(),
        demo_config()
    );
    let gateway = Served::start(&config, &[]);
    let gateways = gateway.admin.trim_start_matches("http://").to_owned();
    let start_controller = |token_file: Option<&Path>| {
        let keys = controller_keys.display().to_string();
        let token = token_file.map(|t| t.display().to_string());
        let mut args = vec!["--keys-file", keys.as_str()];
        if let Some(token) = &token {
            args.extend(["--gateway-token-file", token.as_str()]);
        }
        start_controller_args(&gateways, &args)
    };
    let start_rollout = |admin: &str, key: Option<&str>| {
        let mut args = vec!["ctl", "--admin", admin];
        if let Some(key) = key {
            args.extend(["--token", key]);
        }
        args.extend(DEMO_ROLLOUT);
        run(&args, &[])
    };

    let (_keyed, admin) = start_controller(Some(&token));
    // The controller's own port wants a key.
    let anonymous = start_rollout(&admin, None).failed();
    assert!(
        anonymous.stderr.contains("Unauthenticated"),
        "{anonymous:?}"
    );
    // With one, it drives the gateway, which checks the controller's key.
    start_rollout(&admin, Some(OPS_KEY)).ok();
    let routes = gateway
        .ctl(&["--token", OPS_KEY, "routes", "--json"])
        .json();
    let canary =
        route_of(&routes, "demo").and_then(|versions| versions.into_iter().find(|(v, _)| v == "2"));
    assert_eq!(canary, Some(("2".to_owned(), 50)), "{routes:#}");

    // A controller without the gateway's key cannot check the plan against it.
    let (_keyless, admin) = start_controller(None);
    let refused = start_rollout(&admin, Some(OPS_KEY)).failed();
    assert!(
        refused.stderr.contains("unauthenticated") || refused.stderr.contains("API key"),
        "{refused:?}"
    );
}
