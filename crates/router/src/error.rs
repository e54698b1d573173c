//! Errors: request-time routing failures and rejected route specs.

use std::fmt;

/// Why a request could not be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The route table has no route for the model. The message opens with Triton's
    /// wording, which its clients match on.
    #[error("Request for unknown model: '{model}' is not found (no route serves it)")]
    UnknownModel {
        /// The requested model.
        model: String,
    },
    /// The request pinned a version that is not part of the model's route.
    #[error("Request for unknown model: '{model}' version {version} is not found (routable versions: {list})", list = .routable.join(", "))]
    UnknownVersion {
        /// The requested model.
        model: String,
        /// The pinned version.
        version: String,
        /// The versions the route does have, in config order.
        routable: Vec<String>,
    },
    /// The request pinned no version, and no version of the model's route may take
    /// unpinned traffic (every weight is 0).
    #[error("model '{model}' serves pinned requests only: none of its versions takes unpinned traffic; set model_version to one of: {list}", list = .routable.join(", "))]
    PinnedOnly {
        /// The requested model.
        model: String,
        /// The versions a request may pin.
        routable: Vec<String>,
    },
}

/// One problem in a route spec, with the path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// Where the problem is, e.g. `routes.demo.versions[1].weight`.
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl std::error::Error for ValidationError {}

/// Every problem found in a set of route specs; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationErrors(Vec<ValidationError>);

impl ValidationErrors {
    /// Wraps the collected errors; `None` when there are none.
    pub(crate) fn from_vec(errors: Vec<ValidationError>) -> Option<Self> {
        (!errors.is_empty()).then_some(Self(errors))
    }

    /// The errors, in the order of the models and fields they refer to.
    pub fn errors(&self) -> &[ValidationError] {
        &self.0
    }

    /// Consumes the value, returning the errors.
    pub fn into_errors(self) -> Vec<ValidationError> {
        self.0
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

impl IntoIterator for ValidationErrors {
    type Item = ValidationError;
    type IntoIter = std::vec::IntoIter<ValidationError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_errors_open_with_tritons_wording_and_name_the_model_and_version() {
        let err = RouteError::UnknownModel { model: "x".into() };
        assert_eq!(
            err.to_string(),
            "Request for unknown model: 'x' is not found (no route serves it)"
        );
        let err = RouteError::UnknownVersion {
            model: "x".into(),
            version: "9".into(),
            routable: vec!["1".into(), "2".into()],
        };
        assert_eq!(
            err.to_string(),
            "Request for unknown model: 'x' version 9 is not found (routable versions: 1, 2)"
        );
    }

    #[test]
    fn validation_errors_display_one_per_line() {
        let errors = ValidationErrors::from_vec(vec![
            ValidationError {
                path: "routes.a".into(),
                message: "first".into(),
            },
            ValidationError {
                path: "routes.b.versions".into(),
                message: "second".into(),
            },
        ])
        .expect("two errors");
        assert_eq!(
            errors.to_string(),
            "routes.a: first\nroutes.b.versions: second"
        );
        assert_eq!(errors.errors().len(), 2);
    }

    #[test]
    fn no_errors_is_not_an_error() {
        assert!(ValidationErrors::from_vec(Vec::new()).is_none());
    }
}
