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

use super::config::SchemaConfig;
use crate::model::Event;

/// Most errors listed in one dead letter's reason.
const MAX_ERRORS: usize = 10;

/// Why a schema cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot read the schema of {event} from {path}: {source}")]
    Read {
        event: String,
        path: String,
        source: std::io::Error,
    },
    #[error("schema of {event} ({origin}) is not JSON: {source}")]
    NotJson {
        event: String,
        origin: String,
        source: serde_json::Error,
    },
    #[error("schema of {event} ({origin}) is not a valid JSON Schema: {reason}")]
    Invalid {
        event: String,
        origin: String,
        reason: String,
    },
    #[error("event {0} has two schemas")]
    Duplicate(String),
}

/// An event that does not match its schema: the JSON pointer and message of each error
/// (the first [`MAX_ERRORS`]), and how many more there were. Its text is the dead
/// letter's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub event: String,
    pub errors: Vec<String>,
    pub more: usize,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "does not match the schema of {}: {}",
            self.event,
            self.errors.join("; ")
        )?;
        if self.more > 0 {
            write!(f, " (and {} more)", self.more)?;
        }
        Ok(())
    }
}

/// One compiled schema, and which of the event's JSON fields it can see.
struct Compiled {
    validator: jsonschema::Validator,
    reads_properties: bool,
    reads_context: bool,
}

impl Compiled {
    fn new(schema: &Value) -> Result<Self, jsonschema::ValidationError<'static>> {
        Ok(Self {
            validator: jsonschema::validator_for(schema)?,
            reads_properties: reads(schema, "properties"),
            reads_context: reads(schema, "context"),
        })
    }
}

/// Whether a schema can look inside the event's `field` (`properties` or `context`).
/// Conservative: only a root object whose keywords are annotations or act on members
/// by name, and whose `properties` does not name `field`, is known not to (the field's
/// value is then not parsed for it).
fn reads(schema: &Value, field: &str) -> bool {
    const BY_NAME_ONLY: [&str; 15] = [
        "$schema",
        "$id",
        "$comment",
        "$defs",
        "definitions",
        "title",
        "description",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "type",
        "required",
        "properties",
    ];
    let Some(root) = schema.as_object() else {
        return true;
    };
    if root.keys().any(|k| !BY_NAME_ONLY.contains(&k.as_str())) {
        return true;
    }
    match root.get("properties") {
        None => false,
        Some(Value::Object(members)) => members.contains_key(field),
        Some(_) => true,
    }
}

/// The compiled schemas of a pipeline, by event name.
#[derive(Default)]
pub struct Schemas {
    by_name: HashMap<String, Compiled>,
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
    pub fn load(cfgs: &[SchemaConfig]) -> Result<Self, SchemaError> {
        let mut schemas = Self::default();
        for cfg in cfgs {
            let text = std::fs::read_to_string(&cfg.path).map_err(|source| SchemaError::Read {
                event: cfg.event.clone(),
                path: cfg.path.display().to_string(),
                source,
            })?;
            schemas.add(&cfg.event, &text, &cfg.path)?;
        }
        Ok(schemas)
    }

    /// Compiles one schema (JSON text) for event `name`.
    pub fn add(&mut self, name: &str, text: &str, origin: &Path) -> Result<(), SchemaError> {
        let origin = origin.display().to_string();
        let schema: Value = match serde_json::from_str(text) {
            Ok(schema) => schema,
            Err(source) => {
                let event = name.to_owned();
                return Err(SchemaError::NotJson {
                    event,
                    origin,
                    source,
                });
            }
        };
        let validator = Compiled::new(&schema).map_err(|e| SchemaError::Invalid {
            event: name.to_owned(),
            origin,
            reason: e.to_string(),
        })?;
        if self.by_name.insert(name.to_owned(), validator).is_some() {
            return Err(SchemaError::Duplicate(name.to_owned()));
        }
        self.versions.insert(name.to_owned(), "file".into());
        Ok(())
    }

    /// Sets the schema of event `name` (replacing any), from the control plane.
    pub fn put(&mut self, name: &str, schema: &Value, version: u32) -> Result<(), SchemaError> {
        let validator = Compiled::new(schema).map_err(|e| SchemaError::Invalid {
            event: name.to_owned(),
            origin: format!("version {version}"),
            reason: e.to_string(),
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
    pub fn check(&self, event: &Event) -> Result<(), Violation> {
        let Some(schema) = self.by_name.get(&event.name) else {
            return Ok(());
        };
        // A field the schema cannot see is not parsed: `{}` stands in for it. One that
        // does not parse (ingest refuses such JSON; a record from elsewhere may hold
        // it) fails the check: validating something else in its place would let it by.
        let parse = |reads: bool, field: &str, text: &str| {
            if !reads {
                return Ok(Value::Object(serde_json::Map::new()));
            }
            serde_json::from_str::<Value>(text).map_err(|e| Violation {
                event: event.name.clone(),
                errors: vec![format!("/{field}: not readable as JSON: {e}")],
                more: 0,
            })
        };
        let instance = serde_json::json!({
            "event_id": event.event_id,
            "name": event.name,
            "user_id": event.user_id,
            "timestamp": event.timestamp_ms,
            "properties": parse(schema.reads_properties, "properties", &event.properties)?,
            "context": parse(schema.reads_context, "context", &event.context)?,
        });
        let mut errors = schema.validator.iter_errors(&instance).peekable();
        if errors.peek().is_none() {
            return Ok(());
        }
        let mut violation = Violation {
            event: event.name.clone(),
            errors: Vec::new(),
            more: 0,
        };
        for e in errors {
            if violation.errors.len() < MAX_ERRORS {
                let pointer = e.instance_path().to_string();
                let pointer = if pointer.is_empty() {
                    "/".into()
                } else {
                    pointer
                };
                violation.errors.push(format!("{pointer}: {e}"));
            } else {
                violation.more += 1;
            }
        }
        Err(violation)
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
        assert_eq!(err.errors.len(), 3, "{err}");
        let err = err.to_string();
        assert!(err.contains("/user_id: "), "{err}");
        assert!(err.contains("/properties/profile_id: "), "{err}");
        assert!(err.contains("/properties/position: "), "{err}");
        // No schema: no check.
        assert!(s.check(&event("app_opened", None, "{}")).is_ok());
        // A field that does not parse fails, rather than something else being checked.
        let err = s
            .check(&event(
                "profile_viewed",
                Some("u"),
                r#"{"profile_id":"p","n":1e400}"#,
            ))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/properties: not readable as JSON: number out of range"),
            "{err}"
        );
    }

    #[test]
    fn fields_a_schema_cannot_see_are_not_parsed() {
        let schema: Value = serde_json::json!({"type": "object", "required": ["properties"],
            "properties": {"properties": {"type": "object"}}});
        assert!(reads(&schema, "properties"));
        assert!(!reads(&schema, "context"));
        for keyword in [
            "additionalProperties",
            "allOf",
            "$ref",
            "unevaluatedProperties",
        ] {
            let mut wider = schema.clone();
            wider[keyword] = serde_json::json!(true);
            assert!(reads(&wider, "context"), "{keyword}");
        }
        assert!(reads(&serde_json::json!(true), "context"));
        // The check gives the same answer: a context the schema cannot see never fails
        // it, one it names is read.
        let s = schemas();
        let mut e = event("profile_viewed", Some("u"), r#"{"profile_id":"p"}"#);
        e.context = "not json".into();
        assert!(s.check(&e).is_ok());
        let mut s = Schemas::default();
        s.add(
            "x",
            r#"{"properties": {"context": {"required": ["locale"]}}}"#,
            Path::new("x.json"),
        )
        .unwrap();
        let mut e = event("x", None, "{}");
        assert!(s.check(&e).unwrap_err().to_string().contains("locale"));
        e.context = r#"{"locale":"fr"}"#.into();
        assert!(s.check(&e).is_ok());
    }

    #[test]
    fn bad_schemas_are_refused_with_their_origin() {
        let mut s = Schemas::default();
        let err = s
            .add("x", r#"{"type": "strin"}"#, Path::new("x.json"))
            .unwrap_err();
        assert!(matches!(err, SchemaError::Invalid { .. }), "{err}");
        let err = err.to_string();
        assert!(
            err.contains("x.json") && err.contains("not a valid JSON Schema"),
            "{err}"
        );
        let err = s.add("x", "{", Path::new("x.json")).unwrap_err();
        assert!(matches!(err, SchemaError::NotJson { .. }), "{err}");
        assert!(err.to_string().contains("not JSON"), "{err}");
        s.add("x", "{}", Path::new("x.json")).unwrap();
        let err = s.add("x", "{}", Path::new("y.json")).unwrap_err();
        assert!(
            matches!(err, SchemaError::Duplicate(ref e) if e == "x"),
            "{err}"
        );
    }
}
