//! Route specs as configured, before validation, and the inventory they refer to.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// What the config file or admin API asks for one model, before validation.
///
/// In TOML:
///
/// ```toml
/// versions = [{ version = "2", weight = 10 }, { version = "1", weight = 90 }]
/// sticky = { header = "x-user-id" }
/// rules = [{ header = "x-canary", equals = "always", version = "2" }]
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// The versions that may serve the model, in the order their traffic segments are laid out.
    ///
    /// List the canary first: the first version owns the segment starting at 0, so
    /// raising its weight only moves sticky keys into it, never out of it.
    pub versions: Vec<VersionWeight>,
    /// Where sticky assignment finds a request's routing key; `None` draws every unpinned request at random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<StickySpec>,
    /// Match rules, tried in order before the split; the first that matches picks the version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleSpec>,
    /// Every weight may be 0: the route then serves pinned requests (and its rules)
    /// only, and refuses the rest with [`RouteError::PinnedOnly`]. Set by the gateway
    /// for a model none of whose versions may take unpinned traffic yet; never read
    /// from a file.
    ///
    /// [`RouteError::PinnedOnly`]: crate::RouteError::PinnedOnly
    #[serde(skip)]
    pub pinned_only: bool,
}

impl RouteSpec {
    /// A plain weighted split: no sticky key, no rules.
    pub fn weighted(versions: Vec<VersionWeight>) -> Self {
        Self {
            versions,
            ..Self::default()
        }
    }
}

/// Where a route's sticky routing key comes from: exactly one of `header` or `parameter`.
///
/// Requests carrying the key always get the same version while the weights stay the
/// same; requests without it are drawn at random.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StickySpec {
    /// A request metadata header; matched case-insensitively.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// A request parameter; matched exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
    /// Hashed with every key; defaults to the model name. Changing it reshuffles every key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
}

/// One match rule: when a request attribute matches, `version` answers, whatever the weights.
///
/// Exactly one of `header` or `parameter` names the attribute, and exactly one of
/// `equals`, `prefix` or `regex` says how its value must match. A request without the
/// attribute never matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// A request metadata header; matched case-insensitively.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// A request parameter; matched exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
    /// The value must be exactly this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<String>,
    /// The value must start with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The value must contain a match of this regular expression (anchor it with `^...$` to match it whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// The version that answers matching requests; one of the route's versions, possibly of weight 0.
    pub version: String,
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
    fn sticky_and_rules_parse_from_toml() {
        let spec: RouteSpec = toml::from_str(
            r#"
versions = [{ version = "2", weight = 10 }, { version = "1", weight = 90 }, { version = "3", weight = 0 }]
sticky = { header = "x-user-id", salt = "exp-7" }
rules = [
  { header = "x-canary", equals = "always", version = "2" },
  { parameter = "tier", prefix = "beta-", version = "2" },
  { header = "x-user", regex = "^qa-.*$", version = "3" },
]
"#,
        )
        .expect("valid spec");
        assert_eq!(
            spec.sticky,
            Some(StickySpec {
                header: Some("x-user-id".into()),
                parameter: None,
                salt: Some("exp-7".into()),
            })
        );
        assert_eq!(
            spec.rules,
            [
                RuleSpec {
                    header: Some("x-canary".into()),
                    equals: Some("always".into()),
                    version: "2".into(),
                    ..RuleSpec::default()
                },
                RuleSpec {
                    parameter: Some("tier".into()),
                    prefix: Some("beta-".into()),
                    version: "2".into(),
                    ..RuleSpec::default()
                },
                RuleSpec {
                    header: Some("x-user".into()),
                    regex: Some("^qa-.*$".into()),
                    version: "3".into(),
                    ..RuleSpec::default()
                },
            ]
        );
        let spec: RouteSpec = toml::from_str(
            r#"versions = [{ version = "1", weight = 1 }]
sticky = { parameter = "user" }"#,
        )
        .expect("valid spec");
        assert_eq!(
            spec.sticky,
            Some(StickySpec {
                parameter: Some("user".into()),
                ..StickySpec::default()
            })
        );
    }

    #[test]
    fn misspelt_sticky_or_rule_field_is_rejected() {
        for (toml, field) in [
            (r#"sticky = { heder = "x-user-id" }"#, "heder"),
            (r#"sticky = { header = "x-user-id", seed = "1" }"#, "seed"),
            (
                r#"rules = [{ header = "x", equal = "y", version = "2" }]"#,
                "equal",
            ),
            (
                r#"rules = [{ header = "x", equals = "y", version = "2", weight = 1 }]"#,
                "weight",
            ),
        ] {
            let text = format!("versions = []\n{toml}");
            let err =
                toml::from_str::<RouteSpec>(&text).expect_err("unknown field must be rejected");
            assert!(err.to_string().contains(field), "{err}");
        }
        let err = toml::from_str::<RouteSpec>(
            r#"versions = []
rules = [{ header = "x", equals = "y" }]"#,
        )
        .expect_err("a rule needs a version");
        assert!(err.to_string().contains("version"), "{err}");
    }

    #[test]
    fn weighted_spec_serialises_without_sticky_or_rules() {
        let spec = RouteSpec::weighted(vec![VersionWeight {
            version: "1".into(),
            weight: 1,
        }]);
        let text = toml::to_string(&spec).expect("serialisable");
        assert!(
            !text.contains("sticky") && !text.contains("rules"),
            "{text}"
        );
        assert_eq!(toml::from_str::<RouteSpec>(&text), Ok(spec));
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
