//! Drift of a version's inputs and outputs from a reference (`[drift]` in its model
//! card): per feature, the most recent `window` values of live traffic against a
//! reference sample, by the two-sample Kolmogorov–Smirnov test and the Population
//! Stability Index, with Benjamini–Hochberg across every feature of the version.
//!
//! A feature is one position along the last axis of a numeric tensor with a fixed last
//! dimension (a rank-1 tensor is one feature, each element a value); tensors with a
//! variable last dimension, and BYTES, are not tracked (the report lists what is). The
//! reference is a JSON file beside the model (`{"<tensor>": [[row], ...]}`), or the
//! first `capture` rows of traffic after the version loads. Memory is bounded: at most
//! `capture` (or the file's rows) plus `window` values per feature.
//!
//! Recording is one lock per request and a copy of its values; the tests run when a
//! report is asked for (`/metrics`, the admin API), on a snapshot taken under the lock.

use std::{collections::BTreeMap, path::Path, sync::Mutex};

use aviary::tensor::{self, Datatype};
use aviary_router::stats::{benjamini_hochberg, ks_two_sample, population_stability_index};
use serde::{Deserialize, Serialize};

use crate::{
    input_rules::InputRulesCard,
    model::OutputTensor,
    schema::{ModelSchema, TensorSpec},
    validate::InputTensor,
};

/// `[drift]` as the card writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftCard {
    /// A JSON file beside the model holding reference rows per tensor; without it the
    /// first `capture` rows of traffic are the reference.
    pub reference: Option<String>,
    /// Rows captured as the reference when there is no file.
    #[serde(default = "default_capture")]
    pub capture: usize,
    /// The most recent rows compared with the reference.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Fewer rows than this in the window or the reference: no verdict.
    #[serde(default = "default_min_samples")]
    pub min_samples: usize,
    /// A feature drifts when its Benjamini–Hochberg adjusted KS p-value is below this.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// ... or its PSI is above this.
    #[serde(default = "default_max_psi")]
    pub max_psi: f64,
    /// Reference-quantile bins of the PSI.
    #[serde(default = "default_bins")]
    pub bins: usize,
}

fn default_capture() -> usize {
    1000
}
fn default_window() -> usize {
    1000
}
fn default_min_samples() -> usize {
    100
}
fn default_alpha() -> f64 {
    0.01
}
fn default_max_psi() -> f64 {
    0.25
}
fn default_bins() -> usize {
    10
}

/// Whether a feature is an input's or an output's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Side {
    /// A request input.
    Input,
    /// A model output.
    Output,
}

impl Side {
    /// The side's name in reports and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Side::Input => "input",
            Side::Output => "output",
        }
    }
}

/// One tracked feature.
#[derive(Debug, Clone, PartialEq)]
struct Feature {
    side: Side,
    tensor: String,
    /// How reports name it: the input rules' feature name, `column N`, or the tensor's
    /// name for a rank-1 tensor.
    name: String,
}

/// One tracked tensor: where its features start and how many there are.
#[derive(Debug, Clone, PartialEq)]
struct Tracked {
    side: Side,
    tensor: String,
    first: usize,
    columns: usize,
}

#[derive(Debug, Default)]
struct Samples {
    /// Per feature, the reference values (filled by capture until `capture` rows).
    reference: Vec<Vec<f64>>,
    /// Per feature, the last `window` values, oldest overwritten first.
    window: Vec<Vec<f64>>,
    /// Where the next value of each feature's window goes.
    next: Vec<usize>,
}

/// A version's drift tracking.
#[derive(Debug)]
pub struct DriftTracker {
    card: DriftCard,
    features: Vec<Feature>,
    tracked: Vec<Tracked>,
    /// Whether the reference came from a file (else it is being captured).
    from_file: bool,
    samples: Mutex<Samples>,
}

/// What a report says of one feature.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeatureDrift {
    /// `input` or `output`.
    pub side: &'static str,
    /// The tensor.
    pub tensor: String,
    /// The feature's name.
    pub feature: String,
    /// Values in the reference.
    pub reference: usize,
    /// Values in the window.
    pub window: usize,
    /// The KS statistic (largest CDF gap), when both sides have values.
    pub ks_statistic: Option<f64>,
    /// Its p-value.
    pub ks_p_value: Option<f64>,
    /// The p-value adjusted across the version's features (Benjamini–Hochberg).
    pub adjusted_p_value: Option<f64>,
    /// The Population Stability Index.
    pub psi: Option<f64>,
    /// `drift`, `ok`, or `insufficient` (fewer than `min_samples` on a side).
    pub verdict: &'static str,
}

impl DriftTracker {
    /// Tracking for a version: its features from `schema` (named by `rules` where they
    /// name them), its reference from the card's file in `folder` or from traffic.
    /// Errors name the card key.
    pub fn from_card(
        card: &DriftCard,
        schema: &ModelSchema,
        rules: Option<&InputRulesCard>,
        folder: &Path,
    ) -> Result<DriftTracker, String> {
        if card.window == 0 || card.min_samples == 0 || card.bins < 2 {
            return Err("drift: window and min_samples must be at least 1, bins at least 2".into());
        }
        if !(card.alpha > 0.0 && card.alpha < 1.0) {
            return Err(format!(
                "drift.alpha: {} is not between 0 and 1",
                card.alpha
            ));
        }
        if card.max_psi.is_nan() || card.max_psi <= 0.0 {
            return Err(format!("drift.max_psi: {} is not positive", card.max_psi));
        }
        let mut features = Vec::new();
        let mut tracked = Vec::new();
        for (side, specs) in [
            (Side::Input, &schema.inputs),
            (Side::Output, &schema.outputs),
        ] {
            for spec in specs {
                let Some(columns) = columns_of(spec) else {
                    continue;
                };
                let names = rules
                    .filter(|_| side == Side::Input)
                    .and_then(|r| r.inputs.get(&spec.name))
                    .map(|i| {
                        i.features
                            .iter()
                            .map(|f| f.name.clone())
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default();
                tracked.push(Tracked {
                    side,
                    tensor: spec.name.clone(),
                    first: features.len(),
                    columns,
                });
                for column in 0..columns {
                    let name = match (names.get(column).cloned().flatten(), spec.shape.len()) {
                        (Some(name), _) => name,
                        (None, 1) => spec.name.clone(),
                        (None, _) => format!("column {column}"),
                    };
                    features.push(Feature {
                        side,
                        tensor: spec.name.clone(),
                        name,
                    });
                }
            }
        }
        let mut samples = Samples {
            reference: vec![Vec::new(); features.len()],
            window: vec![Vec::new(); features.len()],
            next: vec![0; features.len()],
        };
        let from_file = match &card.reference {
            Some(file) => {
                let path = folder.join(file);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("drift.reference: {}: {e}", path.display()))?;
                let rows: BTreeMap<String, Vec<Vec<f64>>> = serde_json::from_str(&text)
                    .map_err(|e| format!("drift.reference: {}: {e}", path.display()))?;
                for (name, values) in rows {
                    let Some(t) = tracked.iter().find(|t| t.tensor == name) else {
                        return Err(format!(
                            "drift.reference: {}: \"{name}\" is not a tracked tensor of the model",
                            path.display()
                        ));
                    };
                    for (r, row) in values.iter().enumerate() {
                        if row.len() != t.columns {
                            return Err(format!(
                                "drift.reference: {}: \"{name}\" row {r} has {} values for {} features",
                                path.display(),
                                row.len(),
                                t.columns
                            ));
                        }
                        for (c, value) in row.iter().enumerate() {
                            samples.reference[t.first + c].push(*value);
                        }
                    }
                }
                true
            }
            None => false,
        };
        Ok(DriftTracker {
            card: card.clone(),
            features,
            tracked,
            from_file,
            samples: Mutex::new(samples),
        })
    }

    /// Records a request's decoded inputs.
    pub fn record_inputs(&self, inputs: &[InputTensor]) {
        let values: Vec<(usize, Vec<f64>)> = inputs
            .iter()
            .filter_map(|input| {
                let t = self.find(Side::Input, &input.name)?;
                Some((t, input.data.numbers()?))
            })
            .collect();
        self.record(values);
    }

    /// Records a successful run's outputs.
    pub fn record_outputs(&self, outputs: &[OutputTensor]) {
        let values: Vec<(usize, Vec<f64>)> = outputs
            .iter()
            .filter_map(|output| {
                let t = self.find(Side::Output, &output.name)?;
                Some((t, raw_numbers(output.datatype, &output.raw)?))
            })
            .collect();
        self.record(values);
    }

    fn find(&self, side: Side, tensor: &str) -> Option<usize> {
        self.tracked
            .iter()
            .position(|t| t.side == side && t.tensor == tensor)
    }

    /// Appends each tracked tensor's values (row-major) to its features: to the
    /// reference while it is still being captured, else to the window.
    fn record(&self, values: Vec<(usize, Vec<f64>)>) {
        if values.is_empty() {
            return;
        }
        let mut samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (index, values) in values {
            let t = &self.tracked[index];
            for (i, value) in values.into_iter().enumerate() {
                // NaN and infinities (allowed by some input rules) have no place in a
                // distribution test; the input rules count them.
                if !value.is_finite() {
                    continue;
                }
                let feature = t.first + i % t.columns;
                let reference = &mut samples.reference[feature];
                if !self.from_file && reference.len() < self.card.capture {
                    reference.push(value);
                    continue;
                }
                let next = samples.next[feature];
                let window = &mut samples.window[feature];
                if window.len() < self.card.window {
                    window.push(value);
                } else {
                    window[next] = value;
                }
                samples.next[feature] = (next + 1) % self.card.window;
            }
        }
    }

    /// Every tracked feature's drift now.
    pub fn report(&self) -> Vec<FeatureDrift> {
        let (reference, window) = {
            let samples = self
                .samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (samples.reference.clone(), samples.window.clone())
        };
        let tests: Vec<_> = reference
            .iter()
            .zip(&window)
            .map(|(r, w)| {
                let enough = r.len() >= self.card.min_samples && w.len() >= self.card.min_samples;
                let ks = enough.then(|| ks_two_sample(r, w)).flatten();
                let psi = enough
                    .then(|| population_stability_index(r, w, self.card.bins))
                    .flatten();
                (enough, ks, psi)
            })
            .collect();
        let p_values: Vec<f64> = tests
            .iter()
            .map(|(_, ks, _)| ks.map_or(f64::NAN, |k| k.p_value))
            .collect();
        let adjusted = benjamini_hochberg(&p_values);
        self.features
            .iter()
            .zip(tests)
            .zip(adjusted)
            .enumerate()
            .map(|(i, ((feature, (enough, ks, psi)), adjusted))| {
                let adjusted = (!adjusted.is_nan()).then_some(adjusted);
                let drifted = adjusted.is_some_and(|p| p < self.card.alpha)
                    || psi.is_some_and(|psi| psi > self.card.max_psi);
                FeatureDrift {
                    side: feature.side.label(),
                    tensor: feature.tensor.clone(),
                    feature: feature.name.clone(),
                    reference: reference[i].len(),
                    window: window[i].len(),
                    ks_statistic: ks.map(|k| k.statistic),
                    ks_p_value: ks.map(|k| k.p_value),
                    adjusted_p_value: adjusted,
                    psi,
                    verdict: match (enough, drifted) {
                        (false, _) => "insufficient",
                        (true, true) => "drift",
                        (true, false) => "ok",
                    },
                }
            })
            .collect()
    }
}

/// How many features a tensor has: 1 for rank 1, its fixed last dimension otherwise;
/// `None` for one not tracked (BYTES, a scalar, a variable last dimension).
fn columns_of(spec: &TensorSpec) -> Option<usize> {
    if spec.datatype == Datatype::Bytes {
        return None;
    }
    match spec.shape.as_slice() {
        [] => None,
        [_] => Some(1),
        [.., last] => usize::try_from(*last).ok().filter(|n| *n > 0),
    }
}

/// An output's raw little-endian values as numbers; `None` for BYTES or a malformed
/// buffer.
fn raw_numbers(datatype: Datatype, raw: &[u8]) -> Option<Vec<f64>> {
    fn all<T: tensor::Element>(raw: &[u8], f: impl Fn(T) -> f64) -> Option<Vec<f64>> {
        Some(tensor::from_raw::<T>(raw)?.into_iter().map(f).collect())
    }
    match datatype {
        Datatype::Fp32 => all::<f32>(raw, f64::from),
        Datatype::Fp64 => all::<f64>(raw, |x| x),
        Datatype::Int64 => all::<i64>(raw, |x| x as f64),
        Datatype::Int32 => all::<i32>(raw, f64::from),
        Datatype::Int16 => all::<i16>(raw, f64::from),
        Datatype::Int8 => all::<i8>(raw, f64::from),
        Datatype::Uint64 => all::<u64>(raw, |x| x as f64),
        Datatype::Uint32 => all::<u32>(raw, f64::from),
        Datatype::Uint16 => all::<u16>(raw, f64::from),
        Datatype::Uint8 => all::<u8>(raw, f64::from),
        Datatype::Bool => all::<bool>(raw, |b| f64::from(u8::from(b))),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
