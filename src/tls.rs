//! TLS for Aviary's listeners and clients, on rustls (ring).
//!
//! A listener with [`ServerTls`] accepts TCP connections and completes each handshake
//! on a task of its own (a slow client never holds up the accept loop), then hands the
//! server a [`Conn`]. The certificate, key and client CA are PEM files, read again when
//! they change ([`ServerTls::watch`]), as cert-manager rotates a Kubernetes Secret: new
//! handshakes use the new files, established connections keep theirs. With a client CA
//! the listener requires a client certificate signed by it (mTLS).
//!
//! Clients take a CA to trust and, for mTLS, a certificate and key
//! (`aviary::client::ClientTlsFiles`).

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::rustls::{
    self, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

/// How long a client may take to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the PEM files are looked at for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// A PEM file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TlsError {
    /// The file (or the setting) at fault.
    pub path: String,
    /// Why.
    pub message: String,
}

fn error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// A listener's PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs.
    pub client_ca: Option<PathBuf>,
}

/// A listener's TLS settings, rebuilt when its files change.
#[derive(Debug)]
pub struct ServerTls {
    files: TlsFiles,
    config: RwLock<Arc<ServerConfig>>,
    /// The files' modification times when they were read at open.
    opened: Vec<Option<SystemTime>>,
}

impl ServerTls {
    /// Reads `files`; `alpn` are the protocols offered (`h2` for gRPC).
    pub fn open(files: TlsFiles, alpn: &[&[u8]]) -> Result<Arc<ServerTls>, TlsError> {
        let opened = stamps(&files);
        let config = build(&files, alpn)?;
        Ok(Arc::new(ServerTls {
            files,
            config: RwLock::new(Arc::new(config)),
            opened,
        }))
    }

    /// The settings new handshakes use.
    fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.config.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Rebuilds the settings whenever a file changes, until the process ends. A set of
    /// files that does not load (a half-written rotation) keeps the last good one in
    /// force, logged, and is tried again on the next change.
    pub async fn watch(self: Arc<Self>) {
        let alpn = self.current().alpn_protocols.clone();
        let alpn: Vec<&[u8]> = alpn.iter().map(Vec::as_slice).collect();
        let mut seen = self.opened.clone();
        loop {
            tokio::time::sleep(WATCH_INTERVAL).await;
            let now = stamps(&self.files);
            if seen == now {
                continue;
            }
            seen = now;
            match build(&self.files, &alpn) {
                Ok(config) => {
                    *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                }
                Err(error) => {
                    tracing::error!(%error, "TLS files changed but do not load; the last good ones stay in force")
                }
            }
        }
    }
}

/// When each file was last modified (`None`: unreadable).
fn stamps(files: &TlsFiles) -> Vec<Option<SystemTime>> {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
    .collect()
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(path, e))?;
    if certs.is_empty() {
        return Err(error(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| error(path, format!("no usable PEM private key: {e}")))
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots.add(cert).map_err(|e| error(path, e))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(files: &TlsFiles, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| error(&files.cert, e))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|e| error(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certificates(&files.cert)?, private_key(&files.key)?)
        .map_err(|e| error(&files.key, format!("does not go with the certificate: {e}")))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client's settings: trusting the CAs in `ca`, presenting `identity` (certificate
/// chain and key files) when given, offering `alpn`.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| error(ca, e))?
        .with_root_certificates(roots(ca)?);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(certificates(cert)?, private_key(key)?)
            .map_err(|e| error(key, format!("does not go with the certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// An accepted connection: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum Conn {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS (boxed: its state is large).
    Tls(Box<TlsStream<TcpStream>>),
}

/// What a server knows of a connection's peer, in each request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// The client certificate chain it presented (mTLS), leaf first.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl Conn {
    /// The peer's address, when the socket still knows it.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        match self {
            Conn::Plain(tcp) => tcp.peer_addr().ok(),
            Conn::Tls(tls) => tls.get_ref().0.peer_addr().ok(),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match self {
            Conn::Plain(tcp) => ConnInfo {
                remote: tcp.peer_addr().ok(),
                peer_certs: None,
            },
            Conn::Tls(tls) => {
                let (tcp, session) = tls.get_ref();
                ConnInfo {
                    remote: tcp.peer_addr().ok(),
                    peer_certs: session.peer_certificates().map(|c| Arc::new(c.to_vec())),
                }
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(io) => io.is_write_vectored(),
            Conn::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_flush(cx),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections `listener` accepts, with TCP_NODELAY (without it, small responses
/// wait for delayed ACKs and the latency tail grows by ~40 ms), through a TLS
/// handshake when `tls` is set. A failed handshake is logged and the connection
/// dropped; the stream goes on. The listener closes when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
) -> Pin<Box<dyn Stream<Item = io::Result<Conn>> + Send>> {
    let Some(tls) = tls else {
        let plain = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        return Box::pin(futures::StreamExt::map(plain, |accepted| {
            accepted.map(Conn::Plain).map_err(io::Error::other)
        }));
    };
    let (sender, receiver) = tokio::sync::mpsc::channel::<io::Result<Conn>>(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = sender.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off, as tonic does.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.current());
            let sender = sender.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = sender.send(Ok(Conn::Tls(Box::new(stream)))).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    Box::pin(futures::stream::unfold(
        receiver,
        |mut receiver| async move { receiver.recv().await.map(|conn| (conn, receiver)) },
    ))
}

/// The connections of [`incoming`] as axum takes them (the `/metrics` and HTTP/REST
/// endpoints): the same accept loop, handshakes and rotation as the gRPC listeners.
pub struct HttpIncoming {
    incoming: Pin<Box<dyn Stream<Item = io::Result<Conn>> + Send>>,
    local: SocketAddr,
}

impl HttpIncoming {
    /// The connections `listener` accepts, through a TLS handshake when `tls` is set.
    pub fn new(listener: TcpListener, tls: Option<Arc<ServerTls>>) -> io::Result<HttpIncoming> {
        Ok(HttpIncoming {
            local: listener.local_addr()?,
            incoming: incoming(listener, tls),
        })
    }
}

impl axum::serve::Listener for HttpIncoming {
    type Io = Conn;
    type Addr = Option<SocketAddr>;

    async fn accept(&mut self) -> (Conn, Option<SocketAddr>) {
        use futures::StreamExt;
        loop {
            match self.incoming.next().await {
                Some(Ok(conn)) => {
                    let peer = conn.peer_addr();
                    return (conn, peer);
                }
                Some(Err(error)) => {
                    // Out of file descriptors and the like: back off, as axum does.
                    tracing::warn!(%error, "HTTP listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // The accept loop never ends while this end is held.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Option<SocketAddr>> {
        Ok(Some(self.local))
    }
}

/// What an axum handler knows of its connection: the same [`ConnInfo`] a gRPC call
/// finds in its extensions (the peer, and its client certificates under mTLS).
impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, HttpIncoming>>
    for ConnInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, HttpIncoming>) -> ConnInfo {
        use tonic::transport::server::Connected;
        stream.io().connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_empty_files_are_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let files = TlsFiles {
            cert: empty.clone(),
            key: dir.path().join("missing.key"),
            client_ca: None,
        };
        let error = ServerTls::open(files, &[b"h2"]).expect_err("no certificate");
        assert!(error.path.ends_with("empty.pem"), "{error}");
    }
}
