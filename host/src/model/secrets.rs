//! Credentials kept out of what weir prints and stores: logs, errors, the admin
//! status, dead letters.

/// `url` with its credentials replaced by `***`: the password of its user information
/// (`redis://user:***@host:6379/0`) and the value of every query parameter whose name
/// says it holds one (`?password=***`, `?token=***`, `?api_key=***`; see
/// [`is_secret_param`]). The rest is kept, so that the message still says which server
/// it is about. A URL without either comes back as it is.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..scheme_end]);
    match authority.rfind('@') {
        Some(at) => {
            match authority[..at].split_once(':') {
                Some((user, _password)) => {
                    out.push_str(user);
                    out.push_str(":***");
                }
                // A lone user part may be a password too (`redis://secret@host`).
                None => out.push_str("***"),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let tail = &rest[authority_end..];
    let (before_fragment, fragment) = tail.split_at(tail.find('#').unwrap_or(tail.len()));
    match before_fragment.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            for (i, pair) in query.split('&').enumerate() {
                if i > 0 {
                    out.push('&');
                }
                match pair.split_once('=') {
                    Some((name, _value)) if is_secret_param(name) => {
                        out.push_str(name);
                        out.push_str("=***");
                    }
                    _ => out.push_str(pair),
                }
            }
        }
        None => out.push_str(before_fragment),
    }
    out.push_str(fragment);
    out
}

/// Whether a query parameter of this name carries a credential: its name (in any case)
/// contains `pass`, `pwd`, `secret`, `token`, `key`, `auth` or `sig` (ClickHouse's
/// `password`, webhook `token`s and `api_key`s, `X-Amz-Signature`, `sig`, ...).
/// Erring on the side of hiding a harmless value.
fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["pass", "pwd", "secret", "token", "key", "auth", "sig"]
        .iter()
        .any(|word| name.contains(word))
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
            ("redis://h/0?password=x@y", "redis://h/0?password=***"),
            (
                "http://ch:8123/?user=weir&password=hunter2&database=db",
                "http://ch:8123/?user=weir&password=***&database=db",
            ),
            (
                "https://hooks.example/in?Token=abc&v=2#frag",
                "https://hooks.example/in?Token=***&v=2#frag",
            ),
            (
                "https://u:p@s3.example/o?X-Amz-Signature=f00&api_key=k",
                "https://u:***@s3.example/o?X-Amz-Signature=***&api_key=***",
            ),
            ("http://ch:8123/?flag&user=a", "http://ch:8123/?flag&user=a"),
            ("http://ch:8123/?", "http://ch:8123/?"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }
}
