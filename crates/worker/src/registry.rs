//! A version's registry record, kept in its model card: its semantic version, its
//! lineage (the training data and its hash, the code revision, the training run, the
//! hyperparameters) and the SHA-256 its model file must have. Pure: the file's hash is
//! computed where the file is read ([`crate::model`]) and checked here.

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256 as Hasher};

/// A SHA-256 digest as 64 lowercase hex digits (uppercase is read as lowercase).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sha256(String);

impl Sha256 {
    /// The SHA-256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Sha256 {
        Sha256::of_digest(&Hasher::digest(bytes))
    }

    /// A finished SHA-256 digest (32 bytes), as hex: for a hash computed as a file
    /// streams in.
    pub fn of_digest(digest: &[u8]) -> Sha256 {
        Sha256(digest.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The 64 hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Sha256 {
    type Error = String;

    fn try_from(text: String) -> Result<Sha256, String> {
        let hex = text.trim().to_ascii_lowercase();
        match hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            true => Ok(Sha256(hex)),
            false => Err(format!(
                "\"{text}\" is not a SHA-256 (64 hex digits, as sha256sum prints)"
            )),
        }
    }
}

impl From<Sha256> for String {
    fn from(digest: Sha256) -> String {
        digest.0
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a version stands in the approval workflow.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Not approved: pinned and shadow traffic, and unpinned traffic up to the
    /// canary cap only.
    #[default]
    Candidate,
    /// Approved for production traffic.
    Approved,
    /// Serving all of its model's unpinned traffic (or did last).
    Production,
    /// Replaced by a newer production version.
    Archived,
}

impl Stage {
    /// Its name, as cards and the admin API write it.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Candidate => "candidate",
            Stage::Approved => "approved",
            Stage::Production => "production",
            Stage::Archived => "archived",
        }
    }

    /// The stage named `name`, as [`Stage::name`] writes it.
    pub fn from_name(name: &str) -> Option<Stage> {
        [
            Stage::Candidate,
            Stage::Approved,
            Stage::Production,
            Stage::Archived,
        ]
        .into_iter()
        .find(|stage| stage.name() == name)
    }

    /// Whether a version at this stage may take unpinned traffic beyond the cap.
    pub fn may_take_traffic(self) -> bool {
        matches!(self, Stage::Approved | Stage::Production)
    }
}

/// Who approved a version, when and why, as its card declares.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    /// Who approved it.
    pub by: String,
    /// When (a TOML date-time, or text).
    #[serde(default, deserialize_with = "text_or_date")]
    pub at: String,
    /// Why.
    #[serde(default)]
    pub note: String,
}

/// A TOML date-time (or a string) as its text.
fn text_or_date<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(match toml::Value::deserialize(deserializer)? {
        toml::Value::String(text) => text,
        toml::Value::Datetime(date) => date.to_string(),
        other => {
            return Err(serde::de::Error::custom(format!(
                "approval.at: {other} is not a date-time"
            )));
        }
    })
}

/// Where a version came from: what it was trained on, by which code, in which run,
/// with which settings. Every field is optional; those given are served as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    /// The training data: a reference to it (a URI, a table and snapshot, a path).
    #[serde(default)]
    pub dataset: String,
    /// The SHA-256 of the training data's contents, as its producer computed it.
    #[serde(default)]
    pub dataset_sha256: Option<Sha256>,
    /// The revision of the training code (a commit).
    #[serde(default)]
    pub code_revision: String,
    /// The training run's id in the experiment tracker (an MLflow run id).
    #[serde(default)]
    pub training_run: String,
    /// The training's hyperparameters, by name: numbers, strings, booleans, dates,
    /// lists and tables, served as JSON.
    #[serde(default, deserialize_with = "hyperparameters")]
    pub hyperparameters: BTreeMap<String, serde_json::Value>,
}

/// Hyperparameters read as TOML and written as the JSON they are served as: a date as
/// its RFC 3339 text; a NaN or an infinity, which JSON cannot hold, refused naming it.
fn hyperparameters<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, serde_json::Value>, D::Error> {
    BTreeMap::<String, toml::Value>::deserialize(deserializer)?
        .into_iter()
        .map(|(name, value)| {
            json_of(&value)
                .map(|json| (name.clone(), json))
                .map_err(|reason| {
                    serde::de::Error::custom(format!("hyperparameters.{name}: {reason}"))
                })
        })
        .collect()
}

fn json_of(value: &toml::Value) -> Result<serde_json::Value, String> {
    use serde_json::Value as Json;
    Ok(match value {
        toml::Value::String(text) => Json::from(text.as_str()),
        toml::Value::Integer(n) => Json::from(*n),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(Json::Number)
            .ok_or_else(|| format!("{f} has no JSON form; write it as a string"))?,
        toml::Value::Boolean(b) => Json::from(*b),
        toml::Value::Datetime(date) => Json::from(date.to_string()),
        toml::Value::Array(items) => {
            Json::Array(items.iter().map(json_of).collect::<Result<_, _>>()?)
        }
        toml::Value::Table(table) => Json::Object(
            table
                .iter()
                .map(|(k, v)| json_of(v).map(|json| (k.clone(), json)))
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// Checks a model file whose contents hash to `actual` against the SHA-256 its card
/// states, if it states one: a swapped file (or a stale card) is refused.
pub fn check_file(actual: &Sha256, stated: Option<&Sha256>) -> Result<(), String> {
    match stated {
        Some(stated) if stated != actual => Err(format!(
            "the model file's SHA-256 is {actual} but its card states sha256 = \"{stated}\": \
             the file is not the one the card describes (a swapped file or a stale card)"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_read_as_sha256sum_prints_them() {
        // sha256sum of the empty input.
        let empty = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855";
        let read = Sha256::try_from(empty.to_owned()).expect("hex");
        assert_eq!(read, Sha256::of(b""));
        assert_eq!(read.as_str(), empty.to_ascii_lowercase());
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(63)] {
            let error = Sha256::try_from(bad.to_owned()).expect_err("not a digest");
            assert!(error.contains("not a SHA-256"), "{error}");
        }
    }

    #[test]
    fn a_file_that_is_not_the_cards_is_refused() {
        let file = Sha256::of(b"model");
        assert!(check_file(&file, None).is_ok());
        assert!(check_file(&file, Some(&Sha256::of(b"model"))).is_ok());
        let error = check_file(&file, Some(&Sha256::of(b"other"))).expect_err("swapped");
        assert!(
            error.contains(file.as_str()) && error.contains("swapped"),
            "{error}"
        );
    }

    #[test]
    fn lineage_takes_any_hyperparameter_and_refuses_unknown_keys() {
        let lineage: Lineage = toml::from_str(
            "dataset = \"s3://data/iris/2026-11\"\ncode_revision = \"4c7451e\"\n\
             training_run = \"a1b2\"\n[hyperparameters]\nlr = 0.5\nsteps = 300\nopt = \"sgd\"\n",
        )
        .expect("lineage");
        assert_eq!(lineage.hyperparameters["steps"], serde_json::json!(300));
        assert_eq!(lineage.hyperparameters["opt"], serde_json::json!("sgd"));
        let dated: Lineage =
            toml::from_str("[hyperparameters]\ncutoff = 2026-11-30\n").expect("date");
        assert_eq!(
            dated.hyperparameters["cutoff"],
            serde_json::json!("2026-11-30")
        );
        let error = toml::from_str::<Lineage>("[hyperparameters]\nlr = nan\n").expect_err("NaN");
        assert!(error.to_string().contains("hyperparameters.lr"), "{error}");
        let error = toml::from_str::<Lineage>("datasett = \"x\"\n").expect_err("typo");
        assert!(error.to_string().contains("datasett"), "{error}");
    }
}
