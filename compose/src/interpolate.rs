//! Variable interpolation as Compose does it: `$VAR`, `${VAR}`, `${VAR:-default}` (unset
//! or empty), `${VAR-default}` (unset), `${VAR:?message}` / `${VAR?message}` (an error),
//! `${VAR:+replacement}` / `${VAR+replacement}`, and `$$` for a literal `$`. Values come
//! from the environment, then the `.env` file beside the compose file (the environment
//! wins, as under `docker compose`).

use std::collections::BTreeMap;

/// The variables a compose file is interpolated with.
#[derive(Debug, Clone, Default)]
pub struct Variables {
    values: BTreeMap<String, String>,
}

impl Variables {
    /// `env` (the process environment) over `dotenv` (the `.env` file's text, if any).
    pub fn new(env: impl IntoIterator<Item = (String, String)>, dotenv: Option<&str>) -> Variables {
        let mut values = BTreeMap::new();
        if let Some(text) = dotenv {
            for (name, value) in parse_env_file(text).into_iter().flatten() {
                values.insert(name, value);
            }
        }
        values.extend(env);
        Variables { values }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }
}

/// Substitutes the variables in `text`; an error says what is wrong.
pub fn interpolate(text: &str, vars: &Variables) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(braced) = rest.strip_prefix('{') {
            let end =
                closing_brace(braced).ok_or_else(|| format!("`${{{braced}`: no closing `}}`"))?;
            out.push_str(&expand(&braced[..end], vars)?);
            rest = &braced[end + 1..];
        } else {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            if len == 0 || rest.starts_with(|c: char| c.is_ascii_digit()) {
                return Err(format!(
                    "`${}`: a `$` starts a variable (write `$$` for a dollar sign)",
                    &rest[..rest.len().min(8)]
                ));
            }
            out.push_str(vars.get(&rest[..len]).unwrap_or(""));
            rest = &rest[len..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Where the `}` closing `${` is, nested `${...}` in a default included.
fn closing_brace(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 1;
            }
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

fn expand(inner: &str, vars: &Variables) -> Result<String, String> {
    let name_len = inner
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(inner.len());
    let (name, op) = inner.split_at(name_len);
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("`${{{inner}}}`: not a variable name"));
    }
    let value = vars.get(name);
    let set_nonempty = value.is_some_and(|v| !v.is_empty());
    let (check_empty, op) = match op.strip_prefix(':') {
        Some(rest) => (true, rest),
        None => (false, op),
    };
    let present = if check_empty {
        set_nonempty
    } else {
        value.is_some()
    };
    let mut chars = op.chars();
    let Some(kind) = chars.next() else {
        return Ok(value.unwrap_or("").to_string());
    };
    let arg = chars.as_str();
    match kind {
        '-' if present => Ok(value.unwrap_or("").to_string()),
        '-' => interpolate(arg, vars),
        '+' if present => interpolate(arg, vars),
        '+' => Ok(String::new()),
        '?' if present => Ok(value.unwrap_or("").to_string()),
        '?' => Err(if arg.is_empty() {
            format!("variable {name} is required")
        } else {
            format!("variable {name} is required: {}", interpolate(arg, vars)?)
        }),
        _ => Err(format!("`${{{inner}}}`: unknown operator after {name}")),
    }
}

/// `NAME=value` lines (and `export NAME=value`), `#` comments, values optionally quoted;
/// each line's result, numbered from 1. A line `NAME` alone is skipped.
pub fn parse_env_file(text: &str) -> Vec<Result<(String, String), (usize, String)>> {
    let mut out = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let name = name.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.push(Err((n + 1, format!("`{name}` is not a variable name"))));
            continue;
        }
        let value = value.trim();
        let value = if let Some(q) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            q.replace("\\n", "\n").replace("\\\"", "\"")
        } else if let Some(q) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
            q.to_string()
        } else {
            // An unquoted value ends at ` #`.
            value
                .split(" #")
                .next()
                .unwrap_or("")
                .trim_end()
                .to_string()
        };
        out.push(Ok((name.to_string(), value)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Variables {
        Variables::new(
            [
                ("TAG".to_string(), "16".to_string()),
                ("EMPTY".into(), String::new()),
            ],
            Some("PORT=8080\nTAG=ignored\n# comment\nexport NAME=\"shop app\"\n"),
        )
    }

    #[test]
    fn compose_interpolation() {
        let v = vars();
        let i = |t: &str| interpolate(t, &v);
        assert_eq!(i("postgres:${TAG}").unwrap(), "postgres:16");
        assert_eq!(i("$PORT:80").unwrap(), "8080:80");
        assert_eq!(i("${NAME}").unwrap(), "shop app");
        assert_eq!(i("${MISSING:-5432}").unwrap(), "5432");
        assert_eq!(i("${EMPTY:-dflt}").unwrap(), "dflt");
        assert_eq!(i("${EMPTY-dflt}").unwrap(), "");
        assert_eq!(i("${MISSING:-${PORT}}").unwrap(), "8080");
        assert_eq!(i("${TAG:+set}${MISSING+no}").unwrap(), "set");
        assert_eq!(i("cost $$5").unwrap(), "cost $5");
        assert!(
            i("${DB_PASSWORD:?set it in .env}")
                .unwrap_err()
                .contains("set it in .env")
        );
        assert!(i("${OPEN").is_err());
        assert!(i("$ 5").is_err());
    }
}
