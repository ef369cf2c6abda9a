//! The `/v1` routes. Backend calls may walk kernel maps, so they run on the blocking pool.

use std::{net::IpAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::{
        ConnectInfo, DefaultBodyLimit, Query, State,
        rejection::{JsonRejection, QueryRejection},
    },
    routing::{get, post},
};
use serde::Deserialize;

use super::{
    PAGE_DEFAULT, PAGE_MAX, Peer,
    audit::{AuditLog, Record, ttl_of},
};
use crate::{
    api::{
        AllowAddRequest, AllowJson, ApiError, Backend, BanAddRequest, BanJson, FlowJson,
        ImportRequest, ImportResponse, MetricsSnapshot, RemoveRequest, RemoveResponse, StatsJson,
        StatusJson, TopJson,
    },
    model::BanSource,
};

pub struct Ctx {
    pub backend: Arc<dyn Backend>,
    pub mutate_gid: Option<u32>,
    pub audit: AuditLog,
}

type Shared = State<Arc<Ctx>>;
type Reply<T> = Result<Json<T>, ApiError>;

/// Import batches of 10k entries and long `ban add` lists exceed axum's 2 MB default.
const BODY_LIMIT: usize = 64 << 20;

pub fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/v1/bans", get(ban_list).post(ban_add).delete(ban_rm))
        .route(
            "/v1/allow",
            get(allow_list).post(allow_add).delete(allow_rm),
        )
        .route("/v1/stats", get(stats))
        .route("/v1/top", get(top))
        .route("/v1/flows", get(flows))
        .route("/v1/status", get(status))
        .route("/v1/metrics", get(metrics))
        .route("/v1/import", post(import))
        .route("/v1/detach", post(detach))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(ctx)
}

async fn run<T: Send + 'static>(
    ctx: &Arc<Ctx>,
    f: impl FnOnce(&dyn Backend) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let b = ctx.backend.clone();
    tokio::task::spawn_blocking(move || f(&*b))
        .await
        .map_err(|e| ApiError::internal(format!("the agent failed to answer: {e}")))?
}

/// Check the peer, apply, and audit only what succeeded.
async fn mutate<T: Send + 'static>(
    ctx: &Arc<Ctx>,
    peer: Peer,
    f: impl FnOnce(&dyn Backend) -> Result<T, ApiError> + Send + 'static,
    record: impl FnOnce(&T, &AuditLog, &Peer) + Send + 'static,
) -> Result<T, ApiError> {
    if let Err(e) = peer.check_mutate(ctx.mutate_gid) {
        // Not an audit record (nothing changed), but an operator wants to see who tried.
        tracing::warn!(uid = ?peer.uid, pid = ?peer.pid, "refused a mutation: {}", e.message);
        return Err(e);
    }
    let c = ctx.clone();
    tokio::task::spawn_blocking(move || {
        let out = f(&*c.backend)?;
        record(&out, &c.audit, &peer);
        Ok(out)
    })
    .await
    .map_err(|e| ApiError::internal(format!("the agent failed to answer: {e}")))?
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(t)| t)
        .map_err(|e| ApiError::invalid(format!("bad request body: {}", e.body_text())))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::invalid(format!("bad query: {}", e.body_text())))
}

#[derive(Deserialize)]
struct BanListQuery {
    source: Option<BanSource>,
    offset: Option<usize>,
    limit: Option<usize>,
}

async fn ban_list(
    State(ctx): Shared,
    q: Result<Query<BanListQuery>, QueryRejection>,
) -> Reply<Vec<BanJson>> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(PAGE_DEFAULT).clamp(1, PAGE_MAX);
    let offset = q.offset.unwrap_or(0);
    run(&ctx, move |b| b.ban_list(q.source, offset, limit))
        .await
        .map(Json)
}

async fn ban_add(
    State(ctx): Shared,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: Result<Json<BanAddRequest>, JsonRejection>,
) -> Reply<Vec<BanJson>> {
    let req = body(req)?;
    let reason = req.reason.clone();
    let ttl = ttl_of(req.ttl_s, req.permanent);
    mutate(
        &ctx,
        peer,
        move |b| b.ban_add(req),
        move |bans, log, p| {
            let addrs = bans
                .iter()
                .map(|b| cidr_text(&b.addr, b.prefix_len))
                .collect();
            log.append(
                p,
                &Record {
                    verb: "ban add",
                    addrs,
                    reason: reason.as_deref(),
                    ttl,
                },
            );
        },
    )
    .await
    .map(Json)
}

fn cidr_text(addr: &str, prefix: u8) -> String {
    let host = if addr.contains(':') { 128 } else { 32 };
    if prefix == host {
        addr.to_owned()
    } else {
        format!("{addr}/{prefix}")
    }
}

async fn ban_rm(
    State(ctx): Shared,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: Result<Json<RemoveRequest>, JsonRejection>,
) -> Reply<RemoveResponse> {
    let req = body(req)?;
    mutate(
        &ctx,
        peer,
        move |b| b.ban_rm(req),
        |r, log, p| removed(r, "ban rm", log, p),
    )
    .await
    .map(Json)
}

fn removed(r: &RemoveResponse, verb: &str, log: &AuditLog, p: &Peer) {
    if !r.removed.is_empty() {
        let addrs = r.removed.clone();
        log.append(
            p,
            &Record {
                verb,
                addrs,
                reason: None,
                ttl: None,
            },
        );
    }
}

async fn allow_list(State(ctx): Shared) -> Reply<Vec<AllowJson>> {
    run(&ctx, |b| b.allow_list()).await.map(Json)
}

async fn allow_add(
    State(ctx): Shared,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: Result<Json<AllowAddRequest>, JsonRejection>,
) -> Reply<AllowJson> {
    let req = body(req)?;
    let reason = req.reason.clone();
    mutate(
        &ctx,
        peer,
        move |b| b.allow_add(req),
        move |a, log, p| {
            let addrs = vec![cidr_text(&a.addr, a.prefix_len)];
            log.append(
                p,
                &Record {
                    verb: "allow add",
                    addrs,
                    reason: reason.as_deref(),
                    ttl: None,
                },
            );
        },
    )
    .await
    .map(Json)
}

async fn allow_rm(
    State(ctx): Shared,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: Result<Json<RemoveRequest>, JsonRejection>,
) -> Reply<RemoveResponse> {
    let req = body(req)?;
    mutate(
        &ctx,
        peer,
        move |b| b.allow_rm(req),
        |r, log, p| removed(r, "allow rm", log, p),
    )
    .await
    .map(Json)
}

async fn stats(State(ctx): Shared) -> Reply<StatsJson> {
    run(&ctx, |b| b.stats()).await.map(Json)
}

#[derive(Deserialize)]
struct TopQuery {
    n: Option<usize>,
}

async fn top(
    State(ctx): Shared,
    q: Result<Query<TopQuery>, QueryRejection>,
) -> Reply<Vec<TopJson>> {
    let n = query(q)?.n.unwrap_or(10).min(PAGE_MAX);
    run(&ctx, move |b| b.top(n)).await.map(Json)
}

#[derive(Deserialize)]
struct FlowsQuery {
    addr: Option<String>,
}

async fn flows(
    State(ctx): Shared,
    q: Result<Query<FlowsQuery>, QueryRejection>,
) -> Reply<Vec<FlowJson>> {
    let addr = match query(q)?.addr {
        None => None,
        Some(a) => Some(a.parse::<IpAddr>().map_err(|_| {
            ApiError::invalid(format!(
                "invalid address {a:?}: expected an IPv4 or IPv6 address"
            ))
        })?),
    };
    run(&ctx, move |b| b.flows(addr)).await.map(Json)
}

async fn status(State(ctx): Shared) -> Reply<StatusJson> {
    run(&ctx, |b| b.status()).await.map(Json)
}

/// The metrics snapshot as JSON, so `wsguard status` can warn about the breaker and netlink
/// fallbacks without scraping Prometheus text.
async fn metrics(State(ctx): Shared) -> Reply<MetricsSnapshot> {
    run(&ctx, |b| b.metrics()).await.map(Json)
}

async fn import(
    State(ctx): Shared,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: Result<Json<ImportRequest>, JsonRejection>,
) -> Reply<ImportResponse> {
    let req = body(req)?;
    let addrs: Vec<String> = req
        .entries
        .iter()
        .map(|e| &e.addr)
        .chain(req.groups.iter().flat_map(|g| &g.addrs))
        .cloned()
        .collect();
    mutate(
        &ctx,
        peer,
        move |b| b.import(req),
        move |_, log, p| {
            log.append(
                p,
                &Record {
                    verb: "import",
                    addrs,
                    reason: None,
                    ttl: None,
                },
            );
        },
    )
    .await
    .map(Json)
}

async fn detach(
    State(ctx): Shared,
    ConnectInfo(peer): ConnectInfo<Peer>,
) -> Reply<serde_json::Value> {
    mutate(
        &ctx,
        peer,
        |b| b.detach(),
        |_, log, p| {
            log.append(
                p,
                &Record {
                    verb: "detach",
                    addrs: vec![],
                    reason: None,
                    ttl: None,
                },
            );
        },
    )
    .await
    .map(|()| Json(serde_json::json!({})))
}
