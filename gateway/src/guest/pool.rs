//! The kept guest sessions, one per VM: reused while they answer, replaced
//! when they do not, closed when idle; and the bookkeeping of calls in flight
//! on them (busy counts, progress routes).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rmcp::RoleClient;
use rmcp::model::{ClientRequest, ProgressToken};
use rmcp::service::RunningService;

use super::{Dial, Forwarder, GuestError, PING_TIMEOUT, Routes, session};
use crate::store::vms::VmRow;

/// A kept session unused this long is closed.
pub const IDLE: Duration = Duration::from_secs(15);
/// A kept session whose agent answered this recently, on a connection still open, is reused
/// without a ping first. A call sent on a session that died since fails (it is never sent
/// twice); the next call then pings, finds it dead and opens a new one.
pub(super) const TRUSTED: Duration = Duration::from_secs(1);

/// An MCP session with one VM's agent.
pub(super) struct Session {
    pub(super) service: RunningService<RoleClient, Forwarder>,
    pub(super) routes: Routes,
    last_used: Mutex<Instant>,
    /// When the agent last answered anything on this session.
    last_answer: Mutex<Instant>,
    in_flight: AtomicUsize,
}

impl Session {
    pub(super) fn new(service: RunningService<RoleClient, Forwarder>) -> Session {
        let routes = service.service().routes.clone();
        Session {
            service,
            routes,
            last_used: Mutex::new(Instant::now()),
            last_answer: Mutex::new(Instant::now()),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Records that the agent answered on this session.
    pub(super) fn answered(&self) {
        *self.last_answer.lock().expect("last_answer lock is never poisoned") = Instant::now();
    }

    /// Whether a kept session still reaches its agent: the tunnel is open, and the agent answered
    /// within [`TRUSTED`] or answers a ping now.
    async fn answers(&self) -> Result<(), String> {
        let peer = self.service.peer();
        if peer.is_transport_closed() {
            return Err("its connection closed".into());
        }
        if self.last_answer.lock().expect("last_answer lock is never poisoned").elapsed() < TRUSTED {
            return Ok(());
        }
        let ping = peer.send_request(ClientRequest::PingRequest(Default::default()));
        match tokio::time::timeout(PING_TIMEOUT, ping).await {
            Ok(Ok(_)) => {
                self.answered();
                Ok(())
            }
            Ok(Err(e)) => Err(format!("ping failed: {e}")),
            Err(_) => Err(format!("no answer to a ping within {PING_TIMEOUT:?}")),
        }
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
            && self.last_used.lock().expect("last_used lock is never poisoned").elapsed() >= IDLE
    }
}

/// Marks a session in use for as long as it lives.
pub(super) struct Busy<'a>(&'a Session);

impl<'a> Busy<'a> {
    pub(super) fn new(session: &'a Session) -> Busy<'a> {
        session.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(session)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        *self.0.last_used.lock().expect("last_used lock is never poisoned") = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sends one request's progress to its caller for as long as it lives.
pub(super) struct Route {
    pub(super) routes: Routes,
    pub(super) token: ProgressToken,
}

impl Drop for Route {
    fn drop(&mut self) {
        self.routes.lock().expect("routes lock is never poisoned").remove(&self.token);
    }
}

/// The kept sessions, one per VM.
#[derive(Default)]
pub struct Sessions {
    pub(super) open: Arc<Mutex<HashMap<String, Arc<Session>>>>,
    /// One opener per VM at a time: calls that race to a VM without a session wait for the one
    /// being opened instead of each opening their own.
    pub(super) opening: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Sessions {
    /// The kept session with `vm`'s agent if it still answers, else a new one (kept).
    pub(super) async fn get(&self, dial: &dyn Dial, vm: &VmRow) -> Result<Arc<Session>, GuestError> {
        let gate = Gate::enter(&self.opening, &vm.id);
        let _opening = gate.gate.lock().await;
        let kept = self.open.lock().expect("sessions lock is never poisoned").get(&vm.id).cloned();
        if let Some(session) = kept {
            match session.answers().await {
                Ok(()) => return Ok(session),
                Err(why) => {
                    tracing::info!(vm = %vm.id, "the kept guest session is replaced: {why}");
                    forget(&self.open, &vm.id, &session);
                }
            }
        }
        let session = Arc::new(Session::new(session(dial, vm).await?));
        self.open.lock().expect("sessions lock is never poisoned").insert(vm.id.clone(), session.clone());
        tokio::spawn(close_when_idle(Arc::downgrade(&self.open), vm.id.clone(), Arc::downgrade(&session)));
        Ok(session)
    }
}

/// A caller's hold on its VM's opener; the last one out removes it from the map, so the map
/// holds only VMs someone is calling now.
struct Gate<'a> {
    map: &'a Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    vm: &'a str,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl<'a> Gate<'a> {
    fn enter(map: &'a Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>, vm: &'a str) -> Gate<'a> {
        let gate = map.lock().expect("opening lock is never poisoned").entry(vm.to_string()).or_default().clone();
        Gate { map, vm, gate }
    }
}

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        let mut map = self.map.lock().expect("opening lock is never poisoned");
        // Ours and the map's: nobody else is waiting on this VM's opener.
        if Arc::strong_count(&self.gate) == 2 {
            map.remove(self.vm);
        }
    }
}

/// Drops `session` from the kept ones if it is still the one kept for `vm`; it closes once the
/// calls using it end.
fn forget(open: &Mutex<HashMap<String, Arc<Session>>>, vm: &str, session: &Arc<Session>) {
    let mut open = open.lock().expect("sessions lock is never poisoned");
    if open.get(vm).is_some_and(|kept| Arc::ptr_eq(kept, session)) {
        open.remove(vm);
    }
}

/// Closes a kept session once it has been idle for [`IDLE`] or its connection has closed.
async fn close_when_idle(open: Weak<Mutex<HashMap<String, Arc<Session>>>>, vm: String, session: Weak<Session>) {
    loop {
        tokio::time::sleep(IDLE / 3).await;
        let (Some(open), Some(session)) = (open.upgrade(), session.upgrade()) else { return };
        if session.idle() || session.service.peer().is_transport_closed() {
            forget(&open, &vm, &session);
            tracing::debug!(vm, "guest session closed");
            return;
        }
    }
}
