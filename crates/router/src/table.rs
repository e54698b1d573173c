//! The route table snapshot the gateway reads, and per-request decisions.

use std::collections::BTreeMap;

use rand::Rng;

use crate::attributes::RequestAttributes;
use crate::error::{RouteError, ValidationErrors};
use crate::route::Route;
use crate::spec::{Inventory, RouteSpec};
use crate::validate;

/// Every model's compiled route: an immutable snapshot, cheap to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    routes: BTreeMap<String, Route>,
}

/// The outcome of routing one request: the version that answers it, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'a> {
    /// The chosen version.
    pub version: &'a str,
    /// Why that version was chosen.
    pub reason: DecisionReason,
}

/// Why a version was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecisionReason {
    /// The request named the version.
    Pinned,
    /// The match rule at this index (in the route's `rules`) matched the request.
    Rule(usize),
    /// The request's routing key placed it in the version's segment of the split.
    Sticky,
    /// The version was drawn from the weighted split.
    Weighted,
    /// The request continues a sequence: the version that served its start.
    Sequence,
}

impl DecisionReason {
    /// A short lowercase name, for metric labels and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pinned => "pinned",
            Self::Rule(_) => "rule",
            Self::Sticky => "sticky",
            Self::Weighted => "weighted",
            Self::Sequence => "sequence",
        }
    }
}

impl RouteTable {
    /// Validates every spec against `inventory` and compiles them; returns all errors, each with its path.
    pub fn compile(
        specs: &BTreeMap<String, RouteSpec>,
        inventory: &impl Inventory,
    ) -> Result<Self, ValidationErrors> {
        let mut errors = Vec::new();
        let mut routes = BTreeMap::new();
        for (model, spec) in specs {
            if let Some(route) = validate::compile_route(model, spec, inventory, &mut errors) {
                routes.insert(model.clone(), route);
            }
        }
        match ValidationErrors::from_vec(errors) {
            Some(errors) => Err(errors),
            None => Ok(Self { routes }),
        }
    }

    /// A table that routes nothing.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The routed models, in name order.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }

    /// The compiled route of `model`, if it is routed.
    pub fn route(&self, model: &str) -> Option<&Route> {
        self.routes.get(model)
    }

    /// Decides the version for a request with no headers or parameters; `pinned` is
    /// the request's `model_version`.
    ///
    /// The same as [`resolve_with`](Self::resolve_with) with no attributes: a pin,
    /// else a weighted draw with `rng` (no rule can match and there is no sticky key).
    pub fn resolve<R: Rng + ?Sized>(
        &self,
        model: &str,
        pinned: Option<&str>,
        rng: &mut R,
    ) -> Result<Decision<'_>, RouteError> {
        self.resolve_with(model, pinned, &(), rng)
    }

    /// Decides the version for one request; `pinned` is the request's `model_version`.
    ///
    /// In order of precedence:
    ///
    /// 1. A pin must name one of the route's versions, even one with weight 0: pinning
    ///    a loaded zero-weight version is how operators try out a dark version.
    ///    `Some("")` counts as no pin, as an empty `model_version` does in the v2
    ///    protocol.
    /// 2. The first match rule whose attribute matches picks its version (weight 0
    ///    included).
    /// 3. With a sticky key configured and present (and not empty) in `attributes`, the
    ///    key's hash picks the version, the same one every time while weights stay put.
    /// 4. Otherwise the version is drawn from the weighted split with `rng`.
    ///
    /// Apart from building an error, this does not allocate.
    pub fn resolve_with<R, A>(
        &self,
        model: &str,
        pinned: Option<&str>,
        attributes: &A,
        rng: &mut R,
    ) -> Result<Decision<'_>, RouteError>
    where
        R: Rng + ?Sized,
        A: RequestAttributes + ?Sized,
    {
        let route = self.route(model).ok_or_else(|| RouteError::UnknownModel {
            model: model.to_owned(),
        })?;
        match pinned.filter(|version| !version.is_empty()) {
            Some(version) => match route.find(version) {
                Some(version) => Ok(Decision {
                    version,
                    reason: DecisionReason::Pinned,
                }),
                None => Err(RouteError::UnknownVersion {
                    model: model.to_owned(),
                    version: version.to_owned(),
                    routable: route.versions().map(|(v, _)| v.to_owned()).collect(),
                }),
            },
            None => route
                .decide(attributes, rng)
                .ok_or_else(|| RouteError::PinnedOnly {
                    model: model.to_owned(),
                    routable: route.versions().map(|(v, _)| v.to_owned()).collect(),
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    use super::*;
    use crate::Attributes;
    use crate::spec::VersionWeight;

    /// `demo` routes 70/30 to versions 1 and 2 and has a dark version 3 with weight 0.
    fn demo_table() -> RouteTable {
        let inventory: BTreeMap<String, BTreeSet<String>> = [
            ("demo".to_owned(), ["1", "2", "3"].map(str::to_owned).into()),
            ("other".to_owned(), ["a".to_owned()].into()),
        ]
        .into();
        let entry = |version: &str, weight| VersionWeight {
            version: version.to_owned(),
            weight,
        };
        let specs = [
            (
                "demo".to_owned(),
                RouteSpec::weighted(vec![entry("1", 70), entry("2", 30), entry("3", 0)]),
            ),
            ("other".to_owned(), RouteSpec::weighted(vec![entry("a", 1)])),
        ]
        .into();
        RouteTable::compile(&specs, &inventory).expect("demo specs are valid")
    }

    #[test]
    fn compiled_table_keeps_models_and_config_order() {
        let table = demo_table();
        assert_eq!(table.models().collect::<Vec<_>>(), ["demo", "other"]);
        let route = table.route("demo").expect("demo is routed");
        assert_eq!(
            route.versions().collect::<Vec<_>>(),
            [("1", 70), ("2", 30), ("3", 0)]
        );
        assert!(table.route("ghost").is_none());
    }

    #[test]
    fn a_pinned_only_route_takes_pins_and_refuses_the_rest_naming_the_versions() {
        let inventory: BTreeMap<String, BTreeSet<String>> =
            [("demo".to_owned(), ["1", "2"].map(str::to_owned).into())].into();
        let spec = RouteSpec {
            pinned_only: true,
            ..RouteSpec::weighted(vec![
                VersionWeight {
                    version: "1".to_owned(),
                    weight: 0,
                },
                VersionWeight {
                    version: "2".to_owned(),
                    weight: 0,
                },
            ])
        };
        let table =
            RouteTable::compile(&[("demo".to_owned(), spec)].into(), &inventory).expect("compiles");
        let mut rng = SmallRng::seed_from_u64(3);
        let pinned = table.resolve("demo", Some("2"), &mut rng).expect("a pin");
        assert_eq!(pinned.version, "2");
        assert_eq!(
            table.resolve("demo", None, &mut rng),
            Err(RouteError::PinnedOnly {
                model: "demo".to_owned(),
                routable: vec!["1".to_owned(), "2".to_owned()],
            })
        );
        // A route with a positive weight is never pinned-only, even when it says so.
        let weighted = RouteSpec {
            pinned_only: true,
            ..RouteSpec::weighted(vec![VersionWeight {
                version: "1".to_owned(),
                weight: 1,
            }])
        };
        let table = RouteTable::compile(&[("demo".to_owned(), weighted)].into(), &inventory)
            .expect("compiles");
        assert_eq!(
            table
                .resolve("demo", None, &mut rng)
                .expect("weighted")
                .version,
            "1"
        );
    }

    #[test]
    fn pinned_versions_resolve_even_with_zero_weight() {
        let table = demo_table();
        let mut rng = SmallRng::seed_from_u64(1);
        for version in ["1", "2", "3"] {
            let decision = table.resolve("demo", Some(version), &mut rng);
            assert_eq!(
                decision,
                Ok(Decision {
                    version,
                    reason: DecisionReason::Pinned
                })
            );
        }
    }

    #[test]
    fn unknown_pinned_version_lists_routable_versions() {
        let table = demo_table();
        let err = table
            .resolve("demo", Some("9"), &mut SmallRng::seed_from_u64(1))
            .expect_err("version 9 is not routed");
        assert_eq!(
            err,
            RouteError::UnknownVersion {
                model: "demo".into(),
                version: "9".into(),
                routable: vec!["1".into(), "2".into(), "3".into()],
            }
        );
        assert_eq!(
            err.to_string(),
            "Request for unknown model: 'demo' version 9 is not found (routable versions: 1, 2, 3)"
        );
    }

    #[test]
    fn unknown_model_is_an_error() {
        let mut rng = SmallRng::seed_from_u64(1);
        for table in [demo_table(), RouteTable::empty()] {
            assert_eq!(
                table.resolve("ghost", None, &mut rng),
                Err(RouteError::UnknownModel {
                    model: "ghost".into()
                })
            );
            assert!(table.resolve("ghost", Some("1"), &mut rng).is_err());
        }
    }

    #[test]
    fn unpinned_requests_follow_the_split() {
        let table = demo_table();
        let mut rng = SmallRng::seed_from_u64(3);
        let mut first = 0;
        for pinned in [None, Some("")].into_iter().cycle().take(10_000) {
            let decision = table
                .resolve("demo", pinned, &mut rng)
                .expect("demo is routed");
            assert_eq!(decision.reason, DecisionReason::Weighted);
            assert_ne!(
                decision.version, "3",
                "zero-weight version got unpinned traffic"
            );
            if decision.version == "1" {
                first += 1;
            }
        }
        assert!(
            (6_800..=7_200).contains(&first),
            "version 1 got {first} of 10000"
        );
    }

    #[test]
    fn empty_table_routes_nothing() {
        let table = RouteTable::empty();
        assert_eq!(table.models().count(), 0);
        assert_eq!(
            RouteTable::compile(&BTreeMap::new(), &BTreeMap::new()),
            Ok(table)
        );
    }

    #[test]
    fn table_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<RouteTable>();
    }

    #[test]
    fn reasons_have_stable_names() {
        assert_eq!(DecisionReason::Pinned.as_str(), "pinned");
        assert_eq!(DecisionReason::Rule(0).as_str(), "rule");
        assert_eq!(DecisionReason::Rule(7).as_str(), "rule");
        assert_eq!(DecisionReason::Sticky.as_str(), "sticky");
        assert_eq!(DecisionReason::Weighted.as_str(), "weighted");
        assert_eq!(DecisionReason::Sequence.as_str(), "sequence");
    }

    /// `demo` as in [`demo_table`] (70/30 over 1 and 2, dark 3), keyed on `x-user-id`,
    /// with the rules of the design example; the regex rule's header is configured in
    /// mixed case.
    fn rules_table() -> RouteTable {
        let inventory: BTreeMap<String, BTreeSet<String>> =
            [("demo".to_owned(), ["1", "2", "3"].map(str::to_owned).into())].into();
        let spec: RouteSpec = toml::from_str(
            r#"
versions = [{ version = "1", weight = 70 }, { version = "2", weight = 30 }, { version = "3", weight = 0 }]
sticky = { header = "x-user-id" }
rules = [
  { header = "x-canary", equals = "always", version = "2" },
  { parameter = "tier", prefix = "beta-", version = "2" },
  { header = "X-User", regex = "^qa-.*$", version = "3" },
  { header = "x-canary", equals = "dark", version = "3" },
]
"#,
        )
        .expect("valid spec");
        RouteTable::compile(&[("demo".to_owned(), spec)].into(), &inventory)
            .expect("rules spec is valid")
    }

    /// Answers only exact names, as gRPC metadata does for its lowercase keys.
    struct Exact<'a>(&'a [(&'a str, &'a str)]);

    impl RequestAttributes for Exact<'_> {
        fn header(&self, name: &str) -> Option<&str> {
            self.0.iter().find(|(n, _)| *n == name).map(|&(_, v)| v)
        }

        fn parameter(&self, _name: &str) -> Option<&str> {
            None
        }
    }

    fn decide<'t>(
        table: &'t RouteTable,
        pinned: Option<&str>,
        attributes: &Attributes,
    ) -> Decision<'t> {
        table
            .resolve_with("demo", pinned, attributes, &mut SmallRng::seed_from_u64(5))
            .expect("demo is routed")
    }

    fn rule(version: &str, index: usize) -> Decision<'_> {
        Decision {
            version,
            reason: DecisionReason::Rule(index),
        }
    }

    #[test]
    fn equals_rules_match_whole_values() {
        let table = rules_table();
        let canary = |value: &str| {
            decide(
                &table,
                None,
                &Attributes::new().with_header("x-canary", value),
            )
        };
        assert_eq!(canary("always"), rule("2", 0));
        assert_eq!(canary("dark"), rule("3", 3));
        for value in ["", "Always", "always!", "never"] {
            assert!(
                !matches!(canary(value).reason, DecisionReason::Rule(_)),
                "x-canary: {value:?}"
            );
        }
    }

    #[test]
    fn prefix_rules_match_parameters_case_sensitively() {
        let table = rules_table();
        let tier = |name: &str, value: &str| {
            decide(&table, None, &Attributes::new().with_parameter(name, value))
        };
        assert_eq!(tier("tier", "beta-1"), rule("2", 1));
        assert_eq!(tier("tier", "beta-"), rule("2", 1));
        assert_eq!(tier("tier", "beta").reason, DecisionReason::Weighted);
        assert_eq!(tier("Tier", "beta-1").reason, DecisionReason::Weighted);
        // A header of the same name is not the parameter.
        let header = Attributes::new().with_header("tier", "beta-1");
        assert_eq!(
            decide(&table, None, &header).reason,
            DecisionReason::Weighted
        );
    }

    #[test]
    fn regex_rules_send_testers_to_a_dark_version() {
        let table = rules_table();
        let user = |value: &str| {
            decide(
                &table,
                None,
                &Attributes::new().with_header("x-user", value),
            )
        };
        assert_eq!(user("qa-alice"), rule("3", 2));
        assert_eq!(user("qa-"), rule("3", 2));
        assert_eq!(user("alice-qa-").reason, DecisionReason::Weighted);
    }

    #[test]
    fn header_names_match_whatever_their_configured_case() {
        let table = rules_table();
        let mut rng = SmallRng::seed_from_u64(5);
        // The rule says `X-User`; gRPC metadata only answers `x-user`.
        let decision = table.resolve_with("demo", None, &Exact(&[("x-user", "qa-bob")]), &mut rng);
        assert_eq!(decision, Ok(rule("3", 2)));
        let decision = decide(
            &table,
            None,
            &Attributes::new().with_header("X-USER", "qa-bob"),
        );
        assert_eq!(decision, rule("3", 2));
    }

    #[test]
    fn the_first_matching_rule_wins() {
        let table = rules_table();
        let both = Attributes::new()
            .with_header("x-user", "qa-alice")
            .with_parameter("tier", "beta-1");
        assert_eq!(decide(&table, None, &both), rule("2", 1));
        // Rule 3 matches too, but comes later.
        let later = both.clone().with_header("x-canary", "dark");
        assert_eq!(decide(&table, None, &later), rule("2", 1));
        let earlier = both.with_header("x-canary", "always");
        assert_eq!(decide(&table, None, &earlier), rule("2", 0));
    }

    #[test]
    fn pins_beat_rules_beat_sticky_keys_beat_the_draw() {
        let table = rules_table();
        let sticky_user = Attributes::new().with_header("x-user-id", "alice");
        let ruled = sticky_user.clone().with_header("x-canary", "always");

        let pinned = decide(&table, Some("1"), &ruled);
        assert_eq!(
            (pinned.version, pinned.reason),
            ("1", DecisionReason::Pinned)
        );
        assert_eq!(decide(&table, None, &ruled), rule("2", 0));
        let sticky = decide(&table, None, &sticky_user);
        assert_eq!(sticky.reason, DecisionReason::Sticky);
        let route = table.route("demo").expect("demo is routed");
        assert_eq!(
            sticky.version,
            route.pick_at_fraction(crate::sticky_hash("demo", "alice"))
        );
        assert_eq!(
            decide(&table, None, &Attributes::new()).reason,
            DecisionReason::Weighted
        );
        // An empty key is no key.
        let empty = Attributes::new().with_header("x-user-id", "");
        assert_eq!(
            decide(&table, None, &empty).reason,
            DecisionReason::Weighted
        );
        // An unknown pin is still an error, whatever the attributes.
        assert!(matches!(
            table.resolve_with("demo", Some("9"), &ruled, &mut SmallRng::seed_from_u64(1)),
            Err(RouteError::UnknownVersion { .. })
        ));
    }

    #[test]
    fn resolve_is_resolve_with_no_attributes() {
        let table = rules_table();
        let (mut a, mut b) = (SmallRng::seed_from_u64(9), SmallRng::seed_from_u64(9));
        for _ in 0..1_000 {
            let plain = table.resolve("demo", None, &mut a);
            assert_eq!(plain, table.resolve_with("demo", None, &(), &mut b));
            assert_eq!(plain.map(|d| d.reason), Ok(DecisionReason::Weighted));
        }
        assert_eq!(
            table.resolve("ghost", None, &mut a),
            table.resolve_with("ghost", None, &Attributes::new(), &mut b)
        );
    }
}
