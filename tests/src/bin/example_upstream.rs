//! `portcullis-example-upstream`: the `orders` service of the README's quick start. It answers
//! every request with 200 and a JSON echo of what it received —
//! `{"upstream":"orders","method":..,"path":..,"headers":{..}}` — so that a `curl` through the
//! proxy shows what the proxy forwarded (normalized path, `X-Forwarded-*`, `X-Request-Id`).
//! It keeps nothing: requests are counted, not recorded. SIGINT/SIGTERM stop it.

use std::net::SocketAddr;
use std::process::ExitCode;

use portcullis_tests::upstream::{RecordingUpstream, UpstreamOptions};

const USAGE: &str = "usage: portcullis-example-upstream [--listen ADDR] [--name NAME]
  --listen ADDR  where to listen (default 127.0.0.1:9000)
  --name NAME    the \"upstream\" field of the echo (default orders)";

struct Args {
    listen: SocketAddr,
    name: String,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut parsed = Args { listen: SocketAddr::from(([127, 0, 0, 1], 9000)), name: "orders".into() };
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg, None),
        };
        let mut value = || inline.clone().or_else(|| args.next()).ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => {
                let v = value()?;
                parsed.listen = v.parse().map_err(|e| format!("--listen {v}: {e}"))?;
            }
            "--name" => parsed.name = value()?,
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Some(parsed))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("portcullis-example-upstream: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let options = UpstreamOptions { name: args.name.clone(), record: false, ..UpstreamOptions::default() };
    let upstream = match RecordingUpstream::bind(args.listen, options).await {
        Ok(u) => u,
        Err(e) => {
            eprintln!("portcullis-example-upstream: binding {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    eprintln!("portcullis-example-upstream: {} listening on http://{}", args.name, upstream.addr());
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("portcullis-example-upstream: installing the SIGTERM handler: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    upstream.stop();
    eprintln!("portcullis-example-upstream: stopped after {} requests", upstream.request_count());
    ExitCode::SUCCESS
}
