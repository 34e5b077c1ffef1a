//! `portcullis-proxy`: the data plane. Receives configuration from the control plane (serving
//! the last-known-good copy from disk while the control plane is away), runs every request
//! through the pipeline, forwards it upstream, and drains cleanly on SIGTERM/SIGINT: stop
//! accepting, let in-flight requests finish until the drain deadline, exit 0.
//!
//! This file only wires things together (flags, logging, runtime, listeners, signals); it must
//! not grow request logic.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use ipnet::IpNet;
use portcullis_data_plane::admin_http::{self, AdminState};
use portcullis_data_plane::config_client::{ConfigClient, ConfigClientOptions};
use portcullis_data_plane::kid_reports;
use portcullis_data_plane::metrics::Metrics;
use portcullis_data_plane::pipeline::{Pipeline, Settings};
use portcullis_data_plane::server::{Server, ServerOptions};
use portcullis_data_plane::snapshot;
use portcullis_data_plane::tls::{self, CertPair};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

// Per-request allocations (headers, futures, body frames) are many and short-lived.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn duration(s: &str) -> Result<Duration, String> {
    portcullis_shared::duration::parse(s).map_err(|e| e.to_string())
}

#[derive(Debug, Parser)]
#[command(name = "portcullis-proxy", version, about = "Portcullis proxy: enforces the configuration on every request")]
struct Args {
    /// Where clients connect.
    #[arg(long, env = "PORTCULLIS_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// /healthz, /readyz, /metrics, /config.
    #[arg(long, env = "PORTCULLIS_ADMIN_LISTEN", default_value = "127.0.0.1:9901")]
    admin_listen: SocketAddr,
    /// Control-plane URLs, comma-separated, tried in rotation.
    #[arg(long, env = "PORTCULLIS_CONTROL_PLANE", value_delimiter = ',', default_value = "http://127.0.0.1:7071")]
    control_plane: Vec<String>,
    /// File holding the bootstrap token presented to the control plane.
    #[arg(long, env = "PORTCULLIS_BOOTSTRAP_TOKEN_FILE")]
    bootstrap_token_file: Option<PathBuf>,
    /// Where the last-known-good configuration is kept.
    #[arg(long, env = "PORTCULLIS_CACHE_DIR", default_value = ".data/proxy")]
    cache_dir: PathBuf,
    /// This proxy's id (default: hostname-pid).
    #[arg(long, env = "PORTCULLIS_ID")]
    id: Option<String>,
    #[arg(long, env = "PORTCULLIS_ZONE", default_value = "")]
    zone: String,
    /// A PEM certificate chain; repeat together with --tls-key. SNI picks the certificate whose
    /// SAN matches; the first is the default. With none, the listener is plaintext.
    #[arg(long, env = "PORTCULLIS_TLS_CERT", value_delimiter = ',')]
    tls_cert: Vec<PathBuf>,
    /// The PEM private key of the --tls-cert at the same position.
    #[arg(long, env = "PORTCULLIS_TLS_KEY", value_delimiter = ',')]
    tls_key: Vec<PathBuf>,
    /// Peers (CIDRs, comma-separated) allowed to set X-Forwarded-For.
    #[arg(long, env = "PORTCULLIS_TRUSTED_PROXIES", value_delimiter = ',')]
    trusted_proxies: Vec<IpNet>,
    /// Runtime worker threads (default: the number of cores). 1 runs a single-threaded runtime.
    #[arg(long, env = "PORTCULLIS_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// The largest request header block, in bytes (HTTP/1 needs at least 8192).
    #[arg(long, env = "PORTCULLIS_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    max_header_bytes: usize,
    /// The request body limit of routes that set none, in bytes.
    #[arg(long, env = "PORTCULLIS_MAX_BODY_BYTES", default_value_t = 10 * 1024 * 1024)]
    max_body_bytes: u64,
    /// How many verified JWTs the process-wide token cache holds (one cache for all routes and
    /// config versions).
    #[arg(long, env = "PORTCULLIS_TOKEN_CACHE_SIZE", default_value_t = 100_000)]
    token_cache_size: usize,
    /// How many token introspection answers (opaque tokens) the process-wide cache holds.
    #[arg(long, env = "PORTCULLIS_INTROSPECTION_CACHE_SIZE", default_value_t = 100_000)]
    introspection_cache_size: usize,
    /// PEM bundle of the CA(s) that https introspection endpoints must chain to (a private IdP
    /// CA). Default: the system roots ($SSL_CERT_FILE or /etc/ssl/certs/ca-certificates.crt).
    #[arg(long, env = "PORTCULLIS_INTROSPECTION_CA_FILE", value_name = "FILE")]
    introspection_ca_file: Option<std::path::PathBuf>,
    /// How long a client may take to send its request headers.
    #[arg(long, env = "PORTCULLIS_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = duration)]
    header_read_timeout: Duration,
    /// How long an idle HTTP/1 client connection is kept open waiting for its next request.
    #[arg(long, env = "PORTCULLIS_KEEP_ALIVE_TIMEOUT", default_value = "60s", value_parser = duration)]
    keep_alive_timeout: Duration,
    /// How long in-flight requests may finish after SIGTERM.
    #[arg(long, env = "PORTCULLIS_DRAIN_TIMEOUT", default_value = "30s", value_parser = duration)]
    drain_timeout: Duration,
    #[arg(long, env = "PORTCULLIS_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn default_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "proxy".to_owned());
    format!("{host}-{}", std::process::id())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    portcullis_shared::process::init_tracing(matches!(args.log_format, LogFormat::Json));
    let workers = args.worker_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // One worker: a current-thread runtime, with no cross-thread wake-ups to pay for.
    let runtime = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()
    }
    .context("building the tokio runtime")?;
    let result = runtime.block_on(run(args, workers));
    // Do not let a stuck blocking task (a DNS lookup) hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn run(args: Args, workers: usize) -> anyhow::Result<()> {
    tls::install_crypto_provider();
    if args.tls_cert.len() != args.tls_key.len() {
        bail!(
            "--tls-cert and --tls-key must come in pairs ({} certificates, {} keys)",
            args.tls_cert.len(),
            args.tls_key.len()
        );
    }
    let pairs: Vec<CertPair> =
        args.tls_cert.iter().zip(&args.tls_key).map(|(c, k)| CertPair { cert: c.clone(), key: k.clone() }).collect();
    let acceptor =
        if pairs.is_empty() { None } else { Some(tls::acceptor(&pairs).context("loading TLS certificates")?) };
    let token = match &args.bootstrap_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the bootstrap token from {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => {
            warn!("no --bootstrap-token-file: the control plane may refuse this proxy");
            None
        }
    };
    if let Some(ca) = &args.introspection_ca_file {
        portcullis_shared::http_client::tls_client_config(Some(ca), &[b"http/1.1"])
            .context("--introspection-ca-file")?;
    }
    let proxy_id = args.id.clone().unwrap_or_else(default_id);

    let shutdown = CancellationToken::new();
    tokio::spawn(portcullis_shared::process::shutdown_signal(shutdown.clone()));
    let snapshots = snapshot::new_handle();
    let metrics = Arc::new(Metrics::new());
    let (kid_reporter, kid_reports) = kid_reports::channel(Arc::clone(&metrics), kid_reports::DEFAULT_INTERVAL);

    let mut client = ConfigClient::new(
        ConfigClientOptions {
            endpoints: args.control_plane.clone(),
            proxy_id: proxy_id.clone(),
            zone: args.zone.clone(),
            token,
            cache_dir: Some(args.cache_dir.clone()),
        },
        snapshots.clone(),
    )
    .with_kid_reports(kid_reports);
    match client.load_last_known_good() {
        Some(version) => info!(config.version = version, "serving the last-known-good configuration"),
        None => info!("no last-known-good configuration; not ready until the control plane sends one"),
    }
    let config_stream = tokio::spawn(client.run(shutdown.clone()));

    let settings = Settings {
        trusted_proxies: args.trusted_proxies.clone(),
        max_body_bytes: args.max_body_bytes,
        token_cache_size: args.token_cache_size,
        introspection_cache_size: args.introspection_cache_size,
        introspection_ca_file: args.introspection_ca_file.clone(),
        ..Settings::default()
    };
    let pipeline =
        Arc::new(Pipeline::new(snapshots.clone(), settings, Arc::clone(&metrics)).with_kid_reports(kid_reporter));
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let admin_listener = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding the admin listener to {}", args.admin_listen))?;

    // The admin server outlives the drain (readyz says 503 meanwhile); it stops at exit.
    let admin_stop = CancellationToken::new();
    let admin = tokio::spawn(admin_http::serve(
        admin_listener,
        AdminState { snapshots, metrics, shutdown: shutdown.clone() },
        admin_stop.clone(),
    ));
    info!(
        listen = %args.listen,
        admin_listen = %args.admin_listen,
        proxy.id = %proxy_id,
        tls = acceptor.is_some(),
        worker_threads = workers,
        "proxy started"
    );
    let options = ServerOptions {
        max_header_bytes: args.max_header_bytes,
        header_read_timeout: args.header_read_timeout,
        keep_alive_timeout: args.keep_alive_timeout,
        drain_timeout: args.drain_timeout,
    };
    Server::new(options, pipeline, acceptor).serve(listener, shutdown.clone()).await;
    shutdown.cancel();
    admin_stop.cancel();
    let _ = admin.await;
    let _ = tokio::time::timeout(Duration::from_secs(2), config_stream).await;
    info!("stopped");
    Ok(())
}
