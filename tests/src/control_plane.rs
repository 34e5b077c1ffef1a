//! An in-process control plane on ephemeral loopback ports, backed by a real store: the
//! embedded store in a temp dir, or a real etcd ([`crate::etcd::EtcdServer`]). It is the same
//! `ConfigState` + `admin::serve` + `discovery::serve` the binary runs (admin API on one port,
//! proxy config streams on another, with a fresh bootstrap token); only the process boundary is
//! skipped. It can be restarted on the same ports and store, like a rolled control-plane pod.

use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use portcullis_control_plane::admin;
use portcullis_control_plane::discovery::{self, BootstrapToken, ProxyRegistry};
use portcullis_control_plane::keys::{KeyRotation, KeyRotationConfig, KeyRotationHandle};
use portcullis_control_plane::state::ConfigState;
use portcullis_control_plane::store::{AnyStore, embedded::EmbeddedStore, etcd::EtcdStore};
use portcullis_proto::admin::v1::admin_service_client::AdminServiceClient;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::etcd::EtcdServer;

/// Where the store lives, so that a restart opens the same one.
#[derive(Clone)]
enum StoreSource {
    Embedded(PathBuf),
    Etcd(String),
}

pub struct TestControlPlane {
    addr: SocketAddr,
    proxy_addr: SocketAddr,
    token: String,
    source: StoreSource,
    state: Arc<ConfigState>,
    registry: Arc<ProxyRegistry>,
    /// The key rotation config, when this control plane runs key rotation (kept across restarts).
    rotation: Option<KeyRotationConfig>,
    keys: Option<KeyRotationHandle>,
    shutdown: CancellationToken,
    servers: Vec<JoinHandle<()>>,
    _data_dir: Option<tempfile::TempDir>,
}

impl TestControlPlane {
    /// A control plane on the embedded store, in a fresh temp dir.
    pub async fn embedded() -> TestControlPlane {
        let dir = tempfile::tempdir().expect("temp dir");
        let source = StoreSource::Embedded(dir.path().to_owned());
        Self::start(source, Some(dir), None, random_token(), None).await
    }

    /// A control plane on the embedded store, in a fresh temp dir, that also runs key rotation
    /// (as the binary does) with `config`, and hands it the proxies' unknown-kid reports.
    pub async fn embedded_with_key_rotation(config: KeyRotationConfig) -> TestControlPlane {
        let dir = tempfile::tempdir().expect("temp dir");
        let source = StoreSource::Embedded(dir.path().to_owned());
        Self::start(source, Some(dir), None, random_token(), Some(config)).await
    }

    /// A control plane on the embedded store in `dir` (to test restarts on the same data).
    pub async fn embedded_in(dir: &Path) -> TestControlPlane {
        Self::start(StoreSource::Embedded(dir.to_owned()), None, None, random_token(), None).await
    }

    /// A control plane on `etcd`; several may share one etcd (replicas).
    pub async fn etcd(etcd: &EtcdServer) -> TestControlPlane {
        Self::start(StoreSource::Etcd(etcd.endpoint()), None, None, random_token(), None).await
    }

    async fn start(
        source: StoreSource,
        data_dir: Option<tempfile::TempDir>,
        ports: Option<(SocketAddr, SocketAddr)>,
        token: String,
        rotation: Option<KeyRotationConfig>,
    ) -> TestControlPlane {
        let store = match &source {
            StoreSource::Embedded(dir) => AnyStore::Embedded(EmbeddedStore::open(dir).expect("open embedded store")),
            StoreSource::Etcd(endpoint) => {
                AnyStore::Etcd(EtcdStore::connect(std::slice::from_ref(endpoint)).await.expect("connect to etcd"))
            }
        };
        let shutdown = CancellationToken::new();
        let state = ConfigState::start(store, shutdown.clone()).await.expect("load configuration");
        let (admin_at, proxy_at) = ports.unwrap_or_else(|| {
            let any: SocketAddr = "127.0.0.1:0".parse().expect("loopback");
            (any, any)
        });
        let listener = bind(admin_at).await;
        let proxy_listener = bind(proxy_at).await;
        let addr = listener.local_addr().expect("local addr");
        let proxy_addr = proxy_listener.local_addr().expect("local addr");
        let registry = Arc::new(ProxyRegistry::new());
        let mut servers = Vec::new();
        let keys = rotation.clone().map(|config| {
            let rotation = KeyRotation::new(Arc::clone(&state), config).expect("key rotation config");
            let handle = rotation.handle();
            servers.push(tokio::spawn(rotation.run(shutdown.clone())));
            handle
        });
        let admin_server = tokio::spawn({
            let (state, registry, shutdown) = (Arc::clone(&state), Arc::clone(&registry), shutdown.clone());
            async move {
                admin::serve(state, registry, listener, shutdown).await.expect("admin server");
            }
        });
        let discovery_server = tokio::spawn({
            let (state, registry, shutdown) = (Arc::clone(&state), Arc::clone(&registry), shutdown.clone());
            let token = BootstrapToken::new(&token).expect("valid token");
            let keys = keys.clone();
            async move {
                discovery::serve(state, registry, Some(token), keys, proxy_listener, shutdown)
                    .await
                    .expect("discovery server");
            }
        });
        servers.extend([admin_server, discovery_server]);
        TestControlPlane {
            addr,
            proxy_addr,
            token,
            source,
            state,
            registry,
            rotation,
            keys,
            shutdown,
            servers,
            _data_dir: data_dir,
        }
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where proxies open their config streams.
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy_addr)
    }

    /// The bootstrap token proxies must present.
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn state(&self) -> &Arc<ConfigState> {
        &self.state
    }

    /// The key rotation task's handle (counters, on-demand refetch), when it runs.
    pub fn key_rotation(&self) -> Option<&KeyRotationHandle> {
        self.keys.as_ref()
    }

    /// The proxies connected to this control plane (what `ListProxies` reports).
    pub fn registry(&self) -> &Arc<ProxyRegistry> {
        &self.registry
    }

    pub async fn client(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::connect(self.admin_url())
            .await
            .expect("connect admin client")
            .max_decoding_message_size(admin::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(admin::MAX_MESSAGE_BYTES)
    }

    /// Stops serving and waits for in-flight calls to finish (config streams are ended).
    pub async fn stop(mut self) {
        self.shutdown_and_wait().await;
    }

    /// Stops this control plane and starts a new one on the same store, ports and token, as a
    /// restarted process would be (its proxy registry starts empty).
    pub async fn restart(mut self) -> TestControlPlane {
        self.shutdown_and_wait().await;
        let (source, token, ports) = (self.source.clone(), self.token.clone(), (self.addr, self.proxy_addr));
        let (data_dir, rotation) = (self._data_dir.take(), self.rotation.take());
        drop(self);
        Self::start(source, data_dir, Some(ports), token, rotation).await
    }

    async fn shutdown_and_wait(&mut self) {
        self.shutdown.cancel();
        for server in self.servers.drain(..) {
            let _ = server.await;
        }
    }
}

impl Drop for TestControlPlane {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Binds `addr`; a fixed port just released by a stopped control plane may take a moment.
async fn bind(addr: SocketAddr) -> TcpListener {
    let mut attempts = 0;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if attempts < 50 && addr.port() != 0 => {
                attempts += 1;
                eprintln!("binding {addr}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("binding {addr}: {e}"),
        }
    }
}

fn random_token() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    format!("test-token-{:016x}", h.finish())
}

/// Path of a binary of this workspace (`portctl`, `portcullis-control-plane`), built by
/// `cargo build --bins` (the README's test command does that first). Tests run from
/// `target/<profile>/deps/`, so binaries are one directory up.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(path.exists(), "{} not found: run `cargo build --bins` first", path.display());
    path
}
