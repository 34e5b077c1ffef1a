//! `portcullis-control-plane`: stores the configuration (embedded store by default, etcd in
//! production), serves the admin gRPC API and the proxies' config streams, and drains cleanly on
//! SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use portcullis_control_plane::admin;
use portcullis_control_plane::discovery::{self, BootstrapToken, ProxyRegistry};
use portcullis_control_plane::keys::{KeyRotation, KeyRotationConfig};
use portcullis_control_plane::state::ConfigState;
use portcullis_control_plane::store::{AnyStore, embedded::EmbeddedStore, etcd::EtcdStore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StoreKind {
    /// One node, durable under --data-dir; no etcd needed (the all-in-one default).
    Embedded,
    /// etcd (production): several replicas share one etcd cluster.
    Etcd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "portcullis-control-plane",
    version,
    about = "Portcullis control plane: admin API, config store and proxy config streams"
)]
struct Args {
    #[arg(long, env = "PORTCULLIS_STORE", value_enum, default_value = "embedded")]
    store: StoreKind,
    /// Comma-separated etcd endpoints (with --store etcd).
    #[arg(long, env = "PORTCULLIS_ETCD_ENDPOINTS", value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    etcd_endpoints: Vec<String>,
    /// Where the embedded store keeps its data (with --store embedded).
    #[arg(long, env = "PORTCULLIS_DATA_DIR", default_value = ".data/control-plane")]
    data_dir: PathBuf,
    #[arg(long, env = "PORTCULLIS_ADMIN_LISTEN", default_value = "127.0.0.1:7070")]
    admin_listen: String,
    /// Where proxies connect for config streams.
    #[arg(long, env = "PORTCULLIS_PROXY_LISTEN", default_value = "127.0.0.1:7071")]
    proxy_listen: String,
    /// File holding the bootstrap token proxies present (`authorization: Bearer <token>`).
    /// Without it every proxy is refused.
    #[arg(long, env = "PORTCULLIS_BOOTSTRAP_TOKEN_FILE")]
    bootstrap_token_file: Option<PathBuf>,
    /// How long a key that disappeared from an issuer's JWKS stays valid (e.g. 1h, 30m).
    #[arg(long, env = "PORTCULLIS_KEY_GRACE", default_value = "1h", value_parser = parse_duration)]
    key_grace: std::time::Duration,
    /// PEM bundle of the CA(s) that issuers' https `jwks_uri`/discovery servers must chain to
    /// (a private IdP CA). Default: the system roots ($SSL_CERT_FILE or
    /// /etc/ssl/certs/ca-certificates.crt).
    #[arg(long, env = "PORTCULLIS_ISSUER_CA_FILE", value_name = "FILE")]
    issuer_ca_file: Option<PathBuf>,
    /// At most one on-demand key fetch per issuer in this window: proxies that meet an unknown
    /// `kid` ask for one, and a flood of random kids must not hammer the issuer (e.g. 10s).
    #[arg(long, env = "PORTCULLIS_KEY_REFETCH_MIN_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    key_refetch_min_interval: std::time::Duration,
    #[arg(long, env = "PORTCULLIS_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    portcullis_shared::duration::parse(s).map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    portcullis_shared::process::init_tracing(matches!(args.log_format, LogFormat::Json));
    let shutdown = CancellationToken::new();
    tokio::spawn(portcullis_shared::process::shutdown_signal(shutdown.clone()));

    let store = match args.store {
        StoreKind::Embedded => {
            info!(data_dir = %args.data_dir.display(), "using the embedded store");
            AnyStore::Embedded(
                EmbeddedStore::open(&args.data_dir)
                    .with_context(|| format!("opening the embedded store in {}", args.data_dir.display()))?,
            )
        }
        StoreKind::Etcd => {
            info!(etcd.endpoints = ?args.etcd_endpoints, "using etcd");
            AnyStore::Etcd(EtcdStore::connect(&args.etcd_endpoints).await.context("connecting to etcd")?)
        }
    };
    let token = match &args.bootstrap_token_file {
        Some(path) => Some(BootstrapToken::from_file(path).context("loading the bootstrap token")?),
        None => {
            warn!("no --bootstrap-token-file: every proxy will be refused");
            None
        }
    };
    let state = ConfigState::start(store, shutdown.clone()).await.context("loading the configuration")?;
    // Before binding: a bad --issuer-ca-file stops start-up while no port is taken yet.
    let rotation_config = KeyRotationConfig {
        grace: args.key_grace,
        issuer_ca_file: args.issuer_ca_file.clone(),
        refetch_min_interval: args.key_refetch_min_interval,
        ..Default::default()
    };
    let rotation = KeyRotation::new(Arc::clone(&state), rotation_config).context("--issuer-ca-file")?;
    let admin_listener = tokio::net::TcpListener::bind(&args.admin_listen)
        .await
        .with_context(|| format!("binding the admin API to {}", args.admin_listen))?;
    let proxy_listener = tokio::net::TcpListener::bind(&args.proxy_listen)
        .await
        .with_context(|| format!("binding the proxy listener to {}", args.proxy_listen))?;
    let registry = Arc::new(ProxyRegistry::new());
    // Idempotent writes: several replicas may run it side by side (one leader would be better).
    let keys = rotation.handle();
    let rotation_task = tokio::spawn(rotation.run(shutdown.clone()));
    let admin = async {
        admin::serve(Arc::clone(&state), Arc::clone(&registry), admin_listener, shutdown.clone())
            .await
            .context("admin API server")
    };
    let proxies = async {
        discovery::serve(Arc::clone(&state), Arc::clone(&registry), token, Some(keys), proxy_listener, shutdown.clone())
            .await
            .context("config stream server")
    };
    // If one server fails, the other is stopped too: a half-running control plane helps no one.
    let served = tokio::try_join!(admin, proxies);
    shutdown.cancel();
    let _ = rotation_task.await;
    served?;
    info!("stopped");
    Ok(())
}
