//! One line of the audit trail, and the filter a query applies to them. Pure: no I/O.

use serde::{Deserialize, Serialize};

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A call that changes something (admin API, Triton's repository RPCs), with its
    /// result: including the refused ones.
    Call,
    /// A model's route changed: its versions and weights before and after.
    Route,
    /// A model version was loaded, reloaded or unloaded, with its file's fingerprint;
    /// or its stage changed (`approved`, `production`, `archived`).
    Model,
    /// A rollout started, was commanded, or its driver decided a step.
    Rollout,
    /// A config file version was applied or rejected.
    Config,
    /// One prediction (opt-in, sampled): who, which version and weights, why, how.
    Prediction,
    /// A version's data: a feature crossed into drift or out of it, or flag-mode input
    /// rules let values through (counts and the latest example).
    Data,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 7] = [
        Kind::Call,
        Kind::Route,
        Kind::Model,
        Kind::Rollout,
        Kind::Config,
        Kind::Prediction,
        Kind::Data,
    ];

    /// The name records and queries use.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Call => "call",
            Kind::Route => "route",
            Kind::Model => "model",
            Kind::Rollout => "rollout",
            Kind::Config => "config",
            Kind::Prediction => "prediction",
            Kind::Data => "data",
        }
    }

    /// The kind named `name`.
    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

/// One audit record: a JSON object on one line of the trail. Fields a kind does not
/// use are left out of the line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// When, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// What the record is about.
    pub kind: Kind,
    /// Who: `key:<name>`, `peer:<address>`, or the task (`config-file`,
    /// `rollout-driver`, `repository-watch`, `data-watch`).
    pub actor: String,
    /// What was done: the RPC path of a call, `load`/`unload`/…, a rollout's
    /// command or decision, `infer`.
    pub action: String,
    /// The model it concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The version it concerns (a prediction: the version that answered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The gRPC status code's name (`OK`, `INVALID_ARGUMENT`, …).
    pub status: String,
    /// The error message, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The state before the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<serde_json::Value>,
    /// The state after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<serde_json::Value>,
    /// The answering model file's content hash (the one responses and `ModelConfig`
    /// name as `aviary_model_fingerprint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Why: a prediction's routing reason (`pinned`, `rule`, `sticky`, `split`, and
    /// `fallback`/`default` when a stand-in answered), a rollout decision's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The request's `id`, as the client sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// How long the prediction took in the gateway, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// BLAKE3 of the request's inputs (names, datatypes, shapes, contents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs_hash: Option<String>,
    /// The request's inputs (`[audit] payloads`): name, datatype, shape and values of
    /// each, or a string saying why they are left out (over the size cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<serde_json::Value>,
    /// The answer's outputs, the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<serde_json::Value>,
    /// The pseudonym of the request's sticky key (a keyed HMAC, never the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The route generation in force after a change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

impl Record {
    /// A record of `kind` by `actor` doing `action`, successful, at `time_ms`, with
    /// every optional field empty.
    pub fn new(time_ms: u64, kind: Kind, actor: String, action: impl Into<String>) -> Record {
        Record {
            time_ms,
            kind,
            actor,
            action: action.into(),
            model: None,
            version: None,
            status: "OK".to_owned(),
            message: None,
            before: None,
            after: None,
            fingerprint: None,
            reason: None,
            request_id: None,
            latency_us: None,
            inputs_hash: None,
            inputs: None,
            outputs: None,
            subject: None,
            generation: None,
        }
    }

    /// The record about `model` (and `version`).
    pub fn about(mut self, model: &str, version: Option<&str>) -> Record {
        self.model = Some(model.to_owned());
        self.version = version.map(str::to_owned);
        self
    }

    /// The record with the outcome `status`.
    pub fn outcome(mut self, status: &tonic::Status) -> Record {
        self.status = crate::exposition::code_name(status.code()).to_owned();
        self.message = (status.code() != tonic::Code::Ok && !status.message().is_empty())
            .then(|| status.message().to_owned());
        self
    }
}

/// Which records a query wants; every filter left empty matches all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only records of these kinds (empty: all).
    pub kinds: Vec<Kind>,
    /// Only records about this model.
    pub model: Option<String>,
    /// Only records about this version.
    pub version: Option<String>,
    /// Only records by this actor (`key:ops`, `config-file`, …).
    pub actor: Option<String>,
    /// Only records at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
}

impl Filter {
    /// Whether `record` is one the query wants.
    pub fn matches(&self, record: &Record) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&record.kind))
            && self
                .model
                .as_ref()
                .is_none_or(|m| record.model.as_ref() == Some(m))
            && self
                .version
                .as_ref()
                .is_none_or(|v| record.version.as_ref() == Some(v))
            && self.actor.as_ref().is_none_or(|a| &record.actor == a)
            && self.since_ms.is_none_or(|since| record.time_ms >= since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prediction(time_ms: u64, model: &str) -> Record {
        Record::new(time_ms, Kind::Prediction, "key:app".into(), "infer").about(model, Some("2"))
    }

    #[test]
    fn a_record_is_one_json_line_without_the_fields_its_kind_does_not_use() {
        let record = prediction(1_000, "demo");
        let line = serde_json::to_string(&record).expect("serialises");
        assert_eq!(
            line,
            r#"{"time_ms":1000,"kind":"prediction","actor":"key:app","action":"infer","model":"demo","version":"2","status":"OK"}"#
        );
        assert_eq!(
            serde_json::from_str::<Record>(&line).expect("parses"),
            record
        );
    }

    #[test]
    fn a_failed_outcome_keeps_its_code_and_message() {
        let record = prediction(1, "demo").outcome(&tonic::Status::invalid_argument("bad shape"));
        assert_eq!(record.status, "INVALID_ARGUMENT");
        assert_eq!(record.message.as_deref(), Some("bad shape"));
        let ok = prediction(1, "demo").outcome(&tonic::Status::ok("ignored"));
        assert_eq!((ok.status.as_str(), ok.message), ("OK", None));
    }

    #[test]
    fn filters_match_on_every_field_they_name() {
        let record = prediction(5_000, "demo");
        assert!(Filter::default().matches(&record));
        let only = |filter: Filter| filter.matches(&record);
        assert!(only(Filter {
            kinds: vec![Kind::Prediction, Kind::Route],
            model: Some("demo".into()),
            version: Some("2".into()),
            actor: Some("key:app".into()),
            since_ms: Some(5_000),
        }));
        assert!(!only(Filter {
            kinds: vec![Kind::Route],
            ..Filter::default()
        }));
        assert!(!only(Filter {
            model: Some("mlp".into()),
            ..Filter::default()
        }));
        assert!(!only(Filter {
            version: Some("1".into()),
            ..Filter::default()
        }));
        assert!(!only(Filter {
            actor: Some("key:ops".into()),
            ..Filter::default()
        }));
        assert!(!only(Filter {
            since_ms: Some(5_001),
            ..Filter::default()
        }));
    }

    #[test]
    fn kinds_round_trip_through_their_names() {
        for name in ["call", "route", "model", "rollout", "config", "prediction"] {
            assert_eq!(Kind::parse(name).map(Kind::as_str), Some(name));
        }
        assert_eq!(Kind::parse("predictions"), None);
    }
}
