//! Validation rules for one model's route spec, checked while it is compiled.

use std::collections::HashMap;

use regex::Regex;

use crate::attributes::Source;
use crate::error::ValidationError;
use crate::route::{Route, WeightError};
use crate::rules::{Matcher, Rule};
use crate::spec::{Inventory, RouteSpec, RuleSpec, StickySpec};
use crate::sticky::Sticky;

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
    let model_path = model_path(model);
    let versions_path = format!("{model_path}.versions");

    // Versions of an unknown model are all unknown too; saying so once is enough.
    let model_known = if model.is_empty() {
        report(errors, &model_path, "model name is empty");
        false
    } else if !inventory.has_model(model) {
        report(
            errors,
            &model_path,
            format!("model {model:?} is not in the repository"),
        );
        false
    } else {
        true
    };

    if spec.versions.is_empty() {
        report(
            errors,
            &versions_path,
            "no versions listed; at least one version is needed",
        );
    }
    let mut first_seen = HashMap::with_capacity(spec.versions.len());
    for (i, entry) in spec.versions.iter().enumerate() {
        let path = format!("{versions_path}[{i}].version");
        let version = entry.version.as_str();
        if version.is_empty() {
            report(errors, &path, "version is empty");
        } else if let Some(&first) = first_seen.get(version) {
            report(
                errors,
                &path,
                format!("version {version:?} is listed twice (first at versions[{first}])"),
            );
        } else {
            first_seen.insert(version, i);
            if model_known && !inventory.has_version(model, version) {
                report(
                    errors,
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
                errors,
                &versions_path,
                "all weights are 0; at least one version needs a positive weight",
            );
            None
        }
        Err(WeightError::Overflow) => {
            report(
                errors,
                &versions_path,
                "the weights add up to more than 2^64 - 1",
            );
            None
        }
    };

    let sticky = spec
        .sticky
        .as_ref()
        .and_then(|sticky| compile_sticky(sticky, model, &format!("{model_path}.sticky"), errors));
    let lookup = VersionLookup {
        model,
        model_known,
        inventory,
        first_seen: &first_seen,
    };
    let rules: Vec<Rule> = spec
        .rules
        .iter()
        .enumerate()
        .filter_map(|(i, rule)| {
            compile_rule(rule, &format!("{model_path}.rules[{i}]"), &lookup, errors)
        })
        .collect();

    if errors.len() > found_before {
        None
    } else {
        route.map(|route| route.with_matching(rules, sticky))
    }
}

fn report(errors: &mut Vec<ValidationError>, path: &str, message: impl Into<String>) {
    errors.push(ValidationError {
        path: path.to_owned(),
        message: message.into(),
    });
}

fn compile_sticky(
    sticky: &StickySpec,
    model: &str,
    path: &str,
    errors: &mut Vec<ValidationError>,
) -> Option<Sticky> {
    let source = compile_source(
        sticky.header.as_deref(),
        sticky.parameter.as_deref(),
        path,
        errors,
    )?;
    Some(Sticky::new(source, sticky.salt.as_deref().unwrap_or(model)))
}

/// What a rule's version is checked against.
struct VersionLookup<'a, I> {
    model: &'a str,
    model_known: bool,
    inventory: &'a I,
    /// Each listed version's position in `versions`, which is its slot in the route.
    first_seen: &'a HashMap<&'a str, usize>,
}

/// Checks one rule, reporting every problem; compiles it only if it has none.
fn compile_rule<I: Inventory>(
    rule: &RuleSpec,
    path: &str,
    versions: &VersionLookup<'_, I>,
    errors: &mut Vec<ValidationError>,
) -> Option<Rule> {
    let source = compile_source(
        rule.header.as_deref(),
        rule.parameter.as_deref(),
        path,
        errors,
    );
    let matcher = compile_matcher(rule, path, errors);
    let slot = rule_slot(&rule.version, &format!("{path}.version"), versions, errors);
    Some(Rule::new(source?, matcher?, slot?))
}

/// Checks that exactly one of `header` and `parameter` is set, to a usable name.
fn compile_source(
    header: Option<&str>,
    parameter: Option<&str>,
    path: &str,
    errors: &mut Vec<ValidationError>,
) -> Option<Source> {
    match (header, parameter) {
        (Some(_), Some(_)) => {
            report(errors, path, "set `header` or `parameter`, not both");
            None
        }
        (None, None) => {
            report(errors, path, "set one of `header` or `parameter`");
            None
        }
        (Some(name), None) => match header_name_problem(name) {
            Some(problem) => {
                report(errors, &format!("{path}.header"), problem);
                None
            }
            None => Some(Source::header(name)),
        },
        (None, Some("")) => {
            report(
                errors,
                &format!("{path}.parameter"),
                "parameter name is empty",
            );
            None
        }
        (None, Some(name)) => Some(Source::parameter(name)),
    }
}

/// Why `name` can never match a text metadata header, if it cannot.
fn header_name_problem(name: &str) -> Option<String> {
    let valid_key = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if name.is_empty() {
        Some("header name is empty".to_owned())
    } else if !valid_key {
        Some(format!(
            "header name {name:?} is not a gRPC metadata key (letters, digits, '-', '_' and '.' only)"
        ))
    } else if name.to_ascii_lowercase().ends_with("-bin") {
        Some(format!(
            "header {name:?} is binary metadata (its name ends in -bin); only text headers can be matched"
        ))
    } else {
        None
    }
}

/// Checks that exactly one of `equals`, `prefix` and `regex` is set, and that a regex compiles.
fn compile_matcher(
    rule: &RuleSpec,
    path: &str,
    errors: &mut Vec<ValidationError>,
) -> Option<Matcher> {
    // A bad pattern is reported even beside another matcher, so one round of fixes is enough.
    let regex = rule.regex.as_deref().map(|pattern| {
        Regex::new(pattern).map_err(|error| {
            report(
                errors,
                &format!("{path}.regex"),
                format!("invalid regex {pattern:?}: {}", regex_reason(&error)),
            );
        })
    });
    match (&rule.equals, &rule.prefix, regex) {
        (Some(value), None, None) => Some(Matcher::Equals(value.as_str().into())),
        (None, Some(prefix), None) => Some(Matcher::Prefix(prefix.as_str().into())),
        (None, None, Some(regex)) => regex.ok().map(Matcher::Regex),
        (None, None, None) => {
            report(errors, path, "set one of `equals`, `prefix` or `regex`");
            None
        }
        _ => {
            let set: Vec<&str> = [
                ("`equals`", rule.equals.is_some()),
                ("`prefix`", rule.prefix.is_some()),
                ("`regex`", rule.regex.is_some()),
            ]
            .into_iter()
            .filter_map(|(name, set)| set.then_some(name))
            .collect();
            report(
                errors,
                path,
                format!(
                    "set only one of `equals`, `prefix` or `regex` (found {})",
                    set.join(" and ")
                ),
            );
            None
        }
    }
}

/// The reason a pattern does not compile, on one line.
///
/// Syntax errors span several lines (the pattern, a caret under the problem, then
/// `error: <reason>`); the reason alone keeps one validation error per line.
fn regex_reason(error: &regex::Error) -> String {
    let text = error.to_string();
    text.lines()
        .rev()
        .find_map(|line| line.trim().strip_prefix("error: "))
        .map_or_else(
            || text.split_whitespace().collect::<Vec<_>>().join(" "),
            str::to_owned,
        )
}

/// The slot of a rule's version: it must be one of the route's listed versions.
fn rule_slot<I: Inventory>(
    version: &str,
    path: &str,
    versions: &VersionLookup<'_, I>,
    errors: &mut Vec<ValidationError>,
) -> Option<usize> {
    let model = versions.model;
    if version.is_empty() {
        report(errors, path, "version is empty");
        None
    } else if let Some(&slot) = versions.first_seen.get(version) {
        Some(slot)
    } else if versions.model_known && !versions.inventory.has_version(model, version) {
        report(
            errors,
            path,
            format!("model {model:?} has no version {version:?} in the repository"),
        );
        None
    } else {
        report(
            errors,
            path,
            format!(
                "version {version:?} is not one of the route's versions; \
                 list it under `versions` (weight 0 keeps it dark)"
            ),
        );
        None
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
    use crate::{Attributes, DecisionReason, RouteTable, ValidationErrors};

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
        RouteSpec::weighted(
            versions
                .iter()
                .map(|&(version, weight)| VersionWeight {
                    version: version.to_owned(),
                    weight,
                })
                .collect(),
        )
    }

    /// `demo` splitting 90/10 over versions 1 and 2, with dark version 3, and `rules`.
    fn with_rules(rules: Vec<RuleSpec>) -> RouteSpec {
        RouteSpec {
            rules,
            ..spec(&[("1", 90), ("2", 10), ("3", 0)])
        }
    }

    fn with_sticky(sticky: StickySpec) -> RouteSpec {
        RouteSpec {
            sticky: Some(sticky),
            ..spec(&[("1", 90), ("2", 10)])
        }
    }

    fn header_equals(header: &str, value: &str, version: &str) -> RuleSpec {
        RuleSpec {
            header: Some(header.to_owned()),
            equals: Some(value.to_owned()),
            version: version.to_owned(),
            ..RuleSpec::default()
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
    ///
    /// The repository holds versions 1, 2 and 3 of `demo`, and 4 of nothing.
    fn assert_single_error(demo: RouteSpec, path: &str, message: &str) {
        let inventory = inventory(&[("demo", &["1", "2", "3"])]);
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
    fn all_zero_weights_compile_only_as_a_pinned_only_route() {
        let inventory = inventory(&[("demo", &["1", "2", "3"])]);
        let pinned_only = RouteSpec {
            pinned_only: true,
            ..spec(&[("1", 0), ("2", 0)])
        };
        let table = RouteTable::compile(&[("demo".to_owned(), pinned_only)].into(), &inventory)
            .expect("a pinned-only route may have every weight at 0");
        let route = table.route("demo").expect("routed");
        assert!(route.is_pinned_only());
        assert_eq!(route.share("1"), Some(0.0));
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
    fn bad_regex_is_rejected_with_the_regex_crate_reason() {
        let rules = vec![
            header_equals("x-canary", "always", "2"),
            RuleSpec {
                header: Some("x-user".into()),
                regex: Some("^(qa".into()),
                version: "2".into(),
                ..RuleSpec::default()
            },
        ];
        assert_single_error(
            with_rules(rules),
            "routes.demo.rules[1].regex",
            r#"invalid regex "^(qa": unclosed group"#,
        );
    }

    #[test]
    fn oversized_regex_is_rejected() {
        let rule = RuleSpec {
            parameter: Some("user".into()),
            regex: Some(r"\w{1000}{1000}".into()),
            version: "2".into(),
            ..RuleSpec::default()
        };
        let inventory = inventory(&[("demo", &["1", "2", "3"])]);
        let errors = compile_err(&[("demo", with_rules(vec![rule]))], &inventory).into_errors();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "routes.demo.rules[0].regex");
        assert!(
            errors[0]
                .message
                .starts_with(r#"invalid regex "\\w{1000}{1000}": "#)
                && errors[0].message.contains("size limit")
                && !errors[0].message.contains('\n'),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn rule_version_must_be_listed_in_the_route() {
        assert_single_error(
            RouteSpec {
                rules: vec![header_equals("x-canary", "always", "3")],
                ..spec(&[("1", 1), ("2", 1)])
            },
            "routes.demo.rules[0].version",
            r#"version "3" is not one of the route's versions; list it under `versions` (weight 0 keeps it dark)"#,
        );
    }

    #[test]
    fn rule_version_unknown_to_the_repository_is_rejected() {
        assert_single_error(
            with_rules(vec![header_equals("x-canary", "always", "9")]),
            "routes.demo.rules[0].version",
            r#"model "demo" has no version "9" in the repository"#,
        );
    }

    #[test]
    fn rule_version_must_not_be_empty() {
        assert_single_error(
            with_rules(vec![header_equals("x-canary", "always", "")]),
            "routes.demo.rules[0].version",
            "version is empty",
        );
    }

    #[test]
    fn rule_needs_exactly_one_attribute() {
        let both = RuleSpec {
            parameter: Some("tier".into()),
            ..header_equals("x-tier", "beta", "2")
        };
        assert_single_error(
            with_rules(vec![both]),
            "routes.demo.rules[0]",
            "set `header` or `parameter`, not both",
        );
        let neither = RuleSpec {
            header: None,
            ..header_equals("x-tier", "beta", "2")
        };
        assert_single_error(
            with_rules(vec![neither]),
            "routes.demo.rules[0]",
            "set one of `header` or `parameter`",
        );
    }

    #[test]
    fn rule_needs_exactly_one_matcher() {
        let two = RuleSpec {
            regex: Some("^beta$".into()),
            ..header_equals("x-tier", "beta", "2")
        };
        assert_single_error(
            with_rules(vec![two]),
            "routes.demo.rules[0]",
            "set only one of `equals`, `prefix` or `regex` (found `equals` and `regex`)",
        );
        let three = RuleSpec {
            prefix: Some("b".into()),
            regex: Some("^beta$".into()),
            ..header_equals("x-tier", "beta", "2")
        };
        assert_single_error(
            with_rules(vec![three]),
            "routes.demo.rules[0]",
            "set only one of `equals`, `prefix` or `regex` (found `equals` and `prefix` and `regex`)",
        );
        let none = RuleSpec {
            equals: None,
            ..header_equals("x-tier", "beta", "2")
        };
        assert_single_error(
            with_rules(vec![none]),
            "routes.demo.rules[0]",
            "set one of `equals`, `prefix` or `regex`",
        );
    }

    #[test]
    fn rule_attribute_names_must_be_usable() {
        assert_single_error(
            with_rules(vec![header_equals("", "beta", "2")]),
            "routes.demo.rules[0].header",
            "header name is empty",
        );
        assert_single_error(
            with_rules(vec![header_equals("X Tier", "beta", "2")]),
            "routes.demo.rules[0].header",
            r#"header name "X Tier" is not a gRPC metadata key (letters, digits, '-', '_' and '.' only)"#,
        );
        assert_single_error(
            with_rules(vec![header_equals("X-Trace-Bin", "beta", "2")]),
            "routes.demo.rules[0].header",
            r#"header "X-Trace-Bin" is binary metadata (its name ends in -bin); only text headers can be matched"#,
        );
        let empty_parameter = RuleSpec {
            header: None,
            parameter: Some(String::new()),
            ..header_equals("x", "beta", "2")
        };
        assert_single_error(
            with_rules(vec![empty_parameter]),
            "routes.demo.rules[0].parameter",
            "parameter name is empty",
        );
    }

    #[test]
    fn sticky_needs_exactly_one_nonempty_key() {
        assert_single_error(
            with_sticky(StickySpec {
                header: Some("x-user-id".into()),
                parameter: Some("user".into()),
                salt: None,
            }),
            "routes.demo.sticky",
            "set `header` or `parameter`, not both",
        );
        assert_single_error(
            with_sticky(StickySpec {
                salt: Some("exp-7".into()),
                ..StickySpec::default()
            }),
            "routes.demo.sticky",
            "set one of `header` or `parameter`",
        );
        assert_single_error(
            with_sticky(StickySpec {
                header: Some(String::new()),
                ..StickySpec::default()
            }),
            "routes.demo.sticky.header",
            "header name is empty",
        );
        assert_single_error(
            with_sticky(StickySpec {
                parameter: Some(String::new()),
                ..StickySpec::default()
            }),
            "routes.demo.sticky.parameter",
            "parameter name is empty",
        );
    }

    #[test]
    fn rules_may_target_a_dark_version() {
        let inventory = inventory(&[("demo", &["1", "2", "3"])]);
        let specs = [(
            "demo".to_owned(),
            RouteSpec {
                sticky: Some(StickySpec {
                    parameter: Some("user".into()),
                    ..StickySpec::default()
                }),
                ..with_rules(vec![header_equals("x-canary", "always", "3")])
            },
        )]
        .into();
        let table = RouteTable::compile(&specs, &inventory).expect("a dark rule target is valid");
        assert_eq!(table.route("demo").and_then(|r| r.weight("3")), Some(0));
    }

    #[test]
    fn every_rule_and_sticky_problem_is_reported_at_once() {
        let inventory = inventory(&[("demo", &["1", "2", "3"])]);
        let rules = vec![
            // Fine.
            header_equals("x-canary", "always", "2"),
            // No attribute, two matchers, a bad regex and an unlisted version.
            RuleSpec {
                prefix: Some("qa-".into()),
                regex: Some("(".into()),
                version: "4".into(),
                ..RuleSpec::default()
            },
            // Both attributes, no matcher.
            RuleSpec {
                header: Some("x-tier".into()),
                parameter: Some("tier".into()),
                version: "1".into(),
                ..RuleSpec::default()
            },
        ];
        let demo = RouteSpec {
            sticky: Some(StickySpec::default()),
            rules,
            ..spec(&[("1", 90), ("2", 10), ("2", 0)])
        };
        let errors = compile_err(&[("demo", demo)], &inventory);
        let paths: Vec<&str> = errors.errors().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "routes.demo.versions[2].version",
                "routes.demo.sticky",
                "routes.demo.rules[1]",
                "routes.demo.rules[1].regex",
                "routes.demo.rules[1]",
                "routes.demo.rules[1].version",
                "routes.demo.rules[2]",
                "routes.demo.rules[2]",
            ]
        );
        assert_eq!(errors.to_string().lines().count(), paths.len());
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

    /// Usually a plain name, sometimes empty, unusable as a header, or absent.
    fn attribute_name() -> impl Strategy<Value = Option<String>> {
        prop::option::weighted(
            0.6,
            prop_oneof![8 => "[a-cA-C-]{1,4}", 1 => Just(String::new()), 1 => "[a ]{1,3}(-bin)?"],
        )
    }

    /// Sometimes a valid pattern, sometimes not; mostly absent.
    fn matcher_value() -> impl Strategy<Value = Option<String>> {
        prop::option::weighted(0.4, prop_oneof!["[a-c]{0,3}", "[a-c()\\[\\]^$*+?.|]{0,5}"])
    }

    fn arbitrary_rule() -> impl Strategy<Value = RuleSpec> {
        (
            attribute_name(),
            attribute_name(),
            matcher_value(),
            matcher_value(),
            matcher_value(),
            version_name(),
        )
            .prop_map(
                |(header, parameter, equals, prefix, regex, version)| RuleSpec {
                    header,
                    parameter,
                    equals,
                    prefix,
                    regex,
                    version,
                },
            )
    }

    fn arbitrary_sticky() -> impl Strategy<Value = Option<StickySpec>> {
        prop::option::of(
            (
                attribute_name(),
                attribute_name(),
                prop::option::of("[a-c]{0,2}"),
            )
                .prop_map(|(header, parameter, salt)| StickySpec {
                    header,
                    parameter,
                    salt,
                }),
        )
    }

    fn arbitrary_specs() -> impl Strategy<Value = BTreeMap<String, RouteSpec>> {
        let weight = prop_oneof![0u32..10, any::<u32>()];
        let entry = (version_name(), weight)
            .prop_map(|(version, weight)| VersionWeight { version, weight });
        let spec = (
            prop::collection::vec(entry, 0..5),
            arbitrary_sticky(),
            prop::collection::vec(arbitrary_rule(), 0..3),
        )
            .prop_map(|(versions, sticky, rules)| RouteSpec {
                versions,
                sticky,
                rules,
                pinned_only: false,
            });
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
                        prop_assert!(!error.message.contains('\n'), "{}", error);
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

                        // Give the request the attributes the rules look for, so some match.
                        let attributes = spec.rules.iter().fold(Attributes::new(), |attributes, rule| {
                            let value = rule.equals.as_deref().or(rule.prefix.as_deref()).unwrap_or("abc");
                            match (&rule.header, &rule.parameter) {
                                (Some(name), _) => attributes.with_header(name, value),
                                (_, Some(name)) => attributes.with_parameter(name, value),
                                (None, None) => attributes,
                            }
                        });
                        let decision = table
                            .resolve_with(model, None, &attributes, &mut rng)
                            .expect("model is routed");
                        match decision.reason {
                            DecisionReason::Rule(i) => {
                                prop_assert_eq!(decision.version, spec.rules[i].version.as_str());
                            }
                            DecisionReason::Sticky | DecisionReason::Weighted => {
                                prop_assert!(route.weight(decision.version) > Some(0));
                            }
                            DecisionReason::Pinned => prop_assert!(false, "nothing was pinned"),
                            DecisionReason::Sequence => prop_assert!(false, "no request here is in a sequence"),
                        }
                    }
                }
            }
        }
    }
}
