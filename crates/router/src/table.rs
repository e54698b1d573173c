//! The route table snapshot the gateway reads, and per-request decisions.

use std::collections::BTreeMap;

use rand::Rng;

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
    /// The version was drawn from the weighted split.
    Weighted,
}

impl DecisionReason {
    /// A short lowercase name, for metric labels and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pinned => "pinned",
            Self::Weighted => "weighted",
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

    /// Decides the version for one request; `pinned` is the request's `model_version`.
    ///
    /// A pin must name one of the route's versions, even one with weight 0: pinning a
    /// loaded zero-weight version is how operators try out a dark version. `Some("")`
    /// counts as no pin, as an empty `model_version` does in the v2 protocol. Without
    /// a pin the version is drawn from the weighted split with `rng`.
    pub fn resolve<R: Rng + ?Sized>(
        &self,
        model: &str,
        pinned: Option<&str>,
        rng: &mut R,
    ) -> Result<Decision<'_>, RouteError> {
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
            None => Ok(Decision {
                version: route.pick(rng),
                reason: DecisionReason::Weighted,
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
                RouteSpec {
                    versions: vec![entry("1", 70), entry("2", 30), entry("3", 0)],
                },
            ),
            (
                "other".to_owned(),
                RouteSpec {
                    versions: vec![entry("a", 1)],
                },
            ),
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
            r#"model "demo" has no version "9" (routable versions: 1, 2, 3)"#
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
        assert_eq!(DecisionReason::Weighted.as_str(), "weighted");
    }
}
