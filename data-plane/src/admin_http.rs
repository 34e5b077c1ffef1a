//! The proxy's admin HTTP server (HTTP/1 only, meant for localhost or a private network):
//! `/healthz` (200 while the process runs), `/readyz` (200 once a snapshot is applied and until
//! shutdown starts, else 503), `/metrics` (Prometheus text) and `/config` (JSON: version, route
//! and resource counts).
//!
//! What it must not do: expose configuration contents, keys or tokens, or share anything with
//! the request path beyond reading the snapshot handle and the metrics registry.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::snapshot::SnapshotHandle;

/// What the admin endpoints read.
#[derive(Clone, Debug)]
pub struct AdminState {
    pub snapshots: SnapshotHandle,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the proxy starts draining: `/readyz` turns 503 so balancers stop sending.
    pub shutdown: CancellationToken,
}

/// Answers one admin request.
pub fn respond(state: &AdminState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if state.shutdown.is_cancelled() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if state.snapshots.load().is_some() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "no configuration yet\n")
            }
        }
        "/metrics" => {
            let snapshot = state.snapshots.load_full();
            let body = state.metrics.render(snapshot.as_deref());
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            r
        }
        "/config" => {
            let snapshot = state.snapshots.load_full();
            let body = match snapshot.as_deref() {
                Some(s) => serde_json::json!({
                    "ready": true,
                    "version": s.version,
                    "routes": s.routes.len(),
                    "resources": s.resource_count,
                }),
                None => serde_json::json!({ "ready": false, "version": 0, "routes": 0, "resources": 0 }),
            };
            let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// Serves the admin endpoints until `stop` fires. Admin connections are not drained: they are
/// short, and a scrape cut by the exit is simply retried.
pub async fn serve(listener: TcpListener, state: AdminState, stop: CancellationToken) {
    let state = Arc::new(state);
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = respond(&state, request.method(), request.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                debug!(client.addr = %peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{ResourceMap, compile, new_handle};

    fn check(state: &AdminState, path: &str, status: u16, contains: &str) {
        let r = respond(state, &Method::GET, path);
        assert_eq!(r.status().as_u16(), status, "{path}");
        let body = futures_body(r);
        assert!(body.contains(contains), "{path}: {body}");
    }

    fn futures_body(r: Response<Full<Bytes>>) -> String {
        use http_body_util::BodyExt;
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let bytes = rt.block_on(async { r.into_body().collect().await.unwrap().to_bytes() });
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn endpoints_follow_readiness_and_shutdown() {
        let state = AdminState {
            snapshots: new_handle(),
            metrics: Arc::new(Metrics::new()),
            shutdown: CancellationToken::new(),
        };
        check(&state, "/healthz", 200, "ok");
        check(&state, "/readyz", 503, "no configuration");
        check(&state, "/config", 200, r#""ready":false"#);
        check(&state, "/metrics", 200, "portcullis_proxy_config_version 0");
        check(&state, "/nope", 404, "not found");
        assert_eq!(respond(&state, &Method::POST, "/healthz").status(), StatusCode::METHOD_NOT_ALLOWED);

        state.snapshots.store(Some(Arc::new(compile(42, &ResourceMap::new()).unwrap())));
        check(&state, "/readyz", 200, "ready");
        check(&state, "/config", 200, r#""version":42"#);
        check(&state, "/metrics", 200, "portcullis_proxy_config_version 42");

        state.shutdown.cancel();
        check(&state, "/readyz", 503, "draining");
        check(&state, "/healthz", 200, "ok");
    }
}
