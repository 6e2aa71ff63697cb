//! The git service: one service VM per network, made on first use from the `git` image, with
//! the repositories on a workspace of their own (made from `git-data`, mounted at
//! /workspaces/repos) and a security group letting the network reach port 80. Everything
//! inside the VM happens through its guest agent; the gateway never runs git itself.
//!
//! Who may clone and push what is decided by the server in the service VM from one file moat
//! writes whole, `/workspaces/repos/access.json`: repositories with their owners, and per VM
//! its owner, address and the SHA-256 of a token. The token is made here, installed in that VM
//! (git's credential store, scoped to the service's URL) and never kept: the database holds its
//! hash, like the access file. Remote credentials go straight into the service VM
//! (`git credential-store`); the database records only that they exist.
//!
//! The service VMs belong to one system principal per network (`system:git:<network id>`), which
//! no API key can be (key names have no ':'), so agents never see them in `vm_list`.

use std::collections::BTreeMap;
use std::time::Duration;

use moat_tools::guest::{ExecInput, ExecOutput, FileWriteInput};
use moat_tools::names::Label;
use moat_tools::{
    AgentInfo, DataWorkspace, GitBranch, GitCommit, GitCredentialDeleteInput, GitCredentialDeleteOutput,
    GitCredentialInfo, GitCredentialListInput, GitCredentialListOutput, GitCredentialOutput, GitCredentialSetInput,
    GitRepoBranchesOutput, GitRepoCreateInput, GitRepoDeleteOutput, GitRepoInfo, GitRepoListInput, GitRepoListOutput,
    GitRepoLogInput, GitRepoLogOutput, GitRepoOutput, GitRepoPushInput, GitRepoPushOutput, GitServiceDeleteOutput,
    GitServiceInfo, GitServiceListOutput, GitServiceOutput, GuestTool, IngressRule, LabelValue, Protocol,
    SecurityGroupCreateInput, ToolName, VmCreateInput, VmState, WorkspaceCreateInput,
};
use serde_json::Value;

use super::networks::network_row;
use super::vms::{random_id, wait_ready};
use super::{ToolError, to_value};
use crate::app::{CallContext, Shared};
use crate::guest;
use crate::principal::{Principal, Role, Transport};
use crate::security::resource::{credential_resource, repo_not_found, repo_resource};
use crate::store::git::{CredentialRow, RepoRow, ServiceRow, TokenRow};
use crate::store::keys::sha256_hex;
use crate::store::networks::NetworkRow;
use crate::store::now;
use crate::store::vms::VmRow;

/// Where the repositories' workspace is mounted in the service VM, and what is on it.
const ROOT: &str = "/workspaces/repos";
/// The images `moat image build git` registers.
const SERVICE_IMAGE: &str = "git";
const DATA_IMAGE: &str = "git-data";
/// The service VM's name, its repositories' workspace and its security group, per system owner.
const SERVICE_NAME: &str = "git";
const WORKSPACE_NAME: &str = "repos";
const GROUP_NAME: &str = "git-service";
/// The service VM's size.
const SERVICE_VCPUS: u32 = 1;
const SERVICE_MEMORY_MIB: u64 = 512;
const SERVICE_GIB: u64 = 4;
/// Where an agent VM keeps its git token (git's credential store format).
const VM_CREDENTIALS: &str = "/etc/moat/git-credentials";
/// How long a git command in the service VM may take, beyond a push's own timeout.
const GIT_TIMEOUT_S: u32 = 60;
/// Exits 0 once something listens on TCP port 80 (0x0050) in the VM, 1 after 20 s.
const LISTENING: &str = "for i in $(seq 100); do grep -q ':0050 00000000:0000 0A' /proc/net/tcp && exit 0; \
                         sleep 0.2; done; exit 1";
/// How often the reconciler looks at the services and the VMs on their networks.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(10);

/// One service change at a time (ensure, delete).
static SERVICES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// One access file write at a time: each renders the database as it is when it writes, so the
/// last write is never older than the last change.
static ACCESS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// One credential hand-out at a time: two for one VM (the create's and the reconciler's) would
/// leave the VM holding one token and the service expecting the other.
static GRANTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// VMs that cannot take git credentials (no git in them): not asked again by the reconciler.
static NO_GIT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The principal owning network `network_id`'s service VM, workspace and group.
fn system(network_id: &str) -> CallContext {
    CallContext {
        principal: Principal::new(format!("system:git:{network_id}"), Role::ClusterAdmin),
        transport: Transport::Internal,
        protocol_version: None,
        session: None,
        cancel: tokio_util::sync::CancellationToken::new(),
        progress: None,
        vm: None,
    }
}

/// The file in the service VM holding `owner`'s remote credentials.
fn credentials_file(owner: &str) -> String {
    format!("{ROOT}/credentials/{}", &sha256_hex(owner)[..16])
}

fn repo_path(name: &str) -> String {
    format!("{ROOT}/git/{name}.git")
}

/// Runs guest `tool` in `vm` as moat itself (no caller's progress or cancellation).
pub(super) async fn in_vm(
    shared: &Shared,
    vm: &VmRow,
    tool: GuestTool,
    args: impl serde::Serialize,
    deadline: Duration,
) -> Result<Value, ToolError> {
    let node = shared.state.node(&vm.node).await?;
    let dial = shared.nodes.node(&vm.node, &node.address)?;
    let cancel = tokio_util::sync::CancellationToken::new();
    Ok(guest::call(&shared.guest, &dial, vm, tool, args, deadline, None, &cancel).await?)
}

/// Runs `argv` in `vm` and returns how it ended (a non-zero exit is the caller's to judge).
async fn exec(
    shared: &Shared,
    vm: &VmRow,
    argv: &[&str],
    stdin: Option<String>,
    timeout_s: u32,
) -> Result<ExecOutput, ToolError> {
    let input = ExecInput {
        argv: Some(argv.iter().map(|a| a.to_string()).collect()),
        command: None,
        cwd: None,
        env: Some(BTreeMap::from([("GIT_TERMINAL_PROMPT".to_string(), "0".to_string())])),
        stdin,
        timeout_s: Some(timeout_s),
    };
    let deadline = Duration::from_secs(u64::from(timeout_s) + 15);
    let out = in_vm(shared, vm, GuestTool::Exec, input, deadline).await?;
    serde_json::from_value(out)
        .map_err(|e| ToolError::Node(format!("the guest agent on vm {} answered exec unexpectedly: {e}", vm.name)))
}

/// [`exec`], failing with git's own words when the command does not succeed.
async fn git_ok(shared: &Shared, vm: &VmRow, argv: &[&str], what: &str) -> Result<String, ToolError> {
    let out = exec(shared, vm, argv, None, GIT_TIMEOUT_S).await?;
    if out.exit_code == Some(0) {
        return Ok(out.stdout);
    }
    Err(ToolError::Node(format!("{what} failed in the git service VM: {}", failure(&out))))
}

/// How a command ended, in one line for an error.
fn failure(out: &ExecOutput) -> String {
    let said = out.stderr.trim();
    let said = if said.is_empty() { out.stdout.trim() } else { said };
    match (out.timed_out, out.exit_code) {
        (true, _) => format!("it did not finish in time and was stopped; it said: {said}"),
        (false, Some(code)) => format!("exit {code}: {said}"),
        (false, None) => format!("killed by signal {}: {said}", out.signal.unwrap_or_default()),
    }
}

/// The access file for network `network_id`, from the database: repositories by name with their
/// owners, and per VM its owner, address and token hash.
async fn access_json(shared: &Shared, network_id: &str) -> Result<String, ToolError> {
    let repos: BTreeMap<String, String> =
        shared.state.repos(Some(network_id)).await?.into_iter().map(|r| (r.name, r.owner)).collect();
    let users: BTreeMap<String, Value> = shared
        .state
        .git_tokens(network_id)
        .await?
        .into_iter()
        .map(|t| (t.vm_id, serde_json::json!({"owner": t.owner, "ip": t.ip, "sha256": t.sha256})))
        .collect();
    Ok(serde_json::json!({"repos": repos, "users": users}).to_string())
}

/// Writes network `network_id`'s access file into its running service VM (atomically: the
/// guest agent writes, syncs and renames).
async fn write_access(shared: &Shared, network_id: &str, vm: &VmRow) -> Result<(), ToolError> {
    let _one = ACCESS.lock().await;
    let content = access_json(shared, network_id).await?;
    let input = FileWriteInput {
        path: format!("{ROOT}/access.json"),
        content,
        encoding: None,
        mode: Some(0o600),
        create_dirs: Some(true),
    };
    in_vm(shared, vm, GuestTool::FileWrite, input, Duration::from_secs(30)).await?;
    Ok(())
}

/// A running service with its VM and address.
struct Running {
    service: ServiceRow,
    vm: VmRow,
    ip: String,
}

/// Makes sure `network` has a git service whose VM runs with its agent answering: made when
/// missing (workspace and group reused when they exist), started when stopped or crashed.
async fn ensure(shared: &Shared, network: &NetworkRow) -> Result<Running, ToolError> {
    let _one = SERVICES.lock().await;
    ensure_locked(shared, network).await
}

async fn ensure_locked(shared: &Shared, network: &NetworkRow) -> Result<Running, ToolError> {
    let sys = system(&network.id);
    let existing = shared.state.git_service(&network.id).await?;
    let vm = match &existing {
        Some(service) => shared.state.vm_by_id(&service.vm_id).await?,
        None => None,
    };
    let (service, vm, made) = match (existing, vm) {
        (Some(service), Some(vm)) => (service, vm, false),
        // No service, or its VM was deleted: make the VM (and what it needs that is missing).
        (_, _) => {
            let (service, vm) = make(shared, &sys, network).await?;
            (service, vm, true)
        }
    };
    let mut booted = made;
    let vm = match vm.state {
        VmState::Running => vm,
        VmState::Stopped | VmState::Crashed => {
            booted = true;
            tracing::info!(network = %network.name, vm = %vm.id, state = %vm.state, "starting the git service VM");
            super::vms::start(shared, &sys, &vm.id).await?;
            shared.state.vm_by_id(&vm.id).await?.ok_or_else(|| gone(network))?
        }
        other => {
            return Err(ToolError::Node(format!(
                "the git service VM of network {} is {other}; try again shortly (git_service_inspect shows it)",
                network.name
            )));
        }
    };
    if !vm.agent.as_deref().and_then(|a| serde_json::from_str::<AgentInfo>(a).ok()).is_some_and(|a| a.ready) {
        wait_ready(shared, &vm).await?;
    }
    let nic = shared.state.nic(&vm.id).await?.ok_or_else(|| gone(network))?;
    let running = Running { service, vm, ip: nic.ip };
    if booted {
        // Whatever changed while it was down (a VM deleted, say) is in force from its first request.
        write_access(shared, &network.id, &running.vm).await?;
    }
    if booted {
        // The init starts the git front after the guest agent: wait until it listens.
        let out = exec(shared, &running.vm, &["sh", "-c", LISTENING], None, 30).await?;
        if out.exit_code != Some(0) {
            return Err(ToolError::Node(format!(
                "the git service VM of network {} booted but its git server does not listen on port 80; vm_logs \
                 on {} shows its console",
                network.name, running.vm.id
            )));
        }
    }
    Ok(running)
}

fn gone(network: &NetworkRow) -> ToolError {
    ToolError::Node(format!(
        "the git service VM of network {} went away meanwhile; call git_service_ensure again",
        network.name
    ))
}

/// Makes network `network`'s service VM as `sys`, reusing its workspace and group when they
/// exist (a service deleted without its repositories comes back with them).
async fn make(shared: &Shared, sys: &CallContext, network: &NetworkRow) -> Result<(ServiceRow, VmRow), ToolError> {
    let owner = &sys.principal.name;
    let workspace = match shared.state.workspaces_by_id_or_name(WORKSPACE_NAME, owner).await?.into_iter().next() {
        Some(row) if row.owner == *owner => row.id,
        _ => {
            let input = WorkspaceCreateInput {
                name: WORKSPACE_NAME.into(),
                image: DATA_IMAGE.into(),
                size_gib: Some(SERVICE_GIB),
                node: Some(network.node.clone()),
            };
            let made = super::workspaces::create(shared, sys, input).await.map_err(|e| missing_image(e, DATA_IMAGE))?;
            made["workspace"]["id"].as_str().unwrap_or_default().to_string()
        }
    };
    let group = match shared.state.groups(Some(&network.id)).await?.into_iter().find(|g| g.owner == *owner) {
        Some(row) => row.id,
        None => {
            let input = SecurityGroupCreateInput {
                name: GROUP_NAME.into(),
                network: network.id.clone(),
                ingress: Some(vec![IngressRule {
                    protocol: Protocol::Tcp,
                    ports: Some("80".into()),
                    source_cidr: Some(network.cidr.clone()),
                    source_group: None,
                }]),
                egress: None,
            };
            let made = super::networks::group_create(shared, sys, input).await?;
            made["group"]["id"].as_str().unwrap_or_default().to_string()
        }
    };
    let input = VmCreateInput {
        name: SERVICE_NAME.into(),
        vcpus: SERVICE_VCPUS,
        memory_mib: SERVICE_MEMORY_MIB,
        image: Some(SERVICE_IMAGE.into()),
        workspace: None,
        data_workspaces: Some(vec![DataWorkspace { name: workspace.clone(), read_only: None }]),
        network: Some(network.id.clone()),
        security_groups: Some(vec![Label(GROUP_NAME.into())]),
        node: None,
        labels: Some(BTreeMap::from([("moat.service".into(), LabelValue("git".into()))])),
        start: Some(true),
        wait_ready: Some(true),
    };
    // A VM made by an earlier attempt that failed after the create (its agent never answered,
    // say) is this network's service VM: record it rather than be refused its name.
    let earlier = shared.state.vms_by_id_or_name(SERVICE_NAME, owner).await?.into_iter().find(|v| v.owner == *owner);
    let vm_id = match earlier {
        Some(vm) => vm.id,
        None => {
            let made = super::vms::create(shared, sys, input).await.map_err(|e| missing_image(e, SERVICE_IMAGE))?;
            made["vm"]["id"].as_str().unwrap_or_default().to_string()
        }
    };
    let service = ServiceRow {
        network_id: network.id.clone(),
        vm_id: vm_id.clone(),
        workspace_id: workspace,
        group_id: group,
        created_at: now(),
    };
    shared.state.put_git_service(&service).await?;
    let vm = shared.state.vm_by_id(&vm_id).await?.ok_or_else(|| gone(network))?;
    tracing::info!(network = %network.name, vm = %vm_id, "made the git service VM");
    Ok((service, vm))
}

/// A missing image said as what to run.
fn missing_image(e: ToolError, image: &str) -> ToolError {
    let hint = "the git service needs the images `git` and `git-data` on the network's node: run `moat image \
                build git` (it registers both with the embedded node), or build them and image_import them";
    match e {
        ToolError::NotFound(message) if message.contains(image) => ToolError::NotFound(format!("{message}; {hint}")),
        ToolError::Invalid(message) if message.contains(image) => ToolError::Invalid(format!("{message}; {hint}")),
        other => other,
    }
}

/// The network a call names, when it names one.
async fn network_opt(shared: &Shared, arg: Option<&str>) -> Result<Option<NetworkRow>, ToolError> {
    match arg {
        Some(arg) => Ok(Some(network_row(shared, arg).await?)),
        None => Ok(None),
    }
}

/// The network a call names, or the only one with a git service when it names none.
async fn network_or_only(shared: &Shared, arg: Option<&str>) -> Result<NetworkRow, ToolError> {
    if let Some(arg) = arg {
        return network_row(shared, arg).await;
    }
    let services = shared.state.git_services().await?;
    match services.as_slice() {
        [one] => network_row(shared, &one.network_id).await,
        [] => Err(ToolError::Invalid(
            "no network has a git service yet; pass network (git_repo_create or git_service_ensure starts one)".into(),
        )),
        _ => Err(ToolError::Invalid("several networks have a git service; pass network".into())),
    }
}

/// The service's facts for admins, with `detail` when its VM is not running.
async fn service_info(shared: &Shared, service: &ServiceRow) -> Result<GitServiceInfo, ToolError> {
    let network = shared.state.network(&service.network_id).await?.map(|n| n.name).unwrap_or_default();
    let vm = shared.state.vm_by_id(&service.vm_id).await?;
    let ip = shared.state.nic(&service.vm_id).await?.map(|n| n.ip).unwrap_or_default();
    let repos = shared.state.repos(Some(&service.network_id)).await?.len() as u32;
    let (node, state, detail) = match &vm {
        Some(vm) if vm.state == VmState::Running => (vm.node.clone(), vm.state.to_string(), None),
        Some(vm) => (
            vm.node.clone(),
            vm.state.to_string(),
            Some(format!(
                "the service VM is {}{}; moat starts a crashed one within {RECONCILE_EVERY:?} and a stopped one at \
                 the next git call",
                vm.state,
                if vm.reason.is_empty() { String::new() } else { format!(" ({})", vm.reason) }
            )),
        ),
        None => {
            (String::new(), "missing".into(), Some("the service VM is gone; git_service_ensure makes it again".into()))
        }
    };
    Ok(GitServiceInfo {
        network,
        node,
        vm: service.vm_id.clone(),
        state,
        ip,
        workspace: service.workspace_id.clone(),
        repos,
        created_at: service.created_at.clone(),
        detail,
    })
}

pub async fn service_ensure(shared: &Shared, arg: &str) -> Result<Value, ToolError> {
    let network = network_row(shared, arg).await?;
    let running = ensure(shared, &network).await?;
    grant_all(shared, &network, &running, None).await;
    Ok(to_value(GitServiceOutput { service: service_info(shared, &running.service).await? }))
}

pub async fn service_list(shared: &Shared) -> Result<Value, ToolError> {
    let mut services = Vec::new();
    for service in shared.state.git_services().await? {
        services.push(service_info(shared, &service).await?);
    }
    Ok(to_value(GitServiceListOutput { services }))
}

pub async fn service_inspect(shared: &Shared, arg: &str) -> Result<Value, ToolError> {
    let network = network_row(shared, arg).await?;
    let service = shared.state.git_service(&network.id).await?.ok_or_else(|| no_service(&network))?;
    // The VM's state as its node reports it now.
    let sys = system(&network.id);
    if shared.state.vm_by_id(&service.vm_id).await?.is_some() {
        super::vms::inspect(shared, &sys, &service.vm_id).await?;
    }
    Ok(to_value(GitServiceOutput { service: service_info(shared, &service).await? }))
}

fn no_service(network: &NetworkRow) -> ToolError {
    ToolError::NotFound(format!(
        "network {} has no git service; git_service_ensure (or the first git_repo_create) starts one",
        network.name
    ))
}

pub async fn service_delete(shared: &Shared, arg: &str, delete_repositories: bool) -> Result<Value, ToolError> {
    let network = network_row(shared, arg).await?;
    let _one = SERVICES.lock().await;
    let service = shared.state.git_service(&network.id).await?;
    if service.is_none() && !delete_repositories {
        return Err(no_service(&network));
    }
    let sys = system(&network.id);
    let mut vm = String::new();
    if let Some(service) = &service {
        if shared.state.vm_by_id(&service.vm_id).await?.is_some() {
            super::vms::delete(shared, &sys, &service.vm_id).await?;
        }
        if shared.state.groups(Some(&network.id)).await?.iter().any(|g| g.id == service.group_id) {
            super::networks::group_delete(shared, &sys, &service.group_id).await?;
        }
        shared.state.delete_git_service(&network.id).await?;
        vm = service.vm_id.clone();
    }
    for token in shared.state.git_tokens(&network.id).await? {
        shared.state.delete_git_token(&token.vm_id).await?;
    }
    if delete_repositories {
        let owner = &sys.principal.name;
        let kept = shared.state.workspaces_by_id_or_name(WORKSPACE_NAME, owner).await?;
        for workspace in kept.iter().filter(|w| w.owner == *owner) {
            super::workspaces::delete(shared, &sys, &workspace.id).await?;
        }
        shared.state.delete_repos(&network.id).await?;
    }
    Ok(to_value(GitServiceDeleteOutput { network: network.name, vm, repositories_deleted: delete_repositories }))
}

/// Gives VM `vm` (on `network`, whose service is `running`) a token of its own: its hash into
/// the database and the access file, the token into the VM's git credential store, scoped to
/// the service's URL. Replaces a token it had.
/// With `replace` false, a VM that has a token by now keeps it.
async fn grant(
    shared: &Shared,
    network: &NetworkRow,
    running: &Running,
    vm: &VmRow,
    replace: bool,
) -> Result<(), ToolError> {
    let _one = GRANTS.lock().await;
    if !replace && shared.state.git_tokens(&network.id).await?.iter().any(|t| t.vm_id == vm.id) {
        return Ok(());
    }
    // Deleted meanwhile: nothing to hand out (a token row now would outlive the VM).
    let Some(nic) = shared.state.nic(&vm.id).await? else { return Ok(()) };
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    // Into the VM first: a VM that cannot take it (no git, agent gone) gets no entry.
    let line = format!("http://{}:{token}@{}\n", vm.id, running.ip);
    let file = FileWriteInput {
        path: VM_CREDENTIALS.into(),
        content: line,
        encoding: None,
        mode: Some(0o600),
        create_dirs: Some(true),
    };
    in_vm(shared, vm, GuestTool::FileWrite, file, Duration::from_secs(30)).await?;
    let key = format!("credential.http://{}.helper", running.ip);
    let helper = format!("store --file={VM_CREDENTIALS}");
    let out = exec(shared, vm, &["git", "config", "--system", &key, &helper], None, 30).await?;
    if out.exit_code != Some(0) {
        return Err(ToolError::Invalid(format!("vm {} cannot use git: {}", vm.name, failure(&out))));
    }
    let row = TokenRow {
        vm_id: vm.id.clone(),
        network_id: network.id.clone(),
        owner: vm.owner.clone(),
        ip: nic.ip,
        sha256: sha256_hex(&token),
        created_at: now(),
    };
    shared.state.put_git_token(&row).await?;
    write_access(shared, &network.id, &running.vm).await?;
    tracing::info!(vm = %vm.id, network = %network.name, "installed the VM's git credentials");
    Ok(())
}

/// Whether `vm` runs with its agent answering, as the last heartbeat saw it.
fn agent_ready(vm: &VmRow) -> bool {
    vm.state == VmState::Running
        && vm.agent.as_deref().and_then(|a| serde_json::from_str::<AgentInfo>(a).ok()).is_some_and(|a| a.ready)
}

/// Grants every running VM on `network` (of `owner`, when given) that has no token yet; a VM
/// that cannot take one is logged and tried again by the reconciler.
async fn grant_all(shared: &Shared, network: &NetworkRow, running: &Running, owner: Option<&str>) {
    let result: Result<(), ToolError> = async {
        let nics = shared.state.nics(Some(&network.id)).await?;
        // Tokens of VMs no longer on the network (deleted while a grant ran) are dropped.
        let tokens = shared.state.git_tokens(&network.id).await?;
        let stale: Vec<&TokenRow> = tokens.iter().filter(|t| !nics.iter().any(|n| n.vm_id == t.vm_id)).collect();
        for token in &stale {
            shared.state.delete_git_token(&token.vm_id).await?;
        }
        if !stale.is_empty() {
            write_access(shared, &network.id, &running.vm).await?;
        }
        let have: Vec<&str> = tokens.iter().map(|t| t.vm_id.as_str()).collect();
        for nic in nics.iter().filter(|n| n.vm_id != running.vm.id && !have.contains(&n.vm_id.as_str())) {
            let Some(vm) = shared.state.vm_by_id(&nic.vm_id).await? else { continue };
            let skip = NO_GIT.lock().expect("never poisoned").contains(&vm.id);
            if skip || owner.is_some_and(|o| o != vm.owner) || !agent_ready(&vm) || vm.owner.starts_with("system:") {
                continue;
            }
            match grant(shared, network, running, &vm, false).await {
                Ok(()) => {}
                Err(ToolError::Invalid(e)) => {
                    tracing::info!(vm = %vm.id, "no git credentials for this VM: {e}");
                    NO_GIT.lock().expect("never poisoned").push(vm.id.clone());
                }
                Err(e) => tracing::warn!(vm = %vm.id, error = %e, "cannot install git credentials in the VM yet"),
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(network = %network.name, error = %e, "cannot hand out git credentials");
    }
}

/// After `vm_create {wait_ready}` on a network with a git service: the VM's credentials now.
/// (Other VMs get theirs from the reconciler once their agent answers.)
pub(super) async fn vm_ready(shared: &Shared, vm: &VmRow) {
    let Ok(Some(nic)) = shared.state.nic(&vm.id).await else { return };
    let Ok(Some(service)) = shared.state.git_service(&nic.network_id).await else { return };
    let (Ok(Some(network)), Ok(Some(service_vm))) =
        (shared.state.network(&nic.network_id).await, shared.state.vm_by_id(&service.vm_id).await)
    else {
        return;
    };
    if service_vm.id == vm.id || service_vm.state != VmState::Running {
        return;
    }
    let Ok(Some(service_nic)) = shared.state.nic(&service_vm.id).await else { return };
    let running = Running { service, vm: service_vm, ip: service_nic.ip };
    if let Err(e) = grant(shared, &network, &running, vm, true).await {
        tracing::warn!(vm = %vm.id, error = %e, "cannot install git credentials in the new VM yet");
    }
}

/// After a VM is deleted: its token is forgotten and its service's access file rewritten, so
/// a copy of the token is worthless (a VM made later at the same address gets its own).
pub(super) async fn vm_deleted(shared: &Shared, vm_id: &str) {
    NO_GIT.lock().expect("never poisoned").retain(|id| id != vm_id);
    let revoked = async {
        let Some(network_id) = shared.state.delete_git_token(vm_id).await? else { return Ok(()) };
        let Some(service) = shared.state.git_service(&network_id).await? else { return Ok(()) };
        let Some(vm) = shared.state.vm_by_id(&service.vm_id).await? else { return Ok(()) };
        if vm.state == VmState::Running {
            write_access(shared, &network_id, &vm).await?;
        }
        Ok::<(), ToolError>(())
    };
    if let Err(e) = revoked.await {
        tracing::warn!(vm = vm_id, error = %e, "cannot rewrite the git access file: the deleted VM's token stays \
                       valid there until it is next written (the next git change on the network, or the \
                       service VM's next start)");
    }
}

/// Every [`RECONCILE_EVERY`]: a crashed service VM is started again, and running VMs on a
/// service's network that have no git credentials yet get theirs.
pub async fn reconcile(shared: std::sync::Arc<Shared>, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let services = match shared.state.git_services().await {
            Ok(services) => services,
            Err(e) => {
                tracing::warn!(error = %e, "git reconcile: cannot read the services");
                continue;
            }
        };
        for service in services {
            let Ok(Some(network)) = shared.state.network(&service.network_id).await else { continue };
            let state = shared.state.vm_by_id(&service.vm_id).await.ok().flatten().map(|vm| vm.state);
            if !matches!(state, Some(VmState::Running | VmState::Crashed)) {
                // Stopped by an admin, or being made or deleted: the next git call starts it.
                continue;
            }
            match ensure(&shared, &network).await {
                Ok(running) => grant_all(&shared, &network, &running, None).await,
                Err(e) => tracing::warn!(network = %network.name, error = %e, "git reconcile: the service is down"),
            }
        }
    }
}

/// The repository a call names, re-checked against the caller for `tool`: someone else's reads
/// as missing.
async fn repo_for(
    shared: &Shared,
    ctx: &CallContext,
    tool: ToolName,
    arg: &str,
    network: Option<&str>,
) -> Result<(RepoRow, NetworkRow), ToolError> {
    let network = network_opt(shared, network).await?;
    let row = crate::security::resource::repo_row(
        &shared.state,
        &ctx.principal.name,
        arg,
        network.as_ref().map(|n| n.id.as_str()),
    )
    .await?;
    if !shared.authz.bundle().is_allowed(&ctx.principal, tool, &repo_resource(&row)) {
        return Err(ToolError::NotFound(repo_not_found(arg)));
    }
    let network = match network {
        Some(n) => n,
        None => network_row(shared, &row.network_id).await?,
    };
    Ok((row, network))
}

fn repo_info(row: &RepoRow, network: &str, ip: &str) -> GitRepoInfo {
    GitRepoInfo {
        id: row.id.clone(),
        name: row.name.clone(),
        network: network.to_string(),
        owner: row.owner.clone(),
        clone_url: format!("http://{ip}/{}.git", row.name),
        created_at: row.created_at.clone(),
    }
}

pub async fn repo_create(shared: &Shared, ctx: &CallContext, input: GitRepoCreateInput) -> Result<Value, ToolError> {
    let network = network_row(shared, &input.network).await?;
    let running = ensure(shared, &network).await?;
    let row = RepoRow {
        id: random_id("repo"),
        name: input.name.clone(),
        network_id: network.id.clone(),
        owner: ctx.principal.name.clone(),
        created_at: now(),
    };
    shared.state.insert_repo(&row).await?;
    let path = repo_path(&row.name);
    // mkdir first: a directory left from before (repositories kept without their records) is
    // never handed to a new owner.
    let made = async {
        let script = "mkdir -p \"$(dirname \"$1\")\" && mkdir \"$1\" && git init -q --bare -b main \"$1\"";
        git_ok(shared, &running.vm, &["sh", "-c", script, "sh", &path], "creating the repository").await?;
        write_access(shared, &network.id, &running.vm).await
    };
    if let Err(e) = made.await {
        shared.state.delete_repo(&row.id).await?;
        return Err(e);
    }
    grant_all(shared, &network, &running, Some(&ctx.principal.name)).await;
    Ok(to_value(GitRepoOutput { repo: repo_info(&row, &network.name, &running.ip) }))
}

pub async fn repo_list(shared: &Shared, ctx: &CallContext, input: GitRepoListInput) -> Result<Value, ToolError> {
    let network = network_opt(shared, input.network.as_deref()).await?;
    let bundle = shared.authz.bundle();
    let networks: BTreeMap<String, String> =
        shared.state.networks().await?.into_iter().map(|n| (n.id, n.name)).collect();
    let mut ips = BTreeMap::new();
    for service in shared.state.git_services().await? {
        let ip = shared.state.nic(&service.vm_id).await?.map(|n| n.ip).unwrap_or_default();
        ips.insert(service.network_id, ip);
    }
    let repos = shared
        .state
        .repos(network.as_ref().map(|n| n.id.as_str()))
        .await?
        .into_iter()
        .filter(|r| bundle.is_allowed(&ctx.principal, ToolName::GitRepoLog, &repo_resource(r)))
        .map(|r| {
            let name = networks.get(&r.network_id).cloned().unwrap_or_default();
            let ip = ips.get(&r.network_id).cloned().unwrap_or_default();
            repo_info(&r, &name, &ip)
        })
        .collect();
    Ok(to_value(GitRepoListOutput { repos }))
}

pub async fn repo_delete(
    shared: &Shared,
    ctx: &CallContext,
    arg: &str,
    network: Option<&str>,
) -> Result<Value, ToolError> {
    let (row, network) = repo_for(shared, ctx, ToolName::GitRepoDelete, arg, network).await?;
    let running = ensure(shared, &network).await?;
    shared.state.delete_repo(&row.id).await?;
    write_access(shared, &network.id, &running.vm).await?;
    git_ok(shared, &running.vm, &["rm", "-rf", "--", &repo_path(&row.name)], "removing the repository").await?;
    Ok(to_value(GitRepoDeleteOutput { deleted: row.id, name: row.name }))
}

/// The commit `reference` names in the repository, or None when it names none (an empty
/// repository's HEAD, a branch that does not exist).
async fn resolve_ref(shared: &Shared, vm: &VmRow, path: &str, reference: &str) -> Result<Option<String>, ToolError> {
    let spec = format!("{reference}^{{commit}}");
    let out = exec(shared, vm, &["git", "-C", path, "rev-parse", "--verify", "--quiet", &spec], None, 30).await?;
    Ok((out.exit_code == Some(0)).then(|| out.stdout.trim().to_string()))
}

fn checked_ref(reference: &str) -> Result<(), ToolError> {
    if moat_tools::git::valid_ref(reference) {
        Ok(())
    } else {
        Err(ToolError::Invalid(format!(
            "`{reference}` is not a ref moat passes to git: use a branch, tag or commit name without '..', '//', \
             a trailing '.' or '/', or '.lock'"
        )))
    }
}

pub async fn repo_log(shared: &Shared, ctx: &CallContext, input: GitRepoLogInput) -> Result<Value, ToolError> {
    let (row, network) = repo_for(shared, ctx, ToolName::GitRepoLog, &input.repo, input.network.as_deref()).await?;
    let reference = input.reference.clone().unwrap_or_else(|| "HEAD".into());
    checked_ref(&reference)?;
    let running = ensure(shared, &network).await?;
    let path = repo_path(&row.name);
    let Some(commit) = resolve_ref(shared, &running.vm, &path, &reference).await? else {
        if input.reference.is_none() {
            return Ok(to_value(GitRepoLogOutput { repo: row.name, reference, commits: Vec::new() }));
        }
        return Err(ToolError::NotFound(format!(
            "repository {} has no branch, tag or commit `{reference}`; git_repo_branches lists its branches",
            row.name
        )));
    };
    let limit = format!("-n{}", input.limit.unwrap_or(20));
    let text = git_ok(
        shared,
        &running.vm,
        &["git", "-C", &path, "log", &limit, "--format=%H%x1f%an%x1f%ae%x1f%aI%x1f%s", &commit, "--"],
        "reading the history",
    )
    .await?;
    let commits = text
        .lines()
        .filter_map(|line| {
            let mut f = line.split('\x1f');
            Some(GitCommit {
                sha: f.next()?.into(),
                author: f.next()?.into(),
                email: f.next()?.into(),
                date: f.next()?.into(),
                subject: f.next().unwrap_or_default().into(),
            })
        })
        .collect();
    Ok(to_value(GitRepoLogOutput { repo: row.name, reference, commits }))
}

pub async fn repo_branches(
    shared: &Shared,
    ctx: &CallContext,
    arg: &str,
    network: Option<&str>,
) -> Result<Value, ToolError> {
    let (row, network) = repo_for(shared, ctx, ToolName::GitRepoBranches, arg, network).await?;
    let running = ensure(shared, &network).await?;
    let path = repo_path(&row.name);
    let text = git_ok(
        shared,
        &running.vm,
        &["git", "-C", &path, "for-each-ref", "--format=%(refname:short)%1f%(objectname)", "refs/heads"],
        "listing the branches",
    )
    .await?;
    let branches = text
        .lines()
        .filter_map(|l| l.split_once('\x1f'))
        .map(|(name, sha)| GitBranch { name: name.into(), sha: sha.into() })
        .collect();
    let head = git_ok(shared, &running.vm, &["git", "-C", &path, "symbolic-ref", "--short", "HEAD"], "reading HEAD")
        .await?
        .trim()
        .to_string();
    Ok(to_value(GitRepoBranchesOutput { repo: row.name, head, branches }))
}

pub async fn repo_push(shared: &Shared, ctx: &CallContext, input: GitRepoPushInput) -> Result<Value, ToolError> {
    let (row, network) = repo_for(shared, ctx, ToolName::GitRepoPush, &input.repo, input.network.as_deref()).await?;
    checked_ref(&input.reference)?;
    let running = ensure(shared, &network).await?;
    let path = repo_path(&row.name);
    if resolve_ref(shared, &running.vm, &path, &input.reference).await?.is_none() {
        return Err(ToolError::NotFound(format!(
            "repository {} has no branch or ref `{}` to push; git_repo_branches lists its branches",
            row.name, input.reference
        )));
    }
    let timeout = input.timeout_s.unwrap_or(60);
    let helper = format!("credential.helper=store --file={}", credentials_file(&row.owner));
    let refspec = format!("{0}:{0}", input.reference);
    let seconds = timeout.to_string();
    let argv = [
        "timeout",
        "-k",
        "5",
        &seconds,
        "git",
        "-C",
        &path,
        "-c",
        "credential.helper=",
        "-c",
        &helper,
        "-c",
        "http.lowSpeedLimit=1000",
        "-c",
        "http.lowSpeedTime=20",
        "push",
        "--",
        &input.remote_url,
        &refspec,
    ];
    let out = exec(shared, &running.vm, &argv, None, timeout + 10).await?;
    let said = format!("{}{}", out.stdout, out.stderr).trim().to_string();
    if out.exit_code == Some(124) || out.timed_out {
        return Err(ToolError::Node(format!(
            "git push to {} did not finish within {timeout} s and was stopped (is the remote reachable from the \
             network?); git said: {said}",
            input.remote_url
        )));
    }
    if out.exit_code != Some(0) {
        return Err(ToolError::Invalid(format!("git push to {} failed: {said}", input.remote_url)));
    }
    Ok(to_value(GitRepoPushOutput {
        repo: row.name,
        remote_url: input.remote_url,
        reference: input.reference,
        output: said,
    }))
}

pub async fn credential_set(
    shared: &Shared,
    ctx: &CallContext,
    input: GitCredentialSetInput,
) -> Result<Value, ToolError> {
    let network = network_or_only(shared, input.network.as_deref()).await?;
    let running = ensure(shared, &network).await?;
    let file = credentials_file(&ctx.principal.name);
    // Stored for both schemes (the remote URL of a push decides which one is used); the secret
    // goes in on standard input, which no log or audit record holds.
    let stdin = format!("host={}\nusername={}\npassword={}\n", input.remote_host, input.username, input.secret);
    let script = "umask 077 && mkdir -p \"$(dirname \"$1\")\" && desc=$(cat) && for scheme in https http; do \
                  printf 'protocol=%s\\n%s\\n\\n' \"$scheme\" \"$desc\" | git credential-store --file \"$1\" store \
                  || exit 1; done";
    let out = exec(shared, &running.vm, &["sh", "-c", script, "sh", &file], Some(stdin), 30).await?;
    if out.exit_code != Some(0) {
        // Not git's words: they could repeat what it was given.
        return Err(ToolError::Node(format!(
            "storing the credential in the git service VM failed (exit {:?}); nothing was recorded",
            out.exit_code
        )));
    }
    let row = CredentialRow {
        network_id: network.id.clone(),
        owner: ctx.principal.name.clone(),
        remote_host: input.remote_host,
        username: input.username,
        updated_at: now(),
    };
    shared.state.put_git_credential(&row).await?;
    Ok(to_value(GitCredentialOutput { credential: credential_info(&row, &network.name) }))
}

pub async fn credential_delete(
    shared: &Shared,
    ctx: &CallContext,
    input: GitCredentialDeleteInput,
) -> Result<Value, ToolError> {
    let network = network_or_only(shared, input.network.as_deref()).await?;
    let owner = &ctx.principal.name;
    let known = shared
        .state
        .git_credentials()
        .await?
        .into_iter()
        .any(|c| c.network_id == network.id && c.owner == *owner && c.remote_host == input.remote_host);
    if !known {
        return Err(ToolError::NotFound(format!(
            "you have no credential for {} on network {}; git_credential_list shows yours",
            input.remote_host, network.name
        )));
    }
    let running = ensure(shared, &network).await?;
    let script = "[ -f \"$1\" ] || exit 0; for scheme in https http; do printf 'protocol=%s\\nhost=%s\\n\\n' \
                  \"$scheme\" \"$2\" | git credential-store --file \"$1\" erase || exit 1; done";
    let file = credentials_file(owner);
    git_ok(shared, &running.vm, &["sh", "-c", script, "sh", &file, &input.remote_host], "erasing the credential")
        .await?;
    shared.state.delete_git_credential(&network.id, owner, &input.remote_host).await?;
    Ok(to_value(GitCredentialDeleteOutput { network: network.name, deleted: input.remote_host }))
}

fn credential_info(row: &CredentialRow, network: &str) -> GitCredentialInfo {
    GitCredentialInfo {
        network: network.to_string(),
        owner: row.owner.clone(),
        remote_host: row.remote_host.clone(),
        username: row.username.clone(),
        updated_at: row.updated_at.clone(),
    }
}

pub async fn credential_list(
    shared: &Shared,
    ctx: &CallContext,
    input: GitCredentialListInput,
) -> Result<Value, ToolError> {
    let network = network_opt(shared, input.network.as_deref()).await?;
    let names: BTreeMap<String, String> = shared.state.networks().await?.into_iter().map(|n| (n.id, n.name)).collect();
    let bundle = shared.authz.bundle();
    let credentials = shared
        .state
        .git_credentials()
        .await?
        .into_iter()
        .filter(|c| network.as_ref().is_none_or(|n| n.id == c.network_id))
        .filter(|c| bundle.is_allowed(&ctx.principal, ToolName::GitCredentialList, &credential_resource(&c.owner)))
        .map(|c| credential_info(&c, names.get(&c.network_id).map(String::as_str).unwrap_or_default()))
        .collect();
    Ok(to_value(GitCredentialListOutput { credentials }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_files_are_per_owner_and_safe_names() {
        let a = credentials_file("alice");
        assert_ne!(a, credentials_file("bob"));
        assert!(a.starts_with("/workspaces/repos/credentials/"));
        let name = a.rsplit('/').next().unwrap();
        assert!(name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit()), "{name}");
    }
}
