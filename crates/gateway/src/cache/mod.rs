//! The prediction cache of routes with `cache = { ttl_ms = .. }`: an answer to a
//! request is served again to an identical request, without running the model, while
//! its TTL lasts. In this process (bounded by bytes or entries), and optionally in a
//! Redis server several gateways share (see [`redis`]).
//!
//! An answer is keyed by the model, the resolved version, the fingerprint of the
//! weights that produced it and the request's content (see [`key`]), so a swap or a
//! weight change never serves another model's answer:
//!
//! - embedded versions: the fingerprint is read from the version's slot when the
//!   request is looked up — exact;
//! - remote versions: workers name it in every answer and in `ModelConfig` (parameter
//!   [`FINGERPRINT_PARAMETER`]); the gateway keys look-ups by the fingerprint it saw
//!   last for the version (from an answer, or from polling `ModelConfig` every
//!   [`FINGERPRINT_REFRESH`]). Until it sees the swapped version's new fingerprint, it
//!   may still serve answers the old weights gave.
//!
//! Either way an answer is stored under the fingerprint in the answer itself: the
//! weights that really produced it. An answer without one (a worker from before this
//! cache) is never stored.

mod key;
mod redis;

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, Instant},
};

use aviary::pb::inference::{
    InferParameter, ModelInferRequest, ModelInferResponse, infer_parameter::ParameterChoice,
};
use aviary_worker::model::FINGERPRINT_PARAMETER;
use bytes::Bytes;
use moka::{Expiry, sync::Cache};
use prost::Message;
use tokio::sync::watch;

use self::redis::{Lookup, RedisTier};
pub use key::{Answerer, CacheKey, RequestHash};

use crate::{
    GatewayError,
    config::{CacheConfig, DEFAULT_CACHE_MAX_BYTES},
    control::Control,
    metrics::{CacheEvent, Metrics},
    route::Route,
    routing::Routing,
};

/// How often the fingerprints of cached remote versions are fetched from their
/// workers' `ModelConfig`: bounds how long a swapped remote version's old answers can
/// be served when every request hits (no answer then brings the new fingerprint).
pub const FINGERPRINT_REFRESH: Duration = Duration::from_secs(2);

/// One held answer: without its request id and fingerprint parameter, as every hit
/// starts from.
#[derive(Debug, Clone)]
struct Entry {
    response: Arc<ModelInferResponse>,
    ttl: Duration,
    /// Its encoded size, the in-process bound's unit (with `max_bytes`).
    weight: u32,
}

/// Each entry lives for its route's TTL.
struct RouteTtl;

impl Expiry<CacheKey, Entry> for RouteTtl {
    fn expire_after_create(&self, _: &CacheKey, entry: &Entry, _: Instant) -> Option<Duration> {
        Some(entry.ttl)
    }
}

/// The prediction cache: both tiers and the fingerprints seen of remote versions.
#[derive(Debug)]
pub struct PredictionCache {
    local: Cache<CacheKey, Entry>,
    /// The heaviest answer held in-process: one heavier than the whole bound would
    /// only push every other answer out before being evicted itself.
    heaviest: u64,
    redis: Option<Arc<RedisTier>>,
    /// The fingerprint last seen of each remote version, by (model, version).
    seen: RwLock<HashMap<(String, String), Arc<str>>>,
}

/// A request on a cached route, ready to be looked up and its answer stored.
#[derive(Debug)]
pub struct Cacheable {
    content: RequestHash,
    ttl: Duration,
    id: String,
}

impl PredictionCache {
    /// The cache `config` describes. The Redis tier, if any, connects on first use.
    pub fn open(config: &CacheConfig) -> Result<PredictionCache, GatewayError> {
        let builder = Cache::builder().expire_after(RouteTtl);
        // A sync cache: look-ups and inserts never wait, so the request path needs no
        // await for them, and moka's housekeeping runs on the callers' threads.
        let (local, heaviest) = match config.max_entries {
            Some(entries) => (builder.max_capacity(entries).build(), u64::MAX),
            None => {
                let bytes = config.max_bytes.unwrap_or(DEFAULT_CACHE_MAX_BYTES);
                let local = builder
                    .max_capacity(bytes)
                    .weigher(|_, entry: &Entry| entry.weight)
                    .build();
                (local, bytes)
            }
        };
        let redis = config
            .redis
            .as_ref()
            .map(RedisTier::open)
            .transpose()?
            .map(Arc::new);
        Ok(PredictionCache {
            local,
            heaviest,
            redis,
            seen: RwLock::default(),
        })
    }

    /// `request` ready to be cached when `route` opts in.
    pub fn cacheable(route: &Route, request: &ModelInferRequest) -> Option<Cacheable> {
        let ttl = route.cache_ttl?;
        // The parameters the route only routes by: the version they pick is in the key.
        let routing_only: Vec<&str> = route.routing_parameters().collect();
        Some(Cacheable {
            content: RequestHash::of(request, &routing_only),
            ttl,
            id: request.id.clone(),
        })
    }

    /// The answer held for `request` at `model`/`version`, marked as a hit and made the
    /// request's own (its id); `None` (counted) when neither tier holds one.
    pub async fn lookup(
        &self,
        routing: &Routing,
        request: &Cacheable,
        (model, version): (&str, &str),
        metrics: &Metrics,
    ) -> Option<ModelInferResponse> {
        let found = match self.fingerprint(routing, model, version) {
            Some(fingerprint) => {
                let answerer = Answerer {
                    model,
                    version,
                    fingerprint: &fingerprint,
                };
                let key = CacheKey::of(answerer, &request.content);
                self.find(&key, request.ttl, (model, version), metrics)
                    .await
            }
            // A remote version not answered yet: nothing can be held for it.
            None => None,
        };
        let Some(held) = found else {
            metrics.record_cache(model, version, CacheEvent::Miss);
            return None;
        };
        let mut response = ModelInferResponse::clone(&held);
        response.id.clone_from(&request.id);
        version.clone_into(&mut response.model_version);
        response
            .parameters
            .insert(CACHE_PARAMETER.to_owned(), text("hit"));
        Some(response)
    }

    /// Keeps `response` (the version's own successful answer) under the fingerprint it
    /// names, in this process and in Redis (in the background), and marks it a miss.
    /// An answer naming no fingerprint is not kept.
    pub fn store(
        &self,
        request: &Cacheable,
        (model, version): (&str, &str),
        response: &mut ModelInferResponse,
        metrics: &Arc<Metrics>,
    ) {
        if let Some(fingerprint) = take_fingerprint(response) {
            self.saw(model, version, &fingerprint);
            let answerer = Answerer {
                model,
                version,
                fingerprint: &fingerprint,
            };
            let key = CacheKey::of(answerer, &request.content);
            let held = ModelInferResponse {
                id: String::new(),
                ..response.clone()
            };
            let encoded = held.encode_to_vec();
            self.hold(key, entry(held, request.ttl, encoded.len()));
            if let Some(redis) = &self.redis {
                let (metrics, model, version) =
                    (Arc::clone(metrics), model.to_owned(), version.to_owned());
                redis.put(&key.hex(), encoded.into(), request.ttl, move || {
                    metrics.record_cache(&model, &version, CacheEvent::Bypass);
                });
            }
        }
        response
            .parameters
            .insert(CACHE_PARAMETER.to_owned(), text("miss"));
    }

    /// Keeps `entry` in-process unless it alone is heavier than the whole bound.
    fn hold(&self, key: CacheKey, entry: Entry) {
        if u64::from(entry.weight) <= self.heaviest {
            self.local.insert(key, entry);
        }
    }

    /// The fingerprint to look `model`/`version` up by: the embedded slot's, else the
    /// one last seen from its workers.
    fn fingerprint(&self, routing: &Routing, model: &str, version: &str) -> Option<Arc<str>> {
        if let Some(exact) = routing
            .backend(model, version)
            .ok()
            .and_then(|backend| backend.fingerprint())
        {
            return Some(exact.into());
        }
        let seen = self.seen.read().unwrap_or_else(PoisonError::into_inner);
        seen.get(&(model.to_owned(), version.to_owned())).cloned()
    }

    /// Notes `fingerprint` as the one `model`/`version` serves now.
    fn saw(&self, model: &str, version: &str, fingerprint: &str) {
        let key = (model.to_owned(), version.to_owned());
        if self
            .seen
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .is_some_and(|held| &**held == fingerprint)
        {
            return;
        }
        tracing::debug!(
            model,
            version,
            fingerprint,
            "prediction cache: new model fingerprint"
        );
        let mut seen = self.seen.write().unwrap_or_else(PoisonError::into_inner);
        seen.insert(key, fingerprint.into());
    }

    /// The answer under `key` in this process, else in Redis (then kept here too).
    async fn find(
        &self,
        key: &CacheKey,
        ttl: Duration,
        (model, version): (&str, &str),
        metrics: &Metrics,
    ) -> Option<Arc<ModelInferResponse>> {
        if let Some(entry) = self.local.get(key) {
            metrics.record_cache(model, version, CacheEvent::Hit);
            return Some(entry.response);
        }
        let redis = self.redis.as_ref()?;
        let bytes: Bytes = match redis.get(&key.hex()).await {
            Lookup::Found(bytes) => bytes,
            Lookup::Missing => return None,
            Lookup::Bypassed => {
                metrics.record_cache(model, version, CacheEvent::Bypass);
                return None;
            }
        };
        let weight = bytes.len();
        let response = ModelInferResponse::decode(bytes)
            .inspect_err(|error| {
                tracing::warn!(model, version, %error, "prediction cache: unreadable Redis entry; ignored");
            })
            .ok()?;
        let entry = entry(response, ttl, weight);
        self.hold(*key, entry.clone());
        metrics.record_cache(model, version, CacheEvent::RedisHit);
        Some(entry.response)
    }

    /// Fetches the fingerprint of every remote version of a cached route from its
    /// workers' `ModelConfig`, all at once; a worker that does not answer leaves what
    /// was seen.
    async fn refresh(&self, routing: &Routing) {
        let mut fetches = tokio::task::JoinSet::new();
        for (model, route) in routing.routes.iter().filter(|(_, r)| r.cache_ttl.is_some()) {
            for version in &route.versions {
                let Ok(backend) = routing.backend(model, &version.version) else {
                    continue;
                };
                if backend.fingerprint().is_some() {
                    continue;
                }
                let (backend, model, version) =
                    (Arc::clone(backend), model.clone(), version.version.clone());
                fetches.spawn(async move {
                    let config = backend.config(model.clone(), version.clone());
                    let fingerprint = match tokio::time::timeout(FINGERPRINT_REFRESH, config).await
                    {
                        Ok(Ok(config)) => config
                            .parameters
                            .get(FINGERPRINT_PARAMETER)
                            .map(|p| p.string_value.clone()),
                        _ => None,
                    };
                    (model, version, fingerprint)
                });
            }
        }
        while let Some(Ok((model, version, fingerprint))) = fetches.join_next().await {
            if let Some(fingerprint) = fingerprint {
                self.saw(&model, &version, &fingerprint);
            }
        }
    }
}

/// Response parameter (and, as `x-aviary-cache`, header) of a cached route's answers:
/// `hit` (served from the cache) or `miss` (the version ran).
pub const CACHE_PARAMETER: &str = "aviary_cache";

/// Response header of a cached route's answers.
pub const CACHE_HEADER: &str = "x-aviary-cache";

/// Removes the worker's fingerprint parameter from `response` (clients are not told
/// which weights answered); the fingerprint it named, if any.
pub fn take_fingerprint(response: &mut ModelInferResponse) -> Option<String> {
    match response
        .parameters
        .remove(FINGERPRINT_PARAMETER)?
        .parameter_choice?
    {
        ParameterChoice::StringParam(fingerprint) => Some(fingerprint),
        _ => None,
    }
}

fn entry(response: ModelInferResponse, ttl: Duration, weight: usize) -> Entry {
    Entry {
        response: Arc::new(response),
        ttl,
        weight: u32::try_from(weight).unwrap_or(u32::MAX),
    }
}

fn text(value: &str) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(value.to_owned())),
    }
}

/// Keeps the fingerprints of cached remote versions fresh until `stop` turns true: at
/// once, then every [`FINGERPRINT_REFRESH`].
pub async fn keep_fingerprints(
    control: Arc<Control>,
    cache: Arc<PredictionCache>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let routing = control.routing().load_full();
        cache.refresh(&routing).await;
        tokio::select! {
            _ = tokio::time::sleep(FINGERPRINT_REFRESH) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(config: &CacheConfig) -> bool {
        let cache = PredictionCache::open(config).expect("no Redis to open");
        let key = CacheKey::of(
            Answerer {
                model: "demo",
                version: "1",
                fingerprint: "f",
            },
            &RequestHash::of(&ModelInferRequest::default(), &[]),
        );
        let answer = ModelInferResponse {
            model_name: "demo".to_owned(),
            ..Default::default()
        };
        cache.hold(key, entry(answer, Duration::from_secs(60), 100));
        cache.local.get(&key).is_some()
    }

    #[test]
    fn an_answer_heavier_than_the_whole_bound_is_not_held() {
        let bytes = |max_bytes| CacheConfig {
            max_bytes: Some(max_bytes),
            ..CacheConfig::default()
        };
        assert!(!held(&bytes(99)));
        assert!(held(&bytes(100)));
        // Bounded by entries, an answer's size does not matter.
        assert!(held(&CacheConfig {
            max_entries: Some(1),
            ..CacheConfig::default()
        }));
    }
}
