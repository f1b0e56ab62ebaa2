//! Credentials kept out of what weir prints and stores: logs, errors, the admin
//! status, dead letters.

/// `url` with the password of its user information replaced by `***`
/// (`redis://user:***@host:6379/0`); the rest is kept, so that the message still says
/// which server it is about. A URL without user information comes back as it is.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let user = match authority[..at].split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        // A lone user part may be a password too (`redis://secret@host`).
        None => "***".to_owned(),
    };
    format!(
        "{}{user}{}{}",
        &url[..scheme_end],
        &authority[at..],
        &rest[authority_end..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_replaced_and_the_server_kept() {
        for (url, want) in [
            (
                "redis://:hunter2@db.internal:6379/0",
                "redis://:***@db.internal:6379/0",
            ),
            ("rediss://app:hunter2@db:6380", "rediss://app:***@db:6380"),
            ("redis://hunter2@db", "redis://***@db"),
            ("http://u:p@ss:w@ch:8123/?x=1", "http://u:***@ch:8123/?x=1"),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://h/0?password=x@y", "redis://h/0?password=x@y"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }
}
