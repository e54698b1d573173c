//! The tests a drift report runs: each feature's window against its reference (KS and
//! PSI), each classifier output's classes (chi-square and PSI), Benjamini–Hochberg
//! across them all; and the same between two versions' windows, for a rollout.

use aviary_router::stats::{
    TestResult, benjamini_hochberg, category_stability_index, chi_square_homogeneity,
    ks_two_sample, population_stability_index,
};
use serde::Serialize;

use super::{
    DriftCard, DriftTracker, Side,
    samples::{class_counts, counts_of},
};

/// What a report says of one feature (or one classifier output's classes).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeatureDrift {
    /// `input` or `output`.
    pub side: &'static str,
    /// The tensor.
    pub tensor: String,
    /// The feature's name; `predicted class` for a classifier output's classes.
    pub feature: String,
    /// `ks` (a feature's values) or `chi-square` (predicted classes).
    pub test: &'static str,
    /// Values (rows, for classes) in the reference.
    pub reference: usize,
    /// Values (rows) in the window.
    pub window: usize,
    /// The test's statistic (KS: the largest CDF gap), when both sides have enough.
    pub statistic: Option<f64>,
    /// Its p-value.
    pub p_value: Option<f64>,
    /// The p-value adjusted across the version's tests (Benjamini–Hochberg).
    pub adjusted_p_value: Option<f64>,
    /// The Population Stability Index.
    pub psi: Option<f64>,
    /// Window values outside the outlier bounds; `None` for classes and before the
    /// reference is complete.
    pub outliers: Option<u64>,
    /// Outliers among every value recorded since the bounds were known (the reference
    /// was complete).
    pub outliers_total: Option<u64>,
    /// `drift`, `ok`, or `insufficient` (fewer than `min_samples` on a side).
    pub verdict: &'static str,
}

impl FeatureDrift {
    /// Whether the feature drifts.
    pub fn drifts(&self) -> bool {
        self.verdict == "drift"
    }

    /// How logs, audit records and rollout decisions name it: `input input/petal_length`.
    pub fn name(&self) -> String {
        format!("{} {}/{}", self.side, self.tensor, self.feature)
    }

    /// Its adjusted p-value and PSI in words: `p 0.0000 PSI 0.3120`.
    pub fn figures(&self) -> String {
        format!(
            "p {} PSI {}",
            figure(self.adjusted_p_value),
            figure(self.psi)
        )
    }
}

/// A statistic as reports write it: four decimals, `-` when not measured.
pub fn figure(value: Option<f64>) -> String {
    value.map_or("-".to_owned(), |v| format!("{v:.4}"))
}

/// One test before the correction across tests.
struct Measured {
    side: Side,
    tensor: String,
    feature: String,
    test: &'static str,
    reference: usize,
    window: usize,
    result: Option<TestResult>,
    psi: Option<f64>,
    outliers: Option<(u64, u64)>,
}

/// A feature's values against a reference: KS and PSI, when both have `min_samples`.
fn measure_values(card: &DriftCard, reference: &[f64], window: &[f64]) -> Measure {
    let enough = reference.len() >= card.min_samples && window.len() >= card.min_samples;
    Measure {
        result: enough.then(|| ks_two_sample(reference, window)).flatten(),
        psi: enough
            .then(|| population_stability_index(reference, window, card.bins))
            .flatten(),
    }
}

/// Class counts against reference counts: chi-square and PSI, when both sides have
/// `min_samples` rows.
fn measure_classes(card: &DriftCard, reference: &[u64], window: &[u64]) -> Measure {
    let rows = |c: &[u64]| c.iter().sum::<u64>();
    let enough =
        rows(reference) >= card.min_samples as u64 && rows(window) >= card.min_samples as u64;
    Measure {
        result: enough
            .then(|| chi_square_homogeneity(reference, window))
            .flatten(),
        psi: enough
            .then(|| category_stability_index(reference, window))
            .flatten(),
    }
}

struct Measure {
    result: Option<TestResult>,
    psi: Option<f64>,
}

/// The verdicts of `measured`, corrected across them all.
fn judge(card: &DriftCard, measured: Vec<Measured>) -> Vec<FeatureDrift> {
    let p_values: Vec<f64> = measured
        .iter()
        .map(|m| m.result.map_or(f64::NAN, |r| r.p_value))
        .collect();
    let adjusted = benjamini_hochberg(&p_values);
    measured
        .into_iter()
        .zip(adjusted)
        .map(|(m, adjusted)| {
            let adjusted = (!adjusted.is_nan()).then_some(adjusted);
            let drifted = adjusted.is_some_and(|p| p < card.alpha)
                || m.psi.is_some_and(|psi| psi > card.max_psi);
            FeatureDrift {
                side: m.side.label(),
                tensor: m.tensor,
                feature: m.feature,
                test: m.test,
                reference: m.reference,
                window: m.window,
                statistic: m.result.map(|r| r.statistic),
                p_value: m.result.map(|r| r.p_value),
                adjusted_p_value: adjusted,
                psi: m.psi,
                outliers: m.outliers.map(|o| o.0),
                outliers_total: m.outliers.map(|o| o.1),
                verdict: match (m.result.is_some() || m.psi.is_some(), drifted) {
                    (false, _) => "insufficient",
                    (true, true) => "drift",
                    (true, false) => "ok",
                },
            }
        })
        .collect()
}

/// The name a classifier output's classes go by in reports.
const PREDICTED_CLASS: &str = "predicted class";

impl DriftTracker {
    /// Every tracked feature's drift from its reference now, then every classifier
    /// output's.
    pub fn report(&self) -> Vec<FeatureDrift> {
        let (features, classes) = {
            let samples = self
                .samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (samples.features.clone(), samples.classes.clone())
        };
        let mut measured: Vec<Measured> = self
            .features
            .iter()
            .zip(&features)
            .map(|(feature, s)| {
                let m = measure_values(&self.card, &s.reference, &s.window.values);
                Measured {
                    side: feature.side,
                    tensor: feature.tensor.clone(),
                    feature: feature.name.clone(),
                    test: "ks",
                    reference: s.reference.len(),
                    window: s.window.values.len(),
                    result: m.result,
                    psi: m.psi,
                    outliers: s.window_outliers().map(|w| (w, s.outliers_total)),
                }
            })
            .collect();
        for t in &self.tracked {
            let Some((_, index)) = t.classes else {
                continue;
            };
            let s = &classes[index];
            let (reference, window) = s.counts();
            let m = measure_classes(&self.card, &reference, &window);
            measured.push(Measured {
                side: t.side,
                tensor: t.tensor.clone(),
                feature: PREDICTED_CLASS.to_owned(),
                test: "chi-square",
                reference: s.reference_rows,
                window: s.window.values.len(),
                result: m.result,
                psi: m.psi,
                outliers: None,
            });
        }
        judge(&self.card, measured)
    }

    /// The features whose verdict crossed into or out of drift since the last call
    /// (the first call compares with none drifting), as they are now.
    pub fn changes(&self) -> Vec<FeatureDrift> {
        let report = self.report();
        let mut drifting = self
            .drifting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        report
            .into_iter()
            .zip(drifting.iter_mut())
            .filter_map(|(feature, was)| {
                let now = feature.drifts();
                (std::mem::replace(was, now) != now).then_some(feature)
            })
            .collect()
    }

    /// How `self`'s outputs differ from `baseline`'s over both windows (the same
    /// recent traffic when both serve one route): per output feature KS and PSI with
    /// the baseline's window as the reference, per classifier output chi-square and
    /// PSI, corrected across them, judged by `self`'s card. Outputs the two do not
    /// share (by tensor and feature name) are left out; `outliers` is not measured.
    pub fn compare_outputs(&self, baseline: &DriftTracker) -> Vec<FeatureDrift> {
        let snapshot = |t: &DriftTracker| {
            let s = t
                .samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (s.features.clone(), s.classes.clone())
        };
        let (ours, our_classes) = snapshot(self);
        let (theirs, their_classes) = snapshot(baseline);
        let mut measured = Vec::new();
        for (i, feature) in self.features.iter().enumerate() {
            if feature.side != Side::Output {
                continue;
            }
            let Some(j) = baseline.features.iter().position(|f| {
                f.side == Side::Output && f.tensor == feature.tensor && f.name == feature.name
            }) else {
                continue;
            };
            let (reference, window) = (&theirs[j].window.values, &ours[i].window.values);
            let m = measure_values(&self.card, reference, window);
            measured.push(Measured {
                side: Side::Output,
                tensor: feature.tensor.clone(),
                feature: feature.name.clone(),
                test: "ks",
                reference: reference.len(),
                window: window.len(),
                result: m.result,
                psi: m.psi,
                outliers: None,
            });
        }
        for t in &self.tracked {
            let Some((_, ours)) = t.classes else {
                continue;
            };
            let Some((_, theirs)) = baseline
                .tracked
                .iter()
                .find(|b| b.side == Side::Output && b.tensor == t.tensor)
                .and_then(|b| b.classes)
            else {
                continue;
            };
            let baseline_window = class_counts(&their_classes[theirs].window.values);
            let window = &our_classes[ours].window.values;
            let (reference, current) = counts_of(&baseline_window, window);
            let m = measure_classes(&self.card, &reference, &current);
            measured.push(Measured {
                side: Side::Output,
                tensor: t.tensor.clone(),
                feature: PREDICTED_CLASS.to_owned(),
                test: "chi-square",
                reference: their_classes[theirs].window.values.len(),
                window: window.len(),
                result: m.result,
                psi: m.psi,
                outliers: None,
            });
        }
        judge(&self.card, measured)
    }
}
