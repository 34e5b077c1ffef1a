//! TLS material and server configurations for the suites: the fixed test CA and its server
//! certificate (SANs `localhost` and `127.0.0.1`), and an unrelated CA for "wrong CA" cases, all
//! in `tests/keys/tls/` (see its README). The TLS [`crate::upstream::RecordingUpstream`] and the
//! https [`crate::auth_server::AuthServer`] serve with [`server_config`].

use std::path::PathBuf;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn key_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("keys/tls").join(name)
}

/// The PEM file of the CA that signed the test server certificate.
pub fn ca_file() -> PathBuf {
    key_file("test_ca.pem")
}

/// The PEM file of a CA that signed nothing the test servers present.
pub fn other_ca_file() -> PathBuf {
    key_file("other_ca.pem")
}

/// A server configuration presenting the test certificate, offering `alpn` (e.g. `h2` and
/// `http/1.1`), with the ring provider.
pub fn server_config(alpn: &[&[u8]]) -> Arc<ServerConfig> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(key_file("test_server.pem"))
        .expect("test server certificate")
        .collect::<Result<_, _>>()
        .expect("test server certificate PEM");
    let key = PrivateKeyDer::from_pem_file(key_file("test_server.key")).expect("test server key");
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("test certificate and key");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}
