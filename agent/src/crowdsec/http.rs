//! Just enough of an HTTP/1.1 client for LAPI: one connection per request (a poll every few
//! seconds needs no pool), plain TCP or rustls (client certificate, CA file), a deadline on
//! the whole exchange and a cap on the body, so a slow or huge answer costs a bounded wait and
//! bounded memory, and never more.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use tokio::io::{AsyncRead, AsyncWrite};

use super::config::{ApiUrl, Tls};

/// `name/version`, as LAPI needs (the watcher login fails on anything else).
pub const USER_AGENT: &str = concat!("wsguard/", env!("CARGO_PKG_VERSION"));

/// The system's CA bundle (Debian), used when `ca_file` is not given.
const SYSTEM_CA: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("cannot connect to {0}")]
    Connect(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("{0}")]
    Protocol(String),
}

impl HttpError {
    /// The `result` label of `wsguard_crowdsec_pulls_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Connect(_) | Self::Tls(_) | Self::Protocol(_) => "unreachable",
            Self::Timeout(_) => "timeout",
            Self::TooLarge(_) => "too_large",
            Self::Status { .. } => "http_error",
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct Client {
    url: ApiUrl,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    timeout: Duration,
}

pub struct Response {
    pub status: StatusCode,
    pub body: Bytes,
}

fn pem_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect();
    let certs = certs.map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate", path.display()));
    }
    Ok(certs)
}

#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl Client {
    /// Reads the certificates now: a bad file stops the agent at start, not at the first poll.
    pub fn new(url: &ApiUrl, tls: &Tls, timeout: Duration) -> Result<Self, String> {
        let tls = if url.tls {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?;
            let builder = if tls.insecure_skip_verify {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyCert))
            } else {
                let mut roots = rustls::RootCertStore::empty();
                let ca = tls
                    .ca_file
                    .clone()
                    .unwrap_or_else(|| std::path::PathBuf::from(SYSTEM_CA));
                for c in pem_certs(&ca)? {
                    roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
                }
                builder.with_root_certificates(roots)
            };
            let config = match &tls.client {
                Some((cert, key)) => {
                    let chain = pem_certs(cert)?;
                    let key = PrivateKeyDer::from_pem_file(key)
                        .map_err(|e| format!("{}: {e}", key.display()))?;
                    builder
                        .with_client_auth_cert(chain, key)
                        .map_err(|e| format!("client certificate: {e}"))?
                }
                None => builder.with_no_client_auth(),
            };
            let name = ServerName::try_from(url.host.clone())
                .map_err(|e| format!("{:?}: {e}", url.host))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Self {
            url: url.clone(),
            tls,
            timeout,
        })
    }

    pub fn url(&self) -> &ApiUrl {
        &self.url
    }

    /// `method prefix+path_query` with `headers` and an optional JSON body; the whole exchange
    /// within `timeout`, the body at most `max_body` bytes. Non-2xx answers are errors.
    pub async fn request(
        &self,
        method: Method,
        path_query: &str,
        headers: &[(&str, &str)],
        json: Option<Vec<u8>>,
        max_body: usize,
    ) -> Result<Response, HttpError> {
        let t = self.timeout;
        match tokio::time::timeout(
            t,
            self.exchange(method, path_query, headers, json, max_body),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout(t)),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path_query: &str,
        headers: &[(&str, &str)],
        json: Option<Vec<u8>>,
        max_body: usize,
    ) -> Result<Response, HttpError> {
        let u = &self.url;
        let shown = format!("{}:{}", u.host, u.port);
        let tcp = tokio::net::TcpStream::connect((u.host.as_str(), u.port))
            .await
            .map_err(|e| HttpError::Connect(format!("{shown}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            Some((conn, name)) => Box::new(
                conn.connect(name.clone(), tcp)
                    .await
                    .map_err(|e| HttpError::Tls(format!("{shown}: {e}")))?,
            ),
            None => Box::new(tcp),
        };
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| HttpError::Protocol(e.to_string()))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        // The driver ends with the connection; abort it if this future is dropped (timeout).
        let _guard = AbortOnDrop(driver);
        let host = if u.host.contains(':') {
            format!("[{}]:{}", u.host, u.port)
        } else {
            format!("{}:{}", u.host, u.port)
        };
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{}", u.prefix, path_query))
            .header(header::HOST, host)
            .header(header::USER_AGENT, USER_AGENT)
            .header(header::ACCEPT, "application/json")
            .header(header::CONNECTION, "close");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = match json {
            Some(b) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(b))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req
            .body(body)
            .map_err(|e| HttpError::Protocol(e.to_string()))?;
        let resp = tx
            .send_request(req)
            .await
            .map_err(|e| HttpError::Protocol(e.to_string()))?;
        let status = resp.status();
        let too_large = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > max_body as u64);
        if too_large {
            return Err(HttpError::TooLarge(max_body));
        }
        let body = Limited::new(resp.into_body(), max_body)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    HttpError::TooLarge(max_body)
                } else {
                    HttpError::Protocol(format!("reading the answer: {e}"))
                }
            })?
            .to_bytes();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(300)])
                .trim()
                .to_owned();
            return Err(HttpError::Status {
                status: status.as_u16(),
                body: text,
            });
        }
        Ok(Response { status, body })
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Percent-encode a query value (RFC 3986 unreserved characters pass).
pub fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
