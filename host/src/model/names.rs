//! Naming rules shared by ingest, the plugin runtime and the configuration.

/// Longest event name, in characters (all ASCII).
pub const MAX_EVENT_NAME: usize = 128;

/// Longest counter key, in bytes.
pub const MAX_COUNTER_KEY: usize = 256;

/// Checks an event name: 1-128 characters of `[A-Za-z0-9_.:-]`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_EVENT_NAME {
        return Err(format!(
            "\"name\" must be 1-{MAX_EVENT_NAME} characters long, not {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
    {
        return Err(format!(
            "\"name\" may only hold A-Z a-z 0-9 _ . : -, not {c:?}"
        ));
    }
    Ok(())
}

/// True for a plain SQL identifier (safe to interpolate into DDL), which is also what
/// tables, columns, counters and sinks are named by: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_rules() {
        assert!(check_name("profile_viewed").is_ok());
        assert!(check_name("a.b:c-d_9").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name(&"x".repeat(MAX_EVENT_NAME + 1)).is_err());
        assert!(check_name("héllo").unwrap_err().contains("'é'"));
        assert!(is_identifier("_t1"));
        assert!(!is_identifier("1t"));
        assert!(!is_identifier("weir; DROP"));
        assert!(!is_identifier(""));
    }
}
