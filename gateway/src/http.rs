//! Streamable HTTP: `/mcp` (rmcp's service: sessions for 2025-11-25 clients,
//! stateless for 2026-07-28, Host validation against DNS rebinding, body
//! limit) and `/healthz`, served by axum with TCP_NODELAY.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use axum::serve::ListenerExt;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::gateway::{Gateway, Shared};

pub struct HttpServer {
    listener: tokio::net::TcpListener,
    router: Router,
}

impl HttpServer {
    pub async fn bind(
        addr: SocketAddr,
        config: &Config,
        shared: Arc<Shared>,
        shutdown: CancellationToken,
    ) -> std::io::Result<HttpServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let mcp_config = StreamableHttpServerConfig::default()
            .with_allowed_hosts(config.allowed_hosts.clone())
            .with_max_request_body_bytes(config.max_body_bytes)
            .with_cancellation_token(shutdown.child_token());
        let mcp = StreamableHttpService::new(
            move || Ok(Gateway::http(shared.clone())),
            Arc::new(LocalSessionManager::default()),
            mcp_config,
        );
        let router = Router::new()
            .route(
                "/healthz",
                get(|| async { axum::Json(json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")})) }),
            )
            .nest_service("/mcp", mcp);
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
