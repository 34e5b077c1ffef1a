//! A whole Portcullis deployment on one machine, for end-to-end scenarios: a real etcd (or the
//! embedded store), the control plane as a real process (`portcullis-control-plane`, with a
//! bootstrap token file), N proxies as real processes (`portcullis-proxy`, each with its own
//! last-known-good cache dir and one or two worker threads) and a [`RecordingUpstream`] — all on
//! ephemeral loopback ports, with every file in one temp dir. Scenarios drive it through the
//! admin API ([`Sandbox::apply`], [`Sandbox::wait_all_acked`]), real HTTP to the proxies
//! ([`Sandbox::get`], [`raw_request`]) and process control ([`Sandbox::kill_control_plane`],
//! [`Sandbox::stop_proxy`] with SIGTERM, [`Sandbox::restart_proxy`] on the same cache dir).
//!
//! Each process's output goes to `<name>.log` in the temp dir; a wait that times out panics with
//! the tail of the logs that explain it. Waiting is bounded polling, never a bare sleep.
//! Everything is killed when the sandbox is dropped.
//!
//! What it must not do: touch anything outside its temp dir and its own processes, or pick
//! fixed ports.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use portcullis_control_plane::admin::MAX_MESSAGE_BYTES;
use portcullis_proto::admin::v1 as api;
use portcullis_proto::admin::v1::admin_service_client::AdminServiceClient;
use portcullis_proto::config::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

use crate::bin_path;
use crate::etcd::EtcdServer;
use crate::upstream::RecordingUpstream;

/// How long a process may take to listen, and a configuration to reach every proxy.
const WAIT: Duration = Duration::from_secs(20);
/// How often a condition is polled while waiting.
const POLL: Duration = Duration::from_millis(20);
/// One HTTP request or admin call, before it counts as hung.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of a log shown when a wait fails.
const LOG_TAIL: usize = 25;

/// Where the control plane keeps the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxStore {
    /// A real etcd started for this sandbox (the production set-up).
    Etcd,
    /// The embedded store in the sandbox's temp dir (no etcd needed).
    Embedded,
}

#[derive(Clone, Debug)]
pub struct SandboxOptions {
    pub proxies: usize,
    /// `--worker-threads` of each proxy.
    pub worker_threads: usize,
    pub store: SandboxStore,
    /// `--drain-timeout` of each proxy.
    pub drain_timeout: Duration,
    /// The control plane's `--key-refetch-min-interval` (its default when `None`).
    pub key_refetch_min_interval: Option<Duration>,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            proxies: 1,
            worker_threads: 1,
            store: SandboxStore::Etcd,
            drain_timeout: Duration::from_secs(10),
            key_refetch_min_interval: None,
        }
    }
}

/// A started child process and the log its output goes to.
#[derive(Debug)]
struct Process {
    name: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Process {
    /// Not started yet; its log will be `<dir>/<name>.log`.
    fn idle(name: &str, dir: &Path) -> Process {
        Process { name: name.to_owned(), log: dir.join(format!("{name}.log")), child: None }
    }

    fn spawn(name: &str, log: PathBuf, mut command: Command) -> Process {
        let mut file = OpenOptions::new().create(true).append(true).open(&log).expect("open log file");
        // Restarts append to the same log: mark where each run starts.
        let _ = writeln!(file, "==== sandbox: starting {name}: {command:?}");
        let child = command
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({command:?}): {e}"));
        Process { name: name.to_owned(), log, child: Some(child) }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The exit status if the process has exited (it is then reaped and forgotten).
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().expect("try_wait")?;
        self.child = None;
        Some(status)
    }

    /// SIGKILL, and reap it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (through `/bin/kill`: no signal-sending dependency), then waits up to `timeout`
    /// for the exit.
    async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let pid = self.pid().unwrap_or_else(|| panic!("{} is not running", self.name));
        let sent = tokio::process::Command::new("/bin/kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .expect("run /bin/kill");
        assert!(sent.success(), "kill -TERM {pid} ({}): {sent}", self.name);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            if Instant::now() > deadline {
                let tail = self.tail();
                self.kill();
                panic!("{} did not exit within {timeout:?} of SIGTERM\n{tail}", self.name);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn tail(&self) -> String {
        log_tail(&self.name, &self.log)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last [`LOG_TAIL`] lines of `path`, headed by `name`.
pub fn log_tail(name: &str, path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n");
    format!("---- {name} ({}), last lines:\n{tail}\n", path.display())
}

#[derive(Debug)]
struct ProxySlot {
    id: String,
    listen: SocketAddr,
    admin: SocketAddr,
    cache_dir: PathBuf,
    process: Process,
}

/// A response read whole.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {} {}", self.status, self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub struct Sandbox {
    options: SandboxOptions,
    token_file: PathBuf,
    etcd: Option<EtcdServer>,
    control_plane: Process,
    cp_admin: SocketAddr,
    cp_proxies: SocketAddr,
    proxies: Vec<ProxySlot>,
    upstream: RecordingUpstream,
    http: Client<HttpConnector, Full<Bytes>>,
    // Last: removed once every process above is gone.
    dir: tempfile::TempDir,
}

impl Sandbox {
    /// etcd, the control plane and `proxies` proxies (one worker thread each), and an upstream.
    /// The proxies are running but hold no configuration yet: apply one, then
    /// [`Sandbox::wait_all_acked`].
    pub async fn start(proxies: usize) -> Sandbox {
        Self::with(SandboxOptions { proxies, ..SandboxOptions::default() }).await
    }

    pub async fn with(options: SandboxOptions) -> Sandbox {
        let dir = tempfile::Builder::new().prefix("portcullis-sandbox-").tempdir().expect("temp dir");
        let token_file = dir.path().join("bootstrap-token");
        std::fs::write(&token_file, format!("{}\n", random_token())).expect("write the bootstrap token");
        let etcd = match options.store {
            SandboxStore::Etcd => Some(EtcdServer::start().await.expect("start etcd")),
            SandboxStore::Embedded => None,
        };
        let upstream = RecordingUpstream::start().await;
        let http = Client::builder(TokioExecutor::new()).build_http();
        let mut sandbox = Sandbox {
            token_file,
            etcd,
            control_plane: Process::idle("control-plane", dir.path()),
            cp_admin: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            cp_proxies: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            proxies: Vec::new(),
            upstream,
            http,
            dir,
            options,
        };
        sandbox.launch_control_plane(true).await;
        for i in 0..sandbox.options.proxies {
            let id = format!("sandbox-proxy-{i}");
            let cache_dir = sandbox.dir.path().join(&id).join("cache");
            std::fs::create_dir_all(&cache_dir).expect("create the cache dir");
            let process = Process::idle(&id, sandbox.dir.path());
            let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
            sandbox.proxies.push(ProxySlot { id, listen: any, admin: any, cache_dir, process });
            sandbox.launch_proxy(i, true).await;
        }
        sandbox
    }

    // ------------------------------------------------------------------ addresses and clients

    /// The sandbox's temp dir (logs, caches, token, embedded store).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The control plane's admin API, `http://127.0.0.1:PORT`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.cp_admin)
    }

    /// Where proxies open their config streams.
    pub fn control_plane_proxy_url(&self) -> String {
        format!("http://{}", self.cp_proxies)
    }

    pub fn bootstrap_token_file(&self) -> &Path {
        &self.token_file
    }

    pub fn etcd(&self) -> Option<&EtcdServer> {
        self.etcd.as_ref()
    }

    pub async fn admin_client(&self) -> AdminServiceClient<Channel> {
        self.try_admin_client().await.unwrap_or_else(|e| panic!("connect to the admin API: {e}\n{}", self.cp_tail()))
    }

    async fn try_admin_client(&self) -> Result<AdminServiceClient<Channel>, tonic::transport::Error> {
        let endpoint = Channel::from_shared(self.admin_url()).expect("admin url").connect_timeout(REQUEST_TIMEOUT);
        Ok(AdminServiceClient::new(endpoint.connect().await?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    pub fn proxy_count(&self) -> usize {
        self.proxies.len()
    }

    /// `http://127.0.0.1:PORT` of proxy `i`'s listener.
    pub fn proxy_url(&self, i: usize) -> String {
        format!("http://{}", self.proxies[i].listen)
    }

    pub fn proxy_addr(&self, i: usize) -> SocketAddr {
        self.proxies[i].listen
    }

    /// `http://127.0.0.1:PORT` of proxy `i`'s admin listener (`/readyz`, `/config`, `/metrics`).
    pub fn proxy_admin_url(&self, i: usize) -> String {
        format!("http://{}", self.proxies[i].admin)
    }

    /// The `--id` of proxy `i`, as `ListProxies` reports it.
    pub fn proxy_id(&self, i: usize) -> &str {
        &self.proxies[i].id
    }

    pub fn proxy_pid(&self, i: usize) -> Option<u32> {
        self.proxies[i].process.pid()
    }

    pub fn control_plane_pid(&self) -> Option<u32> {
        self.control_plane.pid()
    }

    pub fn proxy_cache_dir(&self, i: usize) -> &Path {
        &self.proxies[i].cache_dir
    }

    pub fn upstream(&self) -> &RecordingUpstream {
        &self.upstream
    }

    /// The tail of proxy `i`'s log.
    pub fn proxy_log_tail(&self, i: usize) -> String {
        self.proxies[i].process.tail()
    }

    fn cp_tail(&self) -> String {
        self.control_plane.tail()
    }

    // ------------------------------------------------------------------ configuration

    /// Applies `resources` in one transaction; returns the new config version.
    pub async fn apply(&self, resources: Vec<pb::Resource>) -> i64 {
        let request = api::ApplyRequest { resources, ..Default::default() };
        match self.admin_client().await.apply(request).await {
            Ok(r) => r.into_inner().revision,
            Err(status) => panic!("apply: {status:?}\n{}", self.cp_tail()),
        }
    }

    /// Deletes one resource; returns the new config version.
    pub async fn delete(&self, kind: api::Kind, name: &str) -> i64 {
        let request = api::DeleteRequest { kind: kind as i32, name: name.into(), expected_revision: 0 };
        match self.admin_client().await.delete(request).await {
            Ok(r) => r.into_inner().revision,
            Err(status) => panic!("delete {kind:?} {name}: {status:?}\n{}", self.cp_tail()),
        }
    }

    pub async fn list_proxies(&self) -> api::ListProxiesResponse {
        match self.admin_client().await.list_proxies(api::ListProxiesRequest {}).await {
            Ok(r) => r.into_inner(),
            Err(status) => panic!("list proxies: {status:?}\n{}", self.cp_tail()),
        }
    }

    /// Waits until every running proxy is connected to the control plane, has acknowledged
    /// exactly `version` with no lag, serves it (`/config`) and is ready (`/readyz` 200).
    /// Returns the `ListProxies` answer that showed it. Panics after a bounded wait with the
    /// last answer and the logs of the control plane and of the proxies not there yet.
    pub async fn wait_all_acked(&self, version: i64) -> api::ListProxiesResponse {
        let deadline = Instant::now() + WAIT;
        let mut last = None;
        loop {
            let mut behind = Vec::new();
            if let Ok(list) = self.try_list_proxies().await {
                for (i, slot) in self.proxies.iter().enumerate().filter(|(_, s)| s.process.is_running()) {
                    let acked = list
                        .proxies
                        .iter()
                        .any(|p| p.id == slot.id && p.connected && p.acked_version == version && p.lag == 0);
                    if !acked || self.proxy_version(i).await != Some(version) || !self.is_ready(i).await {
                        behind.push(i);
                    }
                }
                if behind.is_empty() {
                    return list;
                }
                last = Some(list);
            } else {
                behind.extend((0..self.proxies.len()).filter(|i| self.proxies[*i].process.is_running()));
            }
            if Instant::now() > deadline {
                let mut logs = self.cp_tail();
                for i in behind.iter().copied() {
                    logs.push_str(&self.proxy_log_tail(i));
                }
                let ids: Vec<&str> = behind.iter().map(|i| self.proxy_id(*i)).collect();
                panic!(
                    "proxies {ids:?} did not acknowledge version {version} within {WAIT:?}; last ListProxies: {last:#?}\n{logs}"
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Whether the control plane's admin API answers.
    pub async fn admin_reachable(&self) -> bool {
        self.try_list_proxies().await.is_ok()
    }

    async fn try_list_proxies(&self) -> Result<api::ListProxiesResponse, String> {
        let mut client = self.try_admin_client().await.map_err(|e| e.to_string())?;
        let call = client.list_proxies(api::ListProxiesRequest {});
        match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(status.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    // ------------------------------------------------------------------ proxy state over HTTP

    /// Proxy `i`'s admin `/config` (`{"ready","version","routes","resources"}`), `None` when
    /// it is unreachable.
    pub async fn proxy_config(&self, i: usize) -> Option<serde_json::Value> {
        let url = format!("{}/config", self.proxy_admin_url(i));
        let response = self.try_get(&url).await.ok()?;
        serde_json::from_slice(&response.body).ok()
    }

    /// The config version proxy `i` serves, `None` when it is unreachable or holds no
    /// configuration.
    pub async fn proxy_version(&self, i: usize) -> Option<i64> {
        let config = self.proxy_config(i).await?;
        config["ready"].as_bool().filter(|r| *r)?;
        config["version"].as_i64()
    }

    /// Whether proxy `i` answers `/readyz` with 200.
    pub async fn is_ready(&self, i: usize) -> bool {
        let url = format!("{}/readyz", self.proxy_admin_url(i));
        matches!(self.try_get(&url).await, Ok(r) if r.status == StatusCode::OK)
    }

    /// Waits until proxy `i` is ready (from the control plane or its last-known-good cache).
    pub async fn wait_ready(&self, i: usize) {
        let deadline = Instant::now() + WAIT;
        while !self.is_ready(i).await {
            if Instant::now() > deadline {
                panic!("{} not ready within {WAIT:?}\n{}", self.proxy_id(i), self.proxy_log_tail(i));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    // ------------------------------------------------------------------ HTTP to the proxies

    /// `GET path` through proxy `i`; panics if no response arrives.
    pub async fn get(&self, i: usize, path: &str) -> HttpResponse {
        let url = format!("{}{path}", self.proxy_url(i));
        self.try_get(&url).await.unwrap_or_else(|e| panic!("GET {url}: {e}\n{}", self.proxy_log_tail(i)))
    }

    /// Sends `request` (an absolute URL) on the sandbox's pooled keep-alive client.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<HttpResponse, String> {
        let call = async {
            let response = self.http.request(request).await.map_err(|e| format!("{e:?}"))?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|e| format!("reading the body: {e}"))?.to_bytes();
            Ok(HttpResponse { status: parts.status, headers: parts.headers, body })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, call)
            .await
            .map_err(|_| format!("no response within {REQUEST_TIMEOUT:?}"))?
    }

    async fn try_get(&self, url: &str) -> Result<HttpResponse, String> {
        self.send(Request::get(url).body(Full::default()).expect("request")).await
    }

    // ------------------------------------------------------------------ process control

    /// SIGKILL to the control plane (a crash), reaped.
    pub fn kill_control_plane(&mut self) {
        assert!(self.control_plane.is_running(), "the control plane is not running");
        self.control_plane.kill();
    }

    /// Starts the control plane again, on the same ports, store and token, and waits until its
    /// admin API answers.
    pub async fn start_control_plane(&mut self) {
        assert!(!self.control_plane.is_running(), "the control plane is already running");
        self.launch_control_plane(false).await;
    }

    /// SIGTERM to proxy `i`; waits for it to exit (within its drain timeout) and returns how.
    pub async fn stop_proxy(&mut self, i: usize) -> ExitStatus {
        let timeout = self.options.drain_timeout + Duration::from_secs(5);
        self.proxies[i].process.terminate(timeout).await
    }

    /// Starts proxy `i` again with the same id, ports and cache dir (stopping it first with
    /// SIGTERM if it runs). It is listening when this returns; whether it is ready depends on
    /// its cache and the control plane ([`Sandbox::wait_ready`]).
    pub async fn restart_proxy(&mut self, i: usize) {
        if self.proxies[i].process.is_running() {
            self.stop_proxy(i).await;
        }
        self.launch_proxy(i, false).await;
    }

    /// Spawns the control plane and waits for its admin API. On the first start, ports that
    /// turn out to be taken (the process exits) are replaced by fresh ones; on a restart the
    /// ports must stay, so a start that fails is retried on them.
    async fn launch_control_plane(&mut self, first: bool) {
        let mut failures = String::new();
        for _attempt in 0..3 {
            if first {
                let [admin, proxies] = free_ports::<2>();
                (self.cp_admin, self.cp_proxies) = (admin, proxies);
            }
            let mut command = Command::new(bin_path("portcullis-control-plane"));
            command
                .arg("--admin-listen")
                .arg(self.cp_admin.to_string())
                .arg("--proxy-listen")
                .arg(self.cp_proxies.to_string())
                .arg("--bootstrap-token-file")
                .arg(&self.token_file);
            if let Some(interval) = self.options.key_refetch_min_interval {
                command.arg("--key-refetch-min-interval").arg(format!("{}ms", interval.as_millis()));
            }
            match &self.etcd {
                Some(etcd) => command.args(["--store", "etcd", "--etcd-endpoints", &etcd.endpoint()]),
                None => command.args(["--store", "embedded"]).arg("--data-dir").arg(self.dir.path().join("cp-data")),
            };
            let log = self.control_plane.log.clone();
            self.control_plane = Process::spawn("control-plane", log, command);
            let deadline = Instant::now() + WAIT;
            loop {
                if let Some(status) = self.control_plane.exited() {
                    failures.push_str(&format!("exited during start-up: {status}\n"));
                    break;
                }
                if self.try_list_proxies().await.is_ok() {
                    return;
                }
                if Instant::now() > deadline {
                    self.control_plane.kill();
                    failures.push_str(&format!("admin API not answering after {WAIT:?}\n"));
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
        }
        panic!("the control plane did not start:\n{failures}{}", self.cp_tail());
    }

    /// Spawns proxy `i` and waits until it listens (`/healthz`; the client listener is bound
    /// before the admin one). Port handling as in [`Sandbox::launch_control_plane`].
    async fn launch_proxy(&mut self, i: usize, first: bool) {
        let mut failures = String::new();
        for _attempt in 0..3 {
            if first {
                let [listen, admin] = free_ports::<2>();
                (self.proxies[i].listen, self.proxies[i].admin) = (listen, admin);
            }
            let slot = &self.proxies[i];
            let mut command = Command::new(bin_path("portcullis-proxy"));
            command
                .arg("--id")
                .arg(&slot.id)
                .arg("--listen")
                .arg(slot.listen.to_string())
                .arg("--admin-listen")
                .arg(slot.admin.to_string())
                .arg("--control-plane")
                .arg(self.control_plane_proxy_url())
                .arg("--bootstrap-token-file")
                .arg(&self.token_file)
                .arg("--cache-dir")
                .arg(&slot.cache_dir)
                .arg("--worker-threads")
                .arg(self.options.worker_threads.to_string())
                .arg("--drain-timeout")
                .arg(format!("{}ms", self.options.drain_timeout.as_millis()));
            let (name, log) = (slot.id.clone(), slot.process.log.clone());
            self.proxies[i].process = Process::spawn(&name, log, command);
            let healthz = format!("{}/healthz", self.proxy_admin_url(i));
            let deadline = Instant::now() + WAIT;
            loop {
                if let Some(status) = self.proxies[i].process.exited() {
                    failures.push_str(&format!("exited during start-up: {status}\n"));
                    break;
                }
                if matches!(self.try_get(&healthz).await, Ok(r) if r.status == StatusCode::OK) {
                    return;
                }
                if Instant::now() > deadline {
                    self.proxies[i].process.kill();
                    failures.push_str(&format!("/healthz not answering after {WAIT:?}\n"));
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
        }
        panic!("{} did not start:\n{failures}{}", self.proxy_id(i), self.proxy_log_tail(i));
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Proxies first, so that none logs a reconnect storm into a dying control plane.
        for slot in &mut self.proxies {
            slot.process.kill();
        }
        self.control_plane.kill();
        self.upstream.stop();
    }
}

/// Writes `request` on a fresh connection to `addr` and reads until the server closes it (or
/// 5 s pass): for requests an HTTP client would normalize or refuse to send. End the request
/// with `Connection: close`.
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.write_all(request).await.expect("write the request");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// `N` distinct loopback ports free a moment ago (bound together, then released).
fn free_ports<const N: usize>() -> [SocketAddr; N] {
    let listeners: Vec<TcpListener> =
        (0..N).map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port")).collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("local addr"))
}

fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    format!("sandbox-token-{:016x}", h.finish())
}
