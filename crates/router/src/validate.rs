//! Validation rules for one model's route spec, checked while it is compiled.

use std::collections::HashMap;

use crate::error::ValidationError;
use crate::route::{Route, WeightError};
use crate::spec::{Inventory, RouteSpec};

/// Checks `spec` for `model` and compiles it.
///
/// Appends every problem found to `errors` and returns the route only if there were none.
pub(crate) fn compile_route(
    model: &str,
    spec: &RouteSpec,
    inventory: &impl Inventory,
    errors: &mut Vec<ValidationError>,
) -> Option<Route> {
    let found_before = errors.len();
    let mut report = |path: &str, message: String| {
        errors.push(ValidationError {
            path: path.to_owned(),
            message,
        });
    };
    let model_path = model_path(model);
    let versions_path = format!("{model_path}.versions");

    // Versions of an unknown model are all unknown too; saying so once is enough.
    let model_known = if model.is_empty() {
        report(&model_path, "model name is empty".to_owned());
        false
    } else if !inventory.has_model(model) {
        report(
            &model_path,
            format!("model {model:?} is not in the repository"),
        );
        false
    } else {
        true
    };

    if spec.versions.is_empty() {
        report(
            &versions_path,
            "no versions listed; at least one version is needed".to_owned(),
        );
    }
    let mut first_seen = HashMap::with_capacity(spec.versions.len());
    for (i, entry) in spec.versions.iter().enumerate() {
        let path = format!("{versions_path}[{i}].version");
        let version = entry.version.as_str();
        if version.is_empty() {
            report(&path, "version is empty".to_owned());
        } else if let Some(&first) = first_seen.get(version) {
            report(
                &path,
                format!("version {version:?} is listed twice (first at versions[{first}])"),
            );
        } else {
            first_seen.insert(version, i);
            if model_known && !inventory.has_version(model, version) {
                report(
                    &path,
                    format!("model {model:?} has no version {version:?} in the repository"),
                );
            }
        }
    }

    let route = match Route::new(spec) {
        Ok(route) => Some(route),
        // An empty list has been reported above.
        Err(WeightError::NoPositiveWeight) if spec.versions.is_empty() => None,
        Err(WeightError::NoPositiveWeight) => {
            report(
                &versions_path,
                "all weights are 0; at least one version needs a positive weight".to_owned(),
            );
            None
        }
        Err(WeightError::Overflow) => {
            report(
                &versions_path,
                "the weights add up to more than 2^64 - 1".to_owned(),
            );
            None
        }
    };
    if errors.len() > found_before {
        None
    } else {
        route
    }
}

/// `routes.<model>`, or `routes["<model>"]` when the name would make the path ambiguous.
fn model_path(model: &str) -> String {
    let plain = !model.is_empty()
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        format!("routes.{model}")
    } else {
        format!("routes[{model:?}]")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    use crate::spec::VersionWeight;
    use crate::{DecisionReason, RouteTable, ValidationErrors};

    use super::*;

    type MapInventory = BTreeMap<String, BTreeSet<String>>;

    fn inventory(models: &[(&str, &[&str])]) -> MapInventory {
        models
            .iter()
            .map(|(model, versions)| {
                let versions = versions.iter().map(|v| (*v).to_owned()).collect();
                ((*model).to_owned(), versions)
            })
            .collect()
    }

    fn spec(versions: &[(&str, u32)]) -> RouteSpec {
        RouteSpec {
            versions: versions
                .iter()
                .map(|&(version, weight)| VersionWeight {
                    version: version.to_owned(),
                    weight,
                })
                .collect(),
        }
    }

    fn compile_err(specs: &[(&str, RouteSpec)], inventory: &MapInventory) -> ValidationErrors {
        let specs = specs
            .iter()
            .map(|(model, spec)| ((*model).to_owned(), spec.clone()))
            .collect();
        RouteTable::compile(&specs, inventory).expect_err("specs are invalid")
    }

    /// Asserts that compiling `demo` alone yields exactly one error, at `path` with `message`.
    fn assert_single_error(demo: RouteSpec, path: &str, message: &str) {
        let inventory = inventory(&[("demo", &["1", "2"])]);
        let errors = compile_err(&[("demo", demo)], &inventory).into_errors();
        assert_eq!(
            errors,
            [ValidationError {
                path: path.to_owned(),
                message: message.to_owned()
            }]
        );
    }

    #[test]
    fn all_zero_weights_are_rejected() {
        assert_single_error(
            spec(&[("1", 0), ("2", 0)]),
            "routes.demo.versions",
            "all weights are 0; at least one version needs a positive weight",
        );
    }

    #[test]
    fn unknown_version_is_rejected() {
        assert_single_error(
            spec(&[("1", 1), ("9", 1)]),
            "routes.demo.versions[1].version",
            r#"model "demo" has no version "9" in the repository"#,
        );
    }

    #[test]
    fn duplicate_version_is_rejected() {
        assert_single_error(
            spec(&[("1", 1), ("2", 1), ("1", 1)]),
            "routes.demo.versions[2].version",
            r#"version "1" is listed twice (first at versions[0])"#,
        );
    }

    #[test]
    fn empty_version_list_is_rejected() {
        assert_single_error(
            spec(&[]),
            "routes.demo.versions",
            "no versions listed; at least one version is needed",
        );
    }

    #[test]
    fn empty_version_name_is_rejected() {
        assert_single_error(
            spec(&[("1", 1), ("", 1)]),
            "routes.demo.versions[1].version",
            "version is empty",
        );
    }

    #[test]
    fn unknown_model_is_rejected_once() {
        let errors = compile_err(&[("ghost", spec(&[("1", 1), ("2", 1)]))], &inventory(&[]));
        assert_eq!(
            errors.into_errors(),
            [ValidationError {
                path: "routes.ghost".to_owned(),
                message: r#"model "ghost" is not in the repository"#.to_owned(),
            }]
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let inventory = inventory(&[
            ("demo", &["1", "2"]),
            ("zero", &["1", "2"]),
            ("bare", &["1"]),
        ]);
        let errors = compile_err(
            &[
                (
                    "demo",
                    spec(&[("1", 10), ("2", 5), ("1", 3), ("9", 1), ("", 0)]),
                ),
                ("ghost", spec(&[("1", 1)])),
                ("zero", spec(&[("1", 0), ("2", 0)])),
                ("bare", spec(&[])),
                ("", spec(&[("1", 1)])),
                ("a.b", spec(&[("1", 0)])),
            ],
            &inventory,
        );
        let paths: Vec<&str> = errors.errors().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                r#"routes[""]"#,
                r#"routes["a.b"]"#,
                r#"routes["a.b"].versions"#,
                "routes.bare.versions",
                "routes.demo.versions[2].version",
                "routes.demo.versions[3].version",
                "routes.demo.versions[4].version",
                "routes.ghost",
                "routes.zero.versions",
            ]
        );
        let text = errors.to_string();
        assert_eq!(text.lines().count(), paths.len());
        for (line, error) in text.lines().zip(errors.errors()) {
            assert_eq!(line, format!("{}: {}", error.path, error.message));
        }
    }

    #[test]
    fn a_valid_model_beside_an_invalid_one_does_not_compile() {
        let inventory = inventory(&[("good", &["1"])]);
        let errors = compile_err(
            &[("good", spec(&[("1", 1)])), ("bad", spec(&[("1", 1)]))],
            &inventory,
        );
        assert_eq!(errors.errors().len(), 1);
    }

    /// Mostly plain names, sometimes empty or needing quotes in paths.
    fn model_name() -> impl Strategy<Value = String> {
        prop_oneof![8 => "[a-d]{1,2}", 1 => Just(String::new()), 1 => "[ab.]{1,3}"]
    }

    /// Few distinct names, so duplicates are common; sometimes empty.
    fn version_name() -> impl Strategy<Value = String> {
        prop_oneof![9 => "[0-5]", 1 => Just(String::new())]
    }

    fn arbitrary_specs() -> impl Strategy<Value = BTreeMap<String, RouteSpec>> {
        let weight = prop_oneof![0u32..10, any::<u32>()];
        let entry = (version_name(), weight)
            .prop_map(|(version, weight)| VersionWeight { version, weight });
        let spec = prop::collection::vec(entry, 0..5).prop_map(|versions| RouteSpec { versions });
        prop::collection::btree_map(model_name(), spec, 0..4)
    }

    fn arbitrary_inventory() -> impl Strategy<Value = MapInventory> {
        prop::collection::btree_map(
            model_name(),
            prop::collection::btree_set(version_name(), 0..4),
            0..4,
        )
    }

    proptest! {
        #[test]
        fn compile_never_panics_and_accepts_only_routable_specs(
            specs in arbitrary_specs(),
            inventory in arbitrary_inventory(),
            covers_specs in any::<bool>(),
            seed in any::<u64>(),
        ) {
            // Half the time the inventory holds every listed version, so valid tables are common.
            let mut inventory = inventory;
            if covers_specs {
                for (model, spec) in &specs {
                    let versions = inventory.entry(model.clone()).or_default();
                    versions.extend(spec.versions.iter().map(|e| e.version.clone()));
                }
            }
            match RouteTable::compile(&specs, &inventory) {
                Err(errors) => {
                    prop_assert!(!errors.errors().is_empty());
                    for error in errors.errors() {
                        prop_assert!(error.path.starts_with("routes"), "{}", error);
                    }
                }
                Ok(table) => {
                    prop_assert!(table.models().eq(specs.keys().map(String::as_str)));
                    let mut rng = SmallRng::seed_from_u64(seed);
                    for (model, spec) in &specs {
                        let route = table.route(model).expect("every compiled model has a route");
                        let listed: Vec<(&str, u32)> =
                            spec.versions.iter().map(|e| (e.version.as_str(), e.weight)).collect();
                        prop_assert_eq!(route.versions().collect::<Vec<_>>(), listed);
                        for entry in &spec.versions {
                            prop_assert!(inventory.has_version(model, &entry.version));
                            let decision = table.resolve(model, Some(&entry.version), &mut rng);
                            prop_assert_eq!(decision.map(|d| d.reason), Ok(DecisionReason::Pinned));
                        }
                        let decision = table.resolve(model, None, &mut rng).expect("model is routed");
                        prop_assert!(route.weight(decision.version) > Some(0));
                    }
                }
            }
        }
    }
}
