//! `moat serve`: opens state, starts the embedded node on a Unix socket,
//! registers it, and serves MCP on stdio and/or HTTP until EOF or a signal.

use std::sync::Arc;

use anyhow::Context;
use moat_node::server::{ListenAddr, Listener};
use rmcp::ServiceExt;
use tokio_util::sync::CancellationToken;

use crate::app::Shared;
use crate::config::Config;
use crate::mcp::catalog::Catalog;
use crate::mcp::http::HttpServer;
use crate::mcp::prompts::Prompts;
use crate::mcp::{Gateway, Identity, Server, stdio};
use crate::nodes::connector::NodeConnector;
use crate::nodes::pki::Pki;
use crate::principal::Principal;
use crate::security::authz::Authz;
use crate::store::State;
use crate::store::audit::AuditLog;
use crate::store::audit::anchor::Anchor;
use crate::store::keys;

pub async fn run(config: Config) -> anyhow::Result<()> {
    let prompts =
        Prompts::load(config.prompts_dir.as_deref()).context("prompts are invalid; fix the file named above")?;
    let authz = Authz::load(&config.policies).context("policies are invalid; fix the file named above")?;
    let state = State::open_with(&config.db_path(), config.durability).await?;
    let key_checker = keys::KeyChecker::open(&config.db_path()).context("cannot open the key store")?;
    let identity = match &config.api_key {
        Some(key) => {
            let principal = key_checker.check(key).context("MOAT_API_KEY is not usable")?;
            tracing::info!(principal = %principal.name, role = principal.role.as_str(), "stdio authenticated by API key");
            Identity::Key(key.clone())
        }
        None => Identity::Operator(Principal::new(config.operator.clone(), config.operator_role)),
    };
    let audit = AuditLog::start(&config.db_path(), config.durability).context("cannot open the audit log")?;
    let anchor = Arc::new(
        Anchor::open(&config.audit_key, config.audit_checkpoints(), config.audit_checkpoint_copy.clone())
            .context("cannot set up audit checkpoints")?,
    );
    anchor.checkpoint(state.pool()).await.context("cannot write the first audit checkpoint")?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));

    // The embedded node: same gRPC service a remote host runs, on a Unix socket.
    std::fs::create_dir_all(&config.node_storage_root)
        .with_context(|| format!("cannot create node storage root {}", config.node_storage_root.display()))?;
    let socket = config.node_socket();
    remove_stale_sockets(socket.parent().expect("the socket path has a directory"));
    let listener = Listener::bind(&ListenAddr::Unix(socket.clone())).await?;
    let vms = moat_node::vm::VmManager::for_host(
        &config.node_name,
        &config.node_storage_root,
        config.images_dir(),
        "qemu-system-x86_64",
        None,
        "vhost-device-vsock",
        moat_node::vmm::confine::DEFAULT_UID_BASE,
    )
    .with_context(|| format!("cannot open the embedded node's VMs in {}", config.node_storage_root.display()))?;
    let storage = moat_node::storage::Storage::open(&config.node_storage).with_context(|| {
        format!("cannot open the embedded node's image and workspace storage {}", config.node_storage.display())
    })?;
    let net = config.node_storage_root.join("net");
    let networks = moat_node::net::host::Networks::open(&net, config.node_netns.clone())
        .with_context(|| format!("cannot open the embedded node's network state in {}", net.display()))?;
    networks.reconcile().await;
    let vms = vms.with_storage(storage).with_networks(networks);
    let api = moat_node::NodeApi::new(config.node_name.clone(), config.node_storage_root.clone(), vms)
        .with_disks(config.node_disks.clone());
    let node_task = tokio::spawn(moat_node::serve(listener, api, shutdown.clone().cancelled_owned()));
    state.upsert_node(&config.node_name, &format!("unix:{}", socket.display())).await?;

    let shared = Arc::new(Shared {
        state: state.clone(),
        nodes: Arc::new(NodeConnector::new(
            Pki::at(&config.state_dir),
            Some((&config.node_name, &format!("unix:{}", socket.display()))),
        )),
        authz,
        audit,
        keys: key_checker,
        guest: crate::guest::Sessions::default(),
    });
    crate::tools::workspaces::clear_unfinished(&shared).await.context("cannot clear unfinished workspace creates")?;
    tokio::spawn({
        let shared = shared.clone();
        async move { crate::tools::networks::sync_all(&shared).await }
    });
    let mcp = Arc::new(Server {
        shared: shared.clone(),
        catalog: Catalog::build(),
        prompts,
        #[cfg(feature = "bench-no-pipeline")]
        no_pipeline: config.insecure_no_pipeline,
    });
    #[cfg(feature = "bench-no-pipeline")]
    if config.insecure_no_pipeline {
        tracing::warn!("bench comparison server: NO authentication, authorization, rate limits or audit");
    }
    tokio::spawn(reload_on_sighup(shared.clone(), shutdown.clone()));
    tokio::spawn(crate::tools::git::reconcile(shared.clone(), shutdown.clone()));
    tokio::spawn(crate::tools::disks::reconcile(shared.clone(), shutdown.clone()));
    tokio::spawn(crate::mcp::portal::run(mcp.clone(), config.max_body_bytes, shutdown.clone()));
    tokio::spawn(checkpoints(anchor.clone(), state.clone(), config.audit_checkpoint, shutdown.clone()));
    tokio::spawn(crate::nodes::heartbeat(state.clone(), shared.nodes.clone(), config.heartbeat, shutdown.clone()));
    if let Err(missing) = crate::image::check(&config.images_dir().join("base")) {
        tracing::warn!("{missing}");
    }

    let result = match config.http {
        Some(addr) => {
            let server = HttpServer::bind(addr, &config, mcp.clone(), shutdown.clone())
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            let bound = server.local_addr()?;
            // Scripts and tests read this line to find the port when --http used port 0.
            tracing::info!(url = %format!("http://{bound}/mcp"), "moat listening");
            let has_keys = keys::list(state.pool()).await.map(|k| k.iter().any(|k| k.revoked_at.is_none()));
            if config.anonymous_role.is_none() && matches!(has_keys, Ok(false)) {
                tracing::warn!(
                    "no API keys exist, so every HTTP request will get 401: create one with \
                     `moat keys create --name NAME --role ROLE`"
                );
            }
            let stdio_task = config.stdio_with_http.then(|| {
                let mcp = mcp.clone();
                let identity = identity.clone();
                let max = config.max_body_bytes;
                let shutdown = shutdown.clone();
                tokio::spawn(async move { serve_stdio(mcp, identity, max, shutdown).await })
            });
            let result = server.run(shutdown.clone()).await.context("HTTP server failed");
            if let Some(task) = stdio_task {
                task.abort();
            }
            result
        }
        None => {
            tracing::info!("moat serving MCP on stdio");
            let result = serve_stdio(mcp.clone(), identity, config.max_body_bytes, shutdown.clone()).await;
            shutdown.cancel();
            result
        }
    };
    shutdown.cancel();
    match node_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "embedded node stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "embedded node task failed"),
    }
    shared.audit.shutdown().await;
    // The last checkpoint vouches for everything this process appended.
    if let Err(e) = anchor.checkpoint(state.pool()).await {
        tracing::error!(error = %e, "cannot write the audit checkpoint at shutdown");
    }
    if tokio::time::timeout(std::time::Duration::from_secs(5), state.close()).await.is_err() {
        tracing::warn!("database connections still busy after 5 s; exiting anyway");
    }
    tracing::info!("moat stopped");
    result
}

/// Every `every`, a checkpoint of the audit chain (when it moved), until shutdown.
async fn checkpoints(anchor: Arc<Anchor>, state: State, every: std::time::Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if let Err(e) = anchor.checkpoint(state.pool()).await {
            tracing::error!(error = %e, "cannot write an audit checkpoint");
        }
    }
}

/// Removes `node-<pid>.sock` files left by gateway processes that no longer run.
fn remove_stale_sockets(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix("node-").and_then(|n| n.strip_suffix(".sock")).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Serves one stdio connection until EOF or shutdown.
async fn serve_stdio(
    server: Arc<Server>,
    identity: Identity,
    max_line: usize,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let gateway = Gateway::stdio(server, identity);
    let running = match gateway.serve_with_ct(stdio::stdio(max_line), shutdown.child_token()).await {
        Ok(running) => running,
        // EOF or shutdown before the client initialized: nothing to serve.
        Err(e) if shutdown.is_cancelled() => {
            tracing::debug!(error = %e, "stdio closed during shutdown");
            return Ok(());
        }
        Err(e) => {
            tracing::info!(error = %e, "stdio client left before initializing");
            return Ok(());
        }
    };
    let reason = running.waiting().await.context("stdio service task failed")?;
    tracing::debug!(?reason, "stdio session ended");
    Ok(())
}

/// SIGHUP reloads policies and limits; a bad set is refused and the current one stays.
async fn reload_on_sighup(shared: Arc<Shared>, shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install a SIGHUP handler; policies will not reload");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            _ = shutdown.cancelled() => return,
        }
        match shared.authz.reload() {
            Ok(()) => tracing::info!(source = %shared.authz.bundle().source, "policies reloaded"),
            Err(e) => tracing::error!(error = %e, "policy reload refused; the previous policies stay in force"),
        }
        // A rotated gateway certificate is used from the next connection to each node on.
        shared.nodes.reload();
        tracing::info!("node connections will use the current gateway certificate");
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install a SIGTERM handler");
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = shutdown.cancelled() => return,
    }
    shutdown.cancel();
}
