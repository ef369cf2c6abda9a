//! The API server on the agent's Unix socket: HTTP/1.1 with JSON bodies (routes in `api`).
//! Reads are open to whoever can connect (the socket is 0600 root); every mutation also checks
//! the peer's credentials, because operators often loosen the socket's mode to share it with a
//! group.

mod audit;
mod peer;
mod routes;
mod socket;

use std::{path::PathBuf, sync::Arc};

use anyhow::Context;
use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};

use crate::api::{ApiError, Backend, ErrorKind};

pub use peer::Peer;

#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Socket path (created 0600; its directory is created if missing).
    pub socket: PathBuf,
    /// Besides uid 0, members of this group may mutate.
    pub mutate_gid: Option<u32>,
    /// Append-only audit log of mutations (who, what, why, TTL).
    pub audit_log: PathBuf,
}

/// Default page of `GET /v1/bans`, and the most one page may hold: 1M bans never sit in one
/// response.
pub const PAGE_DEFAULT: usize = 10_000;
pub const PAGE_MAX: usize = 100_000;

/// Serve the API until an error; the daemon drops the future to stop it.
pub async fn serve_api(opts: ServerOptions, backend: Arc<dyn Backend>) -> anyhow::Result<()> {
    let listener = socket::bind(&opts.socket)?;
    let ctx = Arc::new(routes::Ctx {
        backend,
        mutate_gid: opts.mutate_gid,
        audit: audit::AuditLog::new(opts.audit_log),
    });
    let app = routes::router(ctx).into_make_service_with_connect_info::<Peer>();
    axum::serve(listener, app)
        .await
        .with_context(|| format!("API server on {}", opts.socket.display()))
}

pub(crate) fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::Invalid => StatusCode::BAD_REQUEST,
        ErrorKind::Refused => StatusCode::CONFLICT,
        ErrorKind::Denied => StatusCode::FORBIDDEN,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (status_of(self.kind), axum::Json(self)).into_response()
    }
}
