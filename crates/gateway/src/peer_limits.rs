//! Rate limits per peer address, for a gateway whose callers carry no API key
//! (`[server] peer_rate_limit`): each client IP address gets a token bucket, and a call
//! over it is refused with RESOURCE_EXHAUSTED and a retry hint, as a key over its
//! `rate_limit` is. Health checks and `ServerLive`/`ServerReady` are never limited.
//!
//! The buckets of peers that went quiet (full again) are dropped once the table is
//! large, so a scan from many addresses cannot grow it without bound.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aviary::{calls::CallGuard, tls::ConnInfo};
use tonic::Status;

use crate::{
    auth::{TokenBucket, over_limit, roles_for},
    config::PeerRateLimit,
};

/// Peers tracked at most before quiet ones are dropped.
const MAX_PEERS: usize = 65_536;

/// The token buckets of every peer address.
#[derive(Debug)]
pub struct PeerLimits {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, TokenBucket>>,
    limited: AtomicU64,
}

impl PeerLimits {
    /// Buckets of `limit` for each peer.
    pub fn new(limit: PeerRateLimit) -> Arc<PeerLimits> {
        Arc::new(PeerLimits {
            per_second: limit.per_second,
            burst: limit.burst(),
            buckets: Mutex::new(HashMap::new()),
            limited: AtomicU64::new(0),
        })
    }

    /// Takes a token from `peer`'s bucket at `now`, or says how long until one is there.
    pub fn take(&self, peer: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_PEERS && !buckets.contains_key(&peer) {
            buckets.retain(|_, bucket| !bucket.is_full(now));
            if buckets.len() >= MAX_PEERS {
                // Every tracked peer is busy: start over rather than grow.
                tracing::warn!(
                    peers = buckets.len(),
                    "peer rate limits: too many busy peers; their buckets start full again"
                );
                buckets.clear();
            }
        }
        buckets
            .entry(peer)
            .or_insert_with(|| TokenBucket::new(self.per_second, self.burst, now))
            .take(now)
    }

    /// Calls refused since start-up.
    pub fn limited(&self) -> u64 {
        self.limited.load(Ordering::Relaxed)
    }
}

impl CallGuard for PeerLimits {
    fn check(
        &self,
        path: &str,
        _headers: &http::HeaderMap,
        extensions: &mut http::Extensions,
    ) -> Result<Option<Arc<str>>, Status> {
        if roles_for(path).is_none() {
            return Ok(None);
        }
        let Some(peer) = extensions.get::<ConnInfo>().and_then(|info| info.remote) else {
            return Ok(None);
        };
        if let Err(wait) = self.take(peer.ip(), Instant::now()) {
            self.limited.fetch_add(1, Ordering::Relaxed);
            let who = format!("{} is over the gateway's per-address rate limit", peer.ip());
            return Err(over_limit(&who, wait));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::RETRY_PUSHBACK;

    fn limits(per_second: f64, burst: f64) -> Arc<PeerLimits> {
        PeerLimits::new(PeerRateLimit {
            per_second,
            burst: Some(burst),
        })
    }

    #[test]
    fn each_peer_has_its_own_bucket() {
        let limits = limits(1.0, 3.0);
        let now = Instant::now();
        let (a, b): (IpAddr, IpAddr) = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        );
        for _ in 0..3 {
            assert!(limits.take(a, now).is_ok());
        }
        let wait = limits.take(a, now).expect_err("a is over");
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert!(limits.take(b, now).is_ok(), "b is not a");
        assert!(
            limits.take(a, now + Duration::from_secs(1)).is_ok(),
            "a refilled"
        );
    }

    #[test]
    fn quiet_peers_are_dropped_when_the_table_is_full() {
        let limits = limits(1.0, 1.0);
        let start = Instant::now();
        for i in 0..MAX_PEERS as u32 {
            let peer = IpAddr::from(i.to_be_bytes());
            limits.take(peer, start).expect("first call");
        }
        // A second later every bucket is full again: a new peer makes room.
        let later = start + Duration::from_secs(2);
        let newcomer: IpAddr = "192.0.2.1".parse().expect("ip");
        assert!(limits.take(newcomer, later).is_ok());
        let tracked = limits.buckets.lock().expect("not poisoned").len();
        assert_eq!(tracked, 1, "only the newcomer is left");
    }

    #[test]
    fn probes_are_never_limited_and_calls_over_the_limit_say_when_to_retry() {
        let limits = limits(1.0, 1.0);
        let mut extensions = http::Extensions::new();
        extensions.insert(ConnInfo {
            remote: Some("127.0.0.2:5000".parse().expect("addr")),
            peer_certs: None,
        });
        let headers = http::HeaderMap::new();
        let infer = "/inference.GRPCInferenceService/ModelInfer";
        assert!(limits.check(infer, &headers, &mut extensions).is_ok());
        let refused = limits
            .check(infer, &headers, &mut extensions)
            .expect_err("over");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.metadata().get(RETRY_PUSHBACK).is_some());
        assert!(refused.message().contains("127.0.0.2"), "{refused:?}");
        for _ in 0..10 {
            assert!(
                limits
                    .check("/grpc.health.v1.Health/Check", &headers, &mut extensions)
                    .is_ok()
            );
        }
        assert_eq!(limits.limited(), 1);
    }
}
