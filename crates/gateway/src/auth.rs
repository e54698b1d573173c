//! Who may call what on a gateway: API keys from a keys file (stored as SHA-256 hashes,
//! never in the clear) and client certificates (mTLS identities, by the names in their
//! subject alternative names), the roles they grant, and the check every call to the
//! inference and admin listeners passes before it reaches its service.
//!
//! Roles: `infer` (inference, optionally on a list of models, and the metadata a client
//! reads first), `read` (metadata, statistics, reports, routes), `model-control`
//! (loading and unloading models), `admin` (everything). Health checks and
//! `ServerLive`/`ServerReady` stay open for probes. The keys file is read again when
//! it changes, so a key is revoked without a restart.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use aviary::{calls::CallGuard, tls::ConnInfo};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tonic::Status;

use crate::GatewayError;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Inference (on the key's models) and the metadata a client reads first.
    Infer,
    /// Metadata, statistics, reports, routes: nothing that changes anything.
    Read,
    /// Loading and unloading models.
    ModelControl,
    /// Everything.
    Admin,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Infer => "infer",
            Role::Read => "read",
            Role::ModelControl => "model-control",
            Role::Admin => "admin",
        }
    }
}

/// The caller a key names, left in the call's extensions for the services.
#[derive(Debug)]
pub struct Identity {
    /// The key's name: who asked, in logs, errors and the audit trail (never the key
    /// itself).
    pub name: Arc<str>,
    roles: BTreeSet<Role>,
    /// The models `infer` covers; `None`: all.
    models: Option<BTreeSet<String>>,
    /// The key's calls per second, when limited.
    limit: Option<std::sync::Mutex<TokenBucket>>,
    /// Its inferences per second on each model so limited.
    model_limits: BTreeMap<String, std::sync::Mutex<TokenBucket>>,
    /// Calls refused by rate limits, by key name, shared by every key of the file (and
    /// kept across its reloads).
    refused: RefusalCounts,
}

/// Calls refused by rate limits, by key name.
type RefusalCounts = Arc<std::sync::Mutex<BTreeMap<String, u64>>>;

/// A rate with a burst: `rate` tokens a second, at most `burst` saved up; each call
/// takes one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens, refilled at `rate` a second.
    pub fn new(rate: f64, burst: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Whether the bucket has filled up again by `now` (its caller has been quiet).
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }

    /// Takes a token at `now`, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

impl Identity {
    /// Whether the key grants `role` (`admin` grants every role).
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role) || self.roles.contains(&Role::Admin)
    }

    /// `Ok` when the key may run an inference on `model` now: the model is on its list,
    /// and its rate limit on the model (if any) has a token.
    pub fn may_infer(&self, model: &str) -> Result<(), Status> {
        if let Some(models) = &self.models
            && !models.contains(model)
            && !self.roles.contains(&Role::Admin)
        {
            return Err(Status::permission_denied(format!(
                "key \"{}\" may not infer on model \"{model}\" (its models: {})",
                self.name,
                models.iter().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let Some(bucket) = self.model_limits.get(model) else {
            return Ok(());
        };
        let taken = bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(Instant::now());
        taken.map_err(|wait| {
            self.count_refusal();
            let who = format!(
                "key \"{}\" is over its rate limit on model \"{model}\"",
                self.name
            );
            over_limit(&who, wait)
        })
    }

    fn count_refusal(&self) {
        *self
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(self.name.to_string())
            .or_insert(0) += 1;
    }
}

/// Which roles may call the method at `path`; `None`: anyone, without a key.
pub fn roles_for(path: &str) -> Option<&'static [Role]> {
    const INFER: &[Role] = &[Role::Infer];
    const READ: &[Role] = &[Role::Read];
    const INFER_OR_READ: &[Role] = &[Role::Infer, Role::Read];
    const MODEL_CONTROL: &[Role] = &[Role::ModelControl];
    const ADMIN: &[Role] = &[Role::Admin];
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    let roles = match (service, method) {
        ("grpc.health.v1.Health", _)
        | ("inference.GRPCInferenceService", "ServerLive" | "ServerReady") => return None,
        // Shared memory regions are registered to be used by inference calls.
        (
            "inference.GRPCInferenceService",
            "ModelInfer"
            | "ModelStreamInfer"
            | "SystemSharedMemoryRegister"
            | "SystemSharedMemoryUnregister",
        ) => INFER,
        (
            "inference.GRPCInferenceService",
            "ModelReady"
            | "ServerMetadata"
            | "ModelMetadata"
            | "ModelConfig"
            | "SystemSharedMemoryStatus",
        ) => INFER_OR_READ,
        ("inference.GRPCInferenceService", "RepositoryModelLoad" | "RepositoryModelUnload") => {
            MODEL_CONTROL
        }
        ("inference.GRPCInferenceService", _) => READ,
        (reflection, _) if reflection.starts_with("grpc.reflection.") => INFER_OR_READ,
        ("aviary.admin.v1.Routes", "GetRoutes" | "GetConfigStatus")
        | ("aviary.admin.v1.Models", "ListModels" | "GetDrift" | "GetStage")
        | ("aviary.admin.v1.Rollouts", "GetRollout")
        | ("aviary.admin.v1.DeadLetters", "ListDeadLetters")
        | ("aviary.admin.v1.Experiments", "GetExperimentReport" | "GetShadowReport") => READ,
        // Ground truth comes from the applications that asked for the predictions.
        ("aviary.admin.v1.Experiments", "Feedback") => INFER,
        // Approving a version for production is the admin's decision.
        ("aviary.admin.v1.Models", "Approve") => ADMIN,
        ("aviary.admin.v1.Models", _) => MODEL_CONTROL,
        // Everything else changes something, or is unknown: only admin.
        _ => ADMIN,
    };
    Some(roles)
}

/// One caller in the keys file: an API key, or a client certificate.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    /// Hex SHA-256 of the key: `printf %s "$KEY" | sha256sum`.
    #[serde(default)]
    sha256: Option<String>,
    /// A DNS or URI subject alternative name (e.g. a SPIFFE ID) of a client certificate
    /// the listener's `client_ca` verified.
    #[serde(default)]
    client_cert: Option<String>,
    roles: Vec<Role>,
    #[serde(default)]
    models: Option<Vec<String>>,
    #[serde(default)]
    rate_limit: Option<RateLimit>,
    /// Inferences per second on each named model, beside `rate_limit`.
    #[serde(default)]
    model_rate_limits: BTreeMap<String, RateLimit>,
}

/// `rate_limit = { per_second = 100, burst = 20 }`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimit {
    per_second: f64,
    /// Calls that may come at once after a quiet spell (default: one second's worth).
    burst: Option<f64>,
}

/// The token bucket of `limit` (set at `path`), or its problems added to `problems`.
fn bucket(
    limit: RateLimit,
    path: &str,
    problems: &mut Vec<String>,
) -> Option<std::sync::Mutex<TokenBucket>> {
    let RateLimit { per_second, burst } = limit;
    if !(per_second > 0.0 && per_second.is_finite()) {
        problems.push(format!("{path}.per_second: must be a positive number"));
        return None;
    }
    if let Some(burst) = burst
        && !(burst >= 1.0 && burst.is_finite())
    {
        problems.push(format!("{path}.burst: must be at least 1"));
        return None;
    }
    Some(std::sync::Mutex::new(TokenBucket::new(
        per_second,
        burst.unwrap_or(per_second.max(1.0)),
        Instant::now(),
    )))
}

/// The gRPC trailer that tells a client how long to wait before it retries.
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// RESOURCE_EXHAUSTED for a call over a rate limit: `who` is over it, and `wait` is
/// how long until it may call again (in the message and in [`RETRY_PUSHBACK`]).
pub fn over_limit(who: &str, wait: Duration) -> Status {
    let wait_ms = wait.as_millis().max(1);
    let mut status = Status::resource_exhausted(format!("{who}; retry in {wait_ms} ms"));
    if let Ok(value) = wait_ms.to_string().parse() {
        status.metadata_mut().insert(RETRY_PUSHBACK, value);
    }
    status
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<KeyEntry>,
}

/// The callers in force: identities by the SHA-256 of their key, and by the name in
/// their client certificate.
#[derive(Debug, Default)]
pub struct KeyTable {
    by_hash: HashMap<[u8; 32], Arc<Identity>>,
    by_cert: HashMap<String, Arc<Identity>>,
}

/// Where an entry's caller is recognised.
enum Credential {
    Key([u8; 32]),
    Certificate(String),
}

impl KeyTable {
    /// Parses a keys file; every problem is listed, each with its entry.
    pub fn parse(text: &str) -> Result<KeyTable, String> {
        KeyTable::parse_counting(text, &RefusalCounts::default())
    }

    /// [`KeyTable::parse`], its keys counting rate-limit refusals in `refused`.
    fn parse_counting(text: &str, refused: &RefusalCounts) -> Result<KeyTable, String> {
        let file: KeysFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut by_hash = HashMap::new();
        let mut by_cert = HashMap::new();
        let mut names = BTreeSet::new();
        let mut problems = Vec::new();
        for (i, key) in file.keys.into_iter().enumerate() {
            let at = format!("keys[{i}] ({:?})", key.name);
            if key.name.is_empty() {
                problems.push(format!("{at}.name: must not be empty"));
            }
            if !names.insert(key.name.clone()) {
                problems.push(format!("{at}.name: another key has this name"));
            }
            if key.roles.is_empty() {
                problems.push(format!("{at}.roles: grants nothing"));
            }
            let credential = match (key.sha256.as_deref(), key.client_cert.as_deref()) {
                (Some(sha256), None) => match parse_hex_32(sha256) {
                    Some(hash) => Credential::Key(hash),
                    None => {
                        problems.push(format!(
                            "{at}.sha256: not 64 hex digits (the SHA-256 of the key, e.g. `printf %s \"$KEY\" | sha256sum`)"
                        ));
                        continue;
                    }
                },
                (None, Some(name)) if !name.trim().is_empty() => {
                    Credential::Certificate(name.trim().to_owned())
                }
                (None, Some(_)) => {
                    problems.push(format!("{at}.client_cert: must not be empty"));
                    continue;
                }
                _ => {
                    problems.push(format!(
                        "{at}: give either sha256 (an API key) or client_cert (a client certificate's name)"
                    ));
                    continue;
                }
            };
            let limit = key
                .rate_limit
                .and_then(|limit| bucket(limit, &format!("{at}.rate_limit"), &mut problems));
            let mut model_limits = BTreeMap::new();
            for (model, limit) in key.model_rate_limits {
                let path = format!("{at}.model_rate_limits.{model}");
                if key
                    .models
                    .as_ref()
                    .is_some_and(|models| !models.contains(&model))
                {
                    problems.push(format!(
                        "{path}: the key may not infer on this model (not in its models)"
                    ));
                }
                if let Some(bucket) = bucket(limit, &path, &mut problems) {
                    model_limits.insert(model, bucket);
                }
            }
            let identity = Identity {
                name: key.name.into(),
                roles: key.roles.into_iter().collect(),
                models: key.models.map(|m| m.into_iter().collect()),
                limit,
                model_limits,
                refused: Arc::clone(refused),
            };
            match credential {
                Credential::Key(hash) => {
                    if by_hash.insert(hash, Arc::new(identity)).is_some() {
                        problems.push(format!("{at}.sha256: the same key as another entry"));
                    }
                }
                Credential::Certificate(name) => {
                    if by_cert.insert(name, Arc::new(identity)).is_some() {
                        problems.push(format!("{at}.client_cert: the same name as another entry"));
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(KeyTable { by_hash, by_cert })
        } else {
            Err(problems.join("\n"))
        }
    }

    /// How many callers the table knows.
    pub fn len(&self) -> usize {
        self.by_hash.len() + self.by_cert.len()
    }

    /// Whether it knows none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The caller: the key in `headers` (`authorization: Bearer <key>`) when one is
    /// sent, else the client certificate of the connection (`peer`), when the listener
    /// verified one and an entry names it.
    pub fn authenticate(
        &self,
        headers: &http::HeaderMap,
        peer: Option<&ConnInfo>,
    ) -> Result<Arc<Identity>, Status> {
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            if let Some(leaf) = peer.and_then(|p| p.peer_certs.as_ref()?.first()) {
                return self.by_certificate(leaf);
            }
            return Err(Status::unauthenticated(
                "an API key is required: send the header `authorization: Bearer <key>` \
                 (aviary ctl/infer: --token or AVIARY_TOKEN)",
            ));
        };
        let key = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization: expected `Bearer <key>`"))?;
        let hash: [u8; 32] = Sha256::digest(key.trim().as_bytes()).into();
        self.by_hash
            .get(&hash)
            .cloned()
            .ok_or_else(|| Status::unauthenticated("the API key is not valid (unknown or revoked)"))
    }

    /// The entry naming one of the DNS or URI names of the certificate `leaf` (which the
    /// listener's client CA has verified).
    fn by_certificate(&self, leaf: &CertificateDer<'_>) -> Result<Arc<Identity>, Status> {
        let cert = webpki::EndEntityCert::try_from(leaf).map_err(|error| {
            Status::unauthenticated(format!("the client certificate cannot be read: {error}"))
        })?;
        let names: Vec<&str> = cert
            .valid_dns_names()
            .chain(cert.valid_uri_names())
            .collect();
        names
            .iter()
            .find_map(|name| self.by_cert.get(*name))
            .cloned()
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "the client certificate ({}) is not in the keys file, and no API key was sent",
                    match names.is_empty() {
                        true => "no DNS or URI names".to_owned(),
                        false => names.join(", "),
                    }
                ))
            })
    }
}

fn parse_hex_32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The keys of a running gateway: the table in force, read again from its file when
/// the file changes (a bad file keeps the last good table, and says why).
#[derive(Debug)]
pub struct Keys {
    path: PathBuf,
    table: ArcSwap<KeyTable>,
    /// Calls refused by rate limits, by key name (kept across reloads of the file).
    limited: RefusalCounts,
}

/// How often the keys file is looked at: a revoked key stops working within this.
pub const KEYS_POLL: Duration = Duration::from_secs(1);

impl Keys {
    /// Reads the keys file at `path`; a missing or invalid file stops the start.
    pub fn open(path: &Path) -> Result<Arc<Keys>, GatewayError> {
        let limited = RefusalCounts::default();
        let table = read_table(path, &limited)?;
        tracing::info!(path = %path.display(), keys = table.len(), "API keys required");
        Ok(Arc::new(Keys {
            path: path.to_owned(),
            table: ArcSwap::from_pointee(table),
            limited,
        }))
    }

    /// Reads the file again whenever it changes; runs until dropped.
    pub async fn watch(self: Arc<Self>) {
        let keys = self;
        {
            let mut seen = modified(&keys.path);
            loop {
                tokio::time::sleep(KEYS_POLL).await;
                let now = modified(&keys.path);
                if now == seen {
                    continue;
                }
                seen = now;
                match read_table(&keys.path, &keys.limited) {
                    Ok(table) => {
                        tracing::info!(path = %keys.path.display(), keys = table.len(), "API keys reloaded");
                        keys.table.store(Arc::new(table));
                    }
                    Err(error) => {
                        tracing::error!(%error, "the keys file is not valid; the last good keys stay in force");
                    }
                }
            }
        }
    }
}

/// The file's modification time and size: what changes when it is rewritten.
fn modified(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn read_table(path: &Path, refused: &RefusalCounts) -> Result<KeyTable, GatewayError> {
    let config = |message: String| GatewayError::Config {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| config(e.to_string()))?;
    KeyTable::parse_counting(&text, refused).map_err(config)
}

impl CallGuard for Keys {
    fn check(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        extensions: &mut http::Extensions,
    ) -> Result<Option<Arc<str>>, Status> {
        let Some(roles) = roles_for(path) else {
            return Ok(None);
        };
        let identity = self
            .table
            .load()
            .authenticate(headers, extensions.get::<ConnInfo>())?;
        if !roles.iter().any(|&role| identity.has(role)) {
            let needed: Vec<&str> = roles.iter().map(|r| r.name()).collect();
            tracing::warn!(
                key = &*identity.name,
                path,
                "call refused: the key lacks the role"
            );
            return Err(Status::permission_denied(format!(
                "key \"{}\" may not call {path}: it needs the role {}",
                identity.name,
                needed.join(" or ")
            )));
        }
        if let Some(bucket) = &identity.limit {
            let taken = bucket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(Instant::now());
            if let Err(wait) = taken {
                identity.count_refusal();
                let who = format!("key \"{}\" is over its rate limit", identity.name);
                return Err(over_limit(&who, wait));
            }
        }
        let name = Arc::clone(&identity.name);
        extensions.insert(identity);
        Ok(Some(name))
    }
}

impl Keys {
    /// Calls refused by each key's rate limits (its own and per model) since start-up.
    pub fn limited(&self) -> BTreeMap<String, u64> {
        self.limited
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The `authorization` header that sends the API key in the file at `path` (set by the
/// setting `field`): the file's only content, surrounding whitespace ignored,
/// printable ASCII.
pub fn read_token(path: &Path, field: &str) -> Result<http::HeaderValue, GatewayError> {
    let problem = |message: String| GatewayError::Config {
        path: field.to_owned(),
        message: format!("{}: {message}", path.display()),
    };
    let text = std::fs::read_to_string(path).map_err(|e| problem(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(problem("the file is empty".into()));
    }
    aviary::client::bearer(token).map_err(|_| problem("the key is not printable ASCII".into()))
}

/// The API key a client sends, from a file read again when it changes (a Kubernetes
/// Secret rotated): every client made with [`TokenFile::authorization`] sends the new
/// key from its next call on, without a restart.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    field: &'static str,
    current: Arc<ArcSwap<http::HeaderValue>>,
}

impl TokenFile {
    /// Reads the key in `path` (set by the setting `field`) now.
    pub fn open(path: &Path, field: &'static str) -> Result<Arc<TokenFile>, GatewayError> {
        let value = read_token(path, field)?;
        Ok(Arc::new(TokenFile {
            path: path.to_owned(),
            field,
            current: Arc::new(ArcSwap::from_pointee(value)),
        }))
    }

    /// What clients send: the key in force at each call.
    pub fn authorization(&self) -> aviary::client::Authorization {
        aviary::client::Authorization::shared(Arc::clone(&self.current))
    }

    /// Reads the file again whenever it changes, until the process ends; a file that
    /// does not hold a key (half-written, emptied) keeps the last good one, logged.
    pub async fn watch(self: Arc<Self>) {
        let mut seen = modified(&self.path);
        loop {
            tokio::time::sleep(KEYS_POLL).await;
            let now = modified(&self.path);
            if now == seen {
                continue;
            }
            seen = now;
            match read_token(&self.path, self.field) {
                Ok(value) => {
                    self.current.store(Arc::new(value));
                    tracing::info!(path = %self.path.display(), field = self.field, "API key file changed; sending the new key");
                }
                Err(error) => {
                    tracing::warn!(%error, "the changed API key file holds no key; sending the last good one");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "s3cret-infer";

    fn hash(key: &str) -> String {
        Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn keys() -> Keys {
        let text = format!(
            "[[keys]]\nname = \"app\"\nsha256 = \"{}\"\nroles = [\"infer\"]\nmodels = [\"demo\"]\n\n\
             [[keys]]\nname = \"ops\"\nsha256 = \"{}\"\nroles = [\"admin\"]\n",
            hash(KEY),
            hash("s3cret-admin")
        );
        let limited = RefusalCounts::default();
        Keys {
            path: PathBuf::new(),
            table: ArcSwap::from_pointee(KeyTable::parse_counting(&text, &limited).expect("valid")),
            limited,
        }
    }

    fn bearer(key: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(&format!("Bearer {key}")).expect("ascii"),
        );
        headers
    }

    fn check(keys: &Keys, path: &str, headers: &http::HeaderMap) -> Result<Arc<Identity>, Status> {
        let mut extensions = http::Extensions::new();
        keys.check(path, headers, &mut extensions)?;
        Ok(extensions
            .get::<Arc<Identity>>()
            .cloned()
            .unwrap_or_else(|| {
                Arc::new(Identity {
                    name: "(open)".into(),
                    roles: BTreeSet::new(),
                    models: None,
                    limit: None,
                    model_limits: BTreeMap::new(),
                    refused: RefusalCounts::default(),
                })
            }))
    }

    /// The connection of a client that presented a certificate with `dns` and `uri`
    /// subject alternative names.
    fn presenting(dns: &[&str], uri: &[&str]) -> ConnInfo {
        let mut params =
            rcgen::CertificateParams::new(dns.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("params");
        for uri in uri {
            params.subject_alt_names.push(rcgen::SanType::URI(
                rcgen::Ia5String::try_from(*uri).expect("ascii"),
            ));
        }
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("certificate");
        ConnInfo {
            remote: None,
            peer_certs: Some(Arc::new(vec![cert.der().clone()])),
        }
    }

    #[test]
    fn a_client_certificate_is_a_caller_by_its_dns_or_uri_name() {
        let table = KeyTable::parse(&format!(
            "[[keys]]\nname = \"ops\"\nclient_cert = \"spiffe://cluster.local/ns/ml/sa/ops\"\nroles = [\"admin\"]\n\n\
             [[keys]]\nname = \"app\"\nclient_cert = \"app.ml.svc\"\nroles = [\"infer\"]\n\n\
             [[keys]]\nname = \"script\"\nsha256 = \"{}\"\nroles = [\"read\"]\n",
            hash(KEY)
        ))
        .expect("valid");
        let none = http::HeaderMap::new();
        let ops = presenting(
            &["laptop.example"],
            &["spiffe://cluster.local/ns/ml/sa/ops"],
        );
        assert_eq!(
            &*table.authenticate(&none, Some(&ops)).expect("ops").name,
            "ops"
        );
        let app = presenting(&["app.ml.svc"], &[]);
        assert_eq!(
            &*table.authenticate(&none, Some(&app)).expect("app").name,
            "app"
        );

        // A key sent with the certificate decides: it is what the client chose to send.
        let with_key = table
            .authenticate(&bearer(KEY), Some(&ops))
            .expect("script");
        assert_eq!(&*with_key.name, "script");

        let stranger = presenting(&["stranger.example"], &[]);
        let refused = table
            .authenticate(&none, Some(&stranger))
            .expect_err("unknown certificate");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert!(
            refused.message().contains("stranger.example"),
            "{refused:?}"
        );
        let plain = ConnInfo {
            remote: None,
            peer_certs: None,
        };
        assert_eq!(
            table
                .authenticate(&none, Some(&plain))
                .expect_err("nothing")
                .code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn an_entry_is_a_key_or_a_certificate_never_both_or_neither() {
        for (entry, problem) in [
            (
                format!("sha256 = \"{}\"\nclient_cert = \"a.svc\"", hash(KEY)),
                "give either sha256",
            ),
            (String::new(), "give either sha256"),
            (
                "client_cert = \" \"".to_owned(),
                "client_cert: must not be empty",
            ),
        ] {
            let text = format!("[[keys]]\nname = \"x\"\n{entry}\nroles = [\"read\"]\n");
            let error = KeyTable::parse(&text).expect_err(problem);
            assert!(error.contains(problem), "{error}");
        }
        let twice = "[[keys]]\nname = \"a\"\nclient_cert = \"a.svc\"\nroles = [\"read\"]\n\n\
                     [[keys]]\nname = \"b\"\nclient_cert = \"a.svc\"\nroles = [\"read\"]\n";
        let error = KeyTable::parse(twice).expect_err("the same name twice");
        assert!(error.contains("the same name as another entry"), "{error}");
    }

    #[test]
    fn a_key_can_have_a_rate_limit_per_model() {
        let refused = RefusalCounts::default();
        let table = KeyTable::parse_counting(
            &format!(
                "[[keys]]\nname = \"app\"\nsha256 = \"{}\"\nroles = [\"infer\"]\n\
                 model_rate_limits = {{ demo = {{ per_second = 0.001, burst = 2 }} }}\n",
                hash(KEY)
            ),
            &refused,
        )
        .expect("valid");
        let app = table.authenticate(&bearer(KEY), None).expect("app");
        assert!(app.may_infer("demo").is_ok());
        assert!(app.may_infer("demo").is_ok());
        let over = app.may_infer("demo").expect_err("over its limit on demo");
        assert_eq!(over.code(), tonic::Code::ResourceExhausted);
        assert!(over.message().contains("on model \"demo\""), "{over:?}");
        assert!(over.metadata().get(RETRY_PUSHBACK).is_some());
        // Other models are not limited, and the refusal is counted for the key.
        assert!(app.may_infer("mlp").is_ok());
        assert_eq!(refused.lock().expect("counts").get("app"), Some(&1));

        let outside = format!(
            "[[keys]]\nname = \"app\"\nsha256 = \"{}\"\nroles = [\"infer\"]\nmodels = [\"demo\"]\n\
             model_rate_limits = {{ mlp = {{ per_second = 5 }}, demo = {{ per_second = 0 }} }}\n",
            hash(KEY)
        );
        let error = KeyTable::parse(&outside).expect_err("invalid");
        assert!(
            error.contains("model_rate_limits.mlp: the key may not infer on this model"),
            "{error}"
        );
        assert!(
            error.contains("model_rate_limits.demo.per_second: must be a positive number"),
            "{error}"
        );
    }

    #[test]
    fn a_token_file_holds_one_printable_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").expect("write");
        assert_eq!(
            read_token(&path, "workers.token_file")
                .expect("read")
                .to_str()
                .expect("ascii"),
            "Bearer s3cret"
        );
        for (text, problem) in [
            ("\n", "the file is empty"),
            ("caf\u{e9}", "not printable ASCII"),
        ] {
            std::fs::write(&path, text).expect("write");
            let error = read_token(&path, "workers.token_file").expect_err(problem);
            let shown = error.to_string();
            assert!(
                shown.contains("workers.token_file") && shown.contains(problem),
                "{shown}"
            );
        }
        let missing = read_token(&dir.path().join("none"), "--gateway-token-file")
            .expect_err("missing")
            .to_string();
        assert!(missing.contains("--gateway-token-file"), "{missing}");
    }

    #[test]
    fn calls_are_refused_without_a_key_and_beyond_its_roles() {
        let keys = keys();
        let infer = "/inference.GRPCInferenceService/ModelInfer";
        let none = http::HeaderMap::new();
        assert_eq!(
            check(&keys, infer, &none).expect_err("no key").code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            check(&keys, infer, &bearer("wrong"))
                .expect_err("bad key")
                .code(),
            tonic::Code::Unauthenticated
        );
        let app = check(&keys, infer, &bearer(KEY)).expect("the infer key infers");
        assert_eq!(&*app.name, "app");
        assert!(app.may_infer("demo").is_ok());
        let other = app.may_infer("mlp").expect_err("not its model");
        assert_eq!(other.code(), tonic::Code::PermissionDenied);
        assert!(
            other.message().contains("mlp") && other.message().contains("demo"),
            "{other:?}"
        );
        let admin = check(&keys, "/aviary.admin.v1.Routes/SetRoute", &bearer(KEY))
            .expect_err("an infer key cannot change routes");
        assert_eq!(admin.code(), tonic::Code::PermissionDenied);
        assert!(
            admin.message().contains("needs the role admin"),
            "{admin:?}"
        );
        assert!(
            check(
                &keys,
                "/aviary.admin.v1.Routes/SetRoute",
                &bearer("s3cret-admin")
            )
            .is_ok()
        );
        // Probes need no key.
        for open in [
            "/grpc.health.v1.Health/Check",
            "/inference.GRPCInferenceService/ServerReady",
        ] {
            assert!(check(&keys, open, &none).is_ok(), "{open}");
        }
    }

    #[test]
    fn every_admin_and_inference_method_needs_the_role_it_should() {
        let cases = [
            (
                "/inference.GRPCInferenceService/SystemSharedMemoryRegister",
                Role::Infer,
                true,
            ),
            (
                "/inference.GRPCInferenceService/SystemSharedMemoryUnregister",
                Role::Read,
                false,
            ),
            (
                "/inference.GRPCInferenceService/SystemSharedMemoryStatus",
                Role::Read,
                true,
            ),
            (
                "/inference.GRPCInferenceService/LogSettings",
                Role::Infer,
                false,
            ),
            (
                "/inference.GRPCInferenceService/ModelMetadata",
                Role::Infer,
                true,
            ),
            (
                "/inference.GRPCInferenceService/ModelStatistics",
                Role::Infer,
                false,
            ),
            (
                "/inference.GRPCInferenceService/RepositoryModelUnload",
                Role::Read,
                false,
            ),
            (
                "/inference.GRPCInferenceService/RepositoryModelUnload",
                Role::ModelControl,
                true,
            ),
            (
                "/aviary.admin.v1.Models/UnloadVersion",
                Role::ModelControl,
                true,
            ),
            ("/aviary.admin.v1.Models/ListModels", Role::Read, true),
            ("/aviary.admin.v1.Models/GetDrift", Role::Read, true),
            ("/aviary.admin.v1.Models/GetStage", Role::Read, true),
            ("/aviary.admin.v1.Rollouts/StartRollout", Role::Read, false),
            ("/aviary.admin.v1.Rollouts/GetRollout", Role::Read, true),
            (
                "/aviary.admin.v1.Fleet/SetRolloutWeights",
                Role::ModelControl,
                false,
            ),
            // The feedback of every bandit route is the controller's (an admin key).
            (
                "/aviary.admin.v1.Fleet/GetBanditFeedback",
                Role::Read,
                false,
            ),
            ("/aviary.admin.v1.Fleet/SetBanditWeights", Role::Admin, true),
            ("/aviary.admin.v1.Experiments/Feedback", Role::Infer, true),
            ("/something.Else/Method", Role::Read, false),
        ];
        for (path, role, allowed) in cases {
            let roles = roles_for(path).expect("not open");
            assert_eq!(roles.contains(&role), allowed, "{path} with {role:?}");
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 3.0, start);
        for _ in 0..3 {
            assert!(bucket.take(start).is_ok(), "the burst");
        }
        let wait = bucket.take(start).expect_err("empty");
        assert_eq!(wait, Duration::from_millis(100), "one token per 100 ms");
        assert!(bucket.take(start + Duration::from_millis(99)).is_err());
        assert!(bucket.take(start + Duration::from_millis(100)).is_ok());
        // A quiet spell saves up no more than the burst.
        let later = start + Duration::from_secs(60);
        let taken = (0..10).filter(|_| bucket.take(later).is_ok()).count();
        assert_eq!(taken, 3);
    }

    #[test]
    fn a_bad_keys_file_names_every_problem() {
        let text = "[[keys]]\nname = \"a\"\nsha256 = \"xyz\"\nroles = []\n\n\
                    [[keys]]\nname = \"a\"\nsha256 = \"00\"\nroles = [\"infer\"]\n";
        let error = KeyTable::parse(text).expect_err("invalid");
        for expected in [
            "keys[0] (\"a\").sha256",
            "keys[0] (\"a\").roles",
            "keys[1] (\"a\").name",
        ] {
            assert!(error.contains(expected), "{expected} in {error}");
        }
        let unknown =
            KeyTable::parse("[[keys]]\nname = \"a\"\nsha256 = \"00\"\nroles = [\"root\"]\n")
                .expect_err("unknown role");
        assert!(unknown.contains("root"), "{unknown}");
    }
}
