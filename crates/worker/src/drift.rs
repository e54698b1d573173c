//! Drift of a version's inputs and outputs from a reference (`[drift]` in its model
//! card): per feature, the most recent `window` values of live traffic against a
//! reference sample, by the two-sample Kolmogorov–Smirnov test and the Population
//! Stability Index; per output the card lists in `classes`, its predicted classes by a
//! chi-square test; Benjamini–Hochberg across every test of the version. Values outside
//! the reference's [p0.1, p99.9] (in flag mode, outside the range the input rules
//! declare) are outliers, counted per feature.
//!
//! A feature is one position along the last axis of a numeric tensor with a fixed last
//! dimension, or one the input rules declare (otherwise a rank-1 tensor is one
//! feature, each element a value); tensors with a variable last dimension, and BYTES,
//! are not tracked (the report lists what is). A class output is a floating-point
//! output of two or more columns (its class is the row's largest) or an integer output
//! of one (its class is the value; its values are not KS-tested). The reference of a
//! tensor is read from a JSON file beside the model (`{"<tensor>": [[row], ...]}`), or,
//! for a tensor the file leaves out or without a file, is the first `capture` rows of
//! traffic after the version loads. Memory is bounded: at most `capture` reference
//! values (a larger file is sampled down, with a fixed seed) plus `window` values per
//! feature, and a request records at most `rows_per_request` rows.
//!
//! Recording takes one lock for a request's inputs and one for its outputs, after
//! converting the rows it keeps; the tests run when a report is asked for (`/metrics`,
//! the admin API, the data watch, a rollout's evaluation), on a snapshot taken under
//! the lock. `assess` holds the tests, `samples` what is kept.

mod assess;
mod samples;

use std::{collections::BTreeMap, path::Path, sync::Mutex};

use aviary::tensor::{self, Datatype};
use serde::{Deserialize, Serialize};

pub use assess::{FeatureDrift, figure};
use samples::{ClassOf, Samples};

use crate::{
    input_rules::{InputRulesCard, RuleMode},
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
    /// Rows captured as the reference when there is no file; a file with more rows is
    /// sampled down to this many.
    #[serde(default = "default_capture")]
    pub capture: usize,
    /// The most recent rows compared with the reference.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Fewer rows than this in the window or the reference: no verdict.
    #[serde(default = "default_min_samples")]
    pub min_samples: usize,
    /// A feature drifts when its Benjamini–Hochberg adjusted p-value is below this.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// ... or its PSI is above this.
    #[serde(default = "default_max_psi")]
    pub max_psi: f64,
    /// Reference-quantile bins of the PSI.
    #[serde(default = "default_bins")]
    pub bins: usize,
    /// Outputs whose rows are predicted classes, tested by chi-square on their class
    /// counts: a floating-point output of 2 or more columns (the class is the row's
    /// largest) or an integer output of 1 (the class is the value, not KS-tested).
    #[serde(default)]
    pub classes: Vec<String>,
    /// Rows of one request recorded at most, chosen at random when it has more
    /// (default: `window / 100`, at least 1): one large batch cannot fill the window
    /// (or the captured reference) by itself, and recording stays cheap per request.
    pub rows_per_request: Option<usize>,
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
    /// The range the input rules declare, in flag mode: outside it is an outlier.
    declared: (Option<f64>, Option<f64>),
}

/// One tracked tensor: where its features start, how many there are, and whether its
/// rows are predicted classes.
#[derive(Debug, Clone, PartialEq)]
struct Tracked {
    side: Side,
    tensor: String,
    first: usize,
    columns: usize,
    /// How a row becomes a class, and which class samples count it (an output the
    /// card lists in `classes`).
    classes: Option<(ClassOf, usize)>,
    /// Whether its values are tested feature by feature (all but integer labels).
    values_tested: bool,
    /// Whether its reference came from the card's file (else it is captured).
    from_file: bool,
}

/// A version's drift tracking.
#[derive(Debug)]
pub struct DriftTracker {
    card: DriftCard,
    features: Vec<Feature>,
    tracked: Vec<Tracked>,
    samples: Mutex<Samples>,
    /// Which tests drifted when [`changes`](Self::changes) last looked.
    drifting: Mutex<Vec<bool>>,
}

impl DriftTracker {
    /// Tracking for a version: its features from `schema` (named, and counted, by
    /// `rules` where they declare features), its reference from the card's file in
    /// `folder` or from traffic. Errors name the card key.
    pub fn from_card(
        card: &DriftCard,
        schema: &ModelSchema,
        rules: Option<&InputRulesCard>,
        folder: &Path,
    ) -> Result<DriftTracker, String> {
        check_card(card)?;
        let mut features = Vec::new();
        let mut tracked = Vec::new();
        let mut classes = 0;
        for (side, specs) in [
            (Side::Input, &schema.inputs),
            (Side::Output, &schema.outputs),
        ] {
            for spec in specs {
                let declared = rules
                    .filter(|_| side == Side::Input)
                    .and_then(|r| r.inputs.get(&spec.name))
                    .map(|input| input.features.len())
                    .filter(|n| *n > 0 && spec.datatype != Datatype::Bytes);
                let Some(columns) = declared.or_else(|| columns_of(spec)) else {
                    continue;
                };
                let class_of = match card.classes.contains(&spec.name) {
                    true if side == Side::Output => {
                        let of = ClassOf::of(spec.datatype, columns).ok_or_else(|| {
                            format!(
                                "drift.classes: output \"{}\" ({} with {columns} values a row) has no classes: a floating-point output of 2 or more columns, or an integer output of 1, has",
                                spec.name,
                                spec.datatype.as_str()
                            )
                        })?;
                        classes += 1;
                        Some((of, classes - 1))
                    }
                    _ => None,
                };
                // An integer label's values are its classes: the chi-square says it all.
                let values_tested = !matches!(class_of, Some((ClassOf::Value, _)));
                tracked.push(Tracked {
                    side,
                    tensor: spec.name.clone(),
                    first: features.len(),
                    columns,
                    classes: class_of,
                    values_tested,
                    from_file: false,
                });
                if values_tested {
                    features.extend(features_of(side, spec, columns, rules));
                }
            }
        }
        for (i, name) in card.classes.iter().enumerate() {
            if !tracked
                .iter()
                .any(|t| t.classes.is_some() && t.tensor == *name)
            {
                return Err(format!(
                    "drift.classes[{i}]: \"{name}\" is not a tracked output of the model"
                ));
            }
        }
        let mut samples = Samples::new(features.len(), classes);
        if let Some(file) = &card.reference {
            load_reference(
                card,
                &crate::repository::file_beside(folder, file, "drift.reference")?,
                &mut tracked,
                &features,
                &mut samples,
            )?;
        }
        let tests = features.len() + classes;
        Ok(DriftTracker {
            card: card.clone(),
            features,
            tracked,
            samples: Mutex::new(samples),
            drifting: Mutex::new(vec![false; tests]),
        })
    }

    /// The card it follows.
    pub fn card(&self) -> &DriftCard {
        &self.card
    }

    /// Records a request's decoded inputs.
    pub fn record_inputs(&self, inputs: &[InputTensor]) {
        let rows: Vec<(usize, Vec<f64>)> = inputs
            .iter()
            .filter_map(|input| {
                let t = self.find(Side::Input, &input.name)?;
                let values = self.chosen_rows(t, input.data.len(), |i| input.data.number_at(i))?;
                Some((t, values))
            })
            .collect();
        self.record(rows);
    }

    /// Records a successful run's outputs.
    pub fn record_outputs(&self, outputs: &[OutputTensor]) {
        let rows: Vec<(usize, Vec<f64>)> = outputs
            .iter()
            .filter_map(|output| {
                let t = self.find(Side::Output, &output.name)?;
                let size = output.datatype.element_size()?;
                let values = self.chosen_rows(t, output.raw.len() / size, |i| {
                    raw_number_at(output.datatype, &output.raw, i)
                })?;
                Some((t, values))
            })
            .collect();
        self.record(rows);
    }

    fn find(&self, side: Side, tensor: &str) -> Option<usize> {
        self.tracked
            .iter()
            .position(|t| t.side == side && t.tensor == tensor)
    }

    /// The values (row-major) of the rows of tracked tensor `index` to record: all of
    /// its `elements / columns` rows, or `rows_per_request` of them chosen uniformly at
    /// random. Only those are read (`value`), before any lock is taken.
    fn chosen_rows(
        &self,
        index: usize,
        elements: usize,
        value: impl Fn(usize) -> Option<f64>,
    ) -> Option<Vec<f64>> {
        let columns = self.tracked[index].columns;
        let rows = elements / columns;
        let most = self
            .card
            .rows_per_request
            .unwrap_or(self.card.window / 100)
            .max(1);
        let chosen: Vec<usize> = match rows > most {
            true => rand::seq::index::sample(&mut rand::rng(), rows, most).into_vec(),
            false => (0..rows).collect(),
        };
        chosen
            .into_iter()
            .flat_map(|row| (row * columns..(row + 1) * columns).map(&value))
            .collect()
    }

    /// Appends each tracked tensor's chosen rows (row-major) to its features, and
    /// their classes: to the reference while it is still being captured, else to the
    /// window.
    fn record(&self, rows: Vec<(usize, Vec<f64>)>) {
        if rows.is_empty() {
            return;
        }
        let mut samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (index, values) in rows {
            let t = &self.tracked[index];
            let capture = (!t.from_file).then_some(self.card.capture);
            for column in (0..t.columns).filter(|_| t.values_tested) {
                let feature = t.first + column;
                let declared = self.features[feature].declared;
                let samples = &mut samples.features[feature];
                for value in values.iter().skip(column).step_by(t.columns) {
                    samples.record(*value, capture, self.card.window, declared);
                }
            }
            if let Some((of, class)) = t.classes {
                for row in values.chunks_exact(t.columns) {
                    if let Some(label) = of.class(row) {
                        samples.classes[class].record(label, capture, self.card.window);
                    }
                }
            }
        }
    }
}

/// Reads the card's reference file into `samples`: each tensor it holds is taken from
/// it (and marked so in `tracked`), the others are captured from traffic. Errors name
/// the key, the file, and the tensor and row at fault.
fn load_reference(
    card: &DriftCard,
    path: &Path,
    tracked: &mut [Tracked],
    features: &[Feature],
    samples: &mut Samples,
) -> Result<(), String> {
    let error = |e: &dyn std::fmt::Display| format!("drift.reference: {}: {e}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| error(&e))?;
    let rows: BTreeMap<String, Vec<Vec<f64>>> =
        serde_json::from_str(&text).map_err(|e| error(&e))?;
    for (name, values) in rows {
        let Some(t) = tracked.iter_mut().find(|t| t.tensor == name) else {
            return Err(error(&format!(
                "\"{name}\" is not a tracked tensor of the model"
            )));
        };
        for (r, row) in values.iter().enumerate() {
            if row.len() != t.columns {
                return Err(error(&format!(
                    "\"{name}\" row {r} has {} values for {} features",
                    row.len(),
                    t.columns
                )));
            }
            if matches!(t.classes, Some((ClassOf::Value, _))) && row[0].fract() != 0.0 {
                return Err(error(&format!(
                    "\"{name}\" row {r}: {} is not a class (an integer)",
                    row[0]
                )));
            }
        }
        if values.len() < card.min_samples {
            return Err(error(&format!(
                "\"{name}\" has {} rows, fewer than min_samples ({}): it could never be judged",
                values.len(),
                card.min_samples
            )));
        }
        t.from_file = true;
        let first = t.values_tested.then_some(t.first);
        for row in kept_rows(&values, card.capture) {
            samples.add_reference_row(first, row, t.classes);
        }
        if t.values_tested {
            for (i, feature) in features.iter().enumerate().skip(t.first).take(t.columns) {
                samples.features[i].settle_bounds(feature.declared);
            }
        }
    }
    Ok(())
}

/// A reference file's rows as kept: all of them, or `most` chosen uniformly at random
/// with a fixed seed (the same file always gives the same reference), in file order.
fn kept_rows(rows: &[Vec<f64>], most: usize) -> Vec<&[f64]> {
    use rand::SeedableRng;
    if rows.len() <= most {
        return rows.iter().map(Vec::as_slice).collect();
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0x000D_21F7);
    let mut chosen = rand::seq::index::sample(&mut rng, rows.len(), most).into_vec();
    chosen.sort_unstable();
    chosen.into_iter().map(|i| rows[i].as_slice()).collect()
}

/// `[drift]`'s numbers, checked; errors name the key.
fn check_card(card: &DriftCard) -> Result<(), String> {
    for (key, value) in [
        ("capture", card.capture),
        ("window", card.window),
        ("min_samples", card.min_samples),
    ] {
        if value == 0 {
            return Err(format!("drift.{key}: must be at least 1"));
        }
    }
    if card.rows_per_request == Some(0) {
        return Err("drift.rows_per_request: must be at least 1".into());
    }
    if card.bins < 2 {
        return Err(format!("drift.bins: {} is fewer than 2", card.bins));
    }
    // A capture below min_samples is allowed: such a version is only ever compared
    // with another one's window, by a rollout's data gates.
    if card.min_samples > card.window {
        return Err(format!(
            "drift.min_samples: {} is more than window ({}): no verdict could ever be reached",
            card.min_samples, card.window
        ));
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
    Ok(())
}

/// The features of a tracked tensor of `columns`: named by the input rules where they
/// name them, with the range they declare in flag mode.
fn features_of(
    side: Side,
    spec: &TensorSpec,
    columns: usize,
    rules: Option<&InputRulesCard>,
) -> Vec<Feature> {
    let declared = rules
        .filter(|_| side == Side::Input)
        .and_then(|r| Some((r.mode, r.inputs.get(&spec.name)?)))
        .map(|(mode, input)| {
            // Without features, the input's own rule holds for every element.
            let named = !input.features.is_empty();
            let rules = input.effective_features(&spec.name);
            (0..columns)
                .map(|c| {
                    let rule = rules.get(if named { c } else { 0 });
                    let range = rule
                        .filter(|_| mode == RuleMode::Flag)
                        .map_or((None, None), |r| (r.min, r.max));
                    (rule.filter(|_| named).and_then(|r| r.name.clone()), range)
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    (0..columns)
        .map(|column| {
            let (name, range) = declared.get(column).cloned().unwrap_or_default();
            let name = match (name, spec.shape.len()) {
                (Some(name), _) => name,
                (None, 1) => spec.name.clone(),
                (None, _) => format!("column {column}"),
            };
            Feature {
                side,
                tensor: spec.name.clone(),
                name,
                declared: range,
            }
        })
        .collect()
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

/// Element `i` of an output's raw little-endian values as a number; `None` for BYTES
/// or past the buffer.
fn raw_number_at(datatype: Datatype, raw: &[u8], i: usize) -> Option<f64> {
    fn at<T: tensor::Element>(raw: &[u8], i: usize, f: impl Fn(T) -> f64) -> Option<f64> {
        let size = std::mem::size_of::<T>();
        Some(f(T::read_le(raw.get(i * size..(i + 1) * size)?)))
    }
    match datatype {
        Datatype::Fp32 => at::<f32>(raw, i, f64::from),
        Datatype::Fp64 => at::<f64>(raw, i, |x| x),
        Datatype::Int64 => at::<i64>(raw, i, |x| x as f64),
        Datatype::Int32 => at::<i32>(raw, i, f64::from),
        Datatype::Int16 => at::<i16>(raw, i, f64::from),
        Datatype::Int8 => at::<i8>(raw, i, f64::from),
        Datatype::Uint64 => at::<u64>(raw, i, |x| x as f64),
        Datatype::Uint32 => at::<u32>(raw, i, f64::from),
        Datatype::Uint16 => at::<u16>(raw, i, f64::from),
        Datatype::Uint8 => at::<u8>(raw, i, f64::from),
        Datatype::Bool => at::<bool>(raw, i, |b| f64::from(u8::from(b))),
        Datatype::Fp16 => {
            let bytes = raw.get(i * 2..i * 2 + 2)?;
            Some(f64::from(
                half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
            ))
        }
        Datatype::Bf16 => {
            let bytes = raw.get(i * 2..i * 2 + 2)?;
            Some(f64::from(
                half::bf16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
            ))
        }
        Datatype::Bytes => None,
    }
}

#[cfg(test)]
mod tests;
