//! The dead-letter queue's optional Redis sink: each letter is also added to a Redis
//! stream (`XADD <stream> MAXLEN ~ <max_len> *`), where consumers in any language can
//! read it. The folder stays the record that `aviary ctl dlq list|replay` reads; this
//! is a copy for systems that already run Redis.
//!
//! It has its own task behind its own bounded queue, so a slow or absent Redis holds
//! up neither the request path nor the disk writer. A letter that cannot be added
//! (queue full, Redis unreachable or failing the write) is dropped and counted. After
//! a failure, letters are dropped without trying for a short, growing while, and one
//! warning is logged when Redis goes away, one a minute while it stays away, and one
//! line when it is back.

use std::{
    borrow::Cow,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aviary::pb::admin::DeadLetter;
use redis::{
    AsyncCommands,
    aio::{ConnectionManager, ConnectionManagerConfig},
    streams::StreamMaxlen,
};
use tokio::{sync::mpsc, time::Instant};

use crate::{GatewayError, config::RedisSinkConfig};

/// Letters waiting for Redis; more are dropped.
const QUEUE: usize = 256;

/// The longest one connection attempt or one XADD may take before it counts as failed.
const TIMEOUT: Duration = Duration::from_secs(2);

/// How long letters are dropped without trying after the first failure; doubled after
/// each further failure up to [`MAX_PAUSE`], so a Redis that is down costs a
/// connection attempt every few seconds, not one per letter.
const FIRST_PAUSE: Duration = Duration::from_millis(500);
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// How often a Redis that stays away is logged again.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The sink's queue and what it has cost.
#[derive(Debug)]
pub(super) struct RedisSink {
    stream: String,
    queue: mpsc::Sender<Arc<DeadLetter>>,
    dropped: Arc<AtomicU64>,
}

impl RedisSink {
    /// Starts the task adding letters to the configured stream. Nothing connects
    /// yet: an unreachable Redis is reported by the task, never here.
    pub(super) fn start(config: &RedisSinkConfig) -> Result<RedisSink, GatewayError> {
        let client = redis::Client::open(config.url.as_str()).map_err(|e| config_error(&e))?;
        let connection = connect(&client).map_err(|e| config_error(&e))?;
        let (queue, letters) = mpsc::channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            // Where, for the logs: host and port, not the URL with its password.
            server: client.get_connection_info().addr().to_string(),
            client,
            connection,
            stream: config.stream.clone(),
            max_len: usize::try_from(config.max_len).unwrap_or(usize::MAX),
            dropped: Arc::clone(&dropped),
        };
        tokio::spawn(writer.run(letters));
        Ok(RedisSink {
            stream: config.stream.clone(),
            queue,
            dropped,
        })
    }

    /// Hands `letter` to the task; never waits (a full queue drops it and counts it).
    pub(super) fn send(&self, letter: Arc<DeadLetter>) {
        if self.queue.try_send(letter).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The stream's key.
    pub(super) fn stream(&self) -> &str {
        &self.stream
    }

    /// Letters not added to the stream.
    pub(super) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A connection to `client`'s server, made on its first use; it reconnects by itself
/// when a connection it had drops.
fn connect(client: &redis::Client) -> redis::RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        // The task paces its own retries (FIRST_PAUSE..MAX_PAUSE).
        .set_number_of_retries(0)
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT));
    ConnectionManager::new_lazy_with_config(client.clone(), config)
}

fn config_error(error: &redis::RedisError) -> GatewayError {
    GatewayError::Config {
        path: "dead_letters.redis.url".to_owned(),
        message: error.to_string(),
    }
}

/// The stream entry of `letter`, as a consumer in any language reads it: numbers in
/// decimal, text in UTF-8, and `request` the protobuf-encoded
/// `inference.ModelInferRequest` (the bytes the folder keeps, not re-encoded).
fn fields(letter: &DeadLetter) -> [(&'static str, Cow<'_, [u8]>); 7] {
    let number = |n: String| Cow::Owned(n.into_bytes());
    [
        ("id", number(letter.id.to_string())),
        ("time_ms", number(letter.at_ms.to_string())),
        ("model", Cow::Borrowed(letter.model.as_bytes())),
        ("version", Cow::Borrowed(letter.version.as_bytes())),
        ("code", number(letter.code.to_string())),
        ("error", Cow::Borrowed(letter.error.as_bytes())),
        ("request", Cow::Borrowed(letter.request.as_slice())),
    ]
}

/// The task's side: the connection and where letters go.
struct Writer {
    client: redis::Client,
    connection: ConnectionManager,
    server: String,
    stream: String,
    max_len: usize,
    dropped: Arc<AtomicU64>,
}

/// Whether Redis took the last write, and if not, since when and what it has cost.
enum Health {
    Up,
    Down {
        /// No write is tried before this.
        retry_at: Instant,
        pause: Duration,
        /// When the last warning was logged, and the drop count then.
        warned_at: Instant,
        dropped_at_warning: u64,
        /// The drop count when Redis went away (letters dropped as the queue
        /// overflowed count too).
        dropped_at_down: u64,
    },
}

impl Writer {
    /// Adds queued letters until the queue closes (the gateway stops).
    async fn run(mut self, mut letters: mpsc::Receiver<Arc<DeadLetter>>) {
        let mut health = Health::Up;
        while let Some(letter) = letters.recv().await {
            if let Health::Down { retry_at, .. } = &health
                && Instant::now() < *retry_at
            {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                health.still_down(&self);
                continue;
            }
            match self.add(&letter).await {
                Ok(()) => health.up(&self),
                Err(error) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    health.failed(&self, &error);
                    // A fresh connection for the next try: the manager reconnects only
                    // after some errors, and a timed-out write may have left it hung.
                    if let Ok(connection) = connect(&self.client) {
                        self.connection = connection;
                    }
                }
            }
        }
    }

    async fn add(&mut self, letter: &DeadLetter) -> Result<(), String> {
        let fields = fields(letter);
        let write = self.connection.xadd_maxlen::<_, _, _, _, ()>(
            &self.stream,
            StreamMaxlen::Approx(self.max_len),
            "*",
            &fields,
        );
        // The manager's timeouts bound each step; this bounds the whole write.
        match tokio::time::timeout(TIMEOUT * 2, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer within {:?}", TIMEOUT * 2)),
        }
    }

    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Health {
    fn up(&mut self, writer: &Writer) {
        if let Health::Down {
            dropped_at_down, ..
        } = *self
        {
            tracing::info!(
                server = %writer.server,
                stream = %writer.stream,
                dropped = writer.dropped() - dropped_at_down,
                "Redis takes dead letters again; those dropped while it was away are only on disk"
            );
        }
        *self = Health::Up;
    }

    /// Warns again once a minute while Redis stays away.
    fn still_down(&mut self, writer: &Writer) {
        if let Health::Down {
            warned_at,
            dropped_at_warning,
            ..
        } = self
            && warned_at.elapsed() >= WARN_EVERY
        {
            let dropped = writer.dropped();
            tracing::warn!(
                server = %writer.server,
                stream = %writer.stream,
                dropped = dropped - *dropped_at_warning,
                "Redis is still unreachable; dead letters are kept on disk only"
            );
            *warned_at = Instant::now();
            *dropped_at_warning = dropped;
        }
    }

    fn failed(&mut self, writer: &Writer, error: &str) {
        match self {
            Health::Up => {
                tracing::warn!(
                    server = %writer.server,
                    stream = %writer.stream,
                    %error,
                    "cannot add a dead letter to Redis; until it is back, letters are kept on \
                     disk only and counted as dropped for Redis"
                );
                // This letter is already counted: it belongs to the outage.
                let dropped = writer.dropped().saturating_sub(1);
                *self = Health::Down {
                    retry_at: Instant::now() + FIRST_PAUSE,
                    pause: FIRST_PAUSE,
                    warned_at: Instant::now(),
                    dropped_at_warning: dropped,
                    dropped_at_down: dropped,
                };
            }
            Health::Down {
                retry_at, pause, ..
            } => {
                *pause = (*pause * 2).min(MAX_PAUSE);
                *retry_at = Instant::now() + *pause;
                self.still_down(writer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_letter_becomes_fields_any_consumer_can_read() {
        let letter = DeadLetter {
            id: 42,
            at_ms: 1_700_000_000_123,
            model: "demo".into(),
            version: "2".into(),
            code: tonic::Code::Unavailable as i32,
            error: "worker down: connection refused".into(),
            request: vec![0x0a, 0x04, b'd', b'e', b'm', b'o', 0xff, 0x00],
        };
        let fields = fields(&letter);
        let as_pairs: Vec<(&str, &[u8])> = fields.iter().map(|(k, v)| (*k, v.as_ref())).collect();
        assert_eq!(
            as_pairs,
            [
                ("id", b"42".as_slice()),
                ("time_ms", b"1700000000123"),
                ("model", b"demo"),
                ("version", b"2"),
                ("code", b"14"),
                ("error", b"worker down: connection refused"),
                ("request", &[0x0a, 0x04, b'd', b'e', b'm', b'o', 0xff, 0x00]),
            ]
        );
        assert!(
            matches!(fields[6].1, Cow::Borrowed(_)),
            "the request's bytes are not copied"
        );
    }
}
