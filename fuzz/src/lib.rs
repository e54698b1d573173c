//! The fuzz harnesses, one function per cargo-fuzz target (`fuzz_targets/*.rs` only
//! call them). Each feeds arbitrary bytes to code that takes input from outside the
//! process, and checks more than "did not panic": a success satisfies the invariants
//! the rest of Aviary relies on, and a refusal carries a client-error code and a
//! message that says what is wrong.
//!
//! - [`infer_request`]: a `ModelInferRequest` decoded within the decode budget, then
//!   validated and decoded against model schemas of every kind of input, and the
//!   decoded inputs checked against model-card input rules in both modes.
//! - [`config`]: the gateway's config parser, then its routes compiled.
//! - [`route_plan`]: a route and a rollout plan (JSON) validated, and the compiled
//!   route asked for versions.
//! - [`admin_messages`]: each admin request message (and Triton's repository load)
//!   decoded, then converted and checked as its handler does before any I/O.

use std::collections::{BTreeMap, BTreeSet};

use aviary::{
    contents::decode_within,
    names::{model_name_problem, version_name_problem},
    pb::{
        admin::{
            AuditQuery, FeedbackRequest, ReplayDeadLettersRequest, RolloutPlan as PlanMessage,
            RolloutWeights, SetRouteRequest, UnloadVersionRequest, VersionRequest,
        },
        inference::{ModelInferRequest, RepositoryModelLoadRequest, RepositoryModelUnloadRequest},
    },
    tensor::Datatype,
};
use aviary_gateway::{
    Config,
    admin::{filter_of, plan_from_message},
    route::{Route, Routes},
    routing::check_routes,
};
use aviary_router::{Attributes, RouteSpec, RouteTable, rollout::RolloutPlan};
use aviary_worker::{
    input_rules::{InputRules, InputRulesCard},
    schema::{ModelSchema, TensorSpec},
    validate::{ValidatedRequest, validate},
};
use prost::Message;
use rand::{SeedableRng, rngs::SmallRng};
use serde::Deserialize;
use tonic::Code;

/// The decode budget of the harnesses: small, so over-budget paths are reached often.
const DECODE_LIMIT: u64 = 1 << 20;

/// Decodes `data` as a `ModelInferRequest` the way the servers' codec does, then
/// validates it against each schema.
pub fn infer_request(data: &[u8]) {
    let (decoded, over) = decode_within(DECODE_LIMIT, || ModelInferRequest::decode(data));
    let request = match (decoded, over) {
        (Ok(request), None) => request,
        (Err(_), Some(over)) => {
            assert!(!over.to_string().is_empty());
            return;
        }
        (Err(_), None) => return,
        (Ok(_), Some(over)) => panic!("decoded a request over its budget: {over}"),
    };
    for (schema, rules) in schemas().into_iter().zip(RULES) {
        match validate(&schema, &request) {
            Ok(validated) => {
                check_rules(&schema, rules, &validated);
                assert_eq!(validated.inputs.len(), schema.inputs.len());
                for (input, spec) in validated.inputs.iter().zip(&schema.inputs) {
                    assert_eq!(input.name, spec.name);
                    assert_eq!(input.data.datatype(), spec.datatype);
                    assert_eq!(input.shape.len(), spec.shape.len());
                    let elements = input.shape.iter().try_fold(1usize, |n, &d| {
                        assert!(d >= 0, "a validated shape has {d}");
                        n.checked_mul(usize::try_from(d).ok()?)
                    });
                    assert_eq!(elements, Some(input.data.len()));
                }
                for output in &validated.outputs {
                    assert!(schema.output(output).is_some(), "unknown output {output}");
                }
            }
            Err(error) => {
                let code = error.code();
                assert!(
                    matches!(code, Code::InvalidArgument | Code::ResourceExhausted),
                    "a malformed request got {code:?}: {error}"
                );
                assert!(!error.to_string().is_empty());
            }
        }
    }
}

/// Parses `data` as a gateway config file and compiles its routes against the
/// versions they name.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Ok(config) => {
            let routes = Route::all_from(&config.routes);
            let inventory = inventory_of(&routes);
            if let Ok(table) = check_routes(&routes, true, &inventory) {
                ask_for_versions(&table, &routes);
            }
        }
        Err(message) => assert!(!message.is_empty()),
    }
}

/// The input of [`route_plan`]: a route and a rollout plan as the config file gives
/// them, and a request's headers and pin to route with it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAndPlan {
    model: String,
    route: RouteSpec,
    #[serde(default)]
    plan: Option<RolloutPlan>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    pin: Option<String>,
}

impl RouteAndPlan {
    /// Reads the JSON form.
    pub fn parse(data: &[u8]) -> Result<RouteAndPlan, serde_json::Error> {
        serde_json::from_slice(data)
    }
}

/// Validates a route (JSON) against a fixed repository, routes a request with it, and
/// validates a rollout plan.
pub fn route_plan(data: &[u8]) {
    let Ok(input) = RouteAndPlan::parse(data) else {
        return;
    };
    let inventory: BTreeMap<String, BTreeSet<String>> =
        [("demo", &["1", "2", "3"][..]), ("iris", &["1"][..])]
            .into_iter()
            .map(|(m, vs)| (m.to_owned(), vs.iter().map(|v| (*v).to_owned()).collect()))
            .collect();
    let specs = BTreeMap::from([(input.model.clone(), input.route.clone())]);
    match RouteTable::compile(&specs, &inventory) {
        Ok(table) => {
            let attributes = input
                .headers
                .iter()
                .fold(Attributes::new(), |a, (k, v)| a.with_header(k, v));
            let route = table
                .route(&input.model)
                .expect("a compiled model has a route");
            let listed: BTreeSet<&str> = route.versions().map(|(v, _)| v).collect();
            let mut rng = SmallRng::seed_from_u64(data.len() as u64);
            let first =
                table.resolve_with(&input.model, input.pin.as_deref(), &attributes, &mut rng);
            match (&first, input.pin.as_deref().filter(|p| !p.is_empty())) {
                (Ok(decision), Some(pin)) => assert_eq!(decision.version, pin),
                (Ok(decision), None) => assert!(listed.contains(decision.version)),
                (Err(_), Some(pin)) => assert!(!listed.contains(pin)),
                (Err(error), None) => panic!("an unpinned request found no version: {error}"),
            }
        }
        Err(errors) => assert!(!errors.to_string().is_empty()),
    }
    if let Some(plan) = input.plan
        && let Err(errors) = plan.validate()
    {
        assert!(!errors.to_string().is_empty());
    }
}

/// Decodes the admin message the first byte selects from the rest, and runs the
/// checks its handler runs before any I/O.
pub fn admin_messages(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match selector % 9 {
        0 => {
            let Some(request) = decode::<SetRouteRequest>(body) else {
                return;
            };
            let Some(message) = request.route else { return };
            let routes = Routes::from([(message.model.clone(), Route::from_message(&message))]);
            let inventory = inventory_of(&routes);
            for embedded in [true, false] {
                if let Err(error) = check_routes(&routes, embedded, &inventory) {
                    client_error(tonic::Status::from(error));
                }
            }
        }
        1 => {
            if let Some(message) = decode::<PlanMessage>(body) {
                let _ = plan_from_message(message).validate();
            }
        }
        2 => {
            if let Some(query) = decode::<AuditQuery>(body)
                && let Err(status) = filter_of(query)
            {
                client_error(status);
            }
        }
        3 => {
            if let Some(request) = decode::<VersionRequest>(body) {
                names(&request.model, &request.version);
            }
        }
        4 => {
            if let Some(request) = decode::<UnloadVersionRequest>(body) {
                names(&request.model, &request.version);
            }
        }
        5 => {
            if let Some(request) = decode::<RepositoryModelLoadRequest>(body) {
                names(&request.model_name, "1");
            }
        }
        6 => {
            if let Some(request) = decode::<RepositoryModelUnloadRequest>(body) {
                names(&request.model_name, "1");
            }
        }
        7 => {
            let _ = decode::<FeedbackRequest>(body);
            let _ = decode::<ReplayDeadLettersRequest>(body);
        }
        _ => {
            let _ = decode::<RolloutWeights>(body);
        }
    }
}

fn decode<M: Message + Default>(body: &[u8]) -> Option<M> {
    decode_within(DECODE_LIMIT, || M::decode(body)).0.ok()
}

/// A refusal of client input names a client-side code and says why.
fn client_error(status: tonic::Status) {
    assert!(
        matches!(
            status.code(),
            Code::InvalidArgument | Code::FailedPrecondition | Code::NotFound
        ),
        "client input got {:?}: {}",
        status.code(),
        status.message()
    );
    assert!(!status.message().is_empty());
}

/// The one name check: a name it accepts can never leave a repository folder.
fn names(model: &str, version: &str) {
    for name in [model, version] {
        let problem = match name == model {
            true => model_name_problem(name),
            false => version_name_problem(name),
        };
        if problem.is_none() {
            assert!(
                !name.is_empty() && name != "." && name != "..",
                "{name:?} accepted"
            );
            assert!(!name.contains(['/', '\\', '\0']), "{name:?} accepted");
            let mut parts = std::path::Path::new(name).components();
            assert!(
                matches!(parts.next(), Some(std::path::Component::Normal(_)))
                    && parts.next().is_none(),
                "{name:?} is not one plain path component"
            );
        }
    }
}

/// Every version the routes name, as if all were loaded.
fn inventory_of(routes: &Routes) -> BTreeMap<String, BTreeSet<String>> {
    routes
        .iter()
        .map(|(model, route)| {
            let versions = route.versions.iter().map(|v| v.version.clone()).collect();
            (model.clone(), versions)
        })
        .collect()
}

/// Each compiled route gives an unpinned request one of its versions.
fn ask_for_versions(table: &RouteTable, routes: &Routes) {
    let mut rng = SmallRng::seed_from_u64(7);
    for model in routes.keys() {
        let decision = table
            .resolve(model, None, &mut rng)
            .unwrap_or_else(|e| panic!("route of {model:?} compiled but routes nothing: {e}"));
        assert!(
            routes[model]
                .versions
                .iter()
                .any(|v| v.version == decision.version)
        );
    }
}

/// Input rules for each of [`schemas`]: features on fixed and variable last
/// dimensions, ranges, allowed numbers and strings, NaN and infinity policies.
const RULES: [&str; 2] = [
    r#"
[inputs.input]
features = [
  { name = "a", min = 0.0, max = 10.0 },
  { name = "b", allowed = [1.0, 2.0] },
  { nan = "allow", inf = "allow", min = -1.0 },
  {},
]
"#,
    r#"
[inputs.text]
allowed = ["yes", "no"]
[inputs.ids]
features = [{ min = 0.0 }, { max = 100.0 }, { allowed = [7.0] }]
[inputs.mask]
allowed = [0.0, 1.0]
[inputs.half]
min = -1.0
max = 1.0
[inputs.wide]
features = [{ nan = "allow" }, { inf = "allow", max = 5.0 }]
[inputs.u64]
max = 1152921504606846976.0
"#,
];

/// Checks `validated` against `rules` in both modes: a refusal names a ruled input, a
/// row inside the request and a rule in words; flag mode refuses nothing a reject
/// would not, and counts at least what reject mode counted.
fn check_rules(schema: &ModelSchema, rules: &str, validated: &ValidatedRequest) {
    let card: InputRulesCard = toml::from_str(rules).expect("the harness's rules parse");
    let reject = InputRules::from_card(&card, schema).expect("the harness's rules apply");
    let flag_card = InputRulesCard {
        mode: aviary_worker::input_rules::RuleMode::Flag,
        ..card.clone()
    };
    let flag = InputRules::from_card(&flag_card, schema).expect("the harness's rules apply");
    let refused = reject.check(&validated.inputs);
    let flagged = flag.check(&validated.inputs);
    match (&refused, &flagged) {
        (Err(a), Err(b)) => assert_eq!(a, b, "a shape mismatch is refused in both modes"),
        (Ok(violation), Ok(None)) => {
            if let Some(v) = violation {
                assert!(card.inputs.contains_key(&v.input), "{v}");
                let input = validated
                    .inputs
                    .iter()
                    .find(|i| i.name == v.input)
                    .expect("the named input was sent");
                assert!(v.index < input.data.len().max(1), "{v}");
                assert!(!v.rule.is_empty() && v.to_string().contains(&v.value));
            }
            let counted =
                |rules: &InputRules| -> u64 { rules.counts().iter().map(|(_, _, _, n)| n).sum() };
            assert_eq!(counted(&reject), u64::from(violation.is_some()));
            assert!(counted(&flag) >= counted(&reject));
        }
        (refused, flagged) => panic!("reject {refused:?} but flag {flagged:?}"),
    }
}

/// Model schemas that between them take every datatype, fixed and variable
/// dimensions, several inputs and several outputs.
fn schemas() -> [ModelSchema; 2] {
    let spec = |name: &str, datatype, shape: &[i64]| TensorSpec {
        name: name.to_owned(),
        datatype,
        shape: shape.to_vec(),
    };
    [
        ModelSchema {
            inputs: vec![spec("input", Datatype::Fp32, &[-1, 4])],
            outputs: vec![spec("output", Datatype::Fp32, &[-1, 3])],
        },
        ModelSchema {
            inputs: vec![
                spec("text", Datatype::Bytes, &[-1]),
                spec("ids", Datatype::Int64, &[-1, -1]),
                spec("mask", Datatype::Bool, &[-1, 8]),
                spec("half", Datatype::Fp16, &[2, -1]),
                spec("brain", Datatype::Bf16, &[-1]),
                spec("small", Datatype::Int8, &[3]),
                spec("wide", Datatype::Fp64, &[-1, 2]),
                spec("u16", Datatype::Uint16, &[-1]),
                spec("u32", Datatype::Uint32, &[-1]),
                spec("u64", Datatype::Uint64, &[-1]),
                spec("i16", Datatype::Int16, &[-1]),
                spec("i32", Datatype::Int32, &[-1]),
                spec("u8", Datatype::Uint8, &[-1]),
            ],
            outputs: vec![
                spec("label", Datatype::Int64, &[-1]),
                spec("scores", Datatype::Fp32, &[-1, 2]),
            ],
        },
    ]
}
