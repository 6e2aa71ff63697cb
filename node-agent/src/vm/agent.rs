//! Whether a VM's guest agent answers: after a VM starts (or is re-adopted),
//! a watcher says hello on the agent's control port (vsock 100), then pings
//! it every few seconds, recording readiness, the agent's version, when it
//! last answered and, when it does not, why. It reconnects with backoff for
//! as long as the VM runs, so an agent restarted inside the guest is noticed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::vsock;

/// The agent's control port inside every VM.
pub use moat_tools::guest::CONTROL_PORT;
const PING_EVERY: Duration = Duration::from_secs(2);
/// Every read on the control channel is bounded by this.
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// What the node knows about a VM's agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentState {
    pub ready: bool,
    pub version: String,
    /// RFC 3339 time of the last answer, empty if never.
    pub last_seen: String,
    /// Why the agent is not ready, when it is not.
    pub detail: String,
}

/// Watches the agent of VM `vm` behind `target` while `running()` holds. Logs when the agent
/// becomes ready, when it is lost, and (once per distinct reason) why it is not ready; `fault()`
/// says when the host side of the VM's vsock is broken, which no retry can mend.
pub async fn watch(
    vm: String,
    target: vsock::Target,
    state: Arc<Mutex<AgentState>>,
    running: impl Fn() -> bool + Send + 'static,
    fault: impl Fn() -> Option<String> + Send + 'static,
) {
    let set = |f: &dyn Fn(&mut AgentState)| f(&mut state.lock().expect("agent state lock is never poisoned"));
    let mut attempts = 0u64;
    while running() {
        attempts += 1;
        let session = async {
            let stream =
                vsock::connect_to(&target, CONTROL_PORT, Duration::from_secs(5)).await.map_err(|e| e.to_string())?;
            let (read, mut write) = tokio::io::split(stream);
            let mut lines = BufReader::new(read).lines();
            let mut ask = async |request: &str| -> Result<serde_json::Value, String> {
                write.write_all(request.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
                let line = tokio::time::timeout(READ_TIMEOUT, lines.next_line())
                    .await
                    .map_err(|_| format!("no answer within {READ_TIMEOUT:?}"))?
                    .map_err(|e| format!("read: {e}"))?
                    .ok_or("the agent closed the control channel")?;
                serde_json::from_str(&line).map_err(|e| format!("bad reply: {e}"))
            };
            let hello = ask("{\"type\":\"hello\",\"protocol\":1}\n").await?;
            let version = hello["agent_version"].as_str().unwrap_or_default().to_string();
            tracing::info!(vm, version, attempts, "guest agent ready");
            set(&|s| {
                *s = AgentState {
                    ready: true,
                    version: version.clone(),
                    last_seen: moat_proto::time::now(),
                    detail: String::new(),
                }
            });
            while running() {
                tokio::time::sleep(PING_EVERY).await;
                ask("{\"type\":\"ping\"}\n").await?;
                set(&|s| s.last_seen = moat_proto::time::now());
            }
            Ok::<(), String>(())
        }
        .await;
        if let Err(why) = session {
            let why = match fault() {
                Some(fault) => format!("{fault} (last attempt: {why})"),
                None => why,
            };
            let (was_ready, same) = {
                let s = state.lock().expect("agent state lock is never poisoned");
                // Timings differ from one attempt to the next; the reason is what matters.
                let shape = |text: &str| text.replace(|c: char| c.is_ascii_digit(), "");
                (s.ready, shape(&s.detail) == shape(&why))
            };
            if !running() {
                // Stopping or crashed: the lifecycle logs say why.
            } else if was_ready {
                tracing::warn!(vm, "guest agent lost: {why}");
            } else if !same {
                tracing::info!(vm, attempts, "guest agent not ready yet: {why}");
            }
            set(&|s| {
                s.ready = false;
                s.detail = why.clone();
            });
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    set(&|s| {
        s.ready = false;
        s.detail = "the VM is not running".into();
    });
}
