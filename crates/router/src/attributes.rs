//! What the router may read from a request: its metadata headers and parameters.

use std::collections::BTreeMap;

/// The request attributes that match rules and sticky keys read.
pub trait RequestAttributes {
    /// The value of metadata header `name`, if the request has it.
    ///
    /// The router always asks with an ASCII-lowercase name (it lowercases configured
    /// header names when it compiles a route), so a lookup in gRPC metadata, whose keys
    /// are lowercase, can use `name` as it is.
    fn header(&self, name: &str) -> Option<&str>;

    /// The value of request parameter `name`, if the request has it as a string.
    fn parameter(&self, name: &str) -> Option<&str>;
}

/// A request with no headers and no parameters.
impl RequestAttributes for () {
    fn header(&self, _name: &str) -> Option<&str> {
        None
    }

    fn parameter(&self, _name: &str) -> Option<&str> {
        None
    }
}

/// Headers and parameters held in maps; for tests and tools.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    /// Keyed by ASCII-lowercase name.
    headers: BTreeMap<String, String>,
    parameters: BTreeMap<String, String>,
}

impl Attributes {
    /// No headers, no parameters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) header `name`; names are case-insensitive.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let mut name = name.into();
        name.make_ascii_lowercase();
        self.headers.insert(name, value.into());
        self
    }

    /// Adds (or replaces) parameter `name`; names are case-sensitive.
    pub fn with_parameter(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.parameters.insert(name.into(), value.into());
        self
    }
}

impl RequestAttributes for Attributes {
    fn header(&self, name: &str) -> Option<&str> {
        // Stored names are lowercase, and the router asks in lowercase; the scan only
        // serves callers that ask with another case.
        self.headers
            .get(name)
            .or_else(|| {
                self.headers
                    .iter()
                    .find(|(key, _)| key.eq_ignore_ascii_case(name))
                    .map(|(_, value)| value)
            })
            .map(String::as_str)
    }

    fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }
}

/// One attribute a compiled route reads: a header (name stored lowercase) or a parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    Header(Box<str>),
    Parameter(Box<str>),
}

impl Source {
    /// A header source; `name` is lowercased here, once, so lookups need not be.
    pub(crate) fn header(name: &str) -> Self {
        Self::Header(name.to_ascii_lowercase().into())
    }

    /// A parameter source; parameter names are case-sensitive.
    pub(crate) fn parameter(name: &str) -> Self {
        Self::Parameter(name.into())
    }

    /// The request's value of this attribute, if it has one.
    pub(crate) fn read<'a, A: RequestAttributes + ?Sized>(
        &self,
        attributes: &'a A,
    ) -> Option<&'a str> {
        match self {
            Self::Header(name) => attributes.header(name),
            Self::Parameter(name) => attributes.parameter(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_attributes_have_nothing() {
        assert_eq!(().header("x-user-id"), None);
        assert_eq!(().parameter("user"), None);
    }

    #[test]
    fn headers_are_case_insensitive_and_parameters_are_not() {
        let attributes = Attributes::new()
            .with_header("X-User-Id", "alice")
            .with_parameter("User", "bob");
        assert_eq!(attributes.header("x-user-id"), Some("alice"));
        assert_eq!(attributes.header("X-USER-ID"), Some("alice"));
        assert_eq!(attributes.header("user"), None);
        assert_eq!(attributes.parameter("User"), Some("bob"));
        assert_eq!(attributes.parameter("user"), None);
        assert_eq!(attributes.parameter("X-User-Id"), None);
    }

    #[test]
    fn later_values_replace_earlier_ones() {
        let attributes = Attributes::new()
            .with_header("x-tier", "free")
            .with_header("X-Tier", "paid");
        assert_eq!(attributes.header("x-tier"), Some("paid"));
    }

    #[test]
    fn header_sources_ask_in_lowercase() {
        /// Answers only exact, lowercase names, as gRPC metadata does.
        struct Metadata;
        impl RequestAttributes for Metadata {
            fn header(&self, name: &str) -> Option<&str> {
                (name == "x-user-id").then_some("alice")
            }
            fn parameter(&self, name: &str) -> Option<&str> {
                (name == "Tier").then_some("beta")
            }
        }
        assert_eq!(Source::header("X-User-ID").read(&Metadata), Some("alice"));
        assert_eq!(Source::parameter("Tier").read(&Metadata), Some("beta"));
        assert_eq!(Source::parameter("tier").read(&Metadata), None);
    }
}
