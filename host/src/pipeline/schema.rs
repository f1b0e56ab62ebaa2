//! JSON Schema validation of events, per event name, before the plugin chain.
//!
//! A schema is compiled once when the pipeline loads. It validates the event as a
//! client would have sent it, with weir's fields filled in:
//! `{"event_id", "name", "user_id", "timestamp" (epoch ms), "properties", "context"}`,
//! so a schema can require a `user_id` or type a property. An event that fails goes to
//! the dead letters (stage `schema`) with the JSON pointer and message of each error.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::config::SchemaConfig;
use crate::runtime::Event;

/// Most errors listed in one dead letter's reason.
const MAX_ERRORS: usize = 10;

/// The compiled schemas of a pipeline, by event name.
#[derive(Default)]
pub struct Schemas {
    by_name: HashMap<String, jsonschema::Validator>,
    /// `event@version` (`event@file` for a configuration file's schema), sorted.
    versions: std::collections::BTreeMap<String, String>,
}

impl std::fmt::Debug for Schemas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schemas")
            .field("events", &self.by_name.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Schemas {
    /// Reads and compiles every declared schema; the error names the file and why.
    pub fn load(cfgs: &[SchemaConfig]) -> Result<Self, String> {
        let mut schemas = Self::default();
        for cfg in cfgs {
            let text = std::fs::read_to_string(&cfg.path).map_err(|e| {
                format!(
                    "cannot read the schema of {} from {}: {e}",
                    cfg.event,
                    cfg.path.display()
                )
            })?;
            schemas.add(&cfg.event, &text, &cfg.path)?;
        }
        Ok(schemas)
    }

    /// Compiles one schema (JSON text) for event `name`.
    pub fn add(&mut self, name: &str, text: &str, origin: &Path) -> Result<(), String> {
        let schema: Value = serde_json::from_str(text)
            .map_err(|e| format!("schema of {name} ({}) is not JSON: {e}", origin.display()))?;
        let validator = jsonschema::validator_for(&schema).map_err(|e| {
            format!(
                "schema of {name} ({}) is not a valid JSON Schema: {e}",
                origin.display()
            )
        })?;
        if self.by_name.insert(name.to_owned(), validator).is_some() {
            return Err(format!("event {name} has two schemas"));
        }
        self.versions.insert(name.to_owned(), "file".into());
        Ok(())
    }

    /// Sets the schema of event `name` (replacing any), from the control plane.
    pub fn put(&mut self, name: &str, schema: &Value, version: u32) -> Result<(), String> {
        let validator = jsonschema::validator_for(schema).map_err(|e| {
            format!("schema of {name} version {version} is not a valid JSON Schema: {e}")
        })?;
        self.by_name.insert(name.to_owned(), validator);
        self.versions.insert(name.to_owned(), version.to_string());
        Ok(())
    }

    /// `event@version` of each schema, by event name.
    pub fn versions(&self) -> Vec<String> {
        self.versions
            .iter()
            .map(|(e, v)| format!("{e}@{v}"))
            .collect()
    }

    /// Validates an event if its name has a schema. `Err` lists each error as
    /// `pointer: message`.
    pub fn check(&self, event: &Event) -> Result<(), String> {
        let Some(validator) = self.by_name.get(&event.name) else {
            return Ok(());
        };
        let parse = |text: &str| serde_json::from_str::<Value>(text).unwrap_or(Value::Null);
        let instance = serde_json::json!({
            "event_id": event.event_id,
            "name": event.name,
            "user_id": event.user_id,
            "timestamp": event.timestamp_ms,
            "properties": parse(&event.properties),
            "context": parse(&event.context),
        });
        let mut errors = validator.iter_errors(&instance).peekable();
        if errors.peek().is_none() {
            return Ok(());
        }
        let mut listed = Vec::new();
        let mut total = 0;
        for e in errors {
            total += 1;
            if listed.len() < MAX_ERRORS {
                let pointer = e.instance_path().to_string();
                let pointer = if pointer.is_empty() {
                    "/".into()
                } else {
                    pointer
                };
                listed.push(format!("{pointer}: {e}"));
            }
        }
        let more = if total > listed.len() {
            format!(" (and {} more)", total - listed.len())
        } else {
            String::new()
        };
        Err(format!(
            "does not match the schema of {}: {}{more}",
            event.name,
            listed.join("; ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schemas() -> Schemas {
        let mut s = Schemas::default();
        s.add(
            "profile_viewed",
            r#"{"type": "object", "required": ["user_id", "properties"],
                "properties": {
                    "user_id": {"type": "string"},
                    "properties": {"type": "object", "required": ["profile_id"],
                                   "properties": {"profile_id": {"type": "string", "minLength": 1},
                                                  "position": {"type": "integer", "minimum": 0}}}}}"#,
            Path::new("test.json"),
        )
        .unwrap();
        s
    }

    fn event(name: &str, user: Option<&str>, props: &str) -> Event {
        Event {
            event_id: "e1".into(),
            app: "a".into(),
            name: name.into(),
            user_id: user.map(Into::into),
            timestamp_ms: 0,
            properties: props.into(),
            context: "{}".into(),
        }
    }

    #[test]
    fn errors_name_the_pointer_and_the_problem() {
        let s = schemas();
        assert!(
            s.check(&event("profile_viewed", Some("u"), r#"{"profile_id":"p"}"#))
                .is_ok()
        );
        let err = s
            .check(&event(
                "profile_viewed",
                None,
                r#"{"profile_id":"","position":-1}"#,
            ))
            .unwrap_err();
        assert!(err.contains("/user_id: "), "{err}");
        assert!(err.contains("/properties/profile_id: "), "{err}");
        assert!(err.contains("/properties/position: "), "{err}");
        // No schema: no check.
        assert!(s.check(&event("app_opened", None, "{}")).is_ok());
    }

    #[test]
    fn bad_schemas_are_refused_with_their_origin() {
        let mut s = Schemas::default();
        let err = s
            .add("x", r#"{"type": "strin"}"#, Path::new("x.json"))
            .unwrap_err();
        assert!(
            err.contains("x.json") && err.contains("not a valid JSON Schema"),
            "{err}"
        );
        let err = s.add("x", "{", Path::new("x.json")).unwrap_err();
        assert!(err.contains("not JSON"), "{err}");
    }
}
