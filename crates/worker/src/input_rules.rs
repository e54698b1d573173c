//! The value rules a model card declares for a version's inputs (`[input_rules]` in
//! `model.toml`): per input, or per feature along the last axis of a feature vector,
//! an inclusive `min`/`max`, `allowed` values (numbers, or strings for BYTES), and
//! whether NaN and infinities are accepted. Beyond what Triton checks (datatype and
//! shape), so a request with a value the model was never meant to see is refused with
//! the feature, row, value and rule named, or, in `flag` mode, served and counted.
//!
//! The rules are checked against the version's schema when it loads, so a card that
//! cannot apply fails the load, not a request. Checking a request is one pass over its
//! decoded elements, with a feature's rule picked by column. Pure code: no I/O.

use std::{
    collections::BTreeMap,
    fmt,
    sync::atomic::{AtomicU64, Ordering},
};

use aviary::tensor::Datatype;
use serde::{Deserialize, Serialize};

use crate::{
    schema::ModelSchema,
    validate::{InputTensor, TensorData},
};

/// The `ModelConfig` parameter carrying a version's input rules, as JSON.
pub const PARAMETER: &str = "card.input_rules";

/// `[input_rules]` as the card writes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputRulesCard {
    /// What a request breaking a rule gets.
    #[serde(default)]
    pub mode: RuleMode,
    /// Rules by input name.
    #[serde(default)]
    pub inputs: BTreeMap<String, InputCard>,
}

/// What a request that breaks a rule gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleMode {
    /// Refused with INVALID_ARGUMENT naming the first value that breaks a rule.
    #[default]
    Reject,
    /// Served; every broken rule is counted per input, feature and rule.
    Flag,
}

/// The request parameter through which a gateway applies its route's mode
/// (`input_rules_mode` in the route's config) over the card's: `"reject"` or `"flag"`.
/// A gateway sets or removes it on every request it forwards, so a client cannot.
pub const MODE_PARAMETER: &str = "aviary_input_rules_mode";

impl RuleMode {
    /// The mode a [`MODE_PARAMETER`] value names; errors name the parameter.
    pub fn from_parameter(value: &str) -> Result<RuleMode, String> {
        match value {
            "reject" => Ok(RuleMode::Reject),
            "flag" => Ok(RuleMode::Flag),
            other => Err(format!(
                "parameter \"{MODE_PARAMETER}\": \"{other}\" is not an input-rule mode (reject, flag)"
            )),
        }
    }

    /// The parameter's value for the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleMode::Reject => "reject",
            RuleMode::Flag => "flag",
        }
    }
}

/// Whether a NaN (or an infinity) is a valid value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Breaks the rule.
    Reject,
    /// Accepted (range checks do not apply to it).
    Allow,
}

/// Allowed values: numbers, or strings for a BYTES input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Allowed {
    /// For numeric and BOOL inputs.
    Numbers(Vec<f64>),
    /// For BYTES inputs.
    Strings(Vec<String>),
}

/// The rules of one input: for every element, or per feature (`features`, one per
/// position along the last axis; a feature's own keys win over the input's).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputCard {
    /// Smallest valid value (inclusive).
    pub min: Option<f64>,
    /// Largest valid value (inclusive).
    pub max: Option<f64>,
    /// The only valid values.
    pub allowed: Option<Allowed>,
    /// Whether NaN is valid (default: reject).
    pub nan: Option<Policy>,
    /// Whether +/- infinity is valid (default: reject).
    pub inf: Option<Policy>,
    /// One entry per feature along the last axis, in order.
    #[serde(default)]
    pub features: Vec<FeatureCard>,
}

impl InputCard {
    /// The input's own keys as one rule for every element, named after the input.
    fn own_keys(&self, input: &str) -> FeatureCard {
        FeatureCard {
            name: Some(input.to_owned()),
            min: self.min,
            max: self.max,
            allowed: self.allowed.clone(),
            nan: self.nan,
            inf: self.inf,
        }
    }

    /// What each element is held to: one rule per feature (its own keys, else the
    /// input's; named, or `column N`), or, without features, the input's keys named
    /// after the input. What the worker applies and `ctl models --schema` shows.
    pub fn effective_features(&self, input: &str) -> Vec<FeatureCard> {
        let whole = self.own_keys(input);
        if self.features.is_empty() {
            return vec![whole];
        }
        self.features
            .iter()
            .enumerate()
            .map(|(column, f)| FeatureCard {
                name: Some(f.name.clone().unwrap_or_else(|| format!("column {column}"))),
                min: f.min.or(whole.min),
                max: f.max.or(whole.max),
                allowed: f.allowed.clone().or_else(|| whole.allowed.clone()),
                nan: f.nan.or(whole.nan),
                inf: f.inf.or(whole.inf),
            })
            .collect()
    }
}

/// The rules of one feature (a position along an input's last axis).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureCard {
    /// The feature's name, used in errors and metrics (default: `column N`).
    pub name: Option<String>,
    /// Smallest valid value (inclusive).
    pub min: Option<f64>,
    /// Largest valid value (inclusive).
    pub max: Option<f64>,
    /// The only valid values.
    pub allowed: Option<Allowed>,
    /// Whether NaN is valid.
    pub nan: Option<Policy>,
    /// Whether +/- infinity is valid.
    pub inf: Option<Policy>,
}

/// Which rule a value broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Broken {
    /// Below `min`.
    BelowMin,
    /// Above `max`.
    AboveMax,
    /// Not one of `allowed`.
    NotAllowed,
    /// NaN where it is rejected.
    Nan,
    /// An infinity where it is rejected.
    Inf,
}

impl Broken {
    /// Every rule, in the order counters are kept.
    pub const ALL: [Broken; 5] = [
        Broken::BelowMin,
        Broken::AboveMax,
        Broken::NotAllowed,
        Broken::Nan,
        Broken::Inf,
    ];

    /// The rule's name in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Broken::BelowMin => "below_min",
            Broken::AboveMax => "above_max",
            Broken::NotAllowed => "not_allowed",
            Broken::Nan => "nan",
            Broken::Inf => "inf",
        }
    }
}

/// One feature's (or a whole input's) compiled rule.
#[derive(Debug, Clone, PartialEq)]
struct Rule {
    /// How errors and metrics name it.
    feature: String,
    min: Option<f64>,
    max: Option<f64>,
    allowed_numbers: Option<Vec<f64>>,
    allowed_strings: Option<Vec<String>>,
    nan_ok: bool,
    inf_ok: bool,
    /// Whether bounds were rounded to at most single precision (shown as such).
    single: bool,
}

/// The rules of one input, compiled.
#[derive(Debug)]
struct InputRule {
    name: String,
    /// Features along the last axis; `None`: one rule for every element.
    features: Option<usize>,
    rules: Vec<Rule>,
    /// Violations counted per rule and broken kind (`rules.len() * Broken::ALL.len()`).
    counts: Vec<AtomicU64>,
}

/// A version's input rules, checked against its schema, with their violation counts.
#[derive(Debug)]
pub struct InputRules {
    mode: RuleMode,
    inputs: Vec<InputRule>,
    /// In flag mode, the most recent request's first broken value, in words.
    last_flagged: std::sync::Mutex<Option<String>>,
}

/// One value that broke a rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// The input.
    pub input: String,
    /// The feature (`column N` when unnamed), or `None` for a whole-input rule.
    pub feature: Option<(String, usize)>,
    /// Row (the element's index over every axis but the last) or, for a whole-input
    /// rule, the element's index.
    pub index: usize,
    /// The value, as the request sent it.
    pub value: String,
    /// The rule and its bound, in words: `is above max 10.0`.
    pub rule: String,
    /// Which rule.
    pub broken: Broken,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "input \"{}\" ", self.input)?;
        match &self.feature {
            Some((name, column)) => {
                write!(f, "feature \"{name}\" (column {column}) row {}", self.index)?
            }
            None => write!(f, "element {}", self.index)?,
        }
        write!(f, ": {} {}", self.value, self.rule)
    }
}

/// The counts of one input feature's broken rules: (input, feature, rule, count).
pub type ViolationCount<'a> = (&'a str, &'a str, Broken, u64);

impl InputRules {
    /// Compiles `card` against `schema`: every input it names exists, features match
    /// the last dimension where it is fixed, bounds and allowed values suit the
    /// datatype. Errors name the card key.
    pub fn from_card(card: &InputRulesCard, schema: &ModelSchema) -> Result<InputRules, String> {
        let mut inputs = Vec::new();
        for (name, input) in &card.inputs {
            let key = format!("input_rules.inputs.{name}");
            let spec = schema
                .inputs
                .iter()
                .find(|s| &s.name == name)
                .ok_or_else(|| {
                    let names: Vec<String> = schema
                        .inputs
                        .iter()
                        .map(|s| format!("\"{}\"", s.name))
                        .collect();
                    format!(
                        "{key}: the model has no input \"{name}\" (inputs: {})",
                        names.join(", ")
                    )
                })?;
            // The input's own keys are checked where they are written, features or not.
            Rule::from_card(&key, spec.datatype, &input.own_keys(name))?;
            let features = match input.features.is_empty() {
                true => None,
                false => {
                    let last = spec.shape.last().copied().ok_or_else(|| {
                        format!("{key}.features: input \"{name}\" is a scalar, it has no features")
                    })?;
                    let count = input.features.len();
                    if last >= 0 && usize::try_from(last).ok() != Some(count) {
                        return Err(format!(
                            "{key}.features: {count} features for a last dimension of {last}"
                        ));
                    }
                    Some(count)
                }
            };
            let rules = input
                .effective_features(name)
                .iter()
                .enumerate()
                .map(|(column, feature)| {
                    let key = match features {
                        Some(_) => format!("{key}.features[{column}]"),
                        None => key.clone(),
                    };
                    Rule::from_card(&key, spec.datatype, feature)
                })
                .collect::<Result<Vec<_>, String>>()?;
            let counts = (0..rules.len() * Broken::ALL.len())
                .map(|_| AtomicU64::new(0))
                .collect();
            inputs.push(InputRule {
                name: name.clone(),
                features,
                rules,
                counts,
            });
        }
        Ok(InputRules {
            mode: card.mode,
            inputs,
            last_flagged: std::sync::Mutex::new(None),
        })
    }

    /// What a request that breaks a rule gets.
    pub fn mode(&self) -> RuleMode {
        self.mode
    }

    /// Checks `inputs` (decoded, in any order). In `reject` mode the first value that
    /// breaks a rule is returned and counted; in `flag` mode every one is counted, the
    /// first kept as the latest example, and `None` returned. A feature vector whose last dimension is not the number of
    /// declared features is an error in either mode (the rules cannot apply).
    pub fn check(&self, inputs: &[InputTensor]) -> Result<Option<Violation>, String> {
        self.check_as(inputs, self.mode)
    }

    /// [`check`](Self::check) in `mode` instead of the card's (a route's override).
    pub fn check_as(
        &self,
        inputs: &[InputTensor],
        mode: RuleMode,
    ) -> Result<Option<Violation>, String> {
        let ruled: Vec<(&InputRule, &InputTensor)> = self
            .inputs
            .iter()
            .filter_map(|rule| Some((rule, inputs.iter().find(|t| t.name == rule.name)?)))
            .collect();
        // Every shape first: a request refused for its shape counts no value.
        for (rule, tensor) in &ruled {
            if let Some(count) = rule.features {
                let last = tensor.shape.last().copied().unwrap_or(0);
                if usize::try_from(last).ok() != Some(count) {
                    return Err(format!(
                        "input \"{}\": the model card declares {count} features along the last axis, the request has {last}",
                        rule.name
                    ));
                }
            }
        }
        let mut flagged = None;
        for (rule, tensor) in ruled {
            if let Some(violation) = rule.check(&tensor.data, mode) {
                if mode == RuleMode::Reject {
                    return Ok(Some(violation));
                }
                flagged.get_or_insert(violation);
            }
        }
        // Best effort, never waiting on the request path: an example another request
        // is storing at the same moment will do.
        if let Some(violation) = flagged
            && let Ok(mut last) = self.last_flagged.try_lock()
        {
            *last = Some(violation.to_string());
        }
        Ok(None)
    }

    /// The latest request's first flagged value (flag mode), taken: the example the
    /// data watch records beside the counts.
    pub fn take_flagged_example(&self) -> Option<String> {
        self.last_flagged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Every input feature's broken-rule counts, zeros left out.
    pub fn counts(&self) -> Vec<ViolationCount<'_>> {
        let mut out = Vec::new();
        for input in &self.inputs {
            for (index, rule) in input.rules.iter().enumerate() {
                for (k, broken) in Broken::ALL.iter().enumerate() {
                    let n = input.counts[index * Broken::ALL.len() + k].load(Ordering::Relaxed);
                    if n > 0 {
                        out.push((input.name.as_str(), rule.feature.as_str(), *broken, n));
                    }
                }
            }
        }
        out
    }
}

impl Rule {
    /// A rule from a feature's keys (with its input's already merged in, see
    /// [`InputCard::effective_features`]), checked against the input's datatype.
    fn from_card(key: &str, datatype: Datatype, card: &FeatureCard) -> Result<Rule, String> {
        let numeric = datatype != Datatype::Bytes;
        if !numeric && (card.min.is_some() || card.max.is_some()) {
            return Err(format!(
                "{key}: min and max do not apply to a BYTES input; use allowed"
            ));
        }
        for (bound, value) in [("min", card.min), ("max", card.max)] {
            if value.is_some_and(|v| !v.is_finite()) {
                return Err(format!("{key}.{bound}: must be a finite number"));
            }
        }
        let (allowed_numbers, allowed_strings) = match &card.allowed {
            Some(Allowed::Numbers(values)) if numeric => {
                if values.is_empty() {
                    return Err(format!("{key}.allowed: lists no value"));
                }
                for (i, value) in values.iter().enumerate() {
                    if !value.is_finite() {
                        return Err(format!(
                            "{key}.allowed[{i}]: {value} can never match (NaN and infinities have nan and inf)"
                        ));
                    }
                    if is_integer(datatype) && value.fract() != 0.0 {
                        return Err(format!(
                            "{key}.allowed[{i}]: {value} can never match a {} value",
                            datatype.as_str()
                        ));
                    }
                }
                let mut values: Vec<f64> =
                    values.iter().map(|v| at_precision(datatype, *v)).collect();
                values.sort_by(f64::total_cmp);
                (Some(values), None)
            }
            Some(Allowed::Strings(values)) if !numeric => {
                if values.is_empty() {
                    return Err(format!("{key}.allowed: lists no value"));
                }
                (None, Some(values.clone()))
            }
            Some(Allowed::Numbers(_)) => {
                return Err(format!("{key}.allowed: a BYTES input takes strings"));
            }
            Some(Allowed::Strings(_)) => {
                return Err(format!(
                    "{key}.allowed: a {} input takes numbers",
                    datatype.as_str()
                ));
            }
            None => (None, None),
        };
        let rule = Rule {
            feature: card.name.clone().unwrap_or_default(),
            min: card.min.map(|v| at_precision(datatype, v)),
            max: card.max.map(|v| at_precision(datatype, v)),
            allowed_numbers,
            allowed_strings,
            nan_ok: card.nan == Some(Policy::Allow),
            inf_ok: card.inf == Some(Policy::Allow),
            single: matches!(datatype, Datatype::Fp32 | Datatype::Fp16 | Datatype::Bf16),
        };
        if let (Some(min), Some(max)) = (rule.min, rule.max)
            && min > max
        {
            return Err(format!("{key}: min {min} is above max {max}"));
        }
        Ok(rule)
    }

    /// A bound as the card wrote it (`10.0`, `0.1`), not as the double nearest the
    /// input's precision it is compared as.
    fn show(&self, value: f64) -> String {
        match self.single {
            true => format!("{:?}", value as f32),
            false => format!("{value:?}"),
        }
    }

    /// The rule `value` breaks, with the rule in words.
    fn judge(&self, value: f64) -> Option<(Broken, String)> {
        if value.is_nan() {
            return (!self.nan_ok).then(|| (Broken::Nan, "is NaN, which is rejected".to_owned()));
        }
        if value.is_infinite() {
            return (!self.inf_ok)
                .then(|| (Broken::Inf, "is infinite, which is rejected".to_owned()));
        }
        if let Some(min) = self.min
            && value < min
        {
            return Some((Broken::BelowMin, format!("is below min {}", self.show(min))));
        }
        if let Some(max) = self.max
            && value > max
        {
            return Some((Broken::AboveMax, format!("is above max {}", self.show(max))));
        }
        if let Some(allowed) = &self.allowed_numbers
            && allowed.binary_search_by(|a| a.total_cmp(&value)).is_err()
            // -0.0 and 0.0 are the same value to a user.
            && !(value == 0.0 && allowed.contains(&0.0))
        {
            let listed: Vec<String> = allowed.iter().map(|v| self.show(*v)).collect();
            return Some((
                Broken::NotAllowed,
                format!("is not one of the allowed values [{}]", listed.join(", ")),
            ));
        }
        None
    }

    fn judge_text(&self, value: &[u8]) -> Option<(Broken, String)> {
        let allowed = self.allowed_strings.as_ref()?;
        (!allowed.iter().any(|a| a.as_bytes() == value)).then(|| {
            let listed: Vec<String> = allowed.iter().map(|v| format!("{v:?}")).collect();
            (
                Broken::NotAllowed,
                format!("is not one of the allowed values [{}]", listed.join(", ")),
            )
        })
    }
}

/// `value` as the nearest number a tensor of `datatype` holds: a card's `0.3` for an
/// FP32 input is the FP32 nearest 0.3, so a request sending 0.3 is at the bound, not
/// above it. Integer and FP64 inputs compare as written.
fn at_precision(datatype: Datatype, value: f64) -> f64 {
    match datatype {
        Datatype::Fp32 => f64::from(value as f32),
        Datatype::Fp16 => half::f16::from_f64(value).to_f64(),
        Datatype::Bf16 => half::bf16::from_f64(value).to_f64(),
        _ => value,
    }
}

/// Whether `datatype` holds whole numbers (BOOL as 0 and 1).
pub(crate) fn is_integer(datatype: Datatype) -> bool {
    matches!(
        datatype,
        Datatype::Int8
            | Datatype::Int16
            | Datatype::Int32
            | Datatype::Int64
            | Datatype::Uint8
            | Datatype::Uint16
            | Datatype::Uint32
            | Datatype::Uint64
            | Datatype::Bool
    )
}

impl InputRule {
    /// Counts what breaks a rule; in `reject` mode stops at (and returns) the first.
    fn check(&self, data: &TensorData, mode: RuleMode) -> Option<Violation> {
        macro_rules! numbers {
            ($values:expr, $to_f64:expr) => {
                self.scan($values, mode, |v| $to_f64(*v), |v| format!("{v:?}"))
            };
        }
        match data {
            TensorData::Bool(v) => numbers!(v, |b: bool| f64::from(u8::from(b))),
            TensorData::Uint8(v) => numbers!(v, f64::from),
            TensorData::Uint16(v) => numbers!(v, f64::from),
            TensorData::Uint32(v) => numbers!(v, f64::from),
            // Above 2^53 a 64-bit integer compares as its nearest double.
            TensorData::Uint64(v) => numbers!(v, |x: u64| x as f64),
            TensorData::Int8(v) => numbers!(v, f64::from),
            TensorData::Int16(v) => numbers!(v, f64::from),
            TensorData::Int32(v) => numbers!(v, f64::from),
            TensorData::Int64(v) => numbers!(v, |x: i64| x as f64),
            TensorData::Fp16(v) => numbers!(v, |x: half::f16| f64::from(x.to_f32())),
            TensorData::Bf16(v) => numbers!(v, |x: half::bf16| f64::from(x.to_f32())),
            TensorData::Fp32(v) => numbers!(v, f64::from),
            TensorData::Fp64(v) => numbers!(v, |x: f64| x),
            TensorData::Bytes(v) => self.scan_texts(v, mode),
        }
    }

    /// The rule of element `index`: its feature's, or the input's.
    fn rule_of(&self, index: usize) -> (usize, &Rule) {
        let position = self.features.map_or(0, |n| index % n);
        (position, &self.rules[position])
    }

    /// One pass over `values`, each read as a number; `shown` writes a broken one as
    /// the request sent it (only then: formatting every element would cost more than
    /// the checks).
    fn scan<T>(
        &self,
        values: &[T],
        mode: RuleMode,
        number: impl Fn(&T) -> f64,
        shown: impl Fn(&T) -> String,
    ) -> Option<Violation> {
        let mut first = None;
        for (index, value) in values.iter().enumerate() {
            let (position, rule) = self.rule_of(index);
            if let Some((broken, words)) = rule.judge(number(value)) {
                self.count(position, broken);
                if first.is_none() {
                    first = Some(self.violation(index, position, shown(value), words, broken));
                }
                if mode == RuleMode::Reject {
                    break;
                }
            }
        }
        first
    }

    fn scan_texts(&self, values: &[Vec<u8>], mode: RuleMode) -> Option<Violation> {
        let mut first = None;
        for (index, value) in values.iter().enumerate() {
            let (position, rule) = self.rule_of(index);
            if let Some((broken, words)) = rule.judge_text(value) {
                self.count(position, broken);
                if first.is_none() {
                    let shown = format!("{:?}", String::from_utf8_lossy(value));
                    first = Some(self.violation(index, position, shown, words, broken));
                }
                if mode == RuleMode::Reject {
                    break;
                }
            }
        }
        first
    }

    fn count(&self, position: usize, broken: Broken) {
        let kind = Broken::ALL
            .iter()
            .position(|b| *b == broken)
            .unwrap_or_default();
        self.counts[position * Broken::ALL.len() + kind].fetch_add(1, Ordering::Relaxed);
    }

    fn violation(
        &self,
        index: usize,
        position: usize,
        value: String,
        rule: String,
        broken: Broken,
    ) -> Violation {
        let (feature, index) = match self.features {
            Some(n) => (
                Some((self.rules[position].feature.clone(), position)),
                index / n,
            ),
            None => (None, index),
        };
        Violation {
            input: self.name.clone(),
            feature,
            index,
            value,
            rule,
            broken,
        }
    }
}

#[cfg(test)]
mod tests;
