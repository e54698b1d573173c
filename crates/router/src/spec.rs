//! Route specs as configured, before validation, and the inventory they refer to.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// What the config file or admin API asks for one model, before validation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// The versions that may serve the model, in the order their traffic segments are laid out.
    pub versions: Vec<VersionWeight>,
}

/// One version of a route and its share of unpinned traffic, relative to the other weights.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VersionWeight {
    /// The version name, as the model repository knows it.
    pub version: String,
    /// Relative weight; 0 means the version only serves requests that pin it.
    pub weight: u32,
}

/// Which models and versions exist (are loaded); route specs are validated against it.
pub trait Inventory {
    /// Whether any version of `model` exists.
    fn has_model(&self, model: &str) -> bool;
    /// Whether `version` of `model` exists.
    fn has_version(&self, model: &str, version: &str) -> bool;
}

impl Inventory for BTreeMap<String, BTreeSet<String>> {
    fn has_model(&self, model: &str) -> bool {
        self.contains_key(model)
    }

    fn has_version(&self, model: &str, version: &str) -> bool {
        self.get(model)
            .is_some_and(|versions| versions.contains(version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_from_toml() {
        let spec: RouteSpec = toml::from_str(
            r#"versions = [{ version = "1", weight = 90 }, { version = "2", weight = 10 }]"#,
        )
        .expect("valid spec");
        assert_eq!(
            spec.versions,
            vec![
                VersionWeight {
                    version: "1".into(),
                    weight: 90
                },
                VersionWeight {
                    version: "2".into(),
                    weight: 10
                },
            ]
        );
    }

    #[test]
    fn misspelt_field_is_rejected() {
        let err = toml::from_str::<RouteSpec>(r#"versions = [{ version = "1", wieght = 90 }]"#)
            .expect_err("unknown field must be rejected");
        assert!(err.to_string().contains("wieght"), "{err}");
        let err = toml::from_str::<RouteSpec>(
            r#"versions = []
split = 1"#,
        )
        .expect_err("unknown field must be rejected");
        assert!(err.to_string().contains("split"), "{err}");
    }

    #[test]
    fn negative_weight_is_rejected() {
        assert!(
            toml::from_str::<RouteSpec>(r#"versions = [{ version = "1", weight = -1 }]"#).is_err()
        );
    }

    #[test]
    fn map_inventory_knows_models_and_versions() {
        let inventory: BTreeMap<String, BTreeSet<String>> =
            [("iris".to_owned(), ["1".to_owned()].into())].into();
        assert!(inventory.has_model("iris"));
        assert!(!inventory.has_model("mnist"));
        assert!(inventory.has_version("iris", "1"));
        assert!(!inventory.has_version("iris", "2"));
        assert!(!inventory.has_version("mnist", "1"));
    }
}
