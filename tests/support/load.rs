//! Unpinned demo traffic that runs until it is finished, or stops itself after
//! [`LOAD_LIMIT`] so a test that never finishes it leaves nothing running.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aviary::pb::admin::{FeedbackRequest, feedback_request::Outcome};
use tokio::task::JoinSet;

use super::{Running, demo_request};

/// The longest any load loop runs (hang protection only).
pub const LOAD_LIMIT: Duration = Duration::from_secs(120);

/// Ground truth a load sends after each answer: whether the answer of this version,
/// for the `n`th answer of a client, was correct.
pub type Truth = fn(&str, u64) -> bool;

/// Unpinned clients sending `demo` requests back to back; each failure's message is
/// collected.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: JoinSet<(u64, Vec<String>)>,
}

impl Load {
    /// `clients` clients on each of `gateways`, each on its own connection, sending
    /// `rows` unpinned.
    pub async fn start(gateways: &[&Running], clients: usize, rows: &[[f32; 4]]) -> Load {
        let mut load = Load::new();
        for gateway in gateways {
            for _ in 0..clients {
                load.spawn(gateway, rows, None).await;
            }
        }
        load
    }

    /// Like [`Load::start`] on one gateway, each answer followed by Feedback saying
    /// what `truth` says.
    pub async fn with_feedback(
        gateway: &Running,
        clients: usize,
        rows: &[[f32; 4]],
        truth: Truth,
    ) -> Load {
        let mut load = Load::new();
        for _ in 0..clients {
            load.spawn(gateway, rows, Some(truth)).await;
        }
        load
    }

    fn new() -> Load {
        Load {
            stop: Arc::new(AtomicBool::new(false)),
            tasks: JoinSet::new(),
        }
    }

    async fn spawn(&mut self, gateway: &Running, rows: &[[f32; 4]], truth: Option<Truth>) {
        let mut client = gateway.client().await;
        let admin = match truth {
            Some(_) => Some(gateway.admin().await),
            None => None,
        };
        let stop = Arc::clone(&self.stop);
        let rows = rows.to_vec();
        self.tasks.spawn(async move {
            let started = Instant::now();
            let (mut ok, mut failures) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) && started.elapsed() < LOAD_LIMIT {
                let response = match client.model_infer(demo_request(&rows, "")).await {
                    Ok(response) => response,
                    Err(status) => {
                        failures.push(status.message().to_owned());
                        continue;
                    }
                };
                ok += 1;
                let (Some(truth), Some(admin)) = (truth, &admin) else {
                    continue;
                };
                let version = response.into_inner().model_version;
                let correct = truth(&version, ok);
                let sent = admin
                    .experiments()
                    .feedback(FeedbackRequest {
                        request_id: format!("req-{ok}"),
                        model: "demo".into(),
                        version,
                        outcome: Some(Outcome::Correct(correct)),
                    })
                    .await;
                if let Err(status) = sent {
                    failures.push(format!("feedback: {}", status.message()));
                }
            }
            (ok, failures)
        });
    }

    /// Stops the clients; returns the answered count and every failure's message.
    pub async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut ok, mut failures) = (0, Vec::new());
        for (n, f) in self.tasks.join_all().await {
            ok += n;
            failures.extend(f);
        }
        (ok, failures)
    }

    /// Stops the clients and asserts that none failed and some were answered; returns
    /// the answered count.
    pub async fn finish_clean(self) -> u64 {
        let (answered, failures) = self.finish().await;
        assert!(
            failures.is_empty(),
            "{} requests failed; first: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        assert!(answered > 0, "the load got no answer at all");
        answered
    }
}
