//! Prometheus text endpoint `/metrics`, plus `/healthz` and `/readyz`. (Stub: the API work
//! fills this in.)

use std::{net::SocketAddr, sync::Arc};

use crate::api::Backend;

/// Serve metrics until an error; the daemon drops the future to stop it.
pub async fn serve_metrics(_addr: SocketAddr, _backend: Arc<dyn Backend>) -> anyhow::Result<()> {
    anyhow::bail!("the metrics endpoint is not implemented yet")
}
