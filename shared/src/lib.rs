//! The shared vocabulary of Portcullis: the validated domain model of every configuration
//! resource, its conversion from protobuf (with errors that name the resource and the field),
//! whole-configuration checks (references, conflicts), and the YAML document format of `portctl`.
//!
//! This crate does no I/O and holds no global state: it is used by the control plane to reject
//! bad input, by proxies to compile snapshots, and by tools to read operators' files. The
//! opt-in features are for binaries only: `process` (logging and the shutdown signal) and
//! `client` (outbound TLS and an http/https connector, [`http_client`]).

pub mod claims;
pub mod config;
pub mod document;
pub mod duration;
#[cfg(feature = "client")]
pub mod http_client;
pub mod jwt;
pub mod kind;
pub mod model;
pub mod path;
#[cfg(feature = "process")]
pub mod process;
pub mod validate;

pub use kind::Kind;
pub use validate::{Violation, Violations};
