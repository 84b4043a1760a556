//! Credentials and the authentication challenges registries send (`Bearer` tokens per
//! scope, `Basic`).

use super::*;

/// How to reach and authenticate to one registry.
#[derive(Clone, Default)]
pub struct RegistryAuth {
    /// User name for basic authentication or for the token service.
    pub username: Option<String>,
    /// Password (or token) going with `username`.
    pub password: Option<String>,
    /// PEM certificates to trust instead of the built-in Mozilla roots (e.g. a private CA).
    pub ca_pem: Option<Vec<u8>>,
    /// Speak plain HTTP instead of HTTPS.
    pub insecure: bool,
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_pem", &self.ca_pem.as_ref().map(|p| p.len()))
            .field("insecure", &self.insecure)
            .finish()
    }
}

/// An authentication challenge from a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Challenge {
    /// The scheme, lowercased (`bearer`, `basic`).
    pub(super) scheme: String,
    /// The parameters, names lowercased (`realm`, `service`, `scope`, ...).
    pub(super) params: HashMap<String, String>,
}

/// Parses a `WWW-Authenticate` value such as
/// `Bearer realm="https://auth.example/token",service="registry",scope="repository:a:pull"`.
/// Only the first challenge of a header listing several is returned.
pub(super) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = match header.find(char::is_whitespace) {
        Some(i) => (&header[..i], header[i..].trim_start()),
        None => (header, ""),
    };
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return None;
    }
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' || c.is_whitespace() {
                break;
            }
            name.push(c);
            chars.next();
        }
        if name.is_empty() {
            break;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() != Some(&'=') {
            // A token68 value or the start of a second challenge: stop here.
            break;
        }
        chars.next();
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.insert(name.to_ascii_lowercase(), value);
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

/// How requests to the registry's host are authorised.
pub(super) enum AuthMode {
    /// Nothing sent (yet).
    Anonymous,
    /// `Authorization: Basic ...` on every request.
    Basic(String),
    /// `Authorization: Bearer <token>` with tokens from the realm, per scope.
    Bearer,
}
