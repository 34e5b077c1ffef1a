//! The Portcullis control plane: stores the configuration (etcd, or an embedded store for the
//! all-in-one default), validates every change against the whole configuration before it is
//! stored, serves the operators' admin gRPC API and (from the data-plane issue) streams versioned
//! snapshots to proxies.
//!
//! It must not sit on any request path: proxies keep serving without it.

pub mod admin;
pub mod discovery;
pub mod keys;
pub mod state;
pub mod store;
