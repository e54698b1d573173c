//! Sticky routing keys and match rules through a real gateway: the header a client
//! sends decides the version, and raising the canary's weight never moves a user out
//! of it.
mod support;

use std::collections::BTreeMap;

use aviary::pb::inference::{InferParameter, infer_parameter::ParameterChoice};
use tonic::Request;

const ROW: [[f32; 4]; 1] = [[5.1, 3.5, 1.4, 0.2]];

/// Demo with version 2 (the canary) listed first, sticky on `x-user-id`, and a rule
/// sending `x-canary: always` to version 2 whatever the split says.
const ROUTES: &str = r#"
[routes.demo]
versions = [ { version = "2", weight = 10 }, { version = "1", weight = 90 } ]
sticky = { header = "x-user-id" }
rules = [
  { header = "x-canary", equals = "always", version = "2" },
  { parameter = "tier", prefix = "beta-", version = "2" },
]
"#;

async fn version_for(
    client: &mut aviary::pb::inference::grpc_inference_service_client::GrpcInferenceServiceClient<
        tonic::transport::Channel,
    >,
    headers: &[(&'static str, String)],
    parameters: &[(&str, &str)],
) -> String {
    let mut body = support::demo_request(&ROW, "");
    for (name, value) in parameters {
        body.parameters.insert(
            (*name).to_owned(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam((*value).to_owned())),
            },
        );
    }
    let mut request = Request::new(body);
    for (name, value) in headers {
        request
            .metadata_mut()
            .insert(*name, value.parse().expect("ascii header"));
    }
    client
        .model_infer(request)
        .await
        .expect("infer succeeds")
        .into_inner()
        .model_version
}

async fn set_weights(gateway: &support::Running, canary: u32, baseline: u32) {
    gateway
        .admin()
        .await
        .set_weights("demo", &[("2", canary), ("1", baseline)])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_users_keep_their_version_and_only_move_into_the_canary() {
    let gateway = support::start_embedded(ROUTES).await;
    let mut client = gateway.client().await;
    let users: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();

    let mut at_10 = BTreeMap::new();
    for user in &users {
        let first = version_for(&mut client, &[("x-user-id", user.clone())], &[]).await;
        let again = version_for(&mut client, &[("x-user-id", user.clone())], &[]).await;
        assert_eq!(first, again, "{user} changed version at fixed weights");
        at_10.insert(user.clone(), first);
    }
    let canary = at_10.values().filter(|v| *v == "2").count();
    // 1,000 users at 10%: binomial sd is 0.95 pp, so ±5 pp is a >5-sigma bound.
    assert!(
        (50..=150).contains(&canary),
        "{canary} of 1000 users in the canary at 10%"
    );

    set_weights(&gateway, 50, 50).await;
    let routes = gateway.admin().await.weights("demo").await;
    assert_eq!(routes, support::owned(&[("2", 50), ("1", 50)]));
    let mut moved_in = 0;
    for user in &users {
        let now = version_for(&mut client, &[("x-user-id", user.clone())], &[]).await;
        // The admin API kept the sticky key: at 50/50 an unsticky user would change
        // version on every other request.
        let again = version_for(&mut client, &[("x-user-id", user.clone())], &[]).await;
        assert_eq!(now, again, "{user} changed version at fixed weights 50/50");
        if at_10[user] == "2" {
            assert_eq!(
                now, "2",
                "{user} left the canary when its weight went 10% -> 50%"
            );
        } else if now == "2" {
            moved_in += 1;
        }
    }
    // It kept the match rules: they send every one of these to version 2, also users
    // the sticky key keeps on version 1; the 50/50 split alone would send the 50
    // requests without a sticky key there with odds of 2^-50.
    for user in users.iter().take(50) {
        let headers = [
            ("x-user-id", user.clone()),
            ("x-canary", "always".to_owned()),
        ];
        assert_eq!(version_for(&mut client, &headers, &[]).await, "2");
        let tier = format!("beta-{user}");
        assert_eq!(version_for(&mut client, &[], &[("tier", &tier)]).await, "2");
    }
    assert!(
        moved_in > 0,
        "raising the canary to 50% moved nobody into it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_rules_override_the_split_even_at_weight_zero() {
    let gateway = support::start_embedded(ROUTES).await;
    set_weights(&gateway, 0, 100).await;
    let mut client = gateway.client().await;
    for i in 0..50 {
        let user = format!("user-{i}");
        assert_eq!(
            version_for(&mut client, &[("x-user-id", user.clone())], &[]).await,
            "1"
        );
        let forced = version_for(
            &mut client,
            &[("x-user-id", user), ("x-canary", "always".into())],
            &[],
        )
        .await;
        assert_eq!(forced, "2", "the x-canary rule picks the dark version");
    }
    assert_eq!(
        version_for(&mut client, &[], &[("tier", "beta-7")]).await,
        "2"
    );
    assert_eq!(
        version_for(&mut client, &[], &[("tier", "gold")]).await,
        "1"
    );
    assert_eq!(
        version_for(&mut client, &[("x-canary", "sometimes".into())], &[]).await,
        "1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_rules_are_rejected_with_their_paths() {
    let broken = r#"
[routes.demo]
versions = [ { version = "1", weight = 1 } ]
sticky = { header = "" }
rules = [ { header = "x-a", regex = "^(qa", version = "1" }, { parameter = "p", equals = "x", version = "9" } ]
"#;
    let text = format!("[repository]\npath = \"{{models}}\"\n\n{broken}");
    let error = support::rejected_at_start(&text, aviary_gateway::Mode::Embedded).await;
    for path in [
        "routes.demo.sticky",
        "routes.demo.rules[0].regex",
        "routes.demo.rules[1].version",
    ] {
        assert!(error.contains(path), "{path} missing from: {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_fail_only_their_version_and_survive_weight_changes() {
    let gateway = support::start_embedded(
        r#"
[routes.demo]
versions = [ { version = "2", weight = 50, fault = { error_rate = 1.0 } }, { version = "1", weight = 50 } ]
"#,
    )
    .await;
    let mut client = gateway.client().await;
    let pinned = |version: &str| support::demo_request(&ROW, version);
    let status = client
        .model_infer(pinned("2"))
        .await
        .expect_err("version 2 always fails");
    assert_eq!(status.code(), tonic::Code::Internal);
    assert!(
        status.message().contains("injected fault"),
        "{}",
        status.message()
    );
    client
        .model_infer(pinned("1"))
        .await
        .expect("version 1 is untouched");

    // Weights set through the admin API keep the configured fault.
    set_weights(&gateway, 10, 90).await;
    let status = client
        .model_infer(pinned("2"))
        .await
        .expect_err("still faulty");
    assert_eq!(status.code(), tonic::Code::Internal);

    let invalid = "[repository]\npath = \"{models}\"\n[routes.demo]\nversions = [ { version = \"1\", weight = 1, fault = { error_rate = 1.5 } } ]\n";
    let error = support::rejected_at_start(invalid, aviary_gateway::Mode::Embedded).await;
    assert!(
        error.contains("routes.demo.versions[0].fault.error_rate"),
        "{error}"
    );
}

/// An HTTP/REST inference of ROW with `headers` and JSON `parameters`: the version
/// that answered, by the body and by `x-aviary-variant`, which must agree.
async fn http_version_for(
    gateway: &support::Running,
    headers: &[(&str, &str)],
    parameters: serde_json::Value,
) -> String {
    let body = serde_json::json!({
        "parameters": parameters,
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ROW}],
    });
    let answer = support::http_request(
        gateway.http_addr.expect("a gateway serves HTTP/REST"),
        "POST",
        "/v2/models/demo/infer",
        headers,
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let json: serde_json::Value = serde_json::from_slice(&answer.body).expect("JSON answer");
    let version = json["model_version"]
        .as_str()
        .expect("model_version")
        .to_owned();
    assert_eq!(answer.headers["x-aviary-variant"], version);
    version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_are_routed_by_the_same_rules_and_sticky_keys() {
    let gateway = support::start_embedded(ROUTES).await;
    set_weights(&gateway, 0, 100).await;
    let none = serde_json::json!({});
    for _ in 0..20 {
        assert_eq!(http_version_for(&gateway, &[], none.clone()).await, "1");
    }
    // A header rule and a parameter rule pick the canary at weight 0; the parameter is
    // the gateway's (the worker would refuse a parameter it does not know).
    assert_eq!(
        http_version_for(&gateway, &[("x-canary", "always")], none.clone()).await,
        "2"
    );
    let tier = serde_json::json!({"tier": "beta-7"});
    assert_eq!(http_version_for(&gateway, &[], tier).await, "2");
    // A sticky user gets over HTTP the version it gets over gRPC.
    set_weights(&gateway, 50, 50).await;
    let mut client = gateway.client().await;
    for i in 0..20 {
        let user = format!("user-{i}");
        let grpc = version_for(&mut client, &[("x-user-id", user.clone())], &[]).await;
        let http = http_version_for(&gateway, &[("x-user-id", &user)], none.clone()).await;
        assert_eq!(grpc, http, "{user}");
    }
}
