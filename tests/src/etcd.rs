//! A real single-member etcd for tests: started from `/usr/bin/etcd` (Debian's etcd-server) or
//! `$ETCD_BIN`, on free loopback ports, with a fresh data directory, fast elections and the
//! raised transaction limits our deployment uses. It waits until `/health` says so, can be
//! stopped and started again on the same ports and data (for restart tests), and is killed and
//! its directory removed on drop. etcd's own log goes to `etcd.log` in that directory.
//!
//! It must not touch anything outside its temp directory and its own process.

use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEFAULT_BIN: &str = "/usr/bin/etcd";
const NAME: &str = "portcullis-test";
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How often `/health` is asked while waiting: polling, not synchronisation.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

pub struct EtcdServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd and waits until it is healthy. Retries on fresh ports if the ones picked
    /// were taken in between.
    pub async fn start() -> anyhow::Result<EtcdServer> {
        let bin = std::env::var_os("ETCD_BIN").map_or_else(|| PathBuf::from(DEFAULT_BIN), PathBuf::from);
        let mut last_error = None;
        for _ in 0..3 {
            let [client_port, peer_port] = free_ports()?;
            let dir = tempfile::Builder::new().prefix("portcullis-etcd-").tempdir()?;
            let mut server = EtcdServer { bin: bin.clone(), dir, client_port, peer_port, child: None };
            match server.start_again().await {
                Ok(()) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
    }

    /// The client URL, like `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Kills etcd (SIGKILL: a crash, which etcd's WAL survives) and waits for it to exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing etcd")?;
            tokio::task::spawn_blocking(move || child.wait()).await?.context("waiting for etcd")?;
        }
        Ok(())
    }

    /// Starts etcd again on the same ports and data directory, and waits until it is healthy.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("etcd is already running");
        }
        let log = self.log_file()?;
        let client_url = self.endpoint();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(&self.bin)
            .arg("--name")
            .arg(NAME)
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .arg("--initial-cluster")
            .arg(format!("{NAME}={peer_url}"))
            .args(["--heartbeat-interval=10", "--election-timeout=100"])
            .args(["--logger", "zap", "--log-level", "error"])
            .args(["--max-txn-ops=100000", "--max-request-bytes=67108864"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        if let Err(e) = self.wait_healthy().await {
            let _ = self.stop().await;
            let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            bail!("{e:#}\netcd log (last lines):\n{tail}");
        }
        Ok(())
    }

    fn log_file(&self) -> anyhow::Result<File> {
        Ok(OpenOptions::new().create(true).append(true).open(self.dir.path().join("etcd.log"))?)
    }

    async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port));
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("etcd exited during start-up: {status}");
            }
            if matches!(tokio::time::timeout(Duration::from_secs(1), health(addr)).await, Ok(Ok(true))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd on {addr} not healthy after {READY_TIMEOUT:?}");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `GET /health` over a raw HTTP/1.0 connection; true once etcd reports `"health":"true"`.
async fn health(addr: SocketAddr) -> std::io::Result<bool> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response);
    Ok(response.starts_with("HTTP/1.") && response.contains("\"health\":\"true\""))
}

/// Two distinct free loopback ports (bound together, then released for etcd).
fn free_ports() -> anyhow::Result<[u16; 2]> {
    let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let b = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok([a.local_addr()?.port(), b.local_addr()?.port()])
}
