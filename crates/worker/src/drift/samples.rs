//! What drift tracking keeps of a version's traffic, bounded: per feature its reference
//! values, the most recent window and its outlier bounds; per classifier output its
//! reference class counts and the most recent classes. Pure: no locks, no I/O.

use std::collections::BTreeMap;

use aviary::tensor::Datatype;
use aviary_router::stats::quantile;

use crate::input_rules::is_integer;

/// The reference quantiles outside which a value is an outlier.
const OUTLIER_QUANTILES: (f64, f64) = (0.001, 0.999);

/// The most recent values, oldest overwritten first.
#[derive(Debug, Clone, Default)]
pub(super) struct Ring<T> {
    pub(super) values: Vec<T>,
    next: usize,
}

impl<T> Ring<T> {
    fn push(&mut self, value: T, capacity: usize) {
        if self.values.len() < capacity {
            self.values.push(value);
        } else if let Some(slot) = self.values.get_mut(self.next) {
            *slot = value;
        }
        // No modulo: this runs for every value of every request.
        self.next += 1;
        if self.next >= capacity {
            self.next = 0;
        }
    }
}

/// One feature's values.
#[derive(Debug, Clone, Default)]
pub(super) struct FeatureSamples {
    pub(super) reference: Vec<f64>,
    pub(super) window: Ring<f64>,
    /// Values outside these (inclusive) are outliers: the declared range in flag mode,
    /// else the reference's [p0.1, p99.9]; `None` until the reference is complete.
    pub(super) bounds: Option<(f64, f64)>,
    /// Outliers among every value recorded since the bounds were known.
    pub(super) outliers_total: u64,
}

impl FeatureSamples {
    /// Records `value`: into the reference while fewer than `capture` are held (`None`:
    /// the reference came from a file), else into the window of `window`. NaN and
    /// infinities have no place in a distribution test (the input rules count them).
    pub(super) fn record(
        &mut self,
        value: f64,
        capture: Option<usize>,
        window: usize,
        declared: (Option<f64>, Option<f64>),
    ) {
        if !value.is_finite() {
            return;
        }
        if let Some(capture) = capture
            && self.reference.len() < capture
        {
            self.reference.push(value);
            if self.reference.len() == capture {
                self.settle_bounds(declared);
            }
            return;
        }
        if self.is_outlier(value) {
            self.outliers_total += 1;
        }
        self.window.push(value, window);
    }

    /// Fixes the outlier bounds once the reference is complete: the declared side where
    /// there is one, else the reference's quantile.
    pub(super) fn settle_bounds(&mut self, declared: (Option<f64>, Option<f64>)) {
        let mut sorted = self.reference.clone();
        sorted.sort_by(f64::total_cmp);
        let of = |q: f64| (!sorted.is_empty()).then(|| quantile(&sorted, q));
        let low = declared.0.or_else(|| of(OUTLIER_QUANTILES.0));
        let high = declared.1.or_else(|| of(OUTLIER_QUANTILES.1));
        self.bounds = low.zip(high);
    }

    pub(super) fn is_outlier(&self, value: f64) -> bool {
        self.bounds
            .is_some_and(|(low, high)| value < low || value > high)
    }

    /// Outliers among the window's values.
    pub(super) fn window_outliers(&self) -> Option<u64> {
        self.bounds?;
        Some(
            self.window
                .values
                .iter()
                .filter(|v| self.is_outlier(**v))
                .count() as u64,
        )
    }
}

/// How a classifier output's row becomes its predicted class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClassOf {
    /// The index of the row's largest value (probabilities or scores).
    Argmax,
    /// The value itself (an integer label).
    Value,
}

impl ClassOf {
    /// How an output of `datatype` and `columns` per row names classes, if it does.
    pub(super) fn of(datatype: Datatype, columns: usize) -> Option<ClassOf> {
        match datatype {
            Datatype::Fp16 | Datatype::Fp32 | Datatype::Fp64 | Datatype::Bf16 if columns >= 2 => {
                Some(ClassOf::Argmax)
            }
            integer if is_integer(integer) && columns == 1 => Some(ClassOf::Value),
            _ => None,
        }
    }

    /// The class of `row`; `None` when it holds a NaN (no class is the largest).
    pub(super) fn class(self, row: &[f64]) -> Option<i64> {
        if row.iter().any(|v| v.is_nan()) {
            return None;
        }
        match self {
            ClassOf::Argmax => row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .and_then(|(i, _)| i64::try_from(i).ok()),
            // Integer outputs, read as f64: exact below 2^53, the labels' range.
            ClassOf::Value => Some(row[0] as i64),
        }
    }
}

/// One classifier output's predicted classes.
#[derive(Debug, Clone, Default)]
pub(super) struct ClassSamples {
    pub(super) reference: BTreeMap<i64, u64>,
    pub(super) reference_rows: usize,
    pub(super) window: Ring<i64>,
}

impl ClassSamples {
    /// Records a row's class, the way [`FeatureSamples::record`] records a value.
    pub(super) fn record(&mut self, class: i64, capture: Option<usize>, window: usize) {
        if let Some(capture) = capture
            && self.reference_rows < capture
        {
            self.add_reference(class);
            return;
        }
        self.window.push(class, window);
    }

    /// Adds a class to the reference. Its classes are bounded by its rows (`capture`,
    /// or the file's), the window's by its length.
    pub(super) fn add_reference(&mut self, class: i64) {
        *self.reference.entry(class).or_default() += 1;
        self.reference_rows += 1;
    }

    /// The reference's and the window's counts over the classes either has, in one
    /// order.
    pub(super) fn counts(&self) -> (Vec<u64>, Vec<u64>) {
        counts_of(&self.reference, &self.window.values)
    }
}

/// How often each class occurs in `classes`.
pub(super) fn class_counts(classes: &[i64]) -> BTreeMap<i64, u64> {
    let mut counts = BTreeMap::new();
    for class in classes {
        *counts.entry(*class).or_default() += 1;
    }
    counts
}

/// Counts of two sides' classes over the union of the classes they have, in one order.
pub(super) fn counts_of(reference: &BTreeMap<i64, u64>, window: &[i64]) -> (Vec<u64>, Vec<u64>) {
    let mut both: BTreeMap<i64, (u64, u64)> =
        reference.iter().map(|(c, n)| (*c, (*n, 0))).collect();
    for (class, n) in class_counts(window) {
        both.entry(class).or_default().1 += n;
    }
    both.into_values().unzip()
}

/// Everything a version's tracking keeps.
#[derive(Debug, Default)]
pub(super) struct Samples {
    pub(super) features: Vec<FeatureSamples>,
    pub(super) classes: Vec<ClassSamples>,
}

impl Samples {
    pub(super) fn new(features: usize, classes: usize) -> Samples {
        Samples {
            features: vec![FeatureSamples::default(); features],
            classes: vec![ClassSamples::default(); classes],
        }
    }

    /// Adds a reference file's row of a tensor whose features start at `first` (`None`:
    /// its values are not tested), and its class when the tensor is a classifier's.
    pub(super) fn add_reference_row(
        &mut self,
        first: Option<usize>,
        row: &[f64],
        classes: Option<(ClassOf, usize)>,
    ) {
        if let Some(first) = first {
            for (c, value) in row.iter().enumerate() {
                if value.is_finite() {
                    self.features[first + c].reference.push(*value);
                }
            }
        }
        if let Some((of, index)) = classes
            && let Some(class) = of.class(row)
        {
            self.classes[index].add_reference(class);
        }
    }
}
