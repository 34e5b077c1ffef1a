//! The admin gRPC API (`portcullis.admin.v1.AdminService`) and the server that hosts it with
//! gRPC health and reflection (v1 and v1alpha, so stock `grpcurl` works).
//!
//! **API boundary:** this is the only module that turns [`StateError`] into `tonic::Status`
//! (in [`status_of`]); invalid input comes back as `INVALID_ARGUMENT` whose details are a
//! `ValidationErrors` message naming kind, name and field of each problem.

use std::net::SocketAddr;
use std::sync::Arc;

use portcullis_proto::admin::v1 as api;
use portcullis_proto::admin::v1::admin_service_server::{AdminService, AdminServiceServer};
use portcullis_proto::config::v1 as pb;
use portcullis_shared::Kind;
use prost::Message;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

use crate::discovery::ProxyRegistry;
use crate::state::{Action, Change, ConfigState, StateError};
use crate::store::StoreError;

/// Admin requests can carry a whole configuration (`Apply` of thousands of resources).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

pub struct Admin {
    state: Arc<ConfigState>,
    /// The proxies connected to this replica's discovery service (`ListProxies`).
    registry: Arc<ProxyRegistry>,
}

impl Admin {
    pub fn new(state: Arc<ConfigState>, registry: Arc<ProxyRegistry>) -> Admin {
        Admin { state, registry }
    }
}

/// The one mapping from state errors to gRPC statuses.
pub fn status_of(e: StateError) -> Status {
    match e {
        StateError::Invalid(v) => {
            let details = api::ValidationErrors {
                violations: v
                    .0
                    .iter()
                    .map(|x| api::FieldViolation {
                        kind: x.kind.to_proto() as i32,
                        name: x.name.clone(),
                        field: x.field.clone(),
                        description: x.message.clone(),
                    })
                    .collect(),
            };
            Status::with_details(Code::InvalidArgument, v.to_string(), details.encode_to_vec().into())
        }
        e @ StateError::Conflict { .. } => Status::aborted(e.to_string()),
        e @ StateError::NotFound { .. } => Status::not_found(e.to_string()),
        StateError::Store(StoreError::TooLarge(m)) => Status::resource_exhausted(format!("transaction too large: {m}")),
        StateError::Store(e) => Status::unavailable(e.to_string()),
        e @ StateError::Contended => Status::aborted(e.to_string()),
        e @ StateError::Internal(_) => {
            tracing::error!(error = %e, "admin write failed");
            Status::internal("internal error")
        }
    }
}

fn kind_arg(value: i32) -> Result<Kind, Status> {
    Kind::from_proto(value).ok_or_else(|| Status::invalid_argument("kind: required (KIND_UPSTREAM, KIND_ROUTE, ...)"))
}

fn action_of(a: Action) -> api::change::Action {
    match a {
        Action::Create => api::change::Action::Create,
        Action::Update => api::change::Action::Update,
        Action::Delete => api::change::Action::Delete,
        Action::Unchanged => api::change::Action::Unchanged,
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn put(&self, request: Request<api::PutRequest>) -> Result<Response<api::PutResponse>, Status> {
        let req = request.into_inner();
        let resource = req.resource.ok_or_else(|| Status::invalid_argument("resource: required"))?;
        let result = self
            .state
            .write(
                vec![Change::Upsert { resource: Box::new(resource), expected_revision: req.expected_revision }],
                false,
            )
            .await
            .map_err(status_of)?;
        let unchanged = result.outcomes.iter().all(|o| o.action == Action::Unchanged);
        // An unchanged resource keeps its own revision, which is what a client CASes on next.
        let revision = match (unchanged, result.outcomes.first()) {
            (true, Some(o)) => self.state.index().get(o.kind, &o.name).map_or(result.revision, |e| e.revision),
            _ => result.revision,
        };
        Ok(Response::new(api::PutResponse { revision, unchanged }))
    }

    async fn get(&self, request: Request<api::GetRequest>) -> Result<Response<api::GetResponse>, Status> {
        let req = request.into_inner();
        let kind = kind_arg(req.kind)?;
        let resource = self
            .state
            .index()
            .get(kind, &req.name)
            .map(|e| e.resource.clone())
            .ok_or_else(|| status_of(StateError::NotFound { kind, name: req.name.clone() }))?;
        Ok(Response::new(api::GetResponse { resource: Some(resource) }))
    }

    async fn list(&self, request: Request<api::ListRequest>) -> Result<Response<api::ListResponse>, Status> {
        let req = request.into_inner();
        let kind = match req.kind {
            0 => None,
            k => Some(kind_arg(k)?),
        };
        let idx = self.state.index();
        let resources = idx.iter(kind).map(|e| e.resource.clone()).collect();
        Ok(Response::new(api::ListResponse { resources, revision: idx.revision() }))
    }

    async fn delete(&self, request: Request<api::DeleteRequest>) -> Result<Response<api::DeleteResponse>, Status> {
        let req = request.into_inner();
        let kind = kind_arg(req.kind)?;
        let change = Change::Delete { kind, name: req.name, expected_revision: req.expected_revision };
        let result = self.state.write(vec![change], false).await.map_err(status_of)?;
        Ok(Response::new(api::DeleteResponse { revision: result.revision }))
    }

    async fn apply(&self, request: Request<api::ApplyRequest>) -> Result<Response<api::ApplyResponse>, Status> {
        let req = request.into_inner();
        let mut changes: Vec<Change> = req
            .resources
            .iter()
            .map(|r| Change::Upsert { resource: Box::new(r.clone()), expected_revision: 0 })
            .collect();
        for d in &req.deletes {
            changes.push(Change::Delete { kind: kind_arg(d.kind)?, name: d.name.clone(), expected_revision: 0 });
        }
        if req.prune {
            let present: std::collections::HashSet<(Kind, &str)> =
                req.resources.iter().filter_map(portcullis_shared::Kind::of).collect();
            let kinds: std::collections::HashSet<Kind> = present.iter().map(|(k, _)| *k).collect();
            let deleted: std::collections::HashSet<(Kind, &str)> = changes
                .iter()
                .filter_map(|c| match c {
                    Change::Delete { kind, name, .. } => Some((*kind, name.as_str())),
                    Change::Upsert { .. } => None,
                })
                .collect();
            let extra: Vec<Change> = self
                .state
                .index()
                .iter(None)
                .filter_map(|e| e.resource.kind_name_owned())
                .filter(|(k, n)| {
                    kinds.contains(k) && !present.contains(&(*k, n.as_str())) && !deleted.contains(&(*k, n.as_str()))
                })
                .map(|(kind, name)| Change::Delete { kind, name, expected_revision: 0 })
                .collect();
            changes.extend(extra);
        }
        let result = self.state.write(changes, req.dry_run).await.map_err(status_of)?;
        let changes = result
            .outcomes
            .into_iter()
            .map(|o| api::Change {
                r#ref: Some(api::ResourceRef { kind: o.kind.to_proto() as i32, name: o.name }),
                action: action_of(o.action) as i32,
                fields: o.fields,
            })
            .collect();
        Ok(Response::new(api::ApplyResponse { revision: result.revision, changes }))
    }

    async fn export(&self, _request: Request<api::ExportRequest>) -> Result<Response<api::ExportResponse>, Status> {
        let idx = self.state.index();
        // Index order is (kind, name) with kinds in dependency order: applying the export in
        // this order never refers forward.
        let resources: Vec<pb::Resource> = idx.iter(None).map(|e| e.resource.clone()).collect();
        Ok(Response::new(api::ExportResponse { resources, revision: idx.revision() }))
    }

    async fn list_proxies(
        &self,
        _request: Request<api::ListProxiesRequest>,
    ) -> Result<Response<api::ListProxiesResponse>, Status> {
        // Per replica: the proxies whose config stream is (or was last) on this control plane.
        let config_version = self.state.revision();
        let proxies = self
            .registry
            .list()
            .into_iter()
            .map(|p| api::ProxyStatus {
                lag: (config_version - p.acked_version).max(0),
                id: p.id,
                zone: p.zone,
                address: p.address,
                build: p.build,
                connected_since: Some(prost_types::Timestamp::from(p.connected_since)),
                acked_version: p.acked_version,
                last_nack_error: p.last_nack_error,
                last_nack_version: p.last_nack_version,
                connected: p.connected,
            })
            .collect();
        Ok(Response::new(api::ListProxiesResponse { proxies, config_version }))
    }
}

/// Owned (kind, name) of a resource message.
trait KindNameOwned {
    fn kind_name_owned(&self) -> Option<(Kind, String)>;
}

impl KindNameOwned for pb::Resource {
    fn kind_name_owned(&self) -> Option<(Kind, String)> {
        Kind::of(self).map(|(k, n)| (k, n.to_owned()))
    }
}

/// Serves the admin API, health and reflection on `listener` until `shutdown` fires, then
/// drains in-flight calls.
pub async fn serve(
    state: Arc<ConfigState>,
    registry: Arc<ProxyRegistry>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<AdminServiceServer<Admin>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(portcullis_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let admin = AdminServiceServer::new(Admin::new(state, registry))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut builder = tonic::transport::Server::builder();
    let router = builder.add_service(health_service).add_service(admin);
    let router = match (reflection().build_v1(), reflection().build_v1alpha()) {
        (Ok(v1), Ok(v1alpha)) => router.add_service(v1).add_service(v1alpha),
        (Err(e), _) | (_, Err(e)) => {
            // The descriptor set is compiled in; failing here is a build defect, not input.
            tracing::error!(error = %e, "gRPC reflection unavailable");
            router
        }
    };
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(admin.addr = ?addr, "admin API listening");
    // TCP_NODELAY: a gRPC response is several small writes (headers, data, trailers); with Nagle
    // on, the last one waits for the client's delayed ACK (~40 ms).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    router.serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned()).await
}
