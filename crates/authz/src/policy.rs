//! The Cedar engine: the schema and policies from `policies/`, validated together,
//! and decisions over entities built from relationships. Pure computation, no IO.

use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityUid, Policy, PolicyId, PolicySet, Request, RestrictedExpression, Schema, ValidationMode,
    Validator,
};

pub(crate) const SCHEMA: &str = include_str!("../../../policies/echo.cedarschema");
pub(crate) const POLICIES: &[(&str, &str)] = &[("echo.cedar", include_str!("../../../policies/echo.cedar"))];

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("schema: {0}")]
    Schema(String),
    #[error("{file}: {message}")]
    Policy { file: String, message: String },
}

/// A validated policy set with its schema.
pub(crate) struct Engine {
    policies: PolicySet,
    authorizer: Authorizer,
    types: Types,
}

/// The entity type names, parsed once instead of on every decision.
struct Types {
    user: cedar_policy::EntityTypeName,
    group: cedar_policy::EntityTypeName,
    org: cedar_policy::EntityTypeName,
    collection: cedar_policy::EntityTypeName,
    system: cedar_policy::EntityTypeName,
    room: cedar_policy::EntityTypeName,
    action: cedar_policy::EntityTypeName,
}

impl Types {
    fn new() -> Result<Types, PolicyError> {
        let parse = |name: &str| cedar_policy::EntityTypeName::from_str(name).map_err(|e| PolicyError::Schema(e.to_string()));
        Ok(Types {
            user: parse("Echo::User")?,
            group: parse("Echo::Group")?,
            org: parse("Echo::Org")?,
            collection: parse("Echo::Collection")?,
            system: parse("Echo::System")?,
            room: parse("Echo::Room")?,
            action: parse("Echo::Action")?,
        })
    }
}

/// The facts one decision needs: who, in which org and groups, and the collections.
pub(crate) struct Facts<'a> {
    pub(crate) user_id: &'a str,
    pub(crate) org: &'a str,
    pub(crate) roles: &'a [String],
    pub(crate) groups: &'a [String],
    pub(crate) collections: &'a [CollectionFacts],
}

/// A chat room and its people: (user id, `owner` | `member`).
#[derive(Clone, Debug)]
pub(crate) struct RoomFacts {
    pub(crate) id: String,
    pub(crate) org: String,
    pub(crate) members: Vec<(String, String)>,
}

/// The account a `user:*` decision is about, as identity knows it.
#[derive(Clone, Debug)]
pub(crate) struct TargetUser {
    pub(crate) id: String,
    pub(crate) org: String,
    pub(crate) roles: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct CollectionFacts {
    pub(crate) id: String,
    pub(crate) org: String,
    pub(crate) owner: String,
    pub(crate) personal: bool,
    pub(crate) org_owned: bool,
    /// (subject type `user`|`group`, subject id, role `viewer`|`editor`|`manager`|`answers`)
    pub(crate) shares: Vec<(String, String, String)>,
}

pub(crate) struct Outcome {
    pub(crate) allowed: bool,
    pub(crate) policies: Vec<String>,
}

/// Formats a Cedar diagnostic with its source position (line and column) where known.
fn describe(error: &dyn miette::Diagnostic, source: &str) -> String {
    let mut message = error.to_string();
    if let Some(help) = error.help() {
        message.push_str(&format!(" ({help})"));
    }
    if let Some(mut labels) = error.labels()
        && let Some(label) = labels.next() {
            let offset = label.offset().min(source.len());
            let line = source[..offset].matches('\n').count() + 1;
            let column = offset - source[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            message = format!("line {line}, column {column}: {message}");
        }
    if let Some(related) = error.related() {
        for inner in related {
            message.push_str("; ");
            message.push_str(&describe(inner, source));
        }
    }
    message
}

impl Engine {
    /// Parses and validates `files` against `schema_text`; any error names its file and line.
    pub(crate) fn load(schema_text: &str, files: &[(&str, &str)]) -> Result<Engine, PolicyError> {
        let (schema, _warnings) = Schema::from_cedarschema_str(schema_text).map_err(|e| PolicyError::Schema(describe(&e, schema_text)))?;
        let mut policies = PolicySet::new();
        for (file, text) in files {
            let parsed = PolicySet::from_str(text).map_err(|e| PolicyError::Policy { file: file.to_string(), message: describe(&e, text) })?;
            for policy in parsed.policies() {
                let id = policy.annotation("id").map(str::to_string).ok_or_else(|| PolicyError::Policy {
                    file: file.to_string(),
                    message: format!("a policy has no @id annotation: {}", policy.to_string().lines().next().unwrap_or_default()),
                })?;
                let renamed: Policy = policy.new_id(PolicyId::new(id.clone()));
                policies.add(renamed).map_err(|e| PolicyError::Policy { file: file.to_string(), message: format!("duplicate policy id `{id}`: {e}") })?;
            }
            let validation = Validator::new(schema.clone()).validate(&parsed, ValidationMode::default());
            if !validation.validation_passed() {
                let messages: Vec<String> = validation.validation_errors().map(|e| describe(e, text)).collect();
                return Err(PolicyError::Policy { file: file.to_string(), message: messages.join("; ") });
            }
        }
        Ok(Engine { policies, authorizer: Authorizer::new(), types: Types::new()? })
    }

    pub(crate) fn builtin() -> Result<Engine, PolicyError> {
        Engine::load(SCHEMA, POLICIES)
    }

    /// The policy set in `dir` (`echo.cedarschema` and every `*.cedar`), or the built-in
    /// one when `dir` is `None`. Returns the engine and the number of policy files.
    pub(crate) fn from_dir(dir: Option<&std::path::Path>) -> Result<(Engine, usize), PolicyError> {
        let Some(dir) = dir else { return Ok((Engine::builtin()?, POLICIES.len())) };
        let schema_path = dir.join("echo.cedarschema");
        let schema = std::fs::read_to_string(&schema_path).map_err(|e| PolicyError::Schema(format!("{}: {e}", schema_path.display())))?;
        let mut files: Vec<(String, String)> = Vec::new();
        let entries = std::fs::read_dir(dir).map_err(|e| PolicyError::Policy { file: dir.display().to_string(), message: e.to_string() })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "cedar") {
                let text = std::fs::read_to_string(&path).map_err(|e| PolicyError::Policy { file: path.display().to_string(), message: e.to_string() })?;
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                files.push((name, text));
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(PolicyError::Policy { file: dir.display().to_string(), message: "no *.cedar files".into() });
        }
        let borrowed: Vec<(&str, &str)> = files.iter().map(|(n, t)| (n.as_str(), t.as_str())).collect();
        Ok((Engine::load(&schema, &borrowed)?, files.len()))
    }

    /// The entities of one decision, built directly (no JSON round trip): the org,
    /// the principal's groups, the principal, and the collections with their shares.
    pub(crate) fn entities(&self, facts: &Facts<'_>) -> Result<Entities, String> {
        Entities::from_entities(self.entity_list(facts)?, None).map_err(|e| e.to_string())
    }

    fn entity_list(&self, facts: &Facts<'_>) -> Result<Vec<Entity>, String> {
        use std::collections::{HashMap, HashSet};
        let types = &self.types;
        let uid = |type_name: &cedar_policy::EntityTypeName, id: &str| -> Result<EntityUid, String> {
            Ok(EntityUid::from_type_name_and_id(type_name.clone(), cedar_policy::EntityId::new(id)))
        };
        let org = uid(&types.org, facts.org)?;
        let mut list = Vec::with_capacity(facts.collections.len() + facts.groups.len() + 2);
        list.push(Entity::new_no_attrs(org.clone(), HashSet::new()));
        let mut parents = HashSet::from([org.clone()]);
        for group in facts.groups {
            let group = uid(&types.group, group)?;
            list.push(Entity::new_no_attrs(group.clone(), HashSet::from([org.clone()])));
            parents.insert(group);
        }
        let user_attrs = HashMap::from([
            ("org".to_string(), RestrictedExpression::new_entity_uid(org.clone())),
            ("roles".to_string(), RestrictedExpression::new_set(facts.roles.iter().map(|r| RestrictedExpression::new_string(r.clone())))),
        ]);
        list.push(Entity::new(uid(&types.user, facts.user_id)?, user_attrs, parents).map_err(|e| e.to_string())?);
        let (user_type, group_type) = (&types.user, &types.group);
        for collection in facts.collections {
            let refs = |subject: &str, role: &str| {
                let entity_type = if subject == "user" { user_type } else { group_type };
                RestrictedExpression::new_set(
                    collection
                        .shares
                        .iter()
                        .filter(|(s, _, r)| s == subject && r == role)
                        .map(|(_, id, _)| RestrictedExpression::new_entity_uid(EntityUid::from_type_name_and_id(entity_type.clone(), cedar_policy::EntityId::new(id)))),
                )
            };
            let attrs = HashMap::from([
                ("org".to_string(), RestrictedExpression::new_entity_uid(uid(&types.org, &collection.org)?)),
                ("owner".to_string(), RestrictedExpression::new_entity_uid(uid(&types.user, &collection.owner)?)),
                ("personal".to_string(), RestrictedExpression::new_bool(collection.personal)),
                ("org_owned".to_string(), RestrictedExpression::new_bool(collection.org_owned)),
                ("viewers".to_string(), refs("user", "viewer")),
                ("viewer_groups".to_string(), refs("group", "viewer")),
                ("editors".to_string(), refs("user", "editor")),
                ("editor_groups".to_string(), refs("group", "editor")),
                ("managers".to_string(), refs("user", "manager")),
                ("manager_groups".to_string(), refs("group", "manager")),
                ("answer_readers".to_string(), refs("user", "answers")),
                ("answer_groups".to_string(), refs("group", "answers")),
            ]);
            list.push(Entity::new(uid(&types.collection, &collection.id)?, attrs, HashSet::new()).map_err(|e| e.to_string())?);
        }
        // Collections may name users and orgs not otherwise present; Cedar treats
        // missing entities as having no attributes and no parents, which is what we want.
        Ok(list)
    }

    /// A `user:*` decision: `principal` (with `facts`) acting on `target`'s account;
    /// `new_role` is `context.new_role` of `user:set_role`.
    pub(crate) fn decide_on_user(&self, facts: &Facts<'_>, action: &str, target: &TargetUser, new_role: Option<&str>) -> Result<Outcome, String> {
        use std::collections::{HashMap, HashSet};
        let types = &self.types;
        let mut entities = self.entity_list(facts)?;
        if target.id != facts.user_id {
            let org = EntityUid::from_type_name_and_id(types.org.clone(), cedar_policy::EntityId::new(&target.org));
            if target.org != facts.org {
                entities.push(Entity::new_no_attrs(org.clone(), HashSet::new()));
            }
            let attrs = HashMap::from([
                ("org".to_string(), RestrictedExpression::new_entity_uid(org.clone())),
                ("roles".to_string(), RestrictedExpression::new_set(target.roles.iter().map(|r| RestrictedExpression::new_string(r.clone())))),
            ]);
            let uid = EntityUid::from_type_name_and_id(types.user.clone(), cedar_policy::EntityId::new(&target.id));
            entities.push(Entity::new(uid, attrs, HashSet::from([org])).map_err(|e| e.to_string())?);
        }
        let entities = Entities::from_entities(entities, None).map_err(|e| e.to_string())?;
        let principal = EntityUid::from_type_name_and_id(types.user.clone(), cedar_policy::EntityId::new(facts.user_id));
        let action_uid = EntityUid::from_type_name_and_id(types.action.clone(), cedar_policy::EntityId::new(action));
        let resource = EntityUid::from_type_name_and_id(types.user.clone(), cedar_policy::EntityId::new(&target.id));
        let context = match (action, new_role) {
            ("user:set_role", Some(role)) => Context::from_pairs([("new_role".to_string(), RestrictedExpression::new_string(role.to_string()))]).map_err(|e| e.to_string())?,
            ("user:set_role", None) => return Err("user:set_role needs the new role".into()),
            _ => Context::empty(),
        };
        let request = Request::new(principal, action_uid, resource, context, None).map_err(|e| e.to_string())?;
        Ok(self.outcome(&request, &entities))
    }

    /// A `room:*` decision for `facts`' principal on `room`.
    pub(crate) fn decide_on_room(&self, facts: &Facts<'_>, action: &str, room: &RoomFacts) -> Result<Outcome, String> {
        use std::collections::{HashMap, HashSet};
        let types = &self.types;
        let mut entities = self.entity_list(facts)?;
        let org = EntityUid::from_type_name_and_id(types.org.clone(), cedar_policy::EntityId::new(&room.org));
        if room.org != facts.org {
            entities.push(Entity::new_no_attrs(org.clone(), HashSet::new()));
        }
        let people = |role: &str| {
            RestrictedExpression::new_set(room.members.iter().filter(|(_, r)| r == role).map(|(user, _)| {
                RestrictedExpression::new_entity_uid(EntityUid::from_type_name_and_id(types.user.clone(), cedar_policy::EntityId::new(user)))
            }))
        };
        let attrs = HashMap::from([
            ("org".to_string(), RestrictedExpression::new_entity_uid(org)),
            ("owners".to_string(), people("owner")),
            ("members".to_string(), people("member")),
        ]);
        let resource = EntityUid::from_type_name_and_id(types.room.clone(), cedar_policy::EntityId::new(&room.id));
        entities.push(Entity::new(resource.clone(), attrs, HashSet::new()).map_err(|e| e.to_string())?);
        let entities = Entities::from_entities(entities, None).map_err(|e| e.to_string())?;
        let principal = EntityUid::from_type_name_and_id(types.user.clone(), cedar_policy::EntityId::new(facts.user_id));
        let action = EntityUid::from_type_name_and_id(types.action.clone(), cedar_policy::EntityId::new(action));
        let request = Request::new(principal, action, resource, Context::empty(), None).map_err(|e| e.to_string())?;
        Ok(self.outcome(&request, &entities))
    }

    fn outcome(&self, request: &Request, entities: &Entities) -> Outcome {
        let response = self.authorizer.is_authorized(request, &self.policies, entities);
        let policies = response.diagnostics().reason().map(|id| id.to_string()).collect();
        let errors: Vec<String> = response.diagnostics().errors().map(|e| e.to_string()).collect();
        if !errors.is_empty() {
            tracing::warn!(?errors, "policy evaluation errors (treated as not applying)");
        }
        Outcome { allowed: response.decision() == Decision::Allow, policies }
    }

    pub(crate) fn decide(&self, user_id: &str, action: &str, resource_type: &str, resource_id: &str, entities: &Entities) -> Result<Outcome, String> {
        self.decide_classified(user_id, action, resource_type, resource_id, None, entities)
    }

    /// A decision about one document of the collection: its classification is
    /// `context.classification` (document actions only; others take no context).
    pub(crate) fn decide_classified(
        &self,
        user_id: &str,
        action: &str,
        resource_type: &str,
        resource_id: &str,
        classification: Option<&str>,
        entities: &Entities,
    ) -> Result<Outcome, String> {
        let principal = EntityUid::from_type_name_and_id(self.types.user.clone(), cedar_policy::EntityId::new(user_id));
        let action = EntityUid::from_type_name_and_id(self.types.action.clone(), cedar_policy::EntityId::new(action));
        let resource_type = match resource_type {
            "Collection" => &self.types.collection,
            "Org" => &self.types.org,
            "System" => &self.types.system,
            other => return Err(format!("unknown resource type `{other}`")),
        };
        let resource = EntityUid::from_type_name_and_id(resource_type.clone(), cedar_policy::EntityId::new(resource_id));
        let context = match classification {
            Some(class) if action_name_is_document(&action) => {
                Context::from_pairs([("classification".to_string(), RestrictedExpression::new_string(class.to_string()))]).map_err(|e| e.to_string())?
            }
            _ => Context::empty(),
        };
        // Requests are built here, well-typed by construction; the policies were validated
        // against the schema when loaded, so the request is not validated again.
        let request = Request::new(principal, action, resource, context, None).map_err(|e| e.to_string())?;
        Ok(self.outcome(&request, entities))
    }
}

fn action_name_is_document(action: &EntityUid) -> bool {
    action.id().unescaped().starts_with("document:")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn collection(id: &str, org: &str, owner: &str, shares: &[(&str, &str, &str)]) -> CollectionFacts {
        CollectionFacts {
            id: id.into(),
            org: org.into(),
            owner: owner.into(),
            personal: false,
            org_owned: false,
            shares: shares.iter().map(|(s, i, r)| (s.to_string(), i.to_string(), r.to_string())).collect(),
        }
    }

    struct Case {
        user: &'static str,
        org: &'static str,
        roles: &'static [&'static str],
        groups: &'static [&'static str],
        action: &'static str,
        collection: CollectionFacts,
        allowed: bool,
        decided_by: &'static str,
    }

    fn check(case: Case) {
        let engine = Engine::builtin().unwrap();
        let roles: Vec<String> = case.roles.iter().map(|r| r.to_string()).collect();
        let groups: Vec<String> = case.groups.iter().map(|g| g.to_string()).collect();
        let collections = [case.collection.clone()];
        let facts = Facts { user_id: case.user, org: case.org, roles: &roles, groups: &groups, collections: &collections };
        let entities = engine.entities(&facts).unwrap();
        let outcome = engine.decide(case.user, case.action, "Collection", &case.collection.id, &entities).unwrap();
        assert_eq!(outcome.allowed, case.allowed, "{} {} on {:?}", case.user, case.action, case.collection);
        if !case.decided_by.is_empty() {
            assert!(outcome.policies.iter().any(|p| p == case.decided_by), "decided by {:?}", outcome.policies);
        }
    }

    #[test]
    fn builtin_policies_validate_against_the_schema() {
        Engine::builtin().unwrap();
    }

    #[test]
    fn table_of_decisions() {
        let owned = collection("c1", "acme", "ann", &[]);
        let shared = collection("c2", "acme", "ann", &[("user", "bob", "viewer")]);
        let answers = collection("c3", "acme", "ann", &[("user", "bob", "answers")]);
        let group_shared = collection("c4", "acme", "ann", &[("group", "eng", "editor")]);
        let cases = vec![
            Case { user: "ann", org: "acme", roles: &["member"], groups: &[], action: "document:read_chunks", collection: owned.clone(), allowed: true, decided_by: "owner-full-control" },
            Case { user: "ann", org: "acme", roles: &["member"], groups: &[], action: "document:delete", collection: owned.clone(), allowed: true, decided_by: "owner-full-control" },
            Case { user: "bob", org: "acme", roles: &["member"], groups: &[], action: "document:read_chunks", collection: owned.clone(), allowed: false, decided_by: "" },
            Case { user: "bob", org: "acme", roles: &["member"], groups: &[], action: "document:read_chunks", collection: shared.clone(), allowed: true, decided_by: "shared-readers" },
            Case { user: "bob", org: "acme", roles: &["member"], groups: &[], action: "document:download", collection: shared.clone(), allowed: true, decided_by: "shared-readers" },
            Case { user: "bob", org: "acme", roles: &["member"], groups: &[], action: "document:delete", collection: shared.clone(), allowed: false, decided_by: "" },
            Case { user: "bob", org: "acme", roles: &["member"], groups: &[], action: "document:read_chunks", collection: answers.clone(), allowed: true, decided_by: "answers-only-readers" },
            Case { user: "bob", org: "acme", roles: &["member"], groups: &[], action: "document:download", collection: answers.clone(), allowed: false, decided_by: "" },
            Case { user: "cy", org: "acme", roles: &["member"], groups: &["eng"], action: "document:create", collection: group_shared.clone(), allowed: true, decided_by: "editors-write" },
            Case { user: "cy", org: "acme", roles: &["member"], groups: &[], action: "document:create", collection: group_shared.clone(), allowed: false, decided_by: "" },
            // A user of another org is refused even when named in a share.
            Case { user: "bob", org: "globex", roles: &["owner"], groups: &[], action: "document:read_chunks", collection: shared.clone(), allowed: false, decided_by: "tenant-isolation" },
            Case { user: "ann", org: "globex", roles: &["owner"], groups: &[], action: "document:read_chunks", collection: owned, allowed: false, decided_by: "tenant-isolation" },
        ];
        for case in cases {
            check(case);
        }
    }

    /// Classified documents: (user, groups, action, classification, allowed, deciding policy).
    #[test]
    fn table_of_classified_decisions() {
        let engine = Engine::builtin().unwrap();
        let collection = collection(
            "c1",
            "acme",
            "ann",
            &[("user", "vic", "viewer"), ("user", "ada", "answers"), ("user", "eve", "editor"), ("group", "leads", "manager")],
        );
        type Row<'a> = (&'a str, &'a [&'a str], &'a str, Option<&'a str>, bool, &'a str);
        let cases: &[Row] = &[
            ("vic", &[], "document:read_chunks", Some("public"), true, "shared-readers"),
            ("vic", &[], "document:read_chunks", Some("internal"), true, "shared-readers"),
            ("vic", &[], "document:download", Some("internal"), true, "shared-readers"),
            ("vic", &[], "document:read_chunks", Some("confidential"), true, "shared-readers"),
            ("vic", &[], "document:download", Some("confidential"), false, "confidential-downloads-for-editors"),
            ("vic", &[], "document:read_chunks", Some("restricted"), false, "restricted-documents-for-editors"),
            ("vic", &[], "document:download", Some("restricted"), false, "restricted-documents-for-editors"),
            ("ada", &[], "document:read_chunks", Some("confidential"), true, "answers-only-readers"),
            ("ada", &[], "document:read_chunks", Some("restricted"), false, "restricted-documents-for-editors"),
            ("eve", &[], "document:read_chunks", Some("restricted"), true, "shared-readers"),
            ("eve", &[], "document:download", Some("confidential"), true, "shared-readers"),
            ("max", &["leads"], "document:download", Some("restricted"), true, "shared-readers"),
            ("ann", &[], "document:download", Some("restricted"), true, "owner-full-control"),
            // Without a classification (a decision about the collection), nothing is forbidden by one.
            ("vic", &[], "document:read_chunks", None, true, "shared-readers"),
            // An outsider gets nothing at any classification.
            ("zed", &[], "document:read_chunks", Some("public"), false, ""),
        ];
        for (user, groups, action, classification, allowed, decided_by) in cases {
            let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
            let roles = vec!["member".to_string()];
            let facts = Facts { user_id: user, org: "acme", roles: &roles, groups: &groups, collections: std::slice::from_ref(&collection) };
            let entities = engine.entities(&facts).unwrap();
            let outcome = engine.decide_classified(user, action, "Collection", "c1", *classification, &entities).unwrap();
            assert_eq!(outcome.allowed, *allowed, "{user} {action} {classification:?}");
            if !decided_by.is_empty() {
                assert!(outcome.policies.iter().any(|p| p == decided_by), "{user} {action} {classification:?}: decided by {:?}", outcome.policies);
            }
        }
    }

    /// Collections owned by the org: its owners and admins manage them; nobody else
    /// gets anything from the ownership.
    #[test]
    fn table_of_org_owned_collection_decisions() {
        let engine = Engine::builtin().unwrap();
        let org_owned = CollectionFacts { org_owned: true, ..collection("c5", "acme", "org:acme", &[("user", "vic", "viewer")]) };
        type Row<'a> = (&'a str, &'a str, &'a [&'a str], &'a str, Option<&'a str>, bool);
        let cases: &[Row] = &[
            ("ada", "acme", &["admin"], "collection:delete", None, true),
            ("oz", "acme", &["owner"], "collection:share", None, true),
            ("ada", "acme", &["admin"], "document:download", Some("restricted"), true),
            ("mo", "acme", &["member"], "document:read_chunks", Some("internal"), false),
            ("mo", "acme", &["member"], "collection:delete", None, false),
            ("vic", "acme", &["member"], "document:read_chunks", Some("internal"), true),
            ("vic", "acme", &["member"], "document:read_chunks", Some("restricted"), false),
            ("vic", "acme", &["member"], "collection:delete", None, false),
            ("gus", "globex", &["admin"], "document:read_chunks", Some("public"), false),
        ];
        for (user, org, roles, action, classification, allowed) in cases {
            let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
            let facts = Facts { user_id: user, org, roles: &roles, groups: &[], collections: std::slice::from_ref(&org_owned) };
            let entities = engine.entities(&facts).unwrap();
            let outcome = engine.decide_classified(user, action, "Collection", "c5", *classification, &entities).unwrap();
            assert_eq!(outcome.allowed, *allowed, "{user} ({roles:?} of {org}) {action} {classification:?}: {:?}", outcome.policies);
        }
        // A user-owned collection gives org admins nothing by itself.
        let owned = collection("c6", "acme", "ann", &[]);
        let roles = vec!["admin".to_string()];
        let facts = Facts { user_id: "ada", org: "acme", roles: &roles, groups: &[], collections: std::slice::from_ref(&owned) };
        let entities = engine.entities(&facts).unwrap();
        assert!(!engine.decide("ada", "document:read_chunks", "Collection", "c6", &entities).unwrap().allowed);
    }

    /// Org-level and operator actions: (user's org, roles, action, resource type and id,
    /// allowed, deciding policy).
    #[test]
    fn table_of_org_and_operator_decisions() {
        let engine = Engine::builtin().unwrap();
        type Row<'a> = (&'a str, &'a [&'a str], &'a str, &'a str, &'a str, bool, &'a str);
        let cases: &[Row] = &[
            ("acme", &["member"], "collection:create", "Org", "acme", true, "members-create-collections"),
            ("acme", &["viewer"], "collection:create", "Org", "acme", false, ""),
            ("acme", &["member"], "collection:create", "Org", "globex", false, ""),
            ("acme", &["admin"], "admin:manage_users", "Org", "acme", true, "org-admins-operate"),
            ("acme", &["owner"], "audit:read", "Org", "acme", true, "org-admins-operate"),
            ("acme", &["member"], "audit:read", "Org", "acme", false, ""),
            ("acme", &["owner"], "admin:manage_users", "Org", "globex", false, ""),
            ("acme", &["owner"], "logs:read", "Org", "globex", false, ""),
            // Operators: the only path across orgs, and only through the operator role.
            ("acme", &["owner"], "system:rotate_keys", "System", "echo", false, ""),
            ("acme", &["admin"], "system:read_all_audit", "System", "echo", false, ""),
            ("infra", &["member", "operator"], "system:rotate_keys", "System", "echo", true, "operators-run-the-installation"),
            ("infra", &["member", "operator"], "system:reload_policies", "System", "echo", true, "operators-run-the-installation"),
            ("infra", &["member", "operator"], "system:read_all_logs", "System", "echo", true, "operators-run-the-installation"),
            ("infra", &["member", "operator"], "system:manage_queue", "System", "echo", true, "operators-run-the-installation"),
            ("acme", &["owner"], "system:manage_queue", "System", "echo", false, ""),
            // The operator role gives nothing inside another org's collections or users.
            ("infra", &["member", "operator"], "admin:manage_users", "Org", "acme", false, ""),
        ];
        for (org, roles, action, resource_type, resource_id, allowed, decided_by) in cases {
            let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
            let facts = Facts { user_id: "u", org, roles: &roles, groups: &[], collections: &[] };
            let entities = engine.entities(&facts).unwrap();
            let outcome = engine.decide("u", action, resource_type, resource_id, &entities).unwrap();
            assert_eq!(outcome.allowed, *allowed, "{roles:?} of {org}: {action} on {resource_type}::{resource_id}");
            if !decided_by.is_empty() {
                assert_eq!(outcome.policies, vec![decided_by.to_string()]);
            }
        }
        let operator = Case {
            user: "op",
            org: "infra",
            roles: &["member", "operator"],
            groups: &[],
            action: "document:read_chunks",
            collection: collection("c9", "acme", "ann", &[]),
            allowed: false,
            decided_by: "tenant-isolation",
        };
        check(operator);
    }

    /// Accounts: (actor roles, target roles, target org, action, new role, allowed).
    #[test]
    fn table_of_account_decisions() {
        let engine = Engine::builtin().unwrap();
        type Row<'a> = (&'a [&'a str], &'a [&'a str], &'a str, &'a str, Option<&'a str>, bool);
        let cases: &[Row] = &[
            (&["owner"], &["owner"], "acme", "user:disable", None, true),
            (&["owner"], &["admin"], "acme", "user:set_role", Some("member"), true),
            (&["owner"], &["member"], "acme", "user:set_role", Some("owner"), true),
            (&["admin"], &["owner"], "acme", "user:disable", None, false),
            (&["admin"], &["owner"], "acme", "user:reset_password", None, false),
            (&["admin"], &["admin"], "acme", "user:disable", None, false),
            (&["admin"], &["member"], "acme", "user:disable", None, true),
            (&["admin"], &["viewer"], "acme", "user:reset_password", None, true),
            (&["admin"], &["member"], "acme", "user:set_role", Some("viewer"), true),
            (&["admin"], &["member"], "acme", "user:set_role", Some("admin"), false),
            (&["admin"], &["owner"], "acme", "user:set_role", Some("member"), false),
            (&["member"], &["viewer"], "acme", "user:disable", None, false),
            (&["owner"], &["member"], "globex", "user:disable", None, false),
            (&["owner", "operator"], &["member"], "globex", "user:disable", None, false),
        ];
        for (actor_roles, target_roles, target_org, action, new_role, allowed) in cases {
            let roles: Vec<String> = actor_roles.iter().map(|r| r.to_string()).collect();
            let facts = Facts { user_id: "actor", org: "acme", roles: &roles, groups: &[], collections: &[] };
            let target = TargetUser { id: "target".into(), org: target_org.to_string(), roles: target_roles.iter().map(|r| r.to_string()).collect() };
            let outcome = engine.decide_on_user(&facts, action, &target, *new_role).unwrap();
            assert_eq!(outcome.allowed, *allowed, "{actor_roles:?} {action} {new_role:?} on {target_roles:?} of {target_org}: {:?}", outcome.policies);
        }
        // Nobody disables or re-roles themselves, owners included.
        let roles = vec!["owner".to_string()];
        let facts = Facts { user_id: "me", org: "acme", roles: &roles, groups: &[], collections: &[] };
        let me = TargetUser { id: "me".into(), org: "acme".into(), roles: roles.clone() };
        assert!(!engine.decide_on_user(&facts, "user:disable", &me, None).unwrap().allowed);
        assert!(!engine.decide_on_user(&facts, "user:set_role", &me, Some("member")).unwrap().allowed);
        assert!(engine.decide_on_user(&facts, "user:reset_password", &me, None).unwrap().allowed);
    }

    #[test]
    fn table_of_room_decisions() {
        let engine = Engine::builtin().unwrap();
        let room = RoomFacts { id: "r1".into(), org: "acme".into(), members: vec![("olly".into(), "owner".into()), ("meg".into(), "member".into())] };
        type Row<'a> = (&'a str, &'a str, &'a str, bool);
        let cases: &[Row] = &[
            ("olly", "acme", "room:read", true),
            ("olly", "acme", "room:manage", true),
            ("meg", "acme", "room:post", true),
            ("meg", "acme", "room:manage", false),
            ("stranger", "acme", "room:read", false),
            ("stranger", "acme", "room:post", false),
            // A member id carried over into another org gets nothing.
            ("meg", "globex", "room:read", false),
        ];
        for (user, org, action, allowed) in cases {
            let roles = vec!["owner".to_string()];
            let facts = Facts { user_id: user, org, roles: &roles, groups: &[], collections: &[] };
            let outcome = engine.decide_on_room(&facts, action, &room).unwrap();
            assert_eq!(outcome.allowed, *allowed, "{user} of {org}: {action}: {:?}", outcome.policies);
        }
    }

    #[test]
    fn an_invalid_policy_is_refused_with_its_file_and_line() {
        let bad = "@id(\"x\")\npermit (principal, action, resource)\nwhen { resource.no_such_attr == 1 };";
        let error = Engine::load(SCHEMA, &[("bad.cedar", bad)]).err().unwrap().to_string();
        assert!(error.starts_with("bad.cedar:"), "{error}");
        let syntax = Engine::load(SCHEMA, &[("syntax.cedar", "@id(\"y\")\npermit (principal action);")]).err().unwrap().to_string();
        assert!(syntax.contains("line 2"), "{syntax}");
    }

    #[test]
    fn policies_without_ids_are_refused() {
        let error = Engine::load(SCHEMA, &[("noid.cedar", "permit (principal, action, resource);")]).err().unwrap().to_string();
        assert!(error.contains("@id"), "{error}");
    }
}
