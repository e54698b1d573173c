//! The audit trail: who changed what (admin calls with their result, route changes
//! with the weights before and after, model loads and unloads with the file's
//! fingerprint, rollout starts, commands and decisions, config applies) and,
//! opt-in and sampled, every prediction (caller, resolved version, model fingerprint,
//! routing reason, latency, status, a hash of the inputs).
//!
//! Recording never waits: a record goes into a bounded queue that one writer thread
//! empties into JSON lines on disk ([`files`]); a full queue drops the record and
//! counts it. Sticky keys are written only as keyed-HMAC pseudonyms ([`pseudonym`]).
//!
//! - [`record`]: the record and the query filter (pure).
//! - [`files`]: the files on disk: appending, closing, pruning, reading.
//! - [`prediction`]: the record of one prediction, begun before it is served.
//! - [`pseudonym`]: the HMAC secret and the pseudonyms it makes.

pub mod files;
pub mod prediction;
pub mod pseudonym;
pub mod record;

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, SystemTime},
};

use aviary::calls::{CallAudit, Caller};
use rand::Rng;

pub use record::{Filter, Kind, Record};

use crate::{GatewayError, config::AuditConfig};
use files::{Layout, Message};
use pseudonym::Pseudonyms;

/// The audit trail of a gateway: cheap to clone, a no-op when off.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    trail: Option<Arc<Trail>>,
}

#[derive(Debug)]
struct Trail {
    sender: mpsc::SyncSender<Message>,
    dir: PathBuf,
    predictions: f64,
    /// The cap of a prediction record's inputs and outputs; `None`: not recorded.
    payload_cap: Option<usize>,
    pseudonyms: Pseudonyms,
    counts: Arc<Counts>,
}

/// What became of the records of a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Written to the trail.
    Written,
    /// Dropped: the queue was full.
    Dropped,
    /// Could not be written (the disk refused).
    Failed,
}

impl Outcome {
    /// The `outcome` label's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Written => "written",
            Outcome::Dropped => "dropped",
            Outcome::Failed => "failed",
        }
    }
}

const OUTCOMES: [Outcome; 3] = [Outcome::Written, Outcome::Dropped, Outcome::Failed];

/// Records by kind and outcome since start-up.
#[derive(Debug, Default)]
pub struct Counts {
    counts: [[AtomicU64; 3]; Kind::ALL.len()],
}

impl Counts {
    fn add(&self, kind: Kind, outcome: Outcome) {
        self.counts[kind as usize][outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Records of `kind` that ended as `outcome`.
    pub fn get(&self, kind: Kind, outcome: Outcome) -> u64 {
        self.counts[kind as usize][outcome as usize].load(Ordering::Relaxed)
    }

    /// Every (kind, outcome) with its count.
    pub fn all(&self) -> Vec<(Kind, Outcome, u64)> {
        Kind::ALL
            .iter()
            .flat_map(|&kind| OUTCOMES.iter().map(move |&outcome| (kind, outcome)))
            .map(|(kind, outcome)| (kind, outcome, self.get(kind, outcome)))
            .collect()
    }
}

/// How long a query waits for the records queued before it to be written.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);

impl Audit {
    /// No trail: nothing is recorded.
    pub fn off() -> Audit {
        Audit::default()
    }

    /// The trail `config` describes (off without `dir`), its writer thread started.
    pub fn open(config: &AuditConfig) -> Result<Audit, GatewayError> {
        let Some(dir) = &config.dir else {
            return Ok(Audit::off());
        };
        let unusable = |error: std::io::Error| GatewayError::Config {
            path: "audit.dir".into(),
            message: format!("{}: {error}", dir.display()),
        };
        std::fs::create_dir_all(dir).map_err(unusable)?;
        let pseudonyms = Pseudonyms::open(config.hmac_key_file.as_deref(), dir)?;
        let layout = Layout {
            dir: dir.clone(),
            max_file_bytes: config.max_file_bytes,
            max_total_bytes: config.max_total_bytes,
            retention: Duration::from_secs(config.retention_days.saturating_mul(24 * 60 * 60)),
        };
        let counts = Arc::new(Counts::default());
        let (sender, receiver) = mpsc::sync_channel(config.queue);
        let writer_counts = Arc::clone(&counts);
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || files::write(&layout, &receiver, &writer_counts))
            .map_err(unusable)?;
        tracing::info!(dir = %dir.display(), predictions = config.predictions, "audit trail on");
        Ok(Audit {
            trail: Some(Arc::new(Trail {
                sender,
                dir: dir.clone(),
                predictions: config.predictions,
                payload_cap: config.payloads.then_some(config.max_payload_bytes),
                pseudonyms,
                counts,
            })),
        })
    }

    /// Whether anything is recorded.
    pub fn is_on(&self) -> bool {
        self.trail.is_some()
    }

    /// A record of `kind` for `action`, now, by the caller this runs for.
    pub fn record_of(kind: Kind, action: impl Into<String>) -> Record {
        Record::new(
            aviary::unix_ms(SystemTime::now()),
            kind,
            aviary::calls::caller().to_string(),
            action,
        )
    }

    /// Records what the data watch found: `drift` (a feature crossed into drift),
    /// `drift-cleared` (out of it) or `flagged` (values flag-mode input rules let
    /// through), with the numbers as `after` and the finding in words as `reason`.
    pub fn record_data(&self, event: &aviary_worker::data_watch::DataEvent) {
        use aviary_worker::data_watch::DataEvent;
        if !self.is_on() {
            return;
        }
        let (model, version) = event.subject();
        let (action, after) = match event {
            DataEvent::Drift { feature, .. } => (
                match feature.drifts() {
                    true => "drift",
                    false => "drift-cleared",
                },
                serde_json::to_value(feature).ok(),
            ),
            DataEvent::Flagged { counts, .. } => (
                "flagged",
                Some(serde_json::Value::Array(
                    counts
                        .iter()
                        .map(|(input, feature, rule, values)| {
                            serde_json::json!({
                                "input": input, "feature": feature, "rule": rule, "values": values,
                            })
                        })
                        .collect(),
                )),
            ),
        };
        let mut record = Audit::record_of(Kind::Data, action).about(model, Some(version));
        record.after = after;
        record.reason = Some(event.describe());
        self.record(record);
    }

    /// Queues `record` for the trail; when the queue is full it is dropped and counted.
    pub fn record(&self, record: Record) {
        let Some(trail) = &self.trail else {
            return;
        };
        let kind = record.kind;
        if trail
            .sender
            .try_send(Message::Record(Box::new(record)))
            .is_err()
        {
            trail.counts.add(kind, Outcome::Dropped);
        }
    }

    /// Whether this prediction is one of the sampled ones.
    pub fn samples_prediction(&self) -> bool {
        match &self.trail {
            Some(trail) if trail.predictions >= 1.0 => true,
            Some(trail) if trail.predictions > 0.0 => rand::rng().random_bool(trail.predictions),
            _ => false,
        }
    }

    /// The most bytes of JSON a prediction record's inputs (or outputs) may take;
    /// `None` when predictions carry no payloads.
    pub fn payload_cap(&self) -> Option<usize> {
        self.trail.as_ref().and_then(|t| t.payload_cap)
    }

    /// The pseudonym of `value` (a sticky key, a user id); `None` when the trail is off.
    pub fn pseudonym(&self, value: &str) -> Option<String> {
        self.trail.as_ref().map(|t| t.pseudonyms.of(value))
    }

    /// Records by kind and outcome; `None` when the trail is off.
    pub fn counts(&self) -> Option<Vec<(Kind, Outcome, u64)>> {
        self.trail.as_ref().map(|t| t.counts.all())
    }

    /// The last `limit` records `filter` matches, oldest first, once what was queued
    /// before the call is written; and whether more matched.
    pub async fn query(
        &self,
        filter: Filter,
        limit: usize,
    ) -> Result<(Vec<String>, bool), GatewayError> {
        let Some(trail) = self.trail.clone() else {
            return Err(GatewayError::Refused(
                "the audit trail is off: set [audit] dir in the gateway's config".into(),
            ));
        };
        tokio::task::spawn_blocking(move || {
            trail.sync();
            files::read(&trail.dir, &filter, limit)
        })
        .await
        .map_err(|e| GatewayError::AuditTrail(e.to_string()))?
        .map_err(|e| GatewayError::AuditTrail(e.to_string()))
    }
}

impl Trail {
    /// Waits (up to [`SYNC_TIMEOUT`]) until what was queued before is written.
    fn sync(&self) {
        let (done, synced) = mpsc::sync_channel(1);
        let deadline = std::time::Instant::now() + SYNC_TIMEOUT;
        let mut message = Message::Sync(done);
        loop {
            match self.sender.try_send(message) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Full(back)) if std::time::Instant::now() < deadline => {
                    message = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return,
            }
        }
        let _ = synced.recv_timeout(SYNC_TIMEOUT);
    }
}

/// Whether a call to `path` changes something (and so goes in the trail).
pub fn changes_something(path: &str) -> bool {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return false;
    };
    match service {
        "inference.GRPCInferenceService" => {
            matches!(method, "RepositoryModelLoad" | "RepositoryModelUnload")
        }
        "aviary.admin.v1.Routes" => method == "SetRoute",
        "aviary.admin.v1.Models" => !matches!(method, "ListModels" | "GetDrift"),
        "aviary.admin.v1.Rollouts" => method != "GetRollout",
        "aviary.admin.v1.DeadLetters" => method == "ReplayDeadLetters",
        "aviary.admin.v1.Fleet" => !matches!(method, "GetVariantStats" | "GetBanditFeedback"),
        _ => false,
    }
}

impl CallAudit for Audit {
    fn records(&self, path: &str) -> bool {
        self.is_on() && changes_something(path)
    }

    fn record(&self, path: &str, caller: &Caller, status: &tonic::Status) {
        let mut record = Audit::record_of(Kind::Call, path).outcome(status);
        record.actor = caller.to_string();
        Audit::record(self, record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_calls_that_change_something_are_recorded() {
        for path in [
            "/aviary.admin.v1.Routes/SetRoute",
            "/aviary.admin.v1.Models/UnloadVersion",
            "/aviary.admin.v1.Rollouts/AbortRollout",
            "/aviary.admin.v1.Fleet/SetRolloutWeights",
            "/inference.GRPCInferenceService/RepositoryModelUnload",
        ] {
            assert!(changes_something(path), "{path}");
        }
        for path in [
            "/aviary.admin.v1.Routes/GetRoutes",
            "/aviary.admin.v1.Models/ListModels",
            "/aviary.admin.v1.Models/GetDrift",
            "/inference.GRPCInferenceService/ModelInfer",
            "/grpc.health.v1.Health/Check",
            "garbage",
        ] {
            assert!(!changes_something(path), "{path}");
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        // A trail whose writer never runs: its queue of 2 fills at once.
        let (sender, _receiver) = mpsc::sync_channel(2);
        let audit = Audit {
            trail: Some(Arc::new(Trail {
                sender,
                dir: PathBuf::new(),
                predictions: 0.0,
                payload_cap: None,
                pseudonyms: Pseudonyms::with_secret(b"0123456789abcdef".to_vec()),
                counts: Arc::default(),
            })),
        };
        for _ in 0..5 {
            audit.record(Audit::record_of(Kind::Prediction, "infer"));
        }
        let counts = audit.counts().expect("on");
        let dropped = counts
            .iter()
            .find(|(k, o, _)| *k == Kind::Prediction && *o == Outcome::Dropped)
            .map(|(_, _, n)| *n);
        assert_eq!(dropped, Some(3));
    }

    #[test]
    fn an_off_trail_records_nothing_and_samples_nothing() {
        let audit = Audit::off();
        audit.record(Audit::record_of(Kind::Route, "set"));
        assert!(!audit.samples_prediction());
        assert_eq!(audit.pseudonym("alice"), None);
        assert_eq!(audit.counts(), None);
    }
}
