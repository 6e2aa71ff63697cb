//! The git service: one service VM per network serves git repositories over smart HTTP to the
//! VMs on that network. Repositories are owned (an agent's VMs clone and push only its own,
//! enforced by the server inside the service VM with per-VM credentials moat installs); pushes
//! to remotes run inside the service VM with credentials that never leave it. The service VMs
//! themselves are shared infrastructure: vm-admins and up ensure, inspect and delete them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{ActionGroup, Hints, ResourceKind, ToolClass, ToolName, ToolSpec, spec_for as spec};

/// A host name (or address) with an optional port, as git credentials key them.
const HOST: &str = r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})(:[0-9]{1,5})?$";
/// A git ref or branch: letters, digits and `._/-`, not starting with '-' or '.'; [`valid_ref`]
/// checks the rest of git's rules that a pattern cannot say simply.
const REF: &str = r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,199}$";
/// A remote's URL: http or https only (the credentials are HTTP credentials).
const REMOTE_URL: &str = r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%/-]*)?$";

/// Names the network whose git service a call is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitServiceRefInput {
    /// The network (name or id).
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub network: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitServiceDeleteInput {
    /// The network (name or id).
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub network: String,
    /// Also delete the workspace holding the repositories and forget them [default: false: the
    /// repositories stay on their workspace and come back with the next git_service_ensure].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_repositories: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitServiceListInput {}

/// One network's git service VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GitServiceInfo {
    /// The network's name.
    pub network: String,
    pub node: String,
    /// The service VM's id (owned by the system, absent from agents' vm_list).
    pub vm: String,
    /// The service VM's state, e.g. "running".
    pub state: String,
    /// Its address on the network; clone URLs start with `http://<ip>/`.
    pub ip: String,
    /// The workspace holding the repositories (they outlive the service VM).
    pub workspace: String,
    /// Repositories on it.
    pub repos: u32,
    pub created_at: String,
    /// What is wrong, when something is (the VM is down and could not be started, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GitServiceOutput {
    pub service: GitServiceInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GitServiceListOutput {
    pub services: Vec<GitServiceInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GitServiceDeleteOutput {
    pub network: String,
    /// The service VM that was deleted.
    pub vm: String,
    /// Whether the repositories went too.
    pub repositories_deleted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitRepoCreateInput {
    /// Repository name, a DNS label (no '/', '.' or spaces); unique on its network.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub name: String,
    /// The network (name or id) whose git service holds it; the service VM starts if it is not
    /// running yet.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub network: String,
}

/// Names one repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitRepoRefInput {
    /// The repository's name or id (e.g. "repo-3f9a0c1d2e4b").
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub repo: String,
    /// Its network (name or id), when the name is used on several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub network: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitRepoListInput {
    /// Only repositories on this network (name or id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub network: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GitRepoInfo {
    pub id: String,
    pub name: String,
    pub network: String,
    pub owner: String,
    /// What the owner's VMs on the network clone, e.g. "http://10.80.0.2/app.git"; their
    /// credentials are installed by moat (git's credential store, /root/.git-credentials).
    pub clone_url: String,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GitRepoOutput {
    pub repo: GitRepoInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GitRepoListOutput {
    pub repos: Vec<GitRepoInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GitRepoDeleteOutput {
    pub deleted: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitRepoLogInput {
    /// The repository's name or id.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub repo: String,
    /// Its network, when the name is used on several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub network: Option<String>,
    /// Branch, tag or commit to start from [default: HEAD].
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = REF))]
    pub reference: Option<String>,
    /// At most this many commits, newest first [default: 20].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GitCommit {
    pub sha: String,
    pub author: String,
    pub email: String,
    /// Author date, ISO 8601.
    pub date: String,
    pub subject: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GitRepoLogOutput {
    pub repo: String,
    #[serde(rename = "ref")]
    pub reference: String,
    /// Newest first; empty for a repository nothing was pushed to yet.
    pub commits: Vec<GitCommit>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GitBranch {
    pub name: String,
    /// The commit it points at.
    pub sha: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GitRepoBranchesOutput {
    pub repo: String,
    /// The branch HEAD names (what a clone checks out).
    pub head: String,
    pub branches: Vec<GitBranch>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitCredentialSetInput {
    /// The remote's host (and port, when not the default), e.g. "github.com".
    #[schemars(length(min = 1, max = 259), regex(pattern = HOST))]
    pub remote_host: String,
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[^\s:/@]+$"))]
    pub username: String,
    /// The password or token. Stored only inside the service VM; never returned, logged or
    /// audited.
    #[schemars(length(min = 1, max = 4096), regex(pattern = r"^[^\r\n]+$"))]
    pub secret: String,
    /// The network whose git service keeps it [default: the only git service].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub network: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitCredentialDeleteInput {
    /// The remote's host (and port), as it was set.
    #[schemars(length(min = 1, max = 259), regex(pattern = HOST))]
    pub remote_host: String,
    /// The network whose git service keeps it [default: the only git service].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub network: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GitCredentialDeleteOutput {
    pub network: String,
    /// The host whose credential is gone from the service VM.
    pub deleted: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitCredentialListInput {
    /// Only credentials kept by this network's git service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub network: Option<String>,
}

/// A remote credential: who may use it and for what, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GitCredentialInfo {
    pub network: String,
    /// Whose pushes use it (credentials are per owner).
    pub owner: String,
    pub remote_host: String,
    pub username: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GitCredentialOutput {
    pub credential: GitCredentialInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GitCredentialListOutput {
    pub credentials: Vec<GitCredentialInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitRepoPushInput {
    /// The repository's name or id.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub repo: String,
    /// Its network, when the name is used on several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub network: Option<String>,
    /// Where to push: an http(s) URL without credentials in it (git_credential_set keeps those).
    #[schemars(length(min = 8, max = 2048), regex(pattern = REMOTE_URL))]
    pub remote_url: String,
    /// The branch or ref to push, e.g. "main" (pushed to the same name on the remote).
    #[serde(rename = "ref")]
    #[schemars(regex(pattern = REF))]
    pub reference: String,
    /// Seconds before the push is given up [default: 60].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5, max = 600))]
    pub timeout_s: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GitRepoPushOutput {
    pub repo: String,
    pub remote_url: String,
    #[serde(rename = "ref")]
    pub reference: String,
    /// What git said (its progress and the ref update lines).
    pub output: String,
}

/// Whether `r` is a ref moat passes to git: [`REF`], and no "..", "//", "@{", ".lock" or
/// trailing '.' or '/' (git check-ref-format's rules, for the characters REF allows).
pub fn valid_ref(r: &str) -> bool {
    let first_ok = r.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    first_ok
        && r.len() <= 200
        && r.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'))
        && !r.contains("..")
        && !r.contains("//")
        && !r.contains("/.")
        && !r.ends_with('.')
        && !r.ends_with('/')
        && !r.ends_with(".lock")
}

const WRITE: Hints = Hints { read_only: false, destructive: false, idempotent: false, open_world: false };
const ENSURE: Hints = Hints { read_only: false, destructive: false, idempotent: true, open_world: false };
const DELETE: Hints = Hints { read_only: false, destructive: true, idempotent: false, open_world: false };
const PUSH: Hints = Hints { read_only: false, destructive: false, idempotent: true, open_world: true };

pub(crate) fn git_service_ensure_spec() -> ToolSpec {
    spec::<GitServiceRefInput, GitServiceOutput>(
        ToolName::GitServiceEnsure,
        "Ensure a network's git service",
        "Makes sure the network has its git service VM running (made on first use: the `git` \
         image, a workspace for the repositories, a security group letting the network reach it \
         on port 80) and answers its state. git_repo_create does this too. vm-admins and \
         cluster-admins only.",
        ENSURE,
        (ToolClass::Write, ActionGroup::Network, ResourceKind::Network),
        json!({"network": "dev"}),
    )
}

pub(crate) fn git_service_list_spec() -> ToolSpec {
    spec::<GitServiceListInput, GitServiceListOutput>(
        ToolName::GitServiceList,
        "List git services",
        "Lists the networks' git service VMs: network, node, VM, state, address and how many \
         repositories each holds. vm-admins and cluster-admins only.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Network, ResourceKind::Cluster),
        json!({}),
    )
}

pub(crate) fn git_service_inspect_spec() -> ToolSpec {
    spec::<GitServiceRefInput, GitServiceOutput>(
        ToolName::GitServiceInspect,
        "Inspect a git service",
        "Shows one network's git service VM: state (as its node reports it now), address, the \
         workspace holding its repositories and how many there are. vm-admins and cluster-admins \
         only.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Network, ResourceKind::Network),
        json!({"network": "dev"}),
    )
}

pub(crate) fn git_service_delete_spec() -> ToolSpec {
    spec::<GitServiceDeleteInput, GitServiceDeleteOutput>(
        ToolName::GitServiceDelete,
        "Delete a git service",
        "Deletes a network's git service VM and its security group (so the network can be \
         deleted). The repositories stay on their workspace and come back with the next \
         git_service_ensure, unless delete_repositories is true. vm-admins and cluster-admins only.",
        DELETE,
        (ToolClass::Write, ActionGroup::Network, ResourceKind::Network),
        json!({"network": "dev"}),
    )
}

pub(crate) fn git_repo_create_spec() -> ToolSpec {
    spec::<GitRepoCreateInput, GitRepoOutput>(
        ToolName::GitRepoCreate,
        "Create a git repository",
        "Creates an empty repository you own in the network's git service (started if needed) \
         and returns its clone URL. Your VMs on that network clone and push it with credentials \
         moat installed in them; other owners' VMs are refused by the server.",
        WRITE,
        (ToolClass::Write, ActionGroup::Git, ResourceKind::GitRepo),
        json!({"name": "app", "network": "dev"}),
    )
}

pub(crate) fn git_repo_list_spec() -> ToolSpec {
    spec::<GitRepoListInput, GitRepoListOutput>(
        ToolName::GitRepoList,
        "List git repositories",
        "Lists the repositories you may see (your own; all for admins and readers) with their \
         network and clone URL.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Read, ResourceKind::GitRepo),
        json!({}),
    )
}

pub(crate) fn git_repo_delete_spec() -> ToolSpec {
    spec::<GitRepoRefInput, GitRepoDeleteOutput>(
        ToolName::GitRepoDelete,
        "Delete a git repository",
        "Deletes one of your repositories from its git service, with all its history. Push it \
         somewhere first (git_repo_push) if you want to keep it.",
        DELETE,
        (ToolClass::Write, ActionGroup::Git, ResourceKind::GitRepo),
        json!({"repo": "app"}),
    )
}

pub(crate) fn git_repo_log_spec() -> ToolSpec {
    spec::<GitRepoLogInput, GitRepoLogOutput>(
        ToolName::GitRepoLog,
        "Show a repository's history",
        "Lists a repository's commits, newest first, from a branch, tag or commit (default \
         HEAD): sha, author, date and subject.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Read, ResourceKind::GitRepo),
        json!({"repo": "app", "limit": 10}),
    )
}

pub(crate) fn git_repo_branches_spec() -> ToolSpec {
    spec::<GitRepoRefInput, GitRepoBranchesOutput>(
        ToolName::GitRepoBranches,
        "List a repository's branches",
        "Lists a repository's branches with the commit each points at, and the branch HEAD names.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Read, ResourceKind::GitRepo),
        json!({"repo": "app"}),
    )
}

pub(crate) fn git_credential_set_spec() -> ToolSpec {
    spec::<GitCredentialSetInput, GitCredentialOutput>(
        ToolName::GitCredentialSet,
        "Store a remote git credential",
        "Stores a username and secret (password or token) for a remote host inside the git \
         service VM, for your git_repo_push calls to that host. The secret never leaves the \
         service VM: no tool returns it and moat's logs and audit record only that it was set. \
         Setting it again replaces it.",
        ENSURE,
        (ToolClass::Write, ActionGroup::Git, ResourceKind::GitCredential),
        json!({"remote_host": "git.example.com", "username": "ci", "secret": "…"}),
    )
}

pub(crate) fn git_credential_delete_spec() -> ToolSpec {
    spec::<GitCredentialDeleteInput, GitCredentialDeleteOutput>(
        ToolName::GitCredentialDelete,
        "Delete a remote git credential",
        "Removes your stored credential for a remote host from the git service VM; pushes to that \
         host then go without one.",
        DELETE,
        (ToolClass::Write, ActionGroup::Git, ResourceKind::GitCredential),
        json!({"remote_host": "git.example.com"}),
    )
}

pub(crate) fn git_credential_list_spec() -> ToolSpec {
    spec::<GitCredentialListInput, GitCredentialListOutput>(
        ToolName::GitCredentialList,
        "List remote git credentials",
        "Lists the remote credentials you stored (all for admins and readers): network, host and \
         username, never the secret.",
        Hints::READ,
        (ToolClass::Read, ActionGroup::Read, ResourceKind::GitCredential),
        json!({}),
    )
}

pub(crate) fn git_repo_push_spec() -> ToolSpec {
    spec::<GitRepoPushInput, GitRepoPushOutput>(
        ToolName::GitRepoPush,
        "Push a repository to a remote",
        "Runs `git push <remote_url> <ref>` inside the git service VM, with your stored \
         credential for that host (git_credential_set), and returns what git said. Fails with \
         git's message when the remote refuses or cannot be reached within timeout_s.",
        PUSH,
        (ToolClass::Exec, ActionGroup::Git, ResourceKind::GitRepo),
        json!({"repo": "app", "remote_url": "https://git.example.com/team/app.git", "ref": "main"}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, s: &str) -> bool {
        regex::Regex::new(pattern).unwrap().is_match(s)
    }

    #[test]
    fn refs_and_urls() {
        for ok in ["main", "feature/x", "v1.2", "release-1", "HEAD"] {
            assert!(matches(REF, ok) && valid_ref(ok), "{ok}");
        }
        for bad in ["-f", "--force", "a..b", "a b", "main.", "x/", "a//b", "HEAD^", "a:b", "", "x/.y", "m.lock"] {
            assert!(!(matches(REF, bad) && valid_ref(bad)), "{bad}");
        }
        for ok in ["http://192.0.2.2:8080/app.git", "https://git.example.com/team/app.git"] {
            assert!(matches(REMOTE_URL, ok), "{ok}");
        }
        for bad in ["ssh://h/x", "http://user:pw@h/x", "file:///etc", "-uhttp://h", "http://h/x y", "ext::sh"] {
            assert!(!matches(REMOTE_URL, bad), "{bad}");
        }
        for bad in ["a/b", "-x", "h:port", "h h"] {
            assert!(!matches(HOST, bad), "{bad}");
        }
        assert!(matches(HOST, "git.example.com:8443"));
    }
}
