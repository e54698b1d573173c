//! Dynamic batching, the task: requests of a batching version queue here; a batch
//! forms when a session is free, from the first waiting request and those of the same
//! [`BatchKey`] queued behind it, then, when callers are evidently concurrent (others
//! were queued, another batch is running, or the last batch had several), those that
//! arrive within
//! `max_queue_delay` of the first (until the batch reaches `max_batch_size` or a
//! preferred size); it runs as one, and each request gets its own rows back. A lone
//! request with every other session idle goes at once: a single caller never pays the
//! delay for a batch that cannot grow. A request whose deadline passed, or whose caller left, while it waited is
//! dropped before the run; a bad request never gets here (validation is per request).

use std::{
    sync::{Arc, Weak},
    time::Instant,
};

use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use crate::{
    WorkerError,
    admission::Reservation,
    batching::{self, BatchKey, BatchSettings},
    model::{LoadedModel, OutputTensor},
    stats::Timings,
    validate::ValidatedRequest,
};

/// Requests waiting for the batcher beyond those being batched; more wait to be queued.
const QUEUE: usize = 1024;

/// What a batched request gets back.
pub type Reply = Result<(Vec<OutputTensor>, Timings), WorkerError>;

/// One request waiting to be batched.
#[derive(Debug)]
pub struct Job {
    request: ValidatedRequest,
    key: BatchKey,
    rows: usize,
    reservation: Reservation,
    deadline: Option<Instant>,
    enqueued: Instant,
    reply: oneshot::Sender<Reply>,
}

impl Job {
    /// A job for `request` (rows within the version's `max_batch_size`), holding its
    /// memory `reservation` until its batch has run.
    pub fn new(
        request: ValidatedRequest,
        reservation: Reservation,
        deadline: Option<Instant>,
    ) -> (Job, oneshot::Receiver<Reply>) {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            key: BatchKey::of(&request),
            rows: batching::rows(&request),
            request,
            reservation,
            deadline,
            enqueued: Instant::now(),
            reply,
        };
        (job, answer)
    }
}

/// Starts the batcher of `model`; it ends when the returned sender (held by the model)
/// is dropped.
pub fn start(model: Weak<LoadedModel>, settings: BatchSettings) -> mpsc::Sender<Job> {
    let (queue, jobs) = mpsc::channel(QUEUE);
    tokio::spawn(run(model, settings, jobs));
    queue
}

async fn run(model: Weak<LoadedModel>, settings: BatchSettings, mut jobs: mpsc::Receiver<Job>) {
    let mut held_over: Option<Job> = None;
    // Requests in the last batch sent: recent evidence of concurrent callers.
    let mut last_batch = 1;
    loop {
        let first = match held_over.take() {
            Some(job) => job,
            None => match jobs.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let Some(loaded) = model.upgrade() else {
            return;
        };
        // Batches form when a session is free: while all are busy, requests pile up
        // and the next batch is larger.
        let Ok(place) = loaded.session_place().await else {
            let _ = first.reply.send(Err(WorkerError::Unavailable(format!(
                "model \"{}\" is unloading",
                loaded.model
            ))));
            continue;
        };
        let dispatch_at = first.enqueued + settings.max_queue_delay;
        let mut batch = Batch::new(first);
        // What queued while the batch waited for its session joins at once.
        while !settings.full(batch.rows) && held_over.is_none() {
            match jobs.try_recv() {
                Ok(job) => held_over = batch.join(job, &settings),
                Err(_) => break,
            }
        }
        // Then it waits out the delay for more, but only where there is evidence of
        // concurrent callers (others were queued, another batch runs, or the last batch
        // had several): a lone caller would pay the whole delay on every request for a
        // batch that never grows.
        let concurrent = batch.jobs.len() > 1 || last_batch > 1 || loaded.others_busy();
        while concurrent && !settings.full(batch.rows) && held_over.is_none() {
            match tokio::time::timeout_at(dispatch_at.into(), jobs.recv()).await {
                Ok(Some(job)) => held_over = batch.join(job, &settings),
                Ok(None) | Err(_) => break,
            }
        }
        last_batch = batch.jobs.len();
        tokio::spawn(run_batch(loaded, batch.jobs, place));
    }
}

/// A batch being formed.
struct Batch {
    jobs: Vec<Job>,
    rows: usize,
}

impl Batch {
    fn new(first: Job) -> Batch {
        Batch {
            rows: first.rows,
            jobs: vec![first],
        }
    }

    /// Adds `job` if it fits (same key, rows within the maximum); else hands it back
    /// to start the next batch.
    fn join(&mut self, job: Job, settings: &BatchSettings) -> Option<Job> {
        if job.key != self.jobs[0].key || self.rows + job.rows > settings.max_batch_size {
            return Some(job);
        }
        self.rows += job.rows;
        self.jobs.push(job);
        None
    }
}

/// Runs one batch on the session `place` holds and answers each job.
async fn run_batch(model: Arc<LoadedModel>, batch: Vec<Job>, place: OwnedSemaphorePermit) {
    let now = Instant::now();
    let mut live = Vec::with_capacity(batch.len());
    for job in batch {
        if job.reply.is_closed() {
            continue;
        }
        if job.deadline.is_some_and(|d| d <= now) {
            let _ = job.reply.send(Err(WorkerError::DeadlineExceeded {
                model: model.model.clone(),
                version: model.version.clone(),
                waited_ms: job.enqueued.elapsed().as_millis(),
            }));
            continue;
        }
        live.push(job);
    }
    if live.is_empty() {
        return;
    }
    let mut requests = Vec::with_capacity(live.len());
    let mut reservations = Vec::with_capacity(live.len());
    let mut answers = Vec::with_capacity(live.len());
    for job in live {
        requests.push(job.request);
        reservations.push(job.reservation);
        answers.push((job.rows, now.duration_since(job.enqueued), job.reply));
    }
    let rows: Vec<usize> = answers.iter().map(|(rows, _, _)| *rows).collect();
    let result = model
        .run_placed(batching::join(requests), reservations, place)
        .await
        .and_then(|(outputs, timings)| {
            batching::split(outputs, &rows)
                .map(|parts| (parts, timings))
                .map_err(|reason| WorkerError::Inference {
                    model: model.model.clone(),
                    version: model.version.clone(),
                    reason,
                })
        });
    match result {
        Ok((parts, timings)) => {
            for (i, (part, (_, queued, reply))) in parts.into_iter().zip(answers).enumerate() {
                let timings = Timings {
                    queue: queued,
                    // The run counts once, with the batch's first request.
                    executions: u64::from(i == 0),
                    ..timings
                };
                let _ = reply.send(Ok((part, timings)));
            }
        }
        Err(error) => {
            // One run failed for every request in it.
            let reason = error.to_string();
            for (_, _, reply) in answers {
                let _ = reply.send(Err(match &error {
                    WorkerError::Inference { .. } => WorkerError::Inference {
                        model: model.model.clone(),
                        version: model.version.clone(),
                        reason: reason.clone(),
                    },
                    _ => WorkerError::Unavailable(reason.clone()),
                }));
            }
        }
    }
}
