//! TLS for the client-facing listener: rustls with the ring provider (installed once at start),
//! certificates and keys read from PEM files, and an SNI resolver that picks the certificate
//! whose subject alternative names match the requested server name (exact, then wildcard); the
//! first certificate is the default for clients that send no SNI or an unknown name. ALPN
//! offers `h2` and `http/1.1`.
//!
//! What it must not do: log key material, accept a key that does not match its certificate, or
//! pick a certificate by anything but its SANs (the subject CN is ignored, as browsers do).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate given")]
    NoCertificate,
    #[error("reading certificates from {path}: {source}")]
    Certs { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("{path} holds no certificate")]
    EmptyChain { path: PathBuf },
    #[error("reading the private key from {path}: {source}")]
    Key { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("certificate {cert} with key {key}: {source}")]
    Pair { cert: PathBuf, key: PathBuf, source: rustls::Error },
    #[error("certificate {path}: {source}")]
    Parse { path: PathBuf, source: webpki::Error },
    #[error("building the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// Installs ring as the process-wide rustls provider. Idempotent: a second call is a no-op.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A certificate chain file and its private key file.
#[derive(Clone, Debug)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Picks a certificate by SNI.
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl SniResolver {
    fn pick(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = server_name else { return Arc::clone(&self.default) };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return Arc::clone(k);
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(k) = self.wildcard.get(parent)
        {
            return Arc::clone(k);
        }
        Arc::clone(&self.default)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

fn load_pair(pair: &CertPair, provider: &CryptoProvider) -> Result<(CertifiedKey, Vec<String>), TlsError> {
    let chain = CertificateDer::pem_file_iter(&pair.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Certs { path: pair.cert.clone(), source })?;
    let Some(leaf) = chain.first() else { return Err(TlsError::EmptyChain { path: pair.cert.clone() }) };
    let names = sans(leaf, &pair.cert)?;
    let key =
        PrivateKeyDer::from_pem_file(&pair.key).map_err(|source| TlsError::Key { path: pair.key.clone(), source })?;
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|source| TlsError::Pair {
        cert: pair.cert.clone(),
        key: pair.key.clone(),
        source,
    })?;
    Ok((certified, names))
}

/// The DNS names (`example.com`, `*.example.com`) a certificate is for, lower-cased.
fn sans(leaf: &CertificateDer<'_>, path: &Path) -> Result<Vec<String>, TlsError> {
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|source| TlsError::Parse { path: path.into(), source })?;
    Ok(cert.valid_dns_names().map(str::to_ascii_lowercase).collect())
}

fn resolver(pairs: &[CertPair], provider: &CryptoProvider) -> Result<SniResolver, TlsError> {
    let mut default = None;
    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    for pair in pairs {
        let (key, names) = load_pair(pair, provider)?;
        let key = Arc::new(key);
        for name in names {
            // The first certificate naming a host wins.
            match name.strip_prefix("*.") {
                Some(parent) => wildcard.entry(parent.to_owned()).or_insert_with(|| Arc::clone(&key)),
                None => exact.entry(name).or_insert_with(|| Arc::clone(&key)),
            };
        }
        default.get_or_insert(key);
    }
    let default = default.ok_or(TlsError::NoCertificate)?;
    Ok(SniResolver { default, exact, wildcard })
}

/// The acceptor for the client-facing listener.
pub fn acceptor(pairs: &[CertPair]) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = resolver(pairs, &provider)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key whose chain is just `tag`: resolver picking needs no real certificate.
    fn key(tag: &str) -> Arc<CertifiedKey> {
        Arc::new(CertifiedKey::new(vec![CertificateDer::from(tag.as_bytes().to_vec())], Arc::new(DummyKey)))
    }

    #[derive(Debug)]
    struct DummyKey;

    impl rustls::sign::SigningKey for DummyKey {
        fn choose_scheme(&self, _: &[rustls::SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
            None
        }

        fn algorithm(&self) -> rustls::SignatureAlgorithm {
            rustls::SignatureAlgorithm::ECDSA
        }
    }

    fn tag(k: &CertifiedKey) -> &[u8] {
        k.cert[0].as_ref()
    }

    fn check(r: &SniResolver, sni: Option<&str>, expected: &str) {
        assert_eq!(tag(&r.pick(sni)), expected.as_bytes(), "{sni:?}");
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_default() {
        let r = SniResolver {
            default: key("default"),
            exact: HashMap::from([("api.example.com".to_owned(), key("api"))]),
            wildcard: HashMap::from([("example.com".to_owned(), key("wild"))]),
        };
        check(&r, None, "default");
        check(&r, Some("api.example.com"), "api");
        check(&r, Some("API.Example.com."), "api");
        check(&r, Some("www.example.com"), "wild");
        check(&r, Some("a.b.example.com"), "default");
        check(&r, Some("example.com"), "default");
        check(&r, Some("other.org"), "default");
    }

    #[test]
    fn missing_files_are_named() {
        let provider = rustls::crypto::ring::default_provider();
        let err =
            resolver(&[CertPair { cert: "/nonexistent/c.pem".into(), key: "/nonexistent/k.pem".into() }], &provider)
                .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/c.pem"), "{err}");
        assert!(matches!(resolver(&[], &provider), Err(TlsError::NoCertificate)));
    }
}
