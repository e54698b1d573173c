//! The prediction cache's key: what an answer depends on, hashed.
//!
//! A key is the BLAKE3 hash (256 bits) of, in this order, each part length-prefixed so
//! no two different requests can encode alike:
//!
//! - the model, the *resolved* version and that version's model fingerprint (the hash
//!   of its weights: another model loaded as the same version is another key);
//! - every input, sorted by name (the order a client lists inputs in changes nothing):
//!   name, datatype, shape, its parameters sorted by name, and its contents — the raw
//!   bytes the client sent for it in `raw_input_contents`, and the protobuf encoding of
//!   its typed `contents`, each marked present or absent (so the same values sent raw
//!   and typed are two keys: correct, just not shared);
//! - the requested outputs in the order asked (the answer lists them in that order):
//!   name and parameters sorted by name;
//! - the request parameters, sorted by name, except the ones the route only routes by
//!   (its sticky key's and its match rules' parameters: the version they pick is
//!   already in the key).
//!
//! Left out: the request `id` (a hit answers with the new request's), gRPC headers
//! (they only route) and the `model_version` the client asked for (the resolved one is
//! in the key).

use std::collections::HashMap;

use aviary::pb::inference::{InferParameter, ModelInferRequest};
use prost::Message;

/// Bumped when what goes into a key changes, so old Redis entries are never read.
const DOMAIN: &[u8] = b"aviary-prediction-cache-v1";

/// The hash of a request's canonical content (inputs, requested outputs, parameters):
/// computed once per request, then combined with whichever fingerprint an answer is
/// looked up or stored under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHash([u8; 32]);

/// A cached answer's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

/// The version an answer comes from: the model, the resolved version and the
/// fingerprint of the weights loaded as it.
#[derive(Debug, Clone, Copy)]
pub struct Answerer<'a> {
    pub model: &'a str,
    pub version: &'a str,
    pub fingerprint: &'a str,
}

impl RequestHash {
    /// The content of `request`; parameters named in `routing_only` are left out.
    pub fn of(request: &ModelInferRequest, routing_only: &[&str]) -> RequestHash {
        let mut hash = Canonical(blake3::Hasher::new());
        hash.bytes(DOMAIN);
        let mut inputs: Vec<_> = request.inputs.iter().enumerate().collect();
        inputs.sort_by(|(_, a), (_, b)| a.name.cmp(&b.name));
        hash.count(inputs.len());
        for (index, input) in inputs {
            hash.text(&input.name);
            hash.text(&input.datatype);
            hash.count(input.shape.len());
            for dimension in &input.shape {
                hash.0.update(&dimension.to_le_bytes());
            }
            hash.parameters(&input.parameters, &[]);
            // Raw contents pair with inputs by position in the request as sent.
            hash.optional(request.raw_input_contents.get(index).map(|raw| &raw[..]));
            hash.optional(
                input
                    .contents
                    .as_ref()
                    .map(Message::encode_to_vec)
                    .as_deref(),
            );
        }
        hash.count(request.outputs.len());
        for output in &request.outputs {
            hash.text(&output.name);
            hash.parameters(&output.parameters, &[]);
        }
        hash.parameters(&request.parameters, routing_only);
        RequestHash(*hash.0.finalize().as_bytes())
    }
}

impl CacheKey {
    /// The key of a request whose content hashes to `content`, answered by `answerer`.
    pub fn of(answerer: Answerer<'_>, content: &RequestHash) -> CacheKey {
        let mut hash = Canonical(blake3::Hasher::new());
        hash.bytes(DOMAIN);
        hash.text(answerer.model);
        hash.text(answerer.version);
        hash.text(answerer.fingerprint);
        hash.bytes(&content.0);
        CacheKey(*hash.0.finalize().as_bytes())
    }

    /// The key in hex, as the Redis tier names it.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A hasher fed only length-prefixed parts.
struct Canonical(blake3::Hasher);

impl Canonical {
    fn count(&mut self, n: usize) {
        self.0.update(&(n as u64).to_le_bytes());
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.count(bytes.len());
        self.0.update(bytes);
    }

    fn text(&mut self, text: &str) {
        self.bytes(text.as_bytes());
    }

    fn optional(&mut self, bytes: Option<&[u8]>) {
        match bytes {
            None => {
                self.0.update(&[0]);
            }
            Some(bytes) => {
                self.0.update(&[1]);
                self.bytes(bytes);
            }
        }
    }

    /// `parameters` but those named in `except`, sorted by name (a map has no order).
    fn parameters(&mut self, parameters: &HashMap<String, InferParameter>, except: &[&str]) {
        let mut kept: Vec<_> = parameters
            .iter()
            .filter(|(name, _)| !except.contains(&name.as_str()))
            .collect();
        kept.sort_by(|a, b| a.0.cmp(b.0));
        self.count(kept.len());
        for (name, value) in kept {
            self.text(name);
            self.bytes(&value.encode_to_vec());
        }
    }
}

#[cfg(test)]
mod tests {
    use aviary::pb::inference::{
        InferTensorContents,
        infer_parameter::ParameterChoice,
        model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
    };

    use super::*;

    const DEMO: Answerer<'static> = Answerer {
        model: "demo",
        version: "1",
        fingerprint: "f1",
    };

    fn text(value: &str) -> InferParameter {
        InferParameter {
            parameter_choice: Some(ParameterChoice::StringParam(value.to_owned())),
        }
    }

    fn input(name: &str, shape: &[i64]) -> InferInputTensor {
        InferInputTensor {
            name: name.to_owned(),
            datatype: "FP32".to_owned(),
            shape: shape.to_vec(),
            ..Default::default()
        }
    }

    /// Two raw inputs, `a` then `b`.
    fn request() -> ModelInferRequest {
        ModelInferRequest {
            model_name: "demo".to_owned(),
            id: "first".to_owned(),
            inputs: vec![input("a", &[1, 2]), input("b", &[1, 1])],
            raw_input_contents: vec![vec![1, 2, 3, 4, 5, 6, 7, 8].into(), vec![9, 9, 9, 9].into()],
            ..Default::default()
        }
    }

    fn key_of(
        answerer: Answerer<'_>,
        request: &ModelInferRequest,
        routing_only: &[&str],
    ) -> CacheKey {
        CacheKey::of(answerer, &RequestHash::of(request, routing_only))
    }

    fn key(request: &ModelInferRequest) -> CacheKey {
        key_of(DEMO, request, &[])
    }

    #[test]
    fn the_request_id_and_the_asked_version_are_not_in_the_key() {
        let mut other = request();
        other.id = "second".to_owned();
        other.model_version = "1".to_owned();
        assert_eq!(key(&request()), key(&other));
    }

    #[test]
    fn the_version_and_the_fingerprint_are() {
        let base = key(&request());
        let version = Answerer {
            version: "2",
            ..DEMO
        };
        let fingerprint = Answerer {
            fingerprint: "f2",
            ..DEMO
        };
        assert_ne!(base, key_of(version, &request(), &[]));
        assert_ne!(base, key_of(fingerprint, &request(), &[]));
    }

    #[test]
    fn input_order_does_not_matter_but_which_bytes_go_with_which_input_does() {
        let mut swapped = request();
        swapped.inputs.reverse();
        swapped.raw_input_contents.reverse();
        assert_eq!(key(&request()), key(&swapped));
        // The same inputs with their contents exchanged are another request.
        let mut exchanged = request();
        exchanged.raw_input_contents.reverse();
        assert_ne!(key(&request()), key(&exchanged));
    }

    #[test]
    fn shape_datatype_and_contents_are_in_the_key() {
        let base = key(&request());
        let mut reshaped = request();
        reshaped.inputs[0].shape = vec![2, 1];
        assert_ne!(base, key(&reshaped));
        let mut retyped = request();
        retyped.inputs[0].datatype = "INT32".to_owned();
        assert_ne!(base, key(&retyped));
        let mut changed = request();
        changed.raw_input_contents[1] = vec![9, 9, 9, 8].into();
        assert_ne!(base, key(&changed));
    }

    #[test]
    fn typed_and_raw_contents_are_told_apart() {
        let mut typed = request();
        typed.raw_input_contents.clear();
        typed.inputs[0].contents = Some(InferTensorContents {
            fp32_contents: vec![1.0, 2.0],
            ..Default::default()
        });
        typed.inputs[1].contents = Some(InferTensorContents {
            fp32_contents: vec![3.0],
            ..Default::default()
        });
        assert_ne!(key(&request()), key(&typed));
        let mut other = typed.clone();
        other.inputs[1].contents = Some(InferTensorContents {
            fp32_contents: vec![4.0],
            ..Default::default()
        });
        assert_ne!(key(&typed), key(&other));
    }

    #[test]
    fn requested_outputs_and_parameters_are_in_the_key() {
        let base = key(&request());
        let mut outputs = request();
        outputs.outputs.push(InferRequestedOutputTensor {
            name: "probabilities".to_owned(),
            ..Default::default()
        });
        assert_ne!(base, key(&outputs));
        let mut parameters = request();
        parameters
            .parameters
            .insert("temperature".to_owned(), text("0.5"));
        assert_ne!(base, key(&parameters));
        // Parameter order in the map never matters: many parameters hash alike.
        let mut many = request();
        for name in ["x", "y", "z", "w"] {
            many.parameters.insert(name.to_owned(), text(name));
        }
        let mut again = request();
        for name in ["w", "z", "y", "x"] {
            again.parameters.insert(name.to_owned(), text(name));
        }
        assert_eq!(key(&many), key(&again));
    }

    #[test]
    fn routing_only_parameters_are_left_out() {
        let mut user = request();
        user.parameters.insert("user".to_owned(), text("alice"));
        let mut other = request();
        other.parameters.insert("user".to_owned(), text("bob"));
        assert_ne!(key(&user), key(&other));
        assert_eq!(
            key_of(DEMO, &user, &["user"]),
            key_of(DEMO, &other, &["user"])
        );
        assert_eq!(key_of(DEMO, &user, &["user"]), key(&request()));
    }

    #[test]
    fn parts_cannot_run_into_each_other() {
        let joined = Answerer {
            model: "demo1",
            version: "",
            ..DEMO
        };
        assert_ne!(key(&request()), key_of(joined, &request(), &[]));
        assert_eq!(key(&request()).hex().len(), 64);
    }
}
