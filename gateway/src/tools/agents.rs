//! Portal agents: a portal VM and a work VM made, shown and deleted as one unit. The members
//! are ordinary VMs made by `vms::create` with the caller's context (placement, quotas,
//! networks as for any VM); the agent's row says which VM is the portal, which work VM and
//! workspaces it may act on, and the role it calls moat with. [`portal_principal`] turns a
//! portal VM into the principal its MCP sessions run as.

use std::collections::BTreeMap;

use std::time::Duration;

use moat_tools::agent::MODEL_KEY_FILE;
use moat_tools::guest::{FileWriteInput, GuestTool};
use moat_tools::{
    AgentCreateInput, AgentDeleteOutput, AgentListOutput, AgentMember, AgentOutput, AgentVm, LabelValue, ModelProvider,
    PortalAgent, PortalRole, ToolName, VmCreateInput,
};
use serde_json::Value;

use super::{ToolError, git, to_value, vms};
use crate::app::{CallContext, Shared};
use crate::principal::{Portal, Principal, Role};
use crate::security::resource::{agent_resource, agent_row};
use crate::store::agents::AgentRow;
use crate::store::now;

/// Memory a member gets when the call does not say.
const DEFAULT_MEMORY_MIB: u64 = 256;

fn role_of(portal: PortalRole) -> Role {
    match portal {
        PortalRole::Reader => Role::Reader,
        PortalRole::Agent => Role::Agent,
        PortalRole::VmAdmin => Role::VmAdmin,
    }
}

/// The `vm_create` input for one member.
fn member_input(agent: &str, member: &str, spec: AgentMember, wait_ready: bool) -> VmCreateInput {
    let labels = BTreeMap::from([
        ("agent".to_string(), LabelValue(agent.to_string())),
        ("agent-member".to_string(), LabelValue(member.to_string())),
    ]);
    VmCreateInput {
        name: format!("{agent}-{member}"),
        vcpus: spec.vcpus.unwrap_or(1),
        memory_mib: spec.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
        image: spec.image,
        workspace: spec.workspace,
        data_workspaces: spec.data_workspaces,
        network: spec.network,
        security_groups: spec.security_groups,
        node: spec.node,
        labels: Some(labels),
        start: Some(true),
        wait_ready: Some(wait_ready),
    }
}

fn created_id(answer: &Value) -> Result<String, ToolError> {
    let id = answer["vm"]["id"].as_str().map(String::from);
    id.ok_or_else(|| ToolError::Node("vm_create answered without a vm id: a moat bug, please report it".into()))
}

pub async fn create(shared: &Shared, ctx: &CallContext, input: AgentCreateInput) -> Result<Value, ToolError> {
    let role = input.role.unwrap_or(PortalRole::Agent);
    if role_of(role) > ctx.principal.role {
        return Err(ToolError::Invalid(format!(
            "role {} is above your own ({}): a portal can never do more than its owner; pick {} or less",
            role.as_str(),
            ctx.principal.role.as_str(),
            ctx.principal.role.as_str()
        )));
    }
    let wait_ready = input.wait_ready.unwrap_or(true);
    if input.model_api_key.is_some() && !wait_ready {
        return Err(ToolError::Invalid(
            "model_api_key is written into the portal through its guest agent, so it needs wait_ready: true \
             (the default)"
                .into(),
        ));
    }
    let row = AgentRow {
        id: vms::random_id("agent"),
        name: input.name.clone(),
        owner: ctx.principal.owner().to_string(),
        role: role.as_str().to_string(),
        portal_vm: None,
        work_vm: None,
        workspaces: "[]".into(),
        created_at: now(),
    };
    shared.state.insert_agent(&row).await?;
    // The portal first: until the row is complete it cannot call moat, so nothing it does can
    // race the work VM's creation.
    let portal = match vms::create(shared, ctx, member_input(&input.name, "portal", input.portal, wait_ready)).await {
        Ok(answer) => created_id(&answer),
        Err(e) => Err(e),
    };
    let portal = match portal {
        Ok(id) => id,
        Err(e) => {
            shared.state.delete_agent(&row.id).await?;
            return Err(e);
        }
    };
    let work = match vms::create(shared, ctx, member_input(&input.name, "work", input.work, wait_ready)).await {
        Ok(answer) => created_id(&answer),
        Err(e) => Err(e),
    };
    let work = match work {
        Ok(id) => id,
        Err(e) => {
            // Both or neither: the portal goes again.
            if let Err(undo) = vms::delete_member(shared, &portal).await {
                tracing::error!(vm = %portal, error = %undo, "cannot delete the portal of an agent that failed");
            }
            shared.state.delete_agent(&row.id).await?;
            return Err(e);
        }
    };
    let model_key = match input.model_api_key {
        Some(key) => {
            let provider = input.model_provider.unwrap_or_default();
            match install_model_key(shared, &portal, provider, key).await {
                Ok(()) => Some(format!("{MODEL_KEY_FILE} ({})", provider.env_var())),
                Err(e) => {
                    for vm in [&work, &portal] {
                        if let Err(undo) = vms::delete_member(shared, vm).await {
                            tracing::error!(%vm, error = %undo, "cannot delete a member of an agent that failed");
                        }
                    }
                    shared.state.delete_agent(&row.id).await?;
                    return Err(e);
                }
            }
        }
        None => None,
    };
    let row = shared.state.complete_agent(&row.id, &portal, &work).await?;
    let agent = info(shared, &row).await?;
    Ok(to_value(AgentOutput { agent, mcp_server: moat_tools::agent::mcp_server_entry(), model_key }))
}

/// Writes the model key into the portal's OpenClaw `.env` through its guest agent. The key is
/// in no error, log line or answer: a failure says only what went wrong around it.
async fn install_model_key(
    shared: &Shared,
    vm_id: &str,
    provider: ModelProvider,
    key: String,
) -> Result<(), ToolError> {
    if key.contains(['\n', '\r', '\0']) {
        return Err(ToolError::Invalid("model_api_key must be one line (no newline or NUL in it)".into()));
    }
    let vm = shared.state.vm_by_id(vm_id).await?.ok_or_else(|| ToolError::Node("the portal VM went away".into()))?;
    let input = FileWriteInput {
        path: MODEL_KEY_FILE.into(),
        content: format!("{}={key}\n", provider.env_var()),
        encoding: None,
        mode: Some(0o600),
        create_dirs: Some(true),
    };
    // The guest agent's errors name the path and what failed, never the content.
    match git::in_vm(shared, &vm, GuestTool::FileWrite, input, Duration::from_secs(30)).await {
        Ok(_) => Ok(()),
        Err(e) => Err(ToolError::Node(format!(
            "cannot write the model key into the portal ({MODEL_KEY_FILE}): {e}; the agent was not made, try again"
        ))),
    }
}

pub async fn list(shared: &Shared, ctx: &CallContext) -> Result<Value, ToolError> {
    let bundle = shared.authz.bundle();
    let mut agents = Vec::new();
    for row in shared.state.agents().await? {
        if bundle.is_allowed(&ctx.principal, ToolName::AgentInspect, &agent_resource(&row)) {
            agents.push(info(shared, &row).await?);
        }
    }
    Ok(to_value(AgentListOutput { agents }))
}

pub async fn inspect(shared: &Shared, ctx: &CallContext, arg: &str) -> Result<Value, ToolError> {
    let row = agent_row(&shared.state, ctx.principal.owner(), arg).await?;
    let agent = info(shared, &row).await?;
    Ok(to_value(AgentOutput { agent, mcp_server: moat_tools::agent::mcp_server_entry(), model_key: None }))
}

/// Deletes both VMs (the work VM first, so the portal never outlives what it drives
/// unnoticed), then the agent. A member already gone is fine; one that cannot be deleted
/// stops the delete with the agent still there to retry.
pub async fn delete(shared: &Shared, ctx: &CallContext, arg: &str) -> Result<Value, ToolError> {
    let row = agent_row(&shared.state, ctx.principal.owner(), arg).await?;
    let mut deleted = Vec::new();
    for vm in [&row.work_vm, &row.portal_vm].into_iter().flatten() {
        match vms::delete_member(shared, vm).await {
            Ok(true) => deleted.push(vm.clone()),
            Ok(false) => {}
            Err(e) => {
                return Err(match e {
                    ToolError::Node(message) => {
                        ToolError::Node(format!("{message}; agent {} stays, call agent_delete again", row.name))
                    }
                    other => other,
                });
            }
        }
    }
    shared.state.delete_agent(&row.id).await?;
    Ok(to_value(AgentDeleteOutput { deleted: row.name, vms: deleted }))
}

async fn info(shared: &Shared, row: &AgentRow) -> Result<PortalAgent, ToolError> {
    let member = async |id: &Option<String>| -> Result<AgentVm, ToolError> {
        let id = id.clone().unwrap_or_default();
        Ok(match shared.state.vm_by_id(&id).await? {
            Some(vm) => AgentVm { id: vm.id, name: vm.name, node: vm.node, state: vm.state.as_str().to_string() },
            None => AgentVm { id, name: String::new(), node: String::new(), state: "deleted".into() },
        })
    };
    let portal = member(&row.portal_vm).await?;
    Ok(PortalAgent {
        id: row.id.clone(),
        name: row.name.clone(),
        owner: row.owner.clone(),
        role: row.role.clone(),
        principal: format!("vm:{}", portal.id),
        portal,
        work: member(&row.work_vm).await?,
        workspaces: row.workspace_ids(),
        created_at: row.created_at.clone(),
    })
}

/// Why a VM's connection to moat cannot become a session.
#[derive(Debug, thiserror::Error)]
pub enum PortalRefusal {
    #[error("vm {0} does not exist (any more); its session ends")]
    Gone(String),
    #[error("vm {vm} is on node {actual}, but the connection came through node {via}; refused")]
    WrongNode { vm: String, actual: String, via: String },
    #[error(
        "vm {0} was not created as a portal, so it cannot call moat: make an agent with agent_create and run \
         the MCP client in its portal VM"
    )]
    NotPortal(String),
    #[error(transparent)]
    Store(#[from] crate::store::StateError),
}

/// The principal a portal VM's calls run as, checked afresh on every request: the VM must
/// still exist, on the node the connection came through, and be a complete agent's portal.
pub async fn portal_principal(shared: &Shared, vm_id: &str, node: &str) -> Result<Principal, PortalRefusal> {
    let vm = shared.state.vm_by_id(vm_id).await?.ok_or_else(|| PortalRefusal::Gone(vm_id.to_string()))?;
    if vm.node != node {
        return Err(PortalRefusal::WrongNode { vm: vm_id.into(), actual: vm.node, via: node.into() });
    }
    let agent = shared.state.agent_of_portal(vm_id).await?.ok_or_else(|| PortalRefusal::NotPortal(vm_id.into()))?;
    let role = agent.role.parse().unwrap_or(Role::Reader);
    let mut pairs: Vec<String> = agent.work_vm.iter().map(|w| format!("vm/{w}")).collect();
    pairs.extend(agent.workspace_ids().into_iter().map(|w| format!("workspace/{w}")));
    Ok(Principal {
        name: format!("vm:{vm_id}"),
        role,
        portal: Some(Portal { owner: agent.owner, agent: agent.id, pairs }),
    })
}
