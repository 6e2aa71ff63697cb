//! Authorization with Cedar: the policy bundle (schema, policies, limits)
//! from `policies/`, validated at load, swapped atomically on reload, and the
//! one question the pipeline asks: may this principal run this tool on this
//! resource?

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicySet, Request,
    RestrictedExpression, Schema, ValidationMode, Validator,
};
use moat_tools::{ResourceKind, ToolName};

use super::limits::{Limiter, LimitsConfig};
pub use super::resource::ResourceRef;
pub use crate::config::PolicySource;
use crate::principal::{Principal, Role};

const EMBEDDED_SCHEMA: &str = include_str!("../../../policies/moat.cedarschema");
const EMBEDDED_POLICIES: &str = include_str!("../../../policies/moat.cedar");
const EMBEDDED_LIMITS: &str = include_str!("../../../policies/limits.toml");

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{source_name}: the Cedar schema does not parse: {message}")]
    Schema { source_name: String, message: String },
    #[error("{source_name}: the Cedar policies do not parse: {message}")]
    Parse { source_name: String, message: String },
    #[error("{source_name}: policies do not validate against the schema: {message}")]
    Invalid { source_name: String, message: String },
    #[error("{source_name}: the schema has no action for tool `{tool}`; add it to an action group")]
    MissingAction { source_name: String, tool: &'static str },
    #[error("{source_name}: action `{tool}` must be in action group `{group}`, which moat_tools gives it")]
    WrongGroup { source_name: String, tool: &'static str, group: &'static str },
    #[error("{source_name}: limits.toml: {message}")]
    Limits { source_name: String, message: String },
}

/// A validated set of policies, with the limits that go with them.
pub struct Bundle {
    pub source: PolicySource,
    schema: Schema,
    policies: PolicySet,
    /// The action hierarchy (tool actions `in` groups), needed by every request.
    actions: Entities,
    pub limiter: Limiter,
    /// Decisions already made under this bundle; dropped with it on reload. Cedar's answer
    /// depends only on the principal, action and resource entities, all of which are in the key.
    decisions: Mutex<HashMap<DecisionKey, bool>>,
}

type DecisionKey = (Principal, ToolName, ResourceRef);

/// Beyond this many cached decisions the cache starts over (bounded memory).
const MAX_CACHED_DECISIONS: usize = 65_536;
/// Stack a decision must find left, else it runs on a fresh segment of [`CEDAR_STACK`]. Cedar
/// insists on 100 KiB at each step, and building the request's entities and evaluating takes
/// between 384 and 512 KiB in a debug build (measured with threads of those sizes).
const CEDAR_RED_ZONE: usize = 1024 * 1024;
const CEDAR_STACK: usize = 2 * 1024 * 1024;

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle").field("source", &self.source).finish_non_exhaustive()
    }
}

impl Bundle {
    pub fn load(source: &PolicySource) -> Result<Bundle, PolicyError> {
        let (schema_text, policy_text, limits_text) = match source {
            PolicySource::Embedded => (EMBEDDED_SCHEMA.into(), EMBEDDED_POLICIES.into(), EMBEDDED_LIMITS.into()),
            PolicySource::Dir(dir) => {
                (read(&dir.join("moat.cedarschema"))?, read(&dir.join("moat.cedar"))?, read(&dir.join("limits.toml"))?)
            }
        };
        let name = |file: &str| match source {
            PolicySource::Embedded => format!("(built-in) policies/{file}"),
            PolicySource::Dir(d) => d.join(file).display().to_string(),
        };
        let (schema, _warnings) = Schema::from_cedarschema_str(&schema_text)
            .map_err(|e| PolicyError::Schema { source_name: name("moat.cedarschema"), message: format!("{e:?}") })?;
        let policies = PolicySet::from_str(&policy_text)
            .map_err(|e| PolicyError::Parse { source_name: name("moat.cedar"), message: e.to_string() })?;
        let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        if !result.validation_passed() {
            let message = result.validation_errors().map(|e| e.to_string()).collect::<Vec<_>>().join("; ");
            return Err(PolicyError::Invalid { source_name: name("moat.cedar"), message });
        }
        let known: HashSet<String> = schema.actions().map(|a| a.id().unescaped().to_string()).collect();
        for tool in ToolName::ALL {
            if !known.contains(tool.cedar_action()) {
                return Err(PolicyError::MissingAction { source_name: name("moat.cedarschema"), tool: tool.as_str() });
            }
        }
        let actions = schema
            .action_entities()
            .map_err(|e| PolicyError::Schema { source_name: name("moat.cedarschema"), message: e.to_string() })?;
        // Roles are granted groups: a tool filed under another group than its spec says would be
        // granted to the wrong roles.
        for tool in ToolName::ALL {
            let group = tool.spec().group.cedar_id();
            let (action, group_uid) = match (uid("Moat::Action", tool.cedar_action()), uid("Moat::Action", group)) {
                (Ok(a), Ok(g)) => (a, g),
                _ => {
                    return Err(PolicyError::MissingAction {
                        source_name: name("moat.cedarschema"),
                        tool: tool.as_str(),
                    });
                }
            };
            if !actions.is_ancestor_of(&group_uid, &action) {
                return Err(PolicyError::WrongGroup {
                    source_name: name("moat.cedarschema"),
                    tool: tool.as_str(),
                    group,
                });
            }
        }
        let limits = LimitsConfig::parse(&limits_text)
            .map_err(|message| PolicyError::Limits { source_name: name("limits.toml"), message })?;
        Ok(Bundle {
            source: source.clone(),
            schema,
            policies,
            actions,
            limiter: Limiter::new(&limits),
            decisions: Mutex::default(),
        })
    }

    /// Whether `principal` may call `tool` on `resource`.
    pub fn is_allowed(&self, principal: &Principal, tool: ToolName, resource: &ResourceRef) -> bool {
        let key = (principal.clone(), tool, resource.clone());
        if let Some(&known) = self.decisions.lock().expect("the decision cache lock is never poisoned").get(&key) {
            return known;
        }
        let allowed = match self.decide(principal, tool, resource) {
            Ok(allowed) => allowed,
            Err(e) => {
                // A request the schema rejects is a moat bug; deny, loudly.
                tracing::error!(error = %e, %tool, "authorization request failed; denying");
                false
            }
        };
        let mut cache = self.decisions.lock().expect("the decision cache lock is never poisoned");
        if cache.len() >= MAX_CACHED_DECISIONS {
            cache.clear();
        }
        cache.insert(key, allowed);
        allowed
    }

    /// Whether `principal` could call `tool` on some resource: tested against a resource it owns,
    /// the most any policy grants (shared kinds, which never have an owner, without one). Decides
    /// what `tools/list` shows.
    pub fn may_ever_call(&self, principal: &Principal, tool: ToolName) -> bool {
        let kind = resource_kind(tool);
        let shared = ResourceRef { kind, id: "probe".into(), owner: None, labels: Vec::new() };
        // A portal's best case is a resource paired with it, owned by whom it acts for.
        let paired = principal.portal.as_ref().and_then(|p| {
            p.pairs.iter().find_map(|pair| pair.strip_prefix(kind.as_str())?.strip_prefix('/').map(String::from))
        });
        let owned = ResourceRef {
            id: paired.unwrap_or_else(|| "probe".into()),
            owner: Some(principal.owner().to_string()),
            ..shared.clone()
        };
        self.is_allowed(principal, tool, &shared) || (!kind.is_shared() && self.is_allowed(principal, tool, &owned))
    }

    /// Cedar refuses to build entities or evaluate (an error, so a deny) with less than 100 KiB of
    /// stack left, which a call nested deep in async handlers can come close to in a debug build:
    /// the decision runs on a fresh stack segment when room is short, so it never depends on depth.
    fn decide(&self, principal: &Principal, tool: ToolName, resource: &ResourceRef) -> Result<bool, String> {
        stacker::maybe_grow(CEDAR_RED_ZONE, CEDAR_STACK, || self.decide_here(principal, tool, resource))
    }

    fn decide_here(&self, principal: &Principal, tool: ToolName, resource: &ResourceRef) -> Result<bool, String> {
        let role_uid = uid("Moat::Role", principal.role.as_str())?;
        let principal_uid = uid("Moat::Principal", &principal.name)?;
        let resource_uid = uid("Moat::Resource", &format!("{}/{}", resource.kind.as_str(), resource.id))?;
        let action_uid = uid("Moat::Action", tool.cedar_action())?;

        let mut principal_attrs =
            HashMap::from([("name".to_string(), RestrictedExpression::new_string(principal.name.clone()))]);
        if let Some(portal) = &principal.portal {
            principal_attrs.insert("owner".to_string(), RestrictedExpression::new_string(portal.owner.clone()));
            principal_attrs.insert(
                "pairs".to_string(),
                RestrictedExpression::new_set(portal.pairs.iter().cloned().map(RestrictedExpression::new_string)),
            );
        }
        let principal_entity = Entity::new(principal_uid.clone(), principal_attrs, HashSet::from([role_uid.clone()]))
            .map_err(|e| e.to_string())?;
        let mut attrs = HashMap::from([
            ("kind".to_string(), RestrictedExpression::new_string(resource.kind.as_str().to_string())),
            (
                "path".to_string(),
                RestrictedExpression::new_string(format!("{}/{}", resource.kind.as_str(), resource.id)),
            ),
            (
                "labels".to_string(),
                RestrictedExpression::new_set(resource.labels.iter().cloned().map(RestrictedExpression::new_string)),
            ),
        ]);
        if let Some(owner) = &resource.owner {
            attrs.insert("owner".to_string(), RestrictedExpression::new_string(owner.clone()));
        }
        let resource_entity = Entity::new(resource_uid.clone(), attrs, HashSet::new()).map_err(|e| e.to_string())?;
        let entities = self
            .actions
            .clone()
            .add_entities(
                [principal_entity, resource_entity, Entity::new_no_attrs(role_uid, HashSet::new())],
                Some(&self.schema),
            )
            .map_err(|e| e.to_string())?;
        let request = Request::new(principal_uid, action_uid, resource_uid, Context::empty(), Some(&self.schema))
            .map_err(|e| e.to_string())?;
        let response = Authorizer::new().is_authorized(&request, &self.policies, &entities);
        let errors: Vec<String> = response.diagnostics().errors().map(|e| e.to_string()).collect();
        if !errors.is_empty() {
            return Err(format!("policy evaluation failed: {}", errors.join("; ")));
        }
        Ok(response.decision() == Decision::Allow)
    }
}

/// The resource kind a tool acts on, without building its whole spec (schemas) on the hot path.
fn resource_kind(tool: ToolName) -> ResourceKind {
    static KINDS: std::sync::OnceLock<HashMap<ToolName, ResourceKind>> = std::sync::OnceLock::new();
    *KINDS
        .get_or_init(|| moat_tools::catalog().into_iter().map(|s| (s.name, s.resource)).collect())
        .get(&tool)
        .expect("every tool is in the catalog")
}

fn uid(type_name: &str, id: &str) -> Result<EntityUid, String> {
    let ty = EntityTypeName::from_str(type_name).map_err(|e| e.to_string())?;
    Ok(EntityUid::from_type_name_and_id(ty, EntityId::new(id)))
}

fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|source| PolicyError::Read { path: path.into(), source })
}

/// The policies in force; replaced whole on reload so no call sees a half-loaded set.
pub struct Authz {
    current: RwLock<Arc<Bundle>>,
}

impl Authz {
    pub fn load(source: &PolicySource) -> Result<Authz, PolicyError> {
        Ok(Authz { current: RwLock::new(Arc::new(Bundle::load(source)?)) })
    }

    pub fn bundle(&self) -> Arc<Bundle> {
        self.current.read().expect("the policy lock is never poisoned").clone()
    }

    /// Reloads from the same source. On error the previous set stays in force.
    pub fn reload(&self) -> Result<(), PolicyError> {
        let source = self.bundle().source.clone();
        let fresh = Arc::new(Bundle::load(&source)?);
        *self.current.write().expect("the policy lock is never poisoned") = fresh;
        Ok(())
    }
}

/// The roles in order, for listings and tests.
pub const ROLES: [Role; 4] = [Role::Reader, Role::Agent, Role::VmAdmin, Role::ClusterAdmin];

#[cfg(test)]
mod tests {
    use super::*;

    fn who(name: &str, role: Role) -> Principal {
        Principal::new(name, role)
    }

    fn owned_by(owner: Option<&str>) -> ResourceRef {
        ResourceRef { kind: ResourceKind::Node, id: "x".into(), owner: owner.map(String::from), labels: vec![] }
    }

    #[test]
    fn decisions_do_not_depend_on_how_much_stack_is_left() {
        // Threads with less stack than a decision takes (Cedar insists on 100 KiB; building the
        // entities and evaluating take 384-512 KiB in a debug build), as a call nested deep in
        // async handlers can have left: the decision is still the policies'.
        let b = Arc::new(Bundle::load(&PolicySource::Embedded).unwrap());
        let own = ResourceRef {
            kind: ResourceKind::Workspace,
            id: "ws-1".into(),
            owner: Some("alice".into()),
            labels: vec![],
        };
        for kib in [96, 384, 640] {
            let (b, own) = (b.clone(), own.clone());
            let decided = std::thread::Builder::new()
                .stack_size(kib * 1024)
                .spawn(move || b.decide(&who("alice", Role::Agent), ToolName::VmCreate, &own))
                .unwrap()
                .join()
                .unwrap();
            assert_eq!(decided, Ok(true), "{kib} KiB of stack");
        }
    }

    #[test]
    fn embedded_policies_load() {
        let b = Bundle::load(&PolicySource::Embedded).unwrap();
        assert!(b.is_allowed(&who("r", Role::Reader), ToolName::Whoami, &ResourceRef::cluster()));
    }

    #[test]
    fn ownership_separates_agents() {
        // Two agents and resources each owns: the real default policies decide.
        let b = Bundle::load(&PolicySource::Embedded).unwrap();
        let (alice, bob) = (who("alice", Role::Agent), who("bob", Role::Agent));
        let read = ToolName::NodeInspect;
        assert!(b.is_allowed(&alice, read, &owned_by(Some("alice"))));
        assert!(!b.is_allowed(&alice, read, &owned_by(Some("bob"))), "agents never read others' resources");
        assert!(b.is_allowed(&bob, read, &owned_by(Some("bob"))));
        assert!(b.is_allowed(&alice, read, &owned_by(None)), "shared infrastructure is readable");
        // A reader reads everyone's; a vm-admin too.
        assert!(b.is_allowed(&who("r", Role::Reader), read, &owned_by(Some("bob"))));
        assert!(b.is_allowed(&who("v", Role::VmAdmin), read, &owned_by(Some("bob"))));
        // Principal names are data, not policy syntax.
        let tricky = who("bob\" || true", Role::Agent);
        assert!(!b.is_allowed(&tricky, read, &owned_by(Some("bob"))));
    }

    #[test]
    fn audit_is_cluster_admin_only() {
        let b = Bundle::load(&PolicySource::Embedded).unwrap();
        for role in ROLES {
            let p = who("p", role);
            assert_eq!(b.may_ever_call(&p, ToolName::AuditQuery), role == Role::ClusterAdmin, "{role:?}");
        }
    }

    /// Every tool's action is in the group its spec names, and a schema that files one elsewhere
    /// is refused with the tool and group named.
    #[test]
    fn every_action_sits_in_its_tools_group() {
        let bundle = Bundle::load(&PolicySource::Embedded).unwrap();
        for tool in ToolName::ALL {
            let action = uid("Moat::Action", tool.cedar_action()).unwrap();
            let group = uid("Moat::Action", tool.spec().group.cedar_id()).unwrap();
            assert!(bundle.actions.is_ancestor_of(&group, &action), "{tool}");
        }
        let dir = tempfile::tempdir().unwrap();
        let schema = EMBEDDED_SCHEMA
            .replace("\"whoami\", ", "")
            .replace("action \"group:read\", ", "action \"whoami\" in [\"group:vm\"];\n  action \"group:read\", ");
        assert_ne!(schema, EMBEDDED_SCHEMA, "the test must move whoami");
        std::fs::write(dir.path().join("moat.cedarschema"), schema).unwrap();
        std::fs::write(dir.path().join("moat.cedar"), EMBEDDED_POLICIES).unwrap();
        std::fs::write(dir.path().join("limits.toml"), EMBEDDED_LIMITS).unwrap();
        match Bundle::load(&PolicySource::Dir(dir.path().into())) {
            Err(PolicyError::WrongGroup { tool: "whoami", group: "group:read", .. }) => {}
            other => panic!("whoami in group:vm must be refused: {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn broken_dirs_are_explained_and_reload_keeps_the_old_set() {
        let dir = tempfile::tempdir().unwrap();
        let write = |f: &str, text: &str| std::fs::write(dir.path().join(f), text).unwrap();
        write("moat.cedarschema", EMBEDDED_SCHEMA);
        write("moat.cedar", EMBEDDED_POLICIES);
        write("limits.toml", EMBEDDED_LIMITS);
        let authz = Authz::load(&PolicySource::Dir(dir.path().into())).unwrap();
        let reader = who("r", Role::Reader);
        assert!(authz.bundle().may_ever_call(&reader, ToolName::Whoami));

        let cases = [
            ("moat.cedar", "permit(principal, action, resource) when { resource.nope };", "do not validate"),
            ("moat.cedar", "permit(principal action resource);", "do not parse"),
            ("moat.cedarschema", "namespace Moat {", "schema does not parse"),
            ("limits.toml", "[tiers.reader]\n", "limits.toml"),
        ];
        for (file, text, want) in cases {
            let good = std::fs::read_to_string(dir.path().join(file)).unwrap();
            write(file, text);
            let err = authz.reload().unwrap_err().to_string();
            assert!(err.contains(want), "{file}: {err}");
            assert!(authz.bundle().may_ever_call(&reader, ToolName::Whoami), "old set still in force");
            write(file, &good);
        }
        // A schema missing a tool's action is refused.
        write("moat.cedarschema", &EMBEDDED_SCHEMA.replace("\"audit_query\"", "\"audit_query_old\""));
        let err = authz.reload().unwrap_err().to_string();
        assert!(err.contains("no action for tool `audit_query`"), "{err}");
        write("moat.cedarschema", EMBEDDED_SCHEMA);

        // A valid change takes effect.
        write(
            "moat.cedar",
            "@id(\"only-admins\")\npermit (principal in Moat::Role::\"cluster-admin\", action, resource);\n",
        );
        authz.reload().unwrap();
        assert!(!authz.bundle().may_ever_call(&reader, ToolName::Whoami));
    }
}
