//! Whether Triton's RepositoryModelLoad and RepositoryModelUnload are served on the
//! inference port, as Triton's `--model-control-mode` says (`none`, its default, refuses
//! them): anyone who can send an inference could otherwise unload a model that serves
//! traffic. The admin API, on its own listener, loads and unloads in every mode.

use std::str::FromStr;

use serde::Deserialize;

use crate::WorkerError;

/// Model control on the inference port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelControl {
    /// RepositoryModelLoad and RepositoryModelUnload are refused (the default).
    #[default]
    None,
    /// They are served.
    Explicit,
}

impl ModelControl {
    /// `Ok` when `rpc` may change `model` through the inference port.
    pub fn allow(self, rpc: &'static str, model: &str) -> Result<(), WorkerError> {
        match self {
            ModelControl::Explicit => Ok(()),
            ModelControl::None => Err(WorkerError::ModelControlOff {
                rpc,
                model: model.to_owned(),
            }),
        }
    }
}

impl FromStr for ModelControl {
    type Err = String;

    fn from_str(text: &str) -> Result<ModelControl, String> {
        match text {
            "none" => Ok(ModelControl::None),
            "explicit" => Ok(ModelControl::Explicit),
            other => Err(format!(
                "\"{other}\" is not a model control mode (none, explicit)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_refuses_with_a_message_that_says_what_to_do() {
        let error = ModelControl::None
            .allow("RepositoryModelUnload", "demo")
            .expect_err("refused");
        assert_eq!(error.code(), tonic::Code::Unavailable);
        let message = error.to_string();
        assert!(
            message.contains("RepositoryModelUnload of model \"demo\""),
            "{message}"
        );
        assert!(message.contains("model_control"), "{message}");
        assert!(
            ModelControl::Explicit
                .allow("RepositoryModelLoad", "demo")
                .is_ok()
        );
        assert_eq!("explicit".parse(), Ok(ModelControl::Explicit));
        assert!("poll".parse::<ModelControl>().is_err());
    }
}
