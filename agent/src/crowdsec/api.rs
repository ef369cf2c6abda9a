//! LAPI's routes as wsguard uses them (crowdsec 1.4.6): the bouncer's decision stream
//! (`X-Api-Key` or the client certificate) and the machine's login, alerts and deletions
//! (JWT, refreshed before it expires).

use hyper::Method;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::sync::Mutex;

use super::{
    config::{CrowdsecConfig, Tls},
    http::{Client, HttpError, query_value},
    model::{Alert, DeleteAnswer, Login, LoginAnswer, StreamAnswer},
};

/// Why a pull or a push failed, as shown in `status` (`last_error`) and counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LapiError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("LAPI's answer is not a {what}: {why}")]
    BadAnswer { what: &'static str, why: String },
    #[error("machine login refused: {0}")]
    Login(String),
}

impl LapiError {
    /// The `result` label of `wsguard_crowdsec_pulls_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Http(h) => h.label(),
            Self::BadAnswer { .. } => "bad_answer",
            Self::Login(_) => "login",
        }
    }
}

struct Token {
    jwt: String,
    /// Refreshed when fewer than `REFRESH_BEFORE` are left.
    expires: OffsetDateTime,
}

const REFRESH_BEFORE: time::Duration = time::Duration::minutes(5);
/// Small bodies: logins, alert ids, delete counts.
const SMALL_BODY: usize = 1 << 20;

pub struct Lapi {
    /// The bouncer's client: with the certificate only when it has no API key.
    http: Client,
    /// The machine's: with the certificate only when it has no password. LAPI checks a
    /// presented certificate's OU against the role (bouncers vs agents) before anything else,
    /// so one role's certificate must never reach the other's routes.
    machine_http: Client,
    cfg: CrowdsecConfig,
    stream_query: String,
    token: Mutex<Option<Token>>,
}

fn list(words: &[String]) -> String {
    words
        .iter()
        .map(|w| query_value(w))
        .collect::<Vec<_>>()
        .join(",")
}

impl Lapi {
    pub fn new(cfg: &CrowdsecConfig) -> Result<Self, String> {
        let with_cert = |cert: bool| Tls {
            client: if cert { cfg.tls.client.clone() } else { None },
            ..cfg.tls.clone()
        };
        let http = Client::new(&cfg.url, &with_cert(cfg.api_key.is_none()), cfg.timeout)?;
        let machine_cert = cfg.machine.as_ref().is_some_and(|m| m.password.is_none());
        let machine_http = Client::new(&cfg.url, &with_cert(machine_cert), cfg.timeout)?;
        let mut q = format!("&scopes={}", list(&cfg.scopes));
        for (k, v) in [
            ("origins", &cfg.origins),
            ("scenarios_containing", &cfg.scenarios_containing),
            ("scenarios_not_containing", &cfg.scenarios_not_containing),
        ] {
            if !v.is_empty() {
                q.push_str(&format!("&{k}={}", list(v)));
            }
        }
        Ok(Self {
            http,
            machine_http,
            cfg: cfg.clone(),
            stream_query: q,
            token: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &CrowdsecConfig {
        &self.cfg
    }

    /// `GET /v1/decisions/stream`; `startup`: every active decision (a full resync).
    pub async fn stream(&self, startup: bool) -> Result<StreamAnswer, LapiError> {
        let path = format!(
            "/v1/decisions/stream?startup={startup}{}",
            self.stream_query
        );
        let key = self.cfg.api_key.as_deref();
        let headers: Vec<(&str, &str)> = key.map(|k| ("X-Api-Key", k)).into_iter().collect();
        let r = self
            .http
            .request(
                Method::GET,
                &path,
                &headers,
                None,
                self.cfg.max_response_bytes,
            )
            .await?;
        // Parsing 100k decisions takes a while: off the async threads.
        tokio::task::spawn_blocking(move || StreamAnswer::parse(&r.body))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|why| LapiError::BadAnswer {
                what: "decision stream",
                why,
            })
    }

    async fn login(&self) -> Result<Token, LapiError> {
        let m = self
            .cfg
            .machine
            .as_ref()
            .ok_or_else(|| LapiError::Login("no machine credentials".into()))?;
        let body = serde_json::to_vec(&Login {
            machine_id: &m.id,
            password: m.password.as_deref().unwrap_or(""),
            scenarios: &[super::SCENARIO],
        })
        .unwrap_or_default();
        let r = self
            .machine_http
            .request(
                Method::POST,
                "/v1/watchers/login",
                &[],
                Some(body),
                SMALL_BODY,
            )
            .await
            .map_err(|e| match e {
                HttpError::Status { status, body } if status == 401 || status == 403 => {
                    LapiError::Login(format!("HTTP {status}: {body}"))
                }
                other => other.into(),
            })?;
        token_of(&r.body)
    }

    /// A valid JWT: the one held, refreshed when close to its end, or a fresh login.
    async fn jwt(&self) -> Result<String, LapiError> {
        let mut t = self.token.lock().await;
        let now = OffsetDateTime::now_utc();
        if let Some(tok) = t.as_ref() {
            if tok.expires - now > REFRESH_BEFORE {
                return Ok(tok.jwt.clone());
            }
            if tok.expires > now {
                let auth = format!("Bearer {}", tok.jwt);
                let r = self
                    .machine_http
                    .request(
                        Method::GET,
                        "/v1/refresh_token",
                        &[("Authorization", &auth)],
                        None,
                        SMALL_BODY,
                    )
                    .await;
                if let Ok(r) = r
                    && let Ok(fresh) = token_of(&r.body)
                {
                    let jwt = fresh.jwt.clone();
                    *t = Some(fresh);
                    return Ok(jwt);
                }
            }
        }
        let fresh = self.login().await?;
        let jwt = fresh.jwt.clone();
        *t = Some(fresh);
        Ok(jwt)
    }

    /// A machine request with the JWT; a 401 (token revoked, LAPI restarted with a new
    /// secret) logs in again once.
    async fn machine(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<bytes::Bytes, LapiError> {
        for attempt in 0..2 {
            let auth = format!("Bearer {}", self.jwt().await?);
            let r = self
                .machine_http
                .request(
                    method.clone(),
                    path,
                    &[("Authorization", &auth)],
                    body.clone(),
                    SMALL_BODY,
                )
                .await;
            match r {
                Ok(r) => return Ok(r.body),
                Err(HttpError::Status { status: 401, .. }) if attempt == 0 => {
                    *self.token.lock().await = None;
                }
                Err(e) => return Err(e.into()),
            }
        }
        unreachable!("the second attempt returns")
    }

    /// `POST /v1/alerts`; the ids LAPI gave the alerts.
    pub async fn post_alerts(&self, alerts: &[Alert]) -> Result<Vec<String>, LapiError> {
        let body = serde_json::to_vec(alerts).unwrap_or_default();
        let r = self.machine(Method::POST, "/v1/alerts", Some(body)).await?;
        serde_json::from_slice(&r).map_err(|e| LapiError::BadAnswer {
            what: "list of alert ids",
            why: e.to_string(),
        })
    }

    /// `DELETE /v1/decisions/ID` (soft delete: every bouncer sees it in `deleted`).
    pub async fn delete_id(&self, id: i64) -> Result<u64, LapiError> {
        match self
            .machine(Method::DELETE, &format!("/v1/decisions/{id}"), None)
            .await
        {
            Ok(b) => deleted_count(&b),
            // Already gone (deleted by someone else, or hard-deleted with its alert).
            Err(LapiError::Http(HttpError::Status { status, .. }))
                if status == 404 || status == 500 =>
            {
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    /// `DELETE /v1/decisions?value=V`: every decision for exactly this address or network.
    pub async fn delete_value(&self, value: &str) -> Result<u64, LapiError> {
        let b = self
            .machine(
                Method::DELETE,
                &format!("/v1/decisions?value={}", query_value(value)),
                None,
            )
            .await?;
        deleted_count(&b)
    }
}

fn token_of(body: &[u8]) -> Result<Token, LapiError> {
    let a: LoginAnswer = serde_json::from_slice(body).map_err(|e| LapiError::BadAnswer {
        what: "login answer",
        why: e.to_string(),
    })?;
    let expires = OffsetDateTime::parse(&a.expire, &Rfc3339).map_err(|e| LapiError::BadAnswer {
        what: "login answer",
        why: format!("expire {:?}: {e}", a.expire),
    })?;
    Ok(Token {
        jwt: a.token,
        expires,
    })
}

fn deleted_count(b: &[u8]) -> Result<u64, LapiError> {
    let a: DeleteAnswer = serde_json::from_slice(b).map_err(|e| LapiError::BadAnswer {
        what: "delete answer",
        why: e.to_string(),
    })?;
    a.nb_deleted.parse().map_err(|_| LapiError::BadAnswer {
        what: "delete answer",
        why: format!("nbDeleted {:?}", a.nb_deleted),
    })
}
