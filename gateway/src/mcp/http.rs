//! Streamable HTTP: `/mcp` (rmcp's service: sessions for 2025-11-25 clients,
//! stateless for 2026-07-28, Host validation against DNS rebinding, body
//! limit) and `/healthz`, served by axum with TCP_NODELAY.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use rmcp::model::ErrorCode;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{Gateway, Server, UNAUTHENTICATED};
use crate::config::Config;
use crate::principal::{Principal, Role};
use crate::store::keys::AuthError;

/// Resolves `Authorization: Bearer <key>` to a principal (attached to the request for the
/// MCP handler) or answers 401 with `WWW-Authenticate`. The key is checked against the
/// database on every request, so revocation and expiry take effect at once.
async fn bearer_auth(mut req: Request, next: Next, server: Arc<Server>, anonymous: Option<Role>) -> Response {
    let token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let result = match (token, anonymous) {
        (None, Some(role)) => Ok(Principal::anonymous(role)),
        (None, None) => Err(AuthError::Missing),
        (Some(key), _) => server.shared.keys.check(key),
    };
    match result {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(AuthError::Store(e)) => {
            tracing::error!(error = %e, "cannot check an API key");
            let message = AuthError::Store(e).to_string();
            jsonrpc_error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::INTERNAL_ERROR.0, message)
        }
        Err(e) => {
            let mut response = jsonrpc_error(StatusCode::UNAUTHORIZED, UNAUTHENTICATED, e.to_string());
            // RFC 6750 §3.1: no error code when the request carried no credentials at all.
            let challenge = match e {
                AuthError::Missing => "Bearer realm=\"moat\"".to_string(),
                _ => format!("Bearer realm=\"moat\", error=\"invalid_token\", error_description=\"{e}\""),
            };
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                response.headers_mut().insert(WWW_AUTHENTICATE, value);
            }
            response
        }
    }
}

/// Answers bodies rmcp would refuse with a bare text line (oversized: 413, unparsable: 415)
/// with a JSON-RPC error instead, so every client sees a code and a message it can act on.
async fn jsonrpc_guard(req: Request, next: Next, limit: usize) -> Response {
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => bytes,
        Err(_) => {
            let message = format!(
                "request body exceeds the {limit} byte limit; send smaller arguments or raise --max-body-bytes"
            );
            return jsonrpc_error(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::INVALID_REQUEST.0, message);
        }
    };
    if let Err(message) = check_body(&bytes) {
        return jsonrpc_error(StatusCode::BAD_REQUEST, ErrorCode::PARSE_ERROR.0, message);
    }
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

/// Whether a POST body (already within the size limit) may go on to rmcp: it must be JSON.
/// The message says what is wrong otherwise.
pub fn check_body(bytes: &[u8]) -> Result<(), String> {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map(drop)
        .map_err(|e| format!("parse error: {e}; the body must be one JSON-RPC message"))
}

fn jsonrpc_error(status: StatusCode, code: i32, message: String) -> Response {
    let body = json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message}});
    (status, axum::Json(body)).into_response()
}

pub struct HttpServer {
    listener: tokio::net::TcpListener,
    router: Router,
}

impl HttpServer {
    pub async fn bind(
        addr: SocketAddr,
        config: &Config,
        server: Arc<Server>,
        shutdown: CancellationToken,
    ) -> std::io::Result<HttpServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let mcp_config = StreamableHttpServerConfig::default()
            .with_allowed_hosts(config.allowed_hosts.clone())
            .with_max_request_body_bytes(config.max_body_bytes)
            .with_cancellation_token(shutdown.child_token());
        let checker = server.clone();
        // The benchmark-only no-pipeline mode lets every request in as a cluster-admin.
        #[cfg(feature = "bench-no-pipeline")]
        let anonymous = if config.insecure_no_pipeline { Some(Role::ClusterAdmin) } else { config.anonymous_role };
        #[cfg(not(feature = "bench-no-pipeline"))]
        let anonymous = config.anonymous_role;
        if let Some(role) = anonymous {
            tracing::warn!(role = role.as_str(), "HTTP requests without a bearer key are let in as `anonymous`");
        }
        let mcp = StreamableHttpService::new(
            move || Ok(Gateway::http(server.clone())),
            Arc::new(LocalSessionManager::default()),
            mcp_config,
        );
        let limit = config.max_body_bytes;
        // Layers run bottom-up: authenticate first, then check the body.
        let mcp = Router::new()
            .route_service("/mcp", mcp)
            .route_layer(axum::middleware::from_fn(move |req, next| jsonrpc_guard(req, next, limit)))
            .route_layer(axum::middleware::from_fn(move |req, next| {
                bearer_auth(req, next, checker.clone(), anonymous)
            }));
        let router = Router::new()
            .route(
                "/healthz",
                get(|| async { axum::Json(json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")})) }),
            )
            .merge(mcp);
        Ok(HttpServer { listener, router })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then lets in-flight requests finish.
    pub async fn run(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let listener = self.listener.tap_io(|tcp| {
            // Without this, small JSON-RPC replies wait on Nagle + delayed ACK (~40 ms).
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        axum::serve(listener, self.router).with_graceful_shutdown(shutdown.cancelled_owned()).await
    }
}
