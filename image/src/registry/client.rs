//! The HTTP side: one agent per registry, retries with backoff and `Retry-After`,
//! redirects that never carry credentials to another host, token caching.

use super::*;

pub(super) fn header<'r>(resp: &'r Response<Body>, name: &str) -> Option<&'r str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

pub(super) fn transport_error(url: &str, e: ureq::Error) -> RegistryError {
    RegistryError::Transport {
        url: url.to_owned(),
        source: Box::new(e),
    }
}

/// Whether a transport error is worth retrying (the network, not the request, failed).
pub(super) fn retryable(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Protocol(_)
            | ureq::Error::BodyStalled
    )
}

/// An HTTP client for one repository on one registry.
pub(super) struct Client {
    pub(super) agent: Agent,
    pub(super) scheme: &'static str,
    /// `host[:port]` of the API.
    pub(super) host: String,
    /// The registry as the user named it (for error messages).
    pub(super) registry: String,
    pub(super) scope: String,
    pub(super) auth: RegistryAuth,
    pub(super) mode: AuthMode,
    /// `Authorization` header values from the token service, by scope.
    pub(super) tokens: HashMap<String, String>,
    pub(super) retries: u32,
}

impl Client {
    pub(super) fn new(
        reference: &Reference,
        auth: RegistryAuth,
        retries: u32,
    ) -> Result<Self, RegistryError> {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(pem) = &auth.ca_pem {
            let mut certs = Vec::new();
            for item in ureq::tls::parse_pem(pem) {
                match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
                    Ok(_) => {}
                    Err(e) => return Err(RegistryError::InvalidCa(e.to_string())),
                }
            }
            if certs.is_empty() {
                return Err(RegistryError::InvalidCa(
                    "no CERTIFICATE block in the PEM data".to_owned(),
                ));
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        let agent = Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("keel/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .tls_config(tls.build())
            .build()
            .new_agent();
        Ok(Client {
            agent,
            scheme: if auth.insecure { "http" } else { "https" },
            host: reference.api_host().to_owned(),
            registry: reference.registry.clone(),
            scope: format!("repository:{}:pull", reference.repository),
            auth,
            mode: AuthMode::Anonymous,
            tokens: HashMap::new(),
            retries,
        })
    }

    pub(super) fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.host)
    }

    pub(super) fn authorization(&self) -> Option<String> {
        match &self.mode {
            AuthMode::Anonymous => None,
            AuthMode::Basic(h) => Some(h.clone()),
            AuthMode::Bearer => self.tokens.get(&self.scope).cloned(),
        }
    }

    pub(super) fn basic_header(&self) -> Option<String> {
        let user = self.auth.username.as_deref()?;
        let pass = self.auth.password.as_deref().unwrap_or("");
        Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        ))
    }

    pub(super) fn unauthorized(&self, detail: impl Into<String>) -> RegistryError {
        RegistryError::Unauthorized {
            registry: self.registry.clone(),
            detail: detail.into(),
        }
    }

    /// GET with retries (connection errors, 5xx, 429), authentication and redirects.
    /// `range_from > 0` asks for the bytes from that offset on.
    pub(super) fn get(
        &mut self,
        url: &str,
        accept: Option<&str>,
        range_from: u64,
    ) -> Result<Response<Body>, RegistryError> {
        let mut attempt = 0;
        loop {
            let wait = match self.get_once(url, accept, range_from) {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    if status != 429 && !(500..600).contains(&status) {
                        return Ok(resp);
                    }
                    if attempt >= self.retries {
                        return Err(self.status_error(url, resp));
                    }
                    retry_after(&resp).unwrap_or_else(|| backoff_delay(attempt))
                }
                Err(Failure::Retryable(_)) if attempt < self.retries => backoff_delay(attempt),
                Err(Failure::Retryable(e) | Failure::Fatal(e)) => return Err(e),
            };
            attempt += 1;
            std::thread::sleep(wait.min(RETRY_AFTER_MAX));
        }
    }

    /// One GET, answering one authentication challenge and following redirects.
    pub(super) fn get_once(
        &mut self,
        url: &str,
        accept: Option<&str>,
        range_from: u64,
    ) -> Result<Response<Body>, Failure> {
        let mut current = url.to_owned();
        let mut authenticated = false;
        let mut redirects = 0;
        loop {
            let same_host = authority(&current) == Some(self.host.as_str());
            let mut req = self.agent.get(&current);
            if let Some(a) = accept {
                req = req.header("Accept", a);
            }
            if range_from > 0 {
                req = req.header("Range", format!("bytes={range_from}-"));
            }
            if same_host && let Some(h) = self.authorization() {
                req = req.header("Authorization", h);
            }
            let resp = req.call().map_err(|e| {
                if retryable(&e) {
                    Failure::Retryable(transport_error(&current, e))
                } else {
                    Failure::Fatal(transport_error(&current, e))
                }
            })?;
            let status = resp.status().as_u16();
            match status {
                301 | 302 | 303 | 307 | 308 => {
                    redirects += 1;
                    let location = header(&resp, "location").ok_or_else(|| {
                        Failure::Fatal(RegistryError::Protocol {
                            url: current.clone(),
                            reason: format!("HTTP {status} without Location"),
                        })
                    })?;
                    let next = resolve_location(&current, location);
                    if redirects > MAX_REDIRECTS {
                        return Err(Failure::Fatal(RegistryError::Protocol {
                            url: url.to_owned(),
                            reason: "too many redirects".to_owned(),
                        }));
                    }
                    if next.starts_with("http://") && !self.auth.insecure {
                        return Err(Failure::Fatal(RegistryError::Protocol {
                            url: current,
                            reason: format!("refusing a redirect to plain HTTP ({next})"),
                        }));
                    }
                    current = next;
                }
                401 if same_host && !authenticated => {
                    authenticated = true;
                    self.authenticate(&current, &resp)?;
                    current = url.to_owned();
                    redirects = 0;
                }
                401 | 403 => {
                    let detail = error_detail(resp);
                    return Err(Failure::Fatal(self.unauthorized(if detail.is_empty() {
                        format!("HTTP {status} from {current}")
                    } else {
                        detail
                    })));
                }
                _ => return Ok(resp),
            }
        }
    }

    /// Answers a 401's challenge: picks the scheme and, for Bearer, gets a token.
    pub(super) fn authenticate(&mut self, url: &str, resp: &Response<Body>) -> Result<(), Failure> {
        let challenge = resp
            .headers()
            .get_all("www-authenticate")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(parse_challenge)
            .find(|c| c.scheme == "bearer" || c.scheme == "basic");
        let Some(challenge) = challenge else {
            return Err(Failure::Fatal(self.unauthorized(format!(
                "HTTP 401 from {url} without a usable WWW-Authenticate challenge"
            ))));
        };
        if challenge.scheme == "basic" {
            let Some(h) = self.basic_header() else {
                return Err(Failure::Fatal(self.unauthorized(
                    "the registry requires credentials and none are set",
                )));
            };
            self.mode = AuthMode::Basic(h);
            return Ok(());
        }
        let Some(realm) = challenge.params.get("realm") else {
            return Err(Failure::Fatal(
                self.unauthorized("Bearer challenge without a realm"),
            ));
        };
        let scope = challenge
            .params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| self.scope.clone());
        let mut token_url = format!("{realm}{}", if realm.contains('?') { '&' } else { '?' });
        if let Some(service) = challenge.params.get("service") {
            token_url.push_str(&format!("service={}&", url_encode(service)));
        }
        token_url.push_str(&format!("scope={}", url_encode(&scope)));
        if token_url.starts_with("http://") && !self.auth.insecure {
            return Err(Failure::Fatal(RegistryError::Protocol {
                url: token_url,
                reason: "refusing a token service on plain HTTP".to_owned(),
            }));
        }
        let mut req = self.agent.get(&token_url);
        if let Some(h) = self.basic_header() {
            req = req.header("Authorization", h);
        }
        let mut resp = req.call().map_err(|e| {
            if retryable(&e) {
                Failure::Retryable(transport_error(&token_url, e))
            } else {
                Failure::Fatal(transport_error(&token_url, e))
            }
        })?;
        let status = resp.status().as_u16();
        match status {
            200 => {}
            401 | 403 => {
                let detail = error_detail(resp);
                return Err(Failure::Fatal(self.unauthorized(format!(
                    "token service {realm}: HTTP {status}{}",
                    if detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {detail}")
                    }
                ))));
            }
            429 | 500..=599 => {
                return Err(Failure::Retryable(self.status_error(&token_url, resp)));
            }
            _ => return Err(Failure::Fatal(self.status_error(&token_url, resp))),
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_JSON)
            .read_to_vec()
            .map_err(|e| Failure::Retryable(transport_error(&token_url, e)))?;
        let doc: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            Failure::Fatal(RegistryError::Json {
                what: format!("token from {realm}"),
                source: e,
            })
        })?;
        let token = doc
            .get("token")
            .or_else(|| doc.get("access_token"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Failure::Fatal(RegistryError::Protocol {
                    url: token_url.clone(),
                    reason: "token response without a token".to_owned(),
                })
            })?;
        self.tokens
            .insert(self.scope.clone(), format!("Bearer {token}"));
        self.mode = AuthMode::Bearer;
        Ok(())
    }

    /// An error for an unexpected status, with the registry's error message if it sent one.
    pub(super) fn status_error(&self, url: &str, resp: Response<Body>) -> RegistryError {
        let status = resp.status().as_u16();
        if status == 401 || status == 403 {
            return self.unauthorized(error_detail(resp));
        }
        let detail = error_detail(resp);
        RegistryError::Http {
            url: url.to_owned(),
            status,
            detail: if detail.is_empty() {
                detail
            } else {
                format!(": {detail}")
            },
        }
    }
}

pub(super) enum Failure {
    Retryable(RegistryError),
    Fatal(RegistryError),
}

/// The `errors[].message` of a registry error body (or the start of a non-JSON body).
pub(super) fn error_detail(mut resp: Response<Body>) -> String {
    let Ok(body) = resp.body_mut().with_config().limit(64 << 10).read_to_vec() else {
        return String::new();
    };
    if let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&body) {
        if let Some(errors) = doc.get("errors").and_then(|e| e.as_array()) {
            let msgs: Vec<String> = errors
                .iter()
                .map(|e| {
                    let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
                    let msg = e.get("message").and_then(|m| m.as_str()).unwrap_or("");
                    match (code.is_empty(), msg.is_empty()) {
                        (false, false) => format!("{code}: {msg}"),
                        (false, true) => code.to_owned(),
                        _ => msg.to_owned(),
                    }
                })
                .collect();
            return msgs.join("; ");
        }
        if let Some(d) = doc.get("details").and_then(|d| d.as_str()) {
            return d.to_owned();
        }
    }
    let text = String::from_utf8_lossy(&body);
    text.trim().chars().take(200).collect()
}

/// `Retry-After` in seconds (an HTTP date is not interpreted: the backoff applies).
pub(super) fn retry_after(resp: &Response<Body>) -> Option<Duration> {
    header(resp, "retry-after")?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// The `host[:port]` of an absolute URL.
pub(super) fn authority(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let auth = &rest[..end];
    Some(auth.rsplit_once('@').map_or(auth, |(_, h)| h))
}

/// Resolves a `Location` header against the URL it answered.
pub(super) fn resolve_location(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_owned();
    }
    let scheme = base.split_once("://").map_or("https", |(s, _)| s);
    if let Some(rest) = location.strip_prefix("//") {
        return format!("{scheme}://{rest}");
    }
    let host = authority(base).unwrap_or("");
    if location.starts_with('/') {
        return format!("{scheme}://{host}{location}");
    }
    // Relative to the base's directory.
    let path = base
        .split_once("://")
        .map(|(_, r)| r)
        .and_then(|r| r.find('/').map(|i| &r[i..]))
        .unwrap_or("/");
    let path = path.split(['?', '#']).next().unwrap_or("/");
    let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
    format!("{scheme}://{host}{dir}/{location}")
}

/// Percent-encodes a query parameter value.
pub(super) fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
