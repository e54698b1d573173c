//! The prediction cache's shared Redis tier: answers several gateways share. Values
//! are protobuf-encoded `ModelInferResponse`s under `<key_prefix><key in hex>`.
//!
//! Redis is an optimisation here, never a dependency: a look-up that takes longer than
//! `timeout_ms` or fails is given up and the request goes on to its version; a write
//! runs in a task of its own, off the request path, and is dropped when too many are
//! already waiting. After a failure, Redis is not asked again for a short, growing
//! while (so a Redis that is down costs each request nothing), and one warning is
//! logged when it goes away, one a minute while it stays away, and one line when it is
//! back.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::{sync::Semaphore, time::Instant};

use crate::{GatewayError, config::CacheRedisConfig};

/// The longest one write may take; writes are off the request path, so this only
/// bounds how long a hung Redis holds a write slot.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Writes waiting for Redis at once; more are dropped (and counted as bypasses).
const MAX_WRITES: usize = 64;

/// How long Redis is not asked after the first failure; doubled after each further
/// failure up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// How often a Redis that stays away is logged again.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What a look-up found.
#[derive(Debug)]
pub(super) enum Lookup {
    /// The encoded answer.
    Found(Bytes),
    /// Redis answered: no such key.
    Missing,
    /// Redis was not asked, or did not answer in time or well.
    Bypassed,
}

/// The Redis tier: a reconnecting connection, its settings and its health.
#[derive(Debug)]
pub(super) struct RedisTier {
    client: redis::Client,
    connection: Mutex<ConnectionManager>,
    /// Host and port, for the logs (not the URL with its password).
    server: String,
    timeout: Duration,
    ttl: Option<Duration>,
    prefix: String,
    writes: Arc<Semaphore>,
    health: Mutex<Health>,
}

/// Whether Redis answered the last request, and if not, since when.
#[derive(Debug)]
enum Health {
    Up,
    Down {
        /// Redis is not asked before this.
        retry_at: Instant,
        pause: Duration,
        /// When the last warning was logged.
        warned_at: Instant,
    },
}

impl RedisTier {
    /// The tier `config` describes. Nothing connects yet: an unreachable Redis shows
    /// as bypasses and a warning, never as an error here.
    pub(super) fn open(config: &CacheRedisConfig) -> Result<RedisTier, GatewayError> {
        let client = redis::Client::open(config.url.as_str()).map_err(|e| config_error(&e))?;
        let timeout = Duration::from_millis(config.timeout_ms);
        let connection = connect(&client, timeout).map_err(|e| config_error(&e))?;
        Ok(RedisTier {
            server: client.get_connection_info().addr().to_string(),
            client,
            connection: Mutex::new(connection),
            timeout,
            ttl: config.ttl_ms.map(Duration::from_millis),
            prefix: config.key_prefix.clone(),
            writes: Arc::new(Semaphore::new(MAX_WRITES)),
            health: Mutex::new(Health::Up),
        })
    }

    /// The answer under `key`, if Redis has it and says so within the timeout.
    pub(super) async fn get(&self, key: &str) -> Lookup {
        if self.paused() {
            return Lookup::Bypassed;
        }
        let mut connection = self.connection();
        let mut command = redis::cmd("GET");
        command.arg(format!("{}{key}", self.prefix));
        let get = command.query_async::<Option<Vec<u8>>>(&mut connection);
        match tokio::time::timeout(self.timeout, get).await {
            Ok(Ok(found)) => {
                self.answered();
                found.map_or(Lookup::Missing, |bytes| Lookup::Found(bytes.into()))
            }
            Ok(Err(error)) => {
                self.failed(&error.to_string());
                Lookup::Bypassed
            }
            Err(_) => {
                self.failed(&format!("no answer within {:?}", self.timeout));
                Lookup::Bypassed
            }
        }
    }

    /// Stores `value` under `key` for the tier's TTL (else `route_ttl`) in a task of
    /// its own; `bypassed` runs when the write is skipped or fails.
    pub(super) fn put(
        self: &Arc<Self>,
        key: &str,
        value: Bytes,
        route_ttl: Duration,
        bypassed: impl FnOnce() + Send + 'static,
    ) {
        if self.paused() {
            return bypassed();
        }
        let Ok(permit) = Arc::clone(&self.writes).try_acquire_owned() else {
            return bypassed();
        };
        let ttl = self.ttl.unwrap_or(route_ttl);
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let (tier, key) = (Arc::clone(self), format!("{}{key}", self.prefix));
        tokio::spawn(async move {
            let _permit = permit;
            let mut connection = tier.connection();
            let mut command = redis::cmd("SET");
            command.arg(key).arg(value.as_ref()).arg("PX").arg(millis);
            let set = command.query_async::<()>(&mut connection);
            match tokio::time::timeout(WRITE_TIMEOUT, set).await {
                Ok(Ok(())) => tier.answered(),
                Ok(Err(error)) => {
                    tier.failed(&error.to_string());
                    bypassed();
                }
                Err(_) => {
                    tier.failed(&format!("no answer within {WRITE_TIMEOUT:?}"));
                    bypassed();
                }
            }
        });
    }

    fn connection(&self) -> ConnectionManager {
        self.connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether Redis is in its pause after a failure.
    fn paused(&self) -> bool {
        let health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        matches!(*health, Health::Down { retry_at, .. } if Instant::now() < retry_at)
    }

    fn answered(&self) {
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(*health, Health::Down { .. }) {
            tracing::info!(server = %self.server, "prediction cache: Redis is back");
        }
        *health = Health::Up;
    }

    /// Pauses Redis, warns (at most once a minute while it stays away) and starts a
    /// fresh connection for the next try: a timed-out request may have left the old one
    /// waiting behind a hung server.
    fn failed(&self, error: &str) {
        let now = Instant::now();
        {
            let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
            *health = match *health {
                Health::Up => {
                    tracing::warn!(server = %self.server, error, "prediction cache: Redis is away; requests go on without it");
                    Health::Down {
                        retry_at: now + FIRST_PAUSE,
                        pause: FIRST_PAUSE,
                        warned_at: now,
                    }
                }
                Health::Down {
                    pause, warned_at, ..
                } => {
                    let pause = (pause * 2).min(MAX_PAUSE);
                    let warned_at = match now.duration_since(warned_at) >= WARN_EVERY {
                        true => {
                            tracing::warn!(server = %self.server, error, "prediction cache: Redis is still away");
                            now
                        }
                        false => warned_at,
                    };
                    Health::Down {
                        retry_at: now + pause,
                        pause,
                        warned_at,
                    }
                }
            };
        }
        if let Ok(fresh) = connect(&self.client, self.timeout) {
            *self
                .connection
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = fresh;
        }
    }
}

/// A connection to `client`'s server, made on first use; it reconnects by itself when
/// a connection it had drops. The tier paces its own retries.
fn connect(client: &redis::Client, timeout: Duration) -> redis::RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(0)
        .set_connection_timeout(Some(timeout.max(WRITE_TIMEOUT)))
        .set_response_timeout(Some(WRITE_TIMEOUT));
    ConnectionManager::new_lazy_with_config(client.clone(), config)
}

fn config_error(error: &redis::RedisError) -> GatewayError {
    GatewayError::Config {
        path: "cache.redis.url".to_owned(),
        message: error.to_string(),
    }
}
