//! The Portcullis proxy: receives versioned configuration from the control plane, compiles it
//! off the request path, and enforces it on every request.

pub mod admin_http;
pub mod config_client;
pub mod cow;
pub mod denial;
pub mod forward;
pub mod http1;
pub mod introspect;
pub mod kid_reports;
pub mod lkg;
pub mod metrics;
pub mod pipeline;
pub mod router;
pub mod server;
pub mod snapshot;
pub mod tls;
pub mod upstream;
