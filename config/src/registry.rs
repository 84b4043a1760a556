//! `[registries."HOST"]`: credentials, CA and insecure transport per registry, and where a
//! registry's CA goes in the image.

use super::*;

/// Where `keel build` puts, in the OS image, the CA file of a registry that boot pulls use:
/// in the read-only root image (/etc is a tmpfs made at boot).
pub const REGISTRY_CA_DIR: &str = "/usr/share/keel/registry-ca";

/// The file name of registry `host`'s CA under [`REGISTRY_CA_DIR`].
pub fn registry_ca_file_name(host: &str) -> String {
    format!(
        "{}.pem",
        host.replace(|c: char| !c.is_ascii_alphanumeric() && c != '.', "_")
    )
}

/// How to reach one registry (`[registries."HOST[:PORT]"]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM file of a CA to trust beside the usual roots, resolved against the host file.
    pub ca: Option<PathBuf>,
    /// Plain HTTP, no TLS.
    pub insecure: bool,
}

pub(crate) fn validate_registries(
    loc: &Locator<'_>,
    raw: &BTreeMap<String, Spanned<raw::Registry>>,
) -> Result<BTreeMap<String, Registry>, ConfigError> {
    let mut out = BTreeMap::new();
    for (host, spanned) in raw {
        let key = format!("registries.\"{host}\"");
        if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
            return Err(loc.at(
                spanned,
                key,
                format!("`{host}` is not a registry: expected HOST or HOST:PORT, such as \"registry.example:5000\""),
            ));
        }
        let r = spanned.get_ref();
        if r.password.is_some() && r.password_file.is_some() {
            return Err(loc.at(
                spanned,
                format!("{key}.password_file"),
                "`password` and `password_file` exclude each other",
            ));
        }
        let password = match &r.password_file {
            None => r.password.clone(),
            Some(file) => {
                let path = loc
                    .file
                    .parent()
                    .unwrap_or(Path::new("."))
                    .join(file.get_ref());
                Some(
                    std::fs::read_to_string(&path)
                        .map_err(|e| {
                            loc.at(
                                file,
                                format!("{key}.password_file"),
                                format!("cannot read {}: {e}", path.display()),
                            )
                        })?
                        .trim_end_matches(['\n', '\r'])
                        .to_string(),
                )
            }
        };
        if password.is_some() != r.username.is_some() {
            return Err(loc.at(spanned, key, "`username` and a password go together"));
        }
        out.insert(
            host.clone(),
            Registry {
                username: r.username.clone(),
                password,
                ca: r.ca.as_ref().map(|c| PathBuf::from(c.get_ref())),
                insecure: r.insecure,
            },
        );
    }
    Ok(out)
}
