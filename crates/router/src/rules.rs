//! Compiled match rules: an attribute, how its value must match, and the version it sends to.

use regex::Regex;

use crate::attributes::{RequestAttributes, Source};

/// How an attribute's value must match.
#[derive(Debug, Clone)]
pub(crate) enum Matcher {
    Equals(Box<str>),
    Prefix(Box<str>),
    /// Compiled once, when the route is; unanchored, as [`Regex::is_match`] is.
    Regex(Regex),
}

impl Matcher {
    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Equals(expected) => value == &**expected,
            Self::Prefix(prefix) => value.starts_with(&**prefix),
            Self::Regex(regex) => regex.is_match(value),
        }
    }
}

// `Regex` has no `PartialEq`; two regexes compiled from the same pattern behave alike.
impl PartialEq for Matcher {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Equals(a), Self::Equals(b)) | (Self::Prefix(a), Self::Prefix(b)) => a == b,
            (Self::Regex(a), Self::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl Eq for Matcher {}

/// One compiled rule; `slot` indexes the route's versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    source: Source,
    matcher: Matcher,
    slot: usize,
}

impl Rule {
    pub(crate) fn new(source: Source, matcher: Matcher, slot: usize) -> Self {
        Self {
            source,
            matcher,
            slot,
        }
    }

    /// The slot of the version this rule sends the request to, if the request matches.
    pub(crate) fn apply<A: RequestAttributes + ?Sized>(&self, attributes: &A) -> Option<usize> {
        self.source
            .read(attributes)
            .is_some_and(|value| self.matcher.matches(value))
            .then_some(self.slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attributes::Attributes;

    fn regex(pattern: &str) -> Matcher {
        Matcher::Regex(Regex::new(pattern).expect("test patterns are valid"))
    }

    #[test]
    fn matchers_compare_values() {
        let equals = Matcher::Equals("always".into());
        assert!(equals.matches("always"));
        assert!(!equals.matches("always "));
        assert!(!equals.matches("Always"));

        let prefix = Matcher::Prefix("beta-".into());
        assert!(prefix.matches("beta-"));
        assert!(prefix.matches("beta-7"));
        assert!(!prefix.matches("beta"));
        assert!(!prefix.matches("xbeta-7"));

        let anchored = regex("^qa-.*$");
        assert!(anchored.matches("qa-alice"));
        assert!(!anchored.matches("alice-qa-"));
        let unanchored = regex("qa-[0-9]+");
        assert!(unanchored.matches("team-qa-12"));
        assert!(!unanchored.matches("qa-x"));
    }

    #[test]
    fn an_empty_prefix_matches_any_present_value() {
        let rule = Rule::new(Source::header("x-debug"), Matcher::Prefix("".into()), 1);
        assert_eq!(
            rule.apply(&Attributes::new().with_header("x-debug", "")),
            Some(1)
        );
        assert_eq!(rule.apply(&()), None);
    }

    #[test]
    fn rules_read_their_attribute() {
        let rule = Rule::new(
            Source::header("X-Canary"),
            Matcher::Equals("always".into()),
            2,
        );
        assert_eq!(
            rule.apply(&Attributes::new().with_header("x-canary", "always")),
            Some(2)
        );
        assert_eq!(
            rule.apply(&Attributes::new().with_header("X-CANARY", "always")),
            Some(2)
        );
        assert_eq!(
            rule.apply(&Attributes::new().with_parameter("x-canary", "always")),
            None
        );
        let rule = Rule::new(
            Source::parameter("tier"),
            Matcher::Prefix("beta-".into()),
            0,
        );
        assert_eq!(
            rule.apply(&Attributes::new().with_parameter("tier", "beta-1")),
            Some(0)
        );
        assert_eq!(
            rule.apply(&Attributes::new().with_parameter("Tier", "beta-1")),
            None
        );
        assert_eq!(
            rule.apply(&Attributes::new().with_header("tier", "beta-1")),
            None
        );
    }

    #[test]
    fn matchers_compare_by_pattern() {
        assert_eq!(regex("^a$"), regex("^a$"));
        assert_ne!(regex("^a$"), regex("^b$"));
        assert_ne!(Matcher::Equals("a".into()), Matcher::Prefix("a".into()));
    }
}
