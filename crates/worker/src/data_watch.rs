//! The data-quality watch: at an interval, which tracked features crossed into drift
//! (or out of it) and which values flag-mode input rules let through since the last
//! look. Each finding is logged, and handed to the caller (the embedded gateway writes
//! it to its audit trail); `aviary_drift` and `aviary_input_violations_total` say the
//! same to Prometheus at every scrape, this says it once, when it happens.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{
    Worker,
    drift::{FeatureDrift, figure},
    input_rules::RuleMode,
};

/// What the watch found.
#[derive(Debug, Clone, PartialEq)]
pub enum DataEvent {
    /// A feature crossed into drift, or out of it (its verdict says which).
    Drift {
        /// The model.
        model: String,
        /// The version.
        version: String,
        /// The feature's drift now.
        feature: FeatureDrift,
    },
    /// Values that broke a version's flag-mode input rules since the last look.
    Flagged {
        /// The model.
        model: String,
        /// The version.
        version: String,
        /// (input, feature, rule, values) for each rule broken since the last look.
        counts: Vec<(String, String, &'static str, u64)>,
        /// The latest request's first flagged value, in words.
        example: Option<String>,
    },
}

impl DataEvent {
    /// The model and version it is about.
    pub fn subject(&self) -> (&str, &str) {
        match self {
            DataEvent::Drift { model, version, .. } | DataEvent::Flagged { model, version, .. } => {
                (model, version)
            }
        }
    }

    /// What happened, in one line.
    pub fn describe(&self) -> String {
        match self {
            DataEvent::Drift { feature: f, .. } => format!(
                "{} {}: {} p (adjusted) {}, PSI {}, over {} window and {} reference values",
                f.name(),
                match f.drifts() {
                    true => "drifts",
                    false => "no longer drifts",
                },
                f.test,
                figure(f.adjusted_p_value),
                figure(f.psi),
                f.window,
                f.reference
            ),
            DataEvent::Flagged {
                counts, example, ..
            } => {
                let counts: Vec<String> = counts
                    .iter()
                    .map(|(input, feature, rule, n)| format!("{input}/{feature} {rule}: {n}"))
                    .collect();
                format!(
                    "input rules flagged values ({}){}",
                    counts.join(", "),
                    example
                        .as_ref()
                        .map_or(String::new(), |e| format!("; latest: {e}"))
                )
            }
        }
    }
}

/// Which loaded copy of a version counts are about (model, version, when it loaded):
/// a reloaded copy counts from zero.
type LoadedCopy = (String, String, std::time::SystemTime);

/// What the watch saw last time: the violation counts of each flag-mode version's
/// loaded copy, by input, feature and rule.
#[derive(Debug, Default)]
pub struct DataWatch {
    seen: BTreeMap<LoadedCopy, BTreeMap<(String, String, &'static str), u64>>,
}

impl DataWatch {
    /// What changed in `worker` since the last look (the first look: since load).
    pub fn look(&mut self, worker: &Worker) -> Vec<DataEvent> {
        let mut events = Vec::new();
        let mut seen = BTreeMap::new();
        for (model, version, loaded) in worker.loaded() {
            if let Some(drift) = &loaded.drift {
                events.extend(drift.changes().into_iter().map(|feature| DataEvent::Drift {
                    model: model.clone(),
                    version: version.clone(),
                    feature,
                }));
            }
            let Some(rules) = loaded
                .input_rules
                .as_ref()
                .filter(|r| r.mode() == RuleMode::Flag)
            else {
                continue;
            };
            // Keyed by the running copy: a reloaded version's counts start again at 0.
            let copy: LoadedCopy = (model.clone(), version.clone(), loaded.loaded_at);
            let before = self.seen.remove(&copy).unwrap_or_default();
            let now: BTreeMap<_, _> = rules
                .counts()
                .into_iter()
                .map(|(input, feature, broken, count)| {
                    (
                        (input.to_owned(), feature.to_owned(), broken.label()),
                        count,
                    )
                })
                .collect();
            let counts: Vec<_> = now
                .iter()
                .filter_map(|(key, count)| {
                    let new = count - before.get(key).copied().unwrap_or(0).min(*count);
                    (new > 0).then(|| (key.0.clone(), key.1.clone(), key.2, new))
                })
                .collect();
            seen.insert(copy, now);
            if !counts.is_empty() {
                events.push(DataEvent::Flagged {
                    model: model.clone(),
                    version: version.clone(),
                    counts,
                    example: rules.take_flagged_example(),
                });
            }
        }
        // Copies no longer loaded are forgotten.
        self.seen = seen;
        events
    }
}

/// Looks at `worker` every `interval` until `stop` turns true: logs each finding and
/// hands it to `on_event`.
pub async fn run(
    worker: Arc<Worker>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
    on_event: impl Fn(&DataEvent) + Send,
) {
    let mut watch = DataWatch::default();
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        // The tests sort every window: off the async threads.
        let looked = {
            let worker = Arc::clone(&worker);
            tokio::task::spawn_blocking(move || {
                let mut watch = watch;
                let events = watch.look(&worker);
                (watch, events)
            })
            .await
        };
        let (kept, events) = match looked {
            Ok(looked) => looked,
            Err(error) => {
                tracing::error!(%error, "the data watch failed and stopped");
                return;
            }
        };
        watch = kept;
        for event in &events {
            let (model, version) = event.subject();
            let what = event.describe();
            match event {
                DataEvent::Drift { feature, .. } if feature.drifts() => {
                    tracing::warn!(model, version, "data drift: {what}")
                }
                DataEvent::Drift { .. } => tracing::info!(model, version, "data drift: {what}"),
                DataEvent::Flagged { .. } => tracing::warn!(model, version, "{what}"),
            }
            on_event(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_read_as_the_docs_quote_them() {
        let feature = FeatureDrift {
            side: "input",
            tensor: "input".into(),
            feature: "petal_length".into(),
            test: "ks",
            reference: 1000,
            window: 1000,
            statistic: Some(0.213),
            p_value: Some(1e-9),
            adjusted_p_value: Some(4e-9),
            psi: Some(0.312),
            outliers: Some(4),
            outliers_total: Some(9),
            verdict: "drift",
        };
        let drift = DataEvent::Drift {
            model: "demo".into(),
            version: "1".into(),
            feature: feature.clone(),
        };
        assert_eq!(drift.subject(), ("demo", "1"));
        assert_eq!(
            drift.describe(),
            "input input/petal_length drifts: ks p (adjusted) 0.0000, PSI 0.3120, over 1000 window and 1000 reference values"
        );
        let cleared = DataEvent::Drift {
            model: "demo".into(),
            version: "1".into(),
            feature: FeatureDrift {
                verdict: "ok",
                psi: None,
                ..feature
            },
        };
        assert!(
            cleared.describe().starts_with(
                "input input/petal_length no longer drifts: ks p (adjusted) 0.0000, PSI -,"
            ),
            "{}",
            cleared.describe()
        );
        let flagged = DataEvent::Flagged {
            model: "demo".into(),
            version: "1".into(),
            counts: vec![
                ("input".into(), "petal_width".into(), "below_min", 25),
                ("input".into(), "petal_width".into(), "above_max", 7),
            ],
            example: Some(
                "input \"input\" feature \"petal_width\" (column 3) row 3: 3.1 is above max 3.0"
                    .into(),
            ),
        };
        assert_eq!(
            flagged.describe(),
            "input rules flagged values (input/petal_width below_min: 25, input/petal_width above_max: 7); \
             latest: input \"input\" feature \"petal_width\" (column 3) row 3: 3.1 is above max 3.0"
        );
    }
}
