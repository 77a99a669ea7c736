//! The event schema registry kept in the repository: `schemas/events/TYPE/vN.json` holds
//! the JSON Schema of each event type's `data` at each version Echo accepts, generated
//! from the typed structs (`wire::event_schemas`). `breaking_changes` is the rule a
//! consumer of a kept version relies on: no field removed, none retyped, no new required
//! field. The tests below fail when the code and the kept schemas disagree:
//! a compatible change asks for the files to be regenerated
//! (`ECHO_WRITE_SCHEMAS=1 cargo test -p common event_schemas`), a breaking one for a new
//! version, and a kept version whose struct is gone for that struct back (both versions
//! are accepted during a transition).

use serde_json::Value;

/// The schema `reference` (`#/$defs/Name`) points at, within `root`.
fn resolve<'a>(root: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/$defs/")) {
        Some(name) => root.get("$defs").and_then(|defs| defs.get(name)).unwrap_or(schema),
        None => schema,
    }
}

/// `schema` with every `$ref` replaced by what it names and without descriptions, for
/// comparing what a field accepts (bounded: recursive types stop at depth 16).
fn expanded(root: &Value, schema: &Value, depth: usize) -> Value {
    if depth > 16 {
        return schema.clone();
    }
    match resolve(root, schema) {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(key, _)| !matches!(key.as_str(), "description" | "title" | "$schema" | "$defs" | "default" | "examples"))
                .map(|(key, value)| (key.clone(), expanded(root, value, depth + 1)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|item| expanded(root, item, depth + 1)).collect()),
        other => other.clone(),
    }
}

fn required(schema: &Value) -> Vec<String> {
    schema.get("required").and_then(Value::as_array).map(|r| r.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// What would break a consumer written against `old` if producers sent `new`: fields
/// removed, fields whose accepted values changed, fields newly required. Empty when
/// `new` only adds optional fields (or changes descriptions).
pub fn breaking_changes(old: &Value, new: &Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let old_fields = old.get("properties").and_then(Value::as_object).unwrap_or(&empty);
    let new_fields = new.get("properties").and_then(Value::as_object).unwrap_or(&empty);
    let mut breaks = Vec::new();
    for (name, was) in old_fields {
        match new_fields.get(name) {
            None => breaks.push(format!("field `{name}` removed")),
            Some(now) if expanded(old, was, 0) != expanded(new, now, 0) => breaks.push(format!("field `{name}` retyped")),
            Some(_) => {}
        }
    }
    let was_required = required(old);
    for name in required(new) {
        if !was_required.contains(&name) {
            breaks.push(format!("field `{name}` newly required"));
        }
    }
    breaks
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::path::PathBuf;

    use serde_json::json;

    use super::*;

    /// `value` with every object's keys in order, so that the kept files do not depend on
    /// whether serde_json preserves insertion order in this build (a feature another
    /// crate of the workspace may turn on).
    fn canonical(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                Value::Object(keys.into_iter().map(|k| (k.clone(), canonical(&map[k]))).collect())
            }
            Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
            other => other.clone(),
        }
    }

    fn registry() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas/events")
    }

    fn file_of(type_: &str, version: &str) -> PathBuf {
        registry().join(type_).join(format!("v{version}.json"))
    }

    #[test]
    fn the_rule_tells_compatible_from_breaking() {
        let old = json!({"type": "object", "properties": {"id": {"type": "string"}, "n": {"type": "integer"}}, "required": ["id"]});
        let added_optional = json!({"type": "object", "properties": {"id": {"type": "string", "description": "the id"}, "n": {"type": "integer"}, "note": {"type": ["string", "null"]}}, "required": ["id"]});
        assert!(breaking_changes(&old, &added_optional).is_empty());
        let removed = json!({"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]});
        assert_eq!(breaking_changes(&old, &removed), ["field `n` removed"]);
        let retyped = json!({"type": "object", "properties": {"id": {"type": "integer"}, "n": {"type": "integer"}}, "required": ["id"]});
        assert_eq!(breaking_changes(&old, &retyped), ["field `id` retyped"]);
        let required = json!({"type": "object", "properties": {"id": {"type": "string"}, "n": {"type": "integer"}, "must": {"type": "string"}}, "required": ["id", "must"]});
        assert_eq!(breaking_changes(&old, &required), ["field `must` newly required"]);
        // Nested types are compared through their definitions.
        let nested = |kind: &str| json!({"type": "object", "properties": {"t": {"$ref": "#/$defs/T"}}, "$defs": {"T": {"type": "object", "properties": {"x": {"type": kind}}}}});
        assert!(breaking_changes(&nested("string"), &nested("string")).is_empty());
        assert_eq!(breaking_changes(&nested("string"), &nested("integer")), ["field `t` retyped"]);
    }

    /// The kept schemas match the code: every (type, version) the code accepts has its
    /// file, equal to what the code generates; every kept file's version is still
    /// accepted.
    #[test]
    fn kept_event_schemas_match_the_code_and_no_change_breaks_a_kept_version() {
        let write = std::env::var_os("ECHO_WRITE_SCHEMAS").is_some();
        let generated = crate::wire::event_schemas();
        let mut problems = Vec::new();
        for (type_, version, schema) in &generated {
            let path = file_of(type_, version);
            let schema = &canonical(schema);
            let text = serde_json::to_string_pretty(schema).unwrap() + "\n";
            let kept = std::fs::read_to_string(&path).map(|text| serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
            match kept {
                Ok(kept) if canonical(&kept) == *schema => {}
                Ok(kept) => {
                    let breaks = breaking_changes(&kept, schema);
                    if !breaks.is_empty() {
                        problems.push(format!(
                            "{type_} v{version}: {} — a consumer of v{version} would break. Keep the v{version} struct, add a v{} one, publish that, and accept both",
                            breaks.join(", "),
                            version.parse::<u32>().unwrap_or(1) + 1
                        ));
                    } else if write {
                        std::fs::write(&path, &text).unwrap();
                    } else {
                        problems.push(format!("{type_} v{version} changed compatibly: regenerate with ECHO_WRITE_SCHEMAS=1 cargo test -p common event_schemas"));
                    }
                }
                Err(_) if write => {
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(&path, &text).unwrap();
                }
                Err(_) => problems.push(format!("{type_} v{version} has no kept schema at {}: ECHO_WRITE_SCHEMAS=1 cargo test -p common event_schemas", path.display())),
            }
        }
        // A kept version stays accepted until its file is deliberately removed.
        for entry in std::fs::read_dir(registry()).into_iter().flatten().flatten() {
            let type_ = entry.file_name().to_string_lossy().to_string();
            for file in std::fs::read_dir(entry.path()).into_iter().flatten().flatten() {
                let name = file.file_name().to_string_lossy().to_string();
                let Some(version) = name.strip_prefix('v').and_then(|n| n.strip_suffix(".json")) else { continue };
                if !generated.iter().any(|(t, v, _)| *t == type_ && *v == version) {
                    problems.push(format!("{type_} v{version} is kept in schemas/ but the code no longer accepts it"));
                }
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    /// What the registry promises is what the queue enforces: an event that fits a kept
    /// schema's required fields is accepted by `validate_event_data`, one missing a
    /// required field is refused.
    #[test]
    fn the_queue_accepts_what_the_kept_schemas_describe() {
        for (type_, version, schema) in crate::wire::event_schemas() {
            let required = required(&schema);
            if required.is_empty() {
                continue;
            }
            let missing = serde_json::Value::Object(serde_json::Map::new());
            assert!(crate::wire::validate_event_data(type_, version, &missing).is_err(), "{type_}: an empty payload lacks {required:?}");
        }
        assert!(crate::wire::validate_event_data(crate::wire::events::DOCUMENT_DELETED, "2", &json!({})).unwrap_err().contains("dataversion"));
    }
}
