//! Compose files on the command line: `keel compose convert`, and `keel check|build|run`
//! given a `.yml`/`.yaml` file, which they convert in memory first.

use std::path::Path;

use keel_compose::{Input, Overlay, Variables};
use keel_config::HostConfig;

use crate::Failure;

/// Whether `path` names a compose file rather than a host file.
pub fn is_compose_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yml" | "yaml")
    )
}

/// Converts the compose file at `path` (with `overlay`, a partial host file), printing the
/// warnings; the host file's text. Variables come from the environment, then the `.env`
/// beside the compose file.
pub fn convert(path: &Path, overlay: Option<&Path>) -> Result<String, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Config(format!("{}: {e}", path.display())))?;
    let dotenv_path = path.parent().unwrap_or(Path::new(".")).join(".env");
    let dotenv = match std::fs::read_to_string(&dotenv_path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Failure::Config(format!("{}: {e}", dotenv_path.display()))),
    };
    let variables = Variables::new(std::env::vars(), dotenv.as_deref());
    let overlay = match overlay {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| Failure::Config(format!("{}: {e}", file.display())))?;
            Some(Overlay::parse(file, &text).map_err(Failure::Config)?)
        }
        None => None,
    };
    let input = Input {
        path,
        text: &text,
        variables: &variables,
        overlay: overlay.as_ref(),
    };
    match keel_compose::convert(&input) {
        Ok(converted) => {
            for warning in &converted.warnings {
                eprintln!("keel: {warning}");
            }
            Ok(converted.host_file)
        }
        Err(findings) => {
            let errors = findings
                .iter()
                .filter(|d| d.severity == keel_compose::Severity::Error)
                .count();
            for finding in &findings {
                eprintln!("keel: {finding}");
            }
            Err(Failure::Config(format!(
                "{}: {errors} error{} (nothing was converted)",
                path.display(),
                if errors == 1 { "" } else { "s" }
            )))
        }
    }
}

/// A host file or a compose file, loaded and validated, and the host file's text.
pub fn load(path: &Path, overlay: Option<&Path>) -> Result<(HostConfig, String), Failure> {
    if !is_compose_file(path) {
        if overlay.is_some() {
            return Err(Failure::Config(
                "--overlay goes with a compose file (a host file is complete)".into(),
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::Config(format!("{}: {e}", path.display())))?;
        let config = HostConfig::parse(path, &text).map_err(|e| Failure::Config(e.to_string()))?;
        return Ok((config, text));
    }
    let text = convert(path, overlay)?;
    // Relative paths (an overlay's image layouts) resolve beside the compose file.
    let as_host_file = path.with_extension("keel.toml");
    let config = HostConfig::parse(&as_host_file, &text).map_err(|e| {
        Failure::Config(format!(
            "the host file converted from {} is not valid: {e} (see it with `keel compose convert {}`)",
            path.display(),
            path.display()
        ))
    })?;
    Ok((config, text))
}
