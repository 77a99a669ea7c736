//! The Cedar engine: the schema and policies from `policies/`, validated together,
//! and decisions over entities built from relationships. Pure computation, no IO.

use std::str::FromStr;

use cedar_policy::{Authorizer, Context, Decision, Entities, EntityUid, Policy, PolicyId, PolicySet, Request, Schema, ValidationMode, Validator};
use serde_json::json;

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
    schema: Schema,
    policies: PolicySet,
    authorizer: Authorizer,
}

/// The facts one decision needs: who, in which org and groups, and the collections.
pub(crate) struct Facts<'a> {
    pub(crate) user_id: &'a str,
    pub(crate) org: &'a str,
    pub(crate) roles: &'a [String],
    pub(crate) groups: &'a [String],
    pub(crate) collections: &'a [CollectionFacts],
}

#[derive(Clone, Debug, Default)]
pub(crate) struct CollectionFacts {
    pub(crate) id: String,
    pub(crate) org: String,
    pub(crate) owner: String,
    pub(crate) personal: bool,
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
        Ok(Engine { schema, policies, authorizer: Authorizer::new() })
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

    pub(crate) fn entities(&self, facts: &Facts<'_>) -> Result<Entities, String> {
        let mut list = vec![json!({"uid": {"type": "Echo::Org", "id": facts.org}, "attrs": {}, "parents": []})];
        for group in facts.groups {
            list.push(json!({"uid": {"type": "Echo::Group", "id": group}, "attrs": {}, "parents": [{"type": "Echo::Org", "id": facts.org}]}));
        }
        let mut parents = vec![json!({"type": "Echo::Org", "id": facts.org})];
        parents.extend(facts.groups.iter().map(|g| json!({"type": "Echo::Group", "id": g})));
        list.push(json!({
            "uid": {"type": "Echo::User", "id": facts.user_id},
            "attrs": {"org": {"__entity": {"type": "Echo::Org", "id": facts.org}}, "roles": facts.roles},
            "parents": parents,
        }));
        for collection in facts.collections {
            let refs = |subject: &str, role: &str| -> Vec<serde_json::Value> {
                let entity_type = if subject == "user" { "Echo::User" } else { "Echo::Group" };
                collection
                    .shares
                    .iter()
                    .filter(|(s, _, r)| s == subject && r == role)
                    .map(|(_, id, _)| json!({"__entity": {"type": entity_type, "id": id}}))
                    .collect()
            };
            list.push(json!({
                "uid": {"type": "Echo::Collection", "id": collection.id},
                "attrs": {
                    "org": {"__entity": {"type": "Echo::Org", "id": collection.org}},
                    "owner": {"__entity": {"type": "Echo::User", "id": collection.owner}},
                    "personal": collection.personal,
                    "viewers": refs("user", "viewer"),
                    "viewer_groups": refs("group", "viewer"),
                    "editors": refs("user", "editor"),
                    "editor_groups": refs("group", "editor"),
                    "managers": refs("user", "manager"),
                    "manager_groups": refs("group", "manager"),
                    "answer_readers": refs("user", "answers"),
                    "answer_groups": refs("group", "answers"),
                },
                "parents": [],
            }));
        }
        // Collections may name users and orgs not otherwise present; Cedar treats
        // missing entities as having no attributes and no parents, which is what we want.
        Entities::from_json_value(serde_json::Value::Array(list), None).map_err(|e| e.to_string())
    }

    pub(crate) fn decide(&self, user_id: &str, action: &str, resource_type: &str, resource_id: &str, entities: &Entities) -> Result<Outcome, String> {
        let principal = EntityUid::from_type_name_and_id(
            "Echo::User".parse().map_err(|e| format!("{e}"))?,
            cedar_policy::EntityId::new(user_id),
        );
        let action = EntityUid::from_type_name_and_id("Echo::Action".parse().map_err(|e| format!("{e}"))?, cedar_policy::EntityId::new(action));
        let resource_type = match resource_type {
            "Collection" => "Echo::Collection",
            "Org" => "Echo::Org",
            other => return Err(format!("unknown resource type `{other}`")),
        };
        let resource = EntityUid::from_type_name_and_id(resource_type.parse().map_err(|e| format!("{e}"))?, cedar_policy::EntityId::new(resource_id));
        let request = Request::new(principal, action, resource, Context::empty(), Some(&self.schema)).map_err(|e| e.to_string())?;
        let response = self.authorizer.is_authorized(&request, &self.policies, entities);
        let policies = response.diagnostics().reason().map(|id| id.to_string()).collect();
        let errors: Vec<String> = response.diagnostics().errors().map(|e| e.to_string()).collect();
        if !errors.is_empty() {
            tracing::warn!(?errors, "policy evaluation errors (treated as not applying)");
        }
        Ok(Outcome { allowed: response.decision() == Decision::Allow, policies })
    }
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
