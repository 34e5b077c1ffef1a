//! Generated protobuf and gRPC types, one module per versioned package. Nothing hand-written
//! lives here: conversions to the validated domain model are in `portcullis-shared`.
#![allow(clippy::all, clippy::pedantic)]

pub mod config {
    pub mod v1 {
        tonic::include_proto!("portcullis.config.v1");
    }
}

pub mod admin {
    pub mod v1 {
        tonic::include_proto!("portcullis.admin.v1");
    }
}

pub mod discovery {
    pub mod v1 {
        tonic::include_proto!("portcullis.discovery.v1");
    }
}

/// Encoded descriptors of every package, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/portcullis_descriptor.bin"));
