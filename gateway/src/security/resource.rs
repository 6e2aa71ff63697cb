//! What the authorizer judges: a [`ResourceRef`] (kind, id, owner, labels),
//! built from the database for an existing VM; how a `vm` argument resolves
//! (id, else the caller's own name, else a name held by one VM); and the pin
//! that makes a handler act on exactly the VM that was judged.

use moat_tools::{ResourceKind, ToolCall};

use crate::store::agents::AgentRow;
use crate::store::git::RepoRow;
use crate::store::networks::{ForwardRow, GroupRow};
use crate::store::vms::VmRow;
use crate::store::workspaces::WorkspaceRow;
use crate::store::{State, StateError};

/// What a call acts on, as the authorizer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourceRef {
    pub kind: ResourceKind,
    pub id: String,
    pub owner: Option<String>,
    pub labels: Vec<String>,
}

impl ResourceRef {
    pub fn cluster() -> ResourceRef {
        ResourceRef { kind: ResourceKind::Cluster, id: "moat".into(), owner: None, labels: Vec::new() }
    }
}

/// Why a `vm` argument names no one VM the caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// Nothing by that id or name (or nothing the caller may see: the words are the same).
    #[error("{0}")]
    Missing(String),
    /// Several other owners' VMs share the name; the caller must pass an id.
    #[error("{0}")]
    Ambiguous(String),
    #[error(transparent)]
    Store(#[from] StateError),
}

/// What a `vm` argument names.
#[derive(Debug)]
pub enum Resolved {
    One(Box<VmRow>),
    Missing,
    /// Several VMs of other owners share the name; the caller must pass an id.
    Ambiguous(Vec<String>),
}

/// Resolves a `vm` argument: an id, else a name among the caller's own VMs, else a name
/// held by exactly one VM.
pub async fn resolve(state: &State, caller: &str, arg: &str) -> Result<Resolved, StateError> {
    // One query for both readings of `arg`: ids and names never collide (ids are `vm-<hex>`,
    // but a name may look like one, so the id wins).
    let (mut by_id, mut named): (Vec<VmRow>, Vec<VmRow>) =
        state.vms_by_id_or_name(arg, caller).await?.into_iter().partition(|row| row.id == arg);
    if let Some(row) = by_id.pop() {
        return Ok(Resolved::One(Box::new(row)));
    }
    named.retain(|row| row.name == arg);
    Ok(match named.len() {
        0 => Resolved::Missing,
        _ if named[0].owner == caller => Resolved::One(Box::new(named.swap_remove(0))),
        1 => Resolved::One(Box::new(named.swap_remove(0))),
        _ => Resolved::Ambiguous(named.into_iter().map(|r| r.id).collect()),
    })
}

/// The authorizer's view of the VM a call names (an unknown VM has no owner, which only
/// admins may act on; they then learn it does not exist).
pub async fn resource(state: &State, caller: &str, arg: &str) -> Result<ResourceRef, StateError> {
    Ok(match resolve(state, caller, arg).await? {
        Resolved::One(row) => vm_resource(&row),
        Resolved::Missing | Resolved::Ambiguous(_) => {
            ResourceRef { kind: ResourceKind::Vm, id: arg.to_string(), owner: None, labels: Vec::new() }
        }
    })
}

pub fn vm_resource(row: &VmRow) -> ResourceRef {
    ResourceRef {
        kind: ResourceKind::Vm,
        id: row.id.clone(),
        owner: Some(row.owner.clone()),
        labels: row.labels().into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
    }
}

pub fn workspace_resource(row: &WorkspaceRow) -> ResourceRef {
    ResourceRef {
        kind: ResourceKind::Workspace,
        id: row.id.clone(),
        owner: Some(row.owner.clone()),
        labels: Vec::new(),
    }
}

/// The answer for a workspace that does not exist, and for one the caller may not see.
pub fn workspace_not_found(arg: &str) -> String {
    format!("no workspace named `{arg}`; workspace_list shows your workspaces")
}

/// Resolves a `workspace` argument as a `vm` one resolves: an id, else a name among the caller's
/// own workspaces, else a name held by exactly one.
pub async fn workspace_row(state: &State, caller: &str, arg: &str) -> Result<WorkspaceRow, LookupError> {
    let (mut by_id, mut named): (Vec<WorkspaceRow>, Vec<WorkspaceRow>) =
        state.workspaces_by_id_or_name(arg, caller).await?.into_iter().partition(|row| row.id == arg);
    if let Some(row) = by_id.pop() {
        return Ok(row);
    }
    named.retain(|row| row.name == arg);
    match named.len() {
        0 => Err(LookupError::Missing(workspace_not_found(arg))),
        _ if named[0].owner == caller => Ok(named.swap_remove(0)),
        1 => Ok(named.swap_remove(0)),
        _ => Err(LookupError::Ambiguous(format!(
            "several workspaces are named `{arg}` (ids {}); pass the id",
            named.into_iter().map(|r| r.id).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// The authorizer's view of the workspace a call names (unknown: no owner).
pub async fn workspace_resource_of(state: &State, caller: &str, arg: &str) -> Result<ResourceRef, StateError> {
    match workspace_row(state, caller, arg).await {
        Ok(row) => Ok(workspace_resource(&row)),
        Err(LookupError::Store(e)) => Err(e),
        Err(_) => {
            Ok(ResourceRef { kind: ResourceKind::Workspace, id: arg.to_string(), owner: None, labels: Vec::new() })
        }
    }
}

pub fn group_resource(row: &GroupRow) -> ResourceRef {
    ResourceRef {
        kind: ResourceKind::SecurityGroup,
        id: row.id.clone(),
        owner: Some(row.owner.clone()),
        labels: Vec::new(),
    }
}

pub fn forward_resource(row: &ForwardRow) -> ResourceRef {
    ResourceRef {
        kind: ResourceKind::PortForward,
        id: row.id.clone(),
        owner: Some(row.owner.clone()),
        labels: Vec::new(),
    }
}

/// The answer for a security group that does not exist, and for one the caller may not see.
pub fn group_not_found(arg: &str) -> String {
    format!("no security group named `{arg}`; security_group_list shows yours")
}

/// An owned row a name or id argument can name.
trait Named: Clone {
    fn id(&self) -> &str;
    fn owner(&self) -> &str;
}

impl Named for GroupRow {
    fn id(&self) -> &str {
        &self.id
    }
    fn owner(&self) -> &str {
        &self.owner
    }
}

impl Named for AgentRow {
    fn id(&self) -> &str {
        &self.id
    }
    fn owner(&self) -> &str {
        &self.owner
    }
}

impl Named for RepoRow {
    fn id(&self) -> &str {
        &self.id
    }
    fn owner(&self) -> &str {
        &self.owner
    }
}

/// The one of `rows` (those whose id or name is `arg`) that `arg` names for `caller`: the one
/// with that id, else the caller's own, else the only one. `missing` says none is; `several`
/// names what several share (e.g. "security groups").
fn one_named<T: Named>(rows: &[T], caller: &str, arg: &str, missing: String, several: &str) -> Result<T, LookupError> {
    if let Some(row) = rows.iter().find(|r| r.id() == arg) {
        return Ok(row.clone());
    }
    let mine: Vec<&T> = rows.iter().filter(|r| r.owner() == caller).collect();
    match (mine.as_slice(), rows) {
        ([one], _) => Ok((*one).clone()),
        ([], []) => Err(LookupError::Missing(missing)),
        ([], [one]) => Ok(one.clone()),
        _ => Err(LookupError::Ambiguous(format!(
            "several {several} are named `{arg}` (ids {}); pass the id",
            rows.iter().map(|r| r.id()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Resolves a `group` argument: an id, else a name among the caller's own groups, else a name
/// held by exactly one group.
pub async fn group_row(state: &State, caller: &str, arg: &str) -> Result<GroupRow, LookupError> {
    let rows = state.groups_by_id_or_name(arg, caller).await?;
    one_named(&rows, caller, arg, group_not_found(arg), "security groups")
}

pub fn repo_resource(row: &RepoRow) -> ResourceRef {
    ResourceRef { kind: ResourceKind::GitRepo, id: row.id.clone(), owner: Some(row.owner.clone()), labels: Vec::new() }
}

/// `owner`'s remote git credentials.
pub fn credential_resource(owner: &str) -> ResourceRef {
    ResourceRef {
        kind: ResourceKind::GitCredential,
        id: owner.to_string(),
        owner: Some(owner.to_string()),
        labels: Vec::new(),
    }
}

/// The answer for a repository that does not exist, and for one the caller may not see.
pub fn repo_not_found(arg: &str) -> String {
    format!("no git repository named `{arg}`; git_repo_list shows yours")
}

/// Resolves a `repo` argument (on `network`, when given) as a `group` one resolves.
pub async fn repo_row(state: &State, caller: &str, arg: &str, network: Option<&str>) -> Result<RepoRow, LookupError> {
    let mut rows = state.repos_by_id_or_name(arg, caller).await?;
    rows.retain(|r| network.is_none_or(|n| r.network_id == n));
    one_named(&rows, caller, arg, repo_not_found(arg), "repositories")
}

pub fn agent_resource(row: &AgentRow) -> ResourceRef {
    ResourceRef { kind: ResourceKind::Agent, id: row.id.clone(), owner: Some(row.owner.clone()), labels: Vec::new() }
}

/// The answer for an agent that does not exist, and for one the caller may not see.
pub fn agent_not_found(arg: &str) -> String {
    format!("no agent named `{arg}`; agent_list shows yours")
}

/// Resolves an `agent` argument as a `group` one resolves.
pub async fn agent_row(state: &State, caller: &str, arg: &str) -> Result<AgentRow, LookupError> {
    let rows = state.agents_by_id_or_name(arg, caller).await?;
    one_named(&rows, caller, arg, agent_not_found(arg), "agents")
}

/// The authorizer's view of the security group or port forward a call names (unknown: no owner).
pub async fn owned_resource_of(
    state: &State,
    caller: &str,
    kind: ResourceKind,
    arg: &str,
) -> Result<ResourceRef, StateError> {
    let unknown = ResourceRef { kind, id: arg.to_string(), owner: None, labels: Vec::new() };
    match kind {
        ResourceKind::SecurityGroup => match group_row(state, caller, arg).await {
            Ok(row) => Ok(group_resource(&row)),
            Err(LookupError::Store(e)) => Err(e),
            Err(_) => Ok(unknown),
        },
        ResourceKind::PortForward => Ok(state.forward(arg).await?.map(|r| forward_resource(&r)).unwrap_or(unknown)),
        ResourceKind::GitRepo => match repo_row(state, caller, arg, None).await {
            Ok(row) => Ok(repo_resource(&row)),
            Err(LookupError::Store(e)) => Err(e),
            Err(_) => Ok(unknown),
        },
        ResourceKind::Agent => match agent_row(state, caller, arg).await {
            Ok(row) => Ok(agent_resource(&row)),
            Err(LookupError::Store(e)) => Err(e),
            Err(_) => Ok(unknown),
        },
        _ => Ok(unknown),
    }
}

/// The answer for a VM that does not exist, and for one the caller may not see.
pub fn not_found(arg: &str) -> String {
    format!("no vm named `{arg}`; vm_list shows your VMs")
}

/// The VM a handler acts on: the one the authorizer judged (`pinned`), as it is now, when
/// there is one (gone since then reads as missing); otherwise `arg` resolved for `caller`.
pub async fn vm_row(state: &State, caller: &str, pinned: Option<&str>, arg: &str) -> Result<VmRow, LookupError> {
    if let Some(id) = pinned {
        return state.vm_by_id(id).await?.ok_or_else(|| LookupError::Missing(not_found(arg)));
    }
    match resolve(state, caller, arg).await? {
        Resolved::One(row) => Ok(*row),
        Resolved::Missing => Err(LookupError::Missing(not_found(arg))),
        Resolved::Ambiguous(ids) => {
            Err(LookupError::Ambiguous(format!("several VMs are named `{arg}` (ids {}); pass the id", ids.join(", "))))
        }
    }
}

/// The existing VM a call was authorized on, by id. A VM named by name is pinned to the one
/// just judged: were it deleted and the name taken by another owner's VM meanwhile, the handler
/// must not act on that one. A VM being created, or one that was not found (no owner), is not.
pub fn pinned_vm(call: &ToolCall, resource: &ResourceRef) -> Option<String> {
    let existing = resource.kind == ResourceKind::Vm && resource.owner.is_some();
    (existing && !matches!(call, ToolCall::VmCreate(_))).then(|| resource.id.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Authorization judged alice's `web`; she deletes it and bob's `web` is then the only VM
    /// of that name. The handler must not act on bob's: the pinned id reads as missing.
    #[tokio::test]
    async fn a_vm_authorized_by_name_stays_the_one_acted_on() {
        use crate::store::vms::tests::row;
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("moat.db")).await.unwrap();
        let quotas = crate::security::limits::Quotas {
            running_vms: 9,
            vcpus: 9,
            memory_mib: 9999,
            workspaces: 1,
            workspace_gib: 8,
        };
        let room = crate::store::vms::NodeCapacity { cpus: 8, memory_mib: 65536 };
        state.reserve_vm(&row("vm-a", "web", "alice", "n1", 1, 256), &quotas, "agent", room, true, &[]).await.unwrap();
        state.reserve_vm(&row("vm-b", "web", "bob", "n1", 1, 256), &quotas, "agent", room, true, &[]).await.unwrap();
        let Resolved::One(judged) = resolve(&state, "alice", "web").await.unwrap() else { panic!("alice's web") };
        assert_eq!(judged.id, "vm-a");
        assert_eq!(vm_row(&state, "alice", Some(&judged.id), "web").await.unwrap().id, "vm-a");

        state.delete_vm_row("vm-a").await.unwrap();
        let unpinned = vm_row(&state, "alice", None, "web").await.unwrap();
        assert_eq!(unpinned.owner, "bob", "by name alone the call would now reach bob's VM");
        match vm_row(&state, "alice", Some(&judged.id), "web").await {
            Err(LookupError::Missing(message)) => assert_eq!(message, not_found("web")),
            other => panic!("the pinned VM is gone, so the call must find nothing: {other:?}"),
        }
    }
}
