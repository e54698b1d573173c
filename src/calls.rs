//! Who is calling, and what a server does with every call before and after its
//! service: a [`CallGuard`] decides whether the call may go on (API keys and roles), a
//! [`CallAudit`] records the calls that change something, and the call runs as its
//! [`Caller`] so that whatever it changes can say who asked ([`caller`]).
//!
//! [`Guarded`] wraps one gRPC service with both; every server in the workspace puts
//! its services behind it, so no service is reached around the checks.

use std::{fmt, net::SocketAddr, sync::Arc};

use futures::future::{BoxFuture, Either, Ready};
use tokio::task::futures::TaskLocalFuture;
use tonic::Status;

/// Who a call (or a change) came from, as the audit trail and the logs name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    /// An API key, by its name (never the key).
    Key(Arc<str>),
    /// A call without a key, by the address it came from.
    Peer(SocketAddr),
    /// The process itself: a background task, e.g. `config-file` or `rollout-driver`.
    Process(&'static str),
    /// Nothing is known of the caller.
    Unknown,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Key(name) => write!(f, "key:{name}"),
            Caller::Peer(addr) => write!(f, "peer:{addr}"),
            Caller::Process(task) => f.write_str(task),
            Caller::Unknown => f.write_str("unknown"),
        }
    }
}

tokio::task_local! {
    static CALLER: Caller;
}

/// The caller of the call (or the background task) this runs in, if it said who it is.
pub fn caller() -> Caller {
    CALLER.try_with(Caller::clone).unwrap_or(Caller::Unknown)
}

/// Runs `work` as `caller`: what it changes is recorded as `caller`'s doing.
pub fn acting_as<F: Future>(caller: Caller, work: F) -> TaskLocalFuture<Caller, F> {
    CALLER.scope(caller, work)
}

/// Decides, before a call reaches its service, whether it may: the path of the call
/// (`/package.Service/Method`) and its headers in; `Err` (the status the caller gets)
/// or the name of the key that was checked out. It may leave what it learnt (the
/// caller's identity) in the request's extensions for the service.
pub trait CallGuard: Send + Sync + fmt::Debug + 'static {
    /// `Ok` when the call at `path` with `headers` may go on, with the name of the
    /// key it came with (`None`: the call needs none and sent none that counts).
    fn check(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        extensions: &mut http::Extensions,
    ) -> Result<Option<Arc<str>>, Status>;
}

/// Records the calls that change something, once they are answered.
pub trait CallAudit: Send + Sync + fmt::Debug + 'static {
    /// Whether calls to `path` are recorded.
    fn records(&self, path: &str) -> bool;

    /// Records a finished call to `path` by `caller`, answered with `status`.
    fn record(&self, path: &str, caller: &Caller, status: &Status);
}

/// The outcome of a guard's check already made for a call, left in its extensions by
/// an in-process caller that had to check before it could build the call (the
/// HTTP/REST endpoint checks a request before it reads its body); [`Guarded`] then
/// takes it instead of checking again. Only code in the process can set extensions:
/// nothing a client sends becomes one.
#[derive(Debug, Clone)]
struct Checked(Option<Arc<str>>);

/// What checks a server's calls: its guard and its audit, either optional.
#[derive(Debug, Clone, Default)]
pub struct CallChecks {
    /// Decides whether a call may go on; none: all may.
    pub guard: Option<Arc<dyn CallGuard>>,
    /// Records the calls that change something; none: nothing is recorded.
    pub audit: Option<Arc<dyn CallAudit>>,
}

impl CallChecks {
    /// Checks a call to `path` ahead of making it, for an in-process caller that must
    /// know before it builds the call (the HTTP/REST endpoint, before it reads a body):
    /// the guard's check, once. Allowed, it leaves the outcome in `extensions`, and the
    /// [`Guarded`] service the call then goes to takes it instead of checking again (a
    /// rate limit is not charged twice). Refused, the refusal is recorded as
    /// [`Guarded`] records one.
    pub fn check_ahead(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        extensions: &mut http::Extensions,
    ) -> Result<(), Status> {
        let Some(guard) = &self.guard else {
            return Ok(());
        };
        match guard.check(path, headers, extensions) {
            Ok(key) => {
                extensions.insert(Checked(key));
                Ok(())
            }
            Err(status) => {
                if let Some(audit) = self.audit.as_ref().filter(|audit| audit.records(path)) {
                    audit.record(path, &peer_of(extensions), &status);
                }
                Err(status)
            }
        }
    }
}

/// A service whose calls are checked by a [`CallGuard`] first, recorded by a
/// [`CallAudit`] when they change something, and run as their [`Caller`].
#[derive(Debug, Clone)]
pub struct Guarded<S> {
    inner: S,
    checks: CallChecks,
}

impl<S> Guarded<S> {
    /// `inner` behind `checks`.
    pub fn new(inner: S, checks: CallChecks) -> Guarded<S> {
        Guarded { inner, checks }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

type Body = tonic::body::Body;

impl<S, B> tonic::codegen::Service<http::Request<B>> for Guarded<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<
        TaskLocalFuture<Caller, S::Future>,
        Either<
            BoxFuture<'static, Result<Self::Response, Self::Error>>,
            Ready<Result<Self::Response, Self::Error>>,
        >,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        let checked = match (parts.extensions.remove::<Checked>(), &self.checks.guard) {
            (Some(Checked(key)), _) => Ok(key),
            (None, Some(guard)) => {
                guard.check(parts.uri.path(), &parts.headers, &mut parts.extensions)
            }
            (None, None) => Ok(None),
        };
        let caller = match &checked {
            Ok(Some(key)) => Caller::Key(Arc::clone(key)),
            _ => peer_of(&parts.extensions),
        };
        let audit = self
            .checks
            .audit
            .as_ref()
            .filter(|audit| audit.records(parts.uri.path()))
            .map(|audit| (Arc::clone(audit), parts.uri.path().to_owned()));
        match (checked, audit) {
            (Ok(_), None) => Either::Left(acting_as(
                caller,
                self.inner.call(http::Request::from_parts(parts, body)),
            )),
            (Ok(_), Some((audit, path))) => {
                let answered = acting_as(
                    caller.clone(),
                    self.inner.call(http::Request::from_parts(parts, body)),
                );
                Either::Right(Either::Left(Box::pin(async move {
                    let response = answered.await?;
                    let status = Status::from_header_map(response.headers())
                        .unwrap_or_else(|| Status::ok(""));
                    audit.record(&path, &caller, &status);
                    Ok(response)
                })))
            }
            (Err(status), audit) => {
                if let Some((audit, path)) = audit {
                    audit.record(&path, &caller, &status);
                }
                Either::Right(Either::Right(futures::future::ready(
                    Ok(status.into_http()),
                )))
            }
        }
    }
}

/// The caller a call without a key is known by: the address it came from.
fn peer_of(extensions: &http::Extensions) -> Caller {
    extensions
        .get::<crate::tls::ConnInfo>()
        .and_then(|info| info.remote)
        .map_or(Caller::Unknown, Caller::Peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_are_named_by_key_address_or_task() {
        assert_eq!(Caller::Key("ops".into()).to_string(), "key:ops");
        assert_eq!(
            Caller::Peer("127.0.0.1:5000".parse().expect("addr")).to_string(),
            "peer:127.0.0.1:5000"
        );
        assert_eq!(Caller::Process("config-file").to_string(), "config-file");
    }

    #[tokio::test]
    async fn work_runs_as_its_caller_and_nothing_else_does() {
        assert_eq!(caller(), Caller::Unknown);
        let seen = acting_as(Caller::Process("rollout-driver"), async { caller() }).await;
        assert_eq!(seen, Caller::Process("rollout-driver"));
        assert_eq!(caller(), Caller::Unknown);
    }
}
