//! Test support for the end-to-end suites in `tests/tests/`: real processes and servers on
//! ephemeral loopback ports (etcd from Debian's `etcd-server`, control planes, `portctl`).

pub mod auth_server;
pub mod control_plane;
pub mod etcd;
pub mod resources;
pub mod sandbox;
pub mod tls;
pub mod upstream;

pub use control_plane::bin_path;
