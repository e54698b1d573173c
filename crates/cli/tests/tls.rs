//! TLS on a gateway's listeners, through the binary: a client trusting the CA gets in,
//! a plaintext client and one trusting another CA do not; the admin listener and
//! `/metrics` with a client CA refuse a client without a certificate; and rotated
//! certificate files are used by new handshakes without a restart. A worker serves
//! its gRPC port and `/metrics` over TLS, and the gateway calls it presenting its own
//! certificate, rotated without a restart; a controller drives a gateway over mutual TLS, its certificate its
//! identity in the gateway's keys file.

mod support;

use std::{path::Path, time::Duration};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use support::*;

/// How soon rotated files are in force (hang protection; they are polled every second).
const ROTATION_DEADLINE: Duration = Duration::from_secs(20);

/// A CA: its certificate (PEM) and what signs with it.
struct Ca {
    pem: String,
    params: CertificateParams,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().expect("key");
        let pem = params.clone().self_signed(&key).expect("self-signed").pem();
        Ca { pem, params, key }
    }

    /// A leaf certificate for `names` signed by this CA: (cert PEM, key PEM).
    fn issue(&self, names: &[&str]) -> (String, String) {
        let issuer = self.params.clone().self_signed(&self.key).expect("issuer");
        let params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("params");
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &issuer, &self.key).expect("signed");
        (cert.pem(), key.serialize_pem())
    }
}

impl Ca {
    /// Writes this CA's certificate to `dir/<file>`.
    fn write_pem(&self, dir: &Path, file: &str) {
        std::fs::write(dir.join(file), &self.pem).expect("write");
    }

    /// Issues a leaf for `names` into `dir/<stem>.crt` and `dir/<stem>.key`.
    fn issue_to(&self, dir: &Path, stem: &str, names: &[&str]) {
        let (cert, key) = self.issue(names);
        std::fs::write(dir.join(format!("{stem}.crt")), cert).expect("write");
        std::fs::write(dir.join(format!("{stem}.key")), key).expect("write");
    }
}

/// Writes `text` to `path` the way a Secret update does: a new file renamed over it.
fn replace(path: &Path, text: &str) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, text).expect("write");
    std::fs::rename(&staged, path).expect("rename");
}

/// `aviary infer` on demo at `addr` with `extra` flags.
fn infer(addr: &str, extra: &[&str]) -> Output {
    let mut args = vec!["infer", "--addr", addr, "--model", "demo", "-i", ROW];
    args.extend_from_slice(extra);
    run(&args, &[])
}

#[test]
fn listeners_speak_tls_require_client_certificates_where_asked_and_rotate_without_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = |name: &str| dir.path().join(name).display().to_string();
    let first_ca = Ca::new("first CA");
    let client_ca = Ca::new("client CA");
    let (cert, key) = first_ca.issue(&["localhost", "127.0.0.1"]);
    std::fs::write(path("server.crt"), &cert).expect("write");
    std::fs::write(path("server.key"), &key).expect("write");
    std::fs::write(path("first-ca.crt"), &first_ca.pem).expect("write");
    std::fs::write(path("clients.crt"), &client_ca.pem).expect("write");
    let (client_cert, client_key) = client_ca.issue(&["ops"]);
    std::fs::write(path("client.crt"), &client_cert).expect("write");
    std::fs::write(path("client.key"), &client_key).expect("write");
    let (cert, key, clients) = (path("server.crt"), path("server.key"), path("clients.crt"));
    // The demo config has a [server] table: TLS goes into it.
    let config = demo_config().replace(
        "[server]\n",
        &format!(
            "[admin]\ntls = {{ cert = \"{cert}\", key = \"{key}\", client_ca = \"{clients}\" }}\n\n\
             [metrics]\ntls = {{ cert = \"{cert}\", key = \"{key}\", client_ca = \"{clients}\" }}\n\n\
             [http]\ntls = {{ cert = \"{cert}\", key = \"{key}\" }}\n\n\
             [server]\ntls = {{ cert = \"{cert}\", key = \"{key}\" }}\n"
        ),
    );
    let mut served = Served::start(&config, &[]);
    let https = format!("https://127.0.0.1:{}", served.inference.port());
    let admin = served.admin.replace("http://", "https://");

    // The inference listener: the CA's clients get in, plaintext and strangers do not.
    let first = path("first-ca.crt");
    let answered = infer(&https, &["--tls-ca", &first]).ok();
    assert!(answered.stdout.contains("demo"), "{answered:?}");
    infer(&served.addr, &[]).failed();
    let stranger = path("clients.crt");
    infer(&https, &["--tls-ca", &stranger]).failed();
    let no_ca = infer(&https, &[]).failed();
    assert!(no_ca.stderr.contains("--tls-ca"), "{no_ca:?}");
    let mixed = infer(&served.addr, &["--tls-ca", &first]).failed();
    assert!(mixed.stderr.contains("use https://"), "{mixed:?}");

    // The admin listener wants a client certificate its client CA signed.
    let ctl = |extra: &[&str]| {
        let mut args = vec!["ctl", "--admin", admin.as_str(), "--tls-ca", first.as_str()];
        args.extend_from_slice(extra);
        args.push("routes");
        run(&args, &[])
    };
    ctl(&[]).failed();
    let (client_cert, client_key) = (path("client.crt"), path("client.key"));
    let routes = ctl(&["--tls-cert", &client_cert, "--tls-key", &client_key]).ok();
    assert!(routes.stdout.contains("demo"), "{routes:?}");

    // So does /metrics: HTTPS only, and a scraper needs a certificate.
    let metrics = served.metrics_addr();
    let (first_ca, identity) = (dir.path().join("first-ca.crt"), dir.path().join("client"));
    let (certificate, private_key) = (
        identity.with_extension("crt"),
        identity.with_extension("key"),
    );
    let (status, _, body) = scrape_tls(metrics, &first_ca, Some((&certificate, &private_key)))
        .expect("a scraper with a certificate gets in");
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("aviary_requests_total"), "{body}");
    scrape_tls(metrics, &first_ca, None).expect_err("no certificate, no metrics");
    let plain = std::net::TcpStream::connect(metrics).and_then(|mut stream| {
        use std::io::{Read, Write};
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: aviary\r\n\r\n")?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).map(|_| answer)
    });
    assert!(
        !plain.is_ok_and(|answer| String::from_utf8_lossy(&answer).contains("aviary_")),
        "plaintext HTTP gets no metrics"
    );

    // HTTP/REST is HTTPS beside a TLS gRPC listener, with the same certificate.
    let http = served.http_addr();
    let (status, _, _) =
        get_tls(http, "/v2/health/ready", &first_ca, None).expect("HTTPS with the server's CA");
    assert!(status.contains("200"), "{status}");

    // Rotation: a certificate from another CA replaces the files; new handshakes use it.
    let second_ca = Ca::new("second CA");
    std::fs::write(path("second-ca.crt"), &second_ca.pem).expect("write");
    let (cert, key) = second_ca.issue(&["localhost", "127.0.0.1"]);
    replace(&dir.path().join("server.key"), &key);
    replace(&dir.path().join("server.crt"), &cert);
    let second = path("second-ca.crt");
    let rotated = eventually(ROTATION_DEADLINE, || {
        infer(&https, &["--tls-ca", &second]).status.success()
    });
    assert!(rotated, "the rotated certificate is served");
    infer(&https, &["--tls-ca", &first]).failed();
    assert!(served.server.exited().is_none(), "no restart");
}

#[test]
fn the_gateway_calls_its_workers_over_tls_presenting_its_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = |name: &str| dir.path().join(name).display().to_string();
    let worker_ca = Ca::new("worker CA");
    let gateway_ca = Ca::new("gateway CA");
    worker_ca.issue_to(dir.path(), "worker", &["localhost", "127.0.0.1"]);
    gateway_ca.issue_to(dir.path(), "gateway", &["gateway"]);
    worker_ca.write_pem(dir.path(), "worker-ca.crt");
    gateway_ca.write_pem(dir.path(), "gateway-ca.crt");
    let models = repo_root().join("deploy/local/models");
    let (worker_cert, worker_key, clients) = (
        path("worker.crt"),
        path("worker.key"),
        path("gateway-ca.crt"),
    );
    let (mut worker, plain) = start_worker_args(
        &models,
        1,
        &[
            "--tls-cert",
            &worker_cert,
            "--tls-key",
            &worker_key,
            "--tls-client-ca",
            &clients,
            "--metrics-tls",
        ],
    );
    // Its /metrics takes the same files: HTTPS, and a client certificate.
    let metrics = worker.wait_address("aviary: metrics listening on ");
    let worker_ca = dir.path().join("worker-ca.crt");
    let identity = (
        dir.path().join("gateway.crt"),
        dir.path().join("gateway.key"),
    );
    let (status, _, _) = scrape_tls(metrics, &worker_ca, Some((&identity.0, &identity.1)))
        .expect("a scraper with a certificate gets in");
    assert!(status.contains("200"), "{status}");
    scrape_tls(metrics, &worker_ca, None).expect_err("no certificate, no metrics");
    let https = plain.replace("http://", "https://");
    let gateway = |tls: &str, endpoint: &str| {
        Served::gateway(
            &format!(
                "[workers]\ntls = {tls}\n\n[routes.demo]\nversions = [ {{ version = \"1\", weight = 100, endpoint = \"{endpoint}\" }} ]\n"
            ),
            &[],
        )
    };
    let with_certificate = format!(
        "{{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}",
        path("worker-ca.crt"),
        path("gateway.crt"),
        path("gateway.key")
    );
    let served = gateway(&with_certificate, &https);
    let answered = infer(&served.addr, &[]).ok();
    assert!(answered.stdout.contains("demo"), "{answered:?}");

    // The worker wants the gateway's certificate; and it speaks TLS only.
    let without_certificate = format!("{{ ca = \"{}\" }}", path("worker-ca.crt"));
    let refused = gateway(&without_certificate, &https);
    infer(&refused.addr, &[]).failed();
    let plaintext = gateway(&with_certificate, &plain);
    infer(&plaintext.addr, &[]).failed();

    // A certificate the worker does not trust is refused; once the files are rotated to
    // one it does, new connections present it, without a restart.
    Ca::new("stranger CA").issue_to(dir.path(), "rotating", &["gateway"]);
    let rotating = format!(
        "{{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}",
        path("worker-ca.crt"),
        path("rotating.crt"),
        path("rotating.key")
    );
    let mut rotated = gateway(&rotating, &https);
    infer(&rotated.addr, &[]).failed();
    let (trusted_cert, trusted_key) = gateway_ca.issue(&["gateway"]);
    replace(&dir.path().join("rotating.key"), &trusted_key);
    replace(&dir.path().join("rotating.crt"), &trusted_cert);
    let answered = eventually(ROTATION_DEADLINE, || {
        infer(&rotated.addr, &[]).status.success()
    });
    assert!(answered, "the rotated client certificate is presented");
    assert!(rotated.server.exited().is_none(), "no restart");
}

#[test]
fn a_controller_drives_a_gateway_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = |name: &str| dir.path().join(name).display().to_string();
    let gateway_ca = Ca::new("gateway CA");
    let controller_ca = Ca::new("controller CA");
    gateway_ca.issue_to(dir.path(), "gateway", &["localhost", "127.0.0.1"]);
    gateway_ca.write_pem(dir.path(), "gateway-ca.crt");
    controller_ca.write_pem(dir.path(), "controller-ca.crt");
    controller_ca.issue_to(dir.path(), "controller", &["controller"]);
    controller_ca.issue_to(dir.path(), "viewer", &["viewer.ops.example"]);
    // Callers are their certificates: the controller is admin, the viewer may read.
    std::fs::write(
        path("keys.toml"),
        "[[keys]]\nname = \"controller\"\nclient_cert = \"controller\"\nroles = [\"admin\"]\n\n\
         [[keys]]\nname = \"viewer\"\nclient_cert = \"viewer.ops.example\"\nroles = [\"read\"]\n",
    )
    .expect("write keys");
    let config = format!(
        "[admin]\ntls = {{ cert = \"{}\", key = \"{}\", client_ca = \"{}\" }}\n\n\
         [auth]\nkeys_file = \"{}\"\n\n[rollouts]\ncontrolled = true\n\n{}",
        path("gateway.crt"),
        path("gateway.key"),
        path("controller-ca.crt"),
        path("keys.toml"),
        demo_config()
    );
    let gateway = Served::start(&config, &[]);
    let gateways = gateway.admin.trim_start_matches("http://").to_owned();
    let ca = path("gateway-ca.crt");
    let start_controller = |identity: &[&str]| {
        let mut args = vec!["--gateway-tls-ca", ca.as_str()];
        args.extend_from_slice(identity);
        start_controller_args(&gateways, &args)
    };
    let start_rollout = |admin: &str| {
        let mut args = vec!["ctl", "--admin", admin];
        args.extend(DEMO_ROLLOUT);
        run(&args, &[])
    };

    // Without a certificate of its own the gateway's admin listener refuses it.
    let (_anonymous, admin) = start_controller(&[]);
    start_rollout(&admin).failed();

    let (cert, key) = (path("controller.crt"), path("controller.key"));
    let (_controller, admin) =
        start_controller(&["--gateway-tls-cert", &cert, "--gateway-tls-key", &key]);
    start_rollout(&admin).ok();
    let tls_ca = path("gateway-ca.crt");
    let https = gateway.admin.replace("http://", "https://");
    let (viewer_cert, viewer_key) = (path("viewer.crt"), path("viewer.key"));
    let as_viewer = |args: &[&str]| {
        let mut all = vec![
            "ctl",
            "--admin",
            https.as_str(),
            "--tls-ca",
            tls_ca.as_str(),
            "--tls-cert",
            viewer_cert.as_str(),
            "--tls-key",
            viewer_key.as_str(),
        ];
        all.extend_from_slice(args);
        run(&all, &[])
    };
    let routes = as_viewer(&["routes", "--json"]).json();
    // The viewer's certificate grants read, not admin.
    let denied = as_viewer(&["set-weights", "demo", "1=100", "2=0"]).failed();
    assert!(
        denied.stderr.contains("PermissionDenied") && denied.stderr.contains("viewer"),
        "{denied:?}"
    );
    let canary =
        route_of(&routes, "demo").and_then(|versions| versions.into_iter().find(|(v, _)| v == "2"));
    assert_eq!(canary, Some(("2".to_owned(), 50)), "{routes:#}");
}
