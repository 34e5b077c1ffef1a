//! Outbound TLS and an http/https connector for hyper-util's legacy client (feature `client`).
//!
//! - [`tls_client_config`] builds a rustls [`ClientConfig`]: TLS 1.3 and 1.2, the ring provider,
//!   roots from a PEM bundle (`ca_file`) or else the system roots (`$SSL_CERT_FILE`, or
//!   `/etc/ssl/certs/ca-certificates.crt`), and the ALPN protocols to offer. Certificate and host
//!   name verification are always on: there is no switch to turn them off. Build it once (at
//!   start-up or config compile time) and share the `Arc`: it also holds the TLS session cache.
//! - [`HttpsConnector`] is a `tower_service::Service<Uri>` for
//!   `hyper_util::client::legacy::Client`: it opens a TCP connection (one timeout over connect and
//!   TLS handshake, `TCP_NODELAY` on), and for `https://` URIs runs the rustls handshake with the
//!   URI host as SNI and certificate name (an IP host is verified against an IP SAN). Its
//!   connections are [`HttpsStream`]s, which report a negotiated `h2` ALPN to the client.
//!
//! ```no_run
//! # async fn fetch() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use portcullis_shared::http_client::{HttpsConnector, tls_client_config};
//!
//! let tls = tls_client_config(None, &[b"http/1.1"])?; // the system roots
//! let connector = HttpsConnector::new(tls, Duration::from_secs(5));
//! let client: Client<HttpsConnector, String> = Client::builder(TokioExecutor::new()).build(connector);
//! let response = client.get("https://idp.example.com/jwks".parse()?).await?;
//! # Ok(()) }
//! ```
//!
//! Users: the control plane's JWKS / OIDC discovery fetches (`control-plane/src/keys.rs`) and the
//! proxy's token-introspection client; the proxy's upstream forwarding reuses [`HttpsStream`].
//!
//! What it must not do: skip or weaken verification, follow redirects or add headers (that is
//! the caller's business), or read files on the request path (configs are built ahead of time).

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The system CA bundle when `$SSL_CERT_FILE` is not set (Debian, Ubuntu, Alpine, Arch).
pub const DEFAULT_SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Why a TLS client configuration could not be built. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("reading CA certificates from {path}: {source}")]
    Read { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("{path} holds no usable PEM CA certificate")]
    Empty { path: PathBuf },
    #[error("CA certificate #{index} in {path} is not usable: {source}")]
    Certificate { path: PathBuf, index: usize, source: rustls::Error },
    #[error("building the TLS client configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// Where the system roots are read from: `$SSL_CERT_FILE` if set, else [`DEFAULT_SYSTEM_ROOTS`].
pub fn system_roots_path() -> PathBuf {
    match std::env::var_os("SSL_CERT_FILE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_SYSTEM_ROOTS),
    }
}

/// A client configuration trusting the CAs of `ca_file` (a PEM bundle), or the system roots
/// when `None`, offering `alpn` (e.g. `&[b"h2"]`, `&[b"http/1.1"]`; empty offers none).
///
/// An explicit `ca_file` must hold only usable certificates; in the system bundle, entries that
/// do not parse are skipped (distributions ship a few), but at least one must be usable.
pub fn tls_client_config(ca_file: Option<&Path>, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let roots = match ca_file {
        Some(path) => roots_from(path, true)?,
        None => roots_from(&system_roots_path(), false)?,
    };
    let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsConfigError::Config)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The certificates of the PEM bundle `path`; `strict`: every one must be usable, else those
/// that are not are skipped. At least one must be.
fn roots_from(path: &Path, strict: bool) -> Result<RootCertStore, TlsConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsConfigError::Read { path: path.to_path_buf(), source })?;
    let mut roots = RootCertStore::empty();
    if strict {
        for (index, cert) in certs.into_iter().enumerate() {
            roots.add(cert).map_err(|source| TlsConfigError::Certificate {
                path: path.to_path_buf(),
                index,
                source,
            })?;
        }
    } else {
        roots.add_parsable_certificates(certs);
    }
    if roots.is_empty() {
        return Err(TlsConfigError::Empty { path: path.to_path_buf() });
    }
    Ok(roots)
}

/// The TLS name of a URI or authority host: a DNS name, or an IP address (brackets of an IPv6
/// literal removed).
pub fn server_name(host: &str) -> Result<ServerName<'static>, ConnectError> {
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    ServerName::try_from(host.to_owned()).map_err(|_| ConnectError::ServerName(host.to_owned()))
}

/// Why [`HttpsConnector`] could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error("unsupported scheme in {0:?}: expected http or https")]
    Scheme(String),
    #[error("https is not configured for this client ({0:?})")]
    TlsUnavailable(String),
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    #[error("connecting to {authority}: {source}")]
    Connect { authority: String, source: io::Error },
    #[error("connecting to {authority} timed out after {timeout:?}")]
    TimedOut { authority: String, timeout: Duration },
    #[error("TLS handshake with {authority}: {source}")]
    Tls { authority: String, source: io::Error },
}

/// An http/https connector for `hyper_util::client::legacy::Client`; see the module docs.
/// Cloning is cheap (two `Arc`s).
#[derive(Clone)]
pub struct HttpsConnector {
    tls: Option<TlsConnector>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for HttpsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsConnector")
            .field("https", &self.tls.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl HttpsConnector {
    /// Connects `http://` and `https://` URIs; `tls` from [`tls_client_config`]. The timeout
    /// covers the TCP connect and the TLS handshake.
    pub fn new(tls: Arc<ClientConfig>, connect_timeout: Duration) -> HttpsConnector {
        HttpsConnector { tls: Some(TlsConnector::from(tls)), connect_timeout }
    }

    /// Connects `http://` URIs only; `https://` ones fail with [`ConnectError::TlsUnavailable`]
    /// (for processes that could not load any trust roots).
    pub fn http_only(connect_timeout: Duration) -> HttpsConnector {
        HttpsConnector { tls: None, connect_timeout }
    }

    /// Connects to `uri` (see [`HttpsConnector::new`]).
    pub async fn connect(&self, uri: &Uri) -> Result<HttpsStream, ConnectError> {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(ConnectError::Scheme(uri.to_string())),
        };
        let Some(authority) = uri.authority() else { return Err(ConnectError::NoHost(uri.to_string())) };
        let host = authority.host();
        let tls = match (&self.tls, https) {
            (_, false) => None,
            (Some(tls), true) => Some((tls, server_name(host)?)),
            (None, true) => return Err(ConnectError::TlsUnavailable(uri.to_string())),
        };
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp_host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let connecting = async {
            let tcp = TcpStream::connect((tcp_host, port))
                .await
                .map_err(|source| ConnectError::Connect { authority: authority.to_string(), source })?;
            // Nagle only delays small requests; a failure to set it is harmless.
            let _ = tcp.set_nodelay(true);
            match tls {
                None => Ok(HttpsStream::from(tcp)),
                Some((tls, name)) => tls
                    .connect(name, tcp)
                    .await
                    .map(HttpsStream::from)
                    .map_err(|source| ConnectError::Tls { authority: authority.to_string(), source }),
            }
        };
        tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| ConnectError::TimedOut { authority: authority.to_string(), timeout: self.connect_timeout })?
    }
}

type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<HttpsStream>, ConnectError>> + Send>>;

impl tower_service::Service<Uri> for HttpsConnector {
    type Response = TokioIo<HttpsStream>;
    type Error = ConnectError;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Connecting {
        let this = self.clone();
        Box::pin(async move { this.connect(&uri).await.map(TokioIo::new) })
    }
}

/// A client connection: plain TCP or TLS over TCP. Tokio I/O; wrap it in
/// [`hyper_util::rt::TokioIo`] for hyper (the connector does).
pub struct HttpsStream(Inner);

enum Inner {
    Plain(TcpStream),
    // Boxed: a TLS session is a few hundred bytes, a TCP stream a few words.
    Tls(Box<TlsStream<TcpStream>>),
}

impl std::fmt::Debug for HttpsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsStream").field("tls", &self.is_tls()).finish()
    }
}

impl HttpsStream {
    pub fn is_tls(&self) -> bool {
        matches!(self.0, Inner::Tls(_))
    }

    /// The ALPN protocol the server chose, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        match &self.0 {
            Inner::Plain(_) => None,
            Inner::Tls(s) => s.get_ref().1.alpn_protocol(),
        }
    }
}

impl From<TcpStream> for HttpsStream {
    fn from(s: TcpStream) -> Self {
        HttpsStream(Inner::Plain(s))
    }
}

impl From<TlsStream<TcpStream>> for HttpsStream {
    fn from(s: TlsStream<TcpStream>) -> Self {
        HttpsStream(Inner::Tls(Box::new(s)))
    }
}

impl Connection for HttpsStream {
    fn connected(&self) -> Connected {
        let connected = Connected::new();
        if self.alpn_protocol() == Some(b"h2") { connected.negotiated_h2() } else { connected }
    }
}

impl AsyncRead for HttpsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.0 {
            Inner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for HttpsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.0 {
            Inner::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.0 {
            Inner::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.0 {
            Inner::Plain(s) => s.is_write_vectored(),
            Inner::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.0 {
            Inner::Plain(s) => Pin::new(s).poll_flush(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.0 {
            Inner::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Whether `e` (or one of its sources) is a failed TLS handshake of this module's connector.
pub fn is_tls_error(e: &(dyn StdError + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if matches!(s.downcast_ref::<ConnectError>(), Some(ConnectError::Tls { .. })) {
            return true;
        }
        source = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(file: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/keys/tls").join(file)
    }

    /// `tls_client_config(ca_file)` fails and its message contains every one of `expected`.
    fn check_err(ca_file: &Path, expected: &[&str]) {
        let err = tls_client_config(Some(ca_file), &[]).unwrap_err().to_string();
        for e in expected {
            assert!(err.contains(e), "{err:?} should contain {e:?}");
        }
    }

    #[test]
    fn bad_ca_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        check_err(&missing, &["reading CA certificates from", "missing.pem"]);
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        check_err(&empty, &["empty.pem", "no usable PEM CA certificate"]);
        // a private key is PEM, but not a certificate
        check_err(&keys("test_server.key"), &["test_server.key", "no usable PEM CA certificate"]);
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n").unwrap();
        check_err(&garbage, &["garbage.pem"]);
        let not_der = dir.path().join("not-der.pem");
        std::fs::write(&not_der, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        check_err(&not_der, &["CA certificate #0 in", "not-der.pem"]);
        check_err(dir.path(), &["reading CA certificates from"]);
    }

    #[test]
    fn a_good_bundle_and_alpn() {
        let config = tls_client_config(Some(&keys("test_ca.pem")), &[b"h2", b"http/1.1"]).unwrap();
        assert_eq!(config.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        let config = tls_client_config(Some(&keys("other_ca.pem")), &[]).unwrap();
        assert!(config.alpn_protocols.is_empty());
    }

    #[test]
    fn the_system_bundle_skips_unusable_entries() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle.pem");
        let good = std::fs::read_to_string(keys("test_ca.pem")).unwrap();
        let bad = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        std::fs::write(&bundle, format!("{bad}{good}")).unwrap();
        assert_eq!(roots_from(&bundle, false).unwrap().len(), 1);
        assert!(matches!(roots_from(&bundle, true), Err(TlsConfigError::Certificate { index: 0, .. })));
        std::fs::write(&bundle, bad).unwrap();
        let err = roots_from(&bundle, false).unwrap_err();
        assert!(matches!(&err, TlsConfigError::Empty { path } if path == &bundle), "{err}");
    }

    #[test]
    fn tls_errors_are_found_in_a_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] ConnectError);
        let tls = ConnectError::Tls { authority: "a:1".into(), source: io::Error::other("bad certificate") };
        assert!(is_tls_error(&Outer(tls)));
        let tcp = ConnectError::Connect { authority: "a:1".into(), source: io::Error::other("refused") };
        assert!(!is_tls_error(&Outer(tcp)));
    }

    #[test]
    fn server_names() {
        assert!(matches!(server_name("localhost"), Ok(ServerName::DnsName(_))));
        assert!(matches!(server_name("127.0.0.1"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(server_name("[::1]"), Ok(ServerName::IpAddress(_))));
        assert!(server_name("bad name").is_err());
    }

    #[tokio::test]
    async fn schemes_and_missing_tls() {
        let c = HttpsConnector::http_only(Duration::from_secs(1));
        let uri: Uri = "https://127.0.0.1:1/".parse().unwrap();
        assert!(matches!(c.connect(&uri).await, Err(ConnectError::TlsUnavailable(_))));
        let uri: Uri = "ftp://127.0.0.1:1/".parse().unwrap();
        assert!(matches!(c.connect(&uri).await, Err(ConnectError::Scheme(_))));
    }
}
