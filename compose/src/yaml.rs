//! The compose file as a tree that remembers where each node is: every diagnostic names the
//! line. Parsed by saphyr (aliases expanded, with its budget against alias bombs); merge keys
//! (`<<: *defaults`, YAML 1.1, used throughout real compose files) are applied here, the
//! mapping's own keys winning.

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};

/// A node and the line it starts on (1-based).
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub line: usize,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    /// A scalar's text as written (after the YAML escapes), and whether it was plain
    /// (unquoted: `true`, `80` and `~` mean a bool, a number and null only then).
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    /// Entries in file order; keys are scalars.
    Map(Vec<(Key, Node)>),
}

/// A mapping key and its line.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub name: String,
    pub line: usize,
}

/// Why the file is not YAML a compose file can be.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub line: usize,
    pub message: String,
}

/// Parses `text`: one document.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let docs = MarkedYaml::load_from_str(text).map_err(|e| SyntaxError {
        line: e.marker().line(),
        message: e.info().to_string(),
    })?;
    match docs.len() {
        0 => Ok(Node {
            line: 1,
            value: Value::Null,
        }),
        1 => docs
            .into_iter()
            .next()
            .map(|doc| convert(&doc))
            .unwrap_or(Ok(Node {
                line: 1,
                value: Value::Null,
            })),
        _ => Err(SyntaxError {
            line: docs.get(1).map_or(1, |d| d.span.start.line()),
            message: "a compose file holds one YAML document".into(),
        }),
    }
}

fn convert(node: &MarkedYaml<'_>) -> Result<Node, SyntaxError> {
    let line = node.span.start.line();
    let value = match &node.data {
        YamlData::Representation(text, style, _) => Value::Scalar {
            text: text.to_string(),
            plain: *style == saphyr::ScalarStyle::Plain,
        },
        YamlData::Value(scalar) => scalar_value(scalar),
        YamlData::Sequence(items) => {
            Value::Seq(items.iter().map(convert).collect::<Result<_, _>>()?)
        }
        YamlData::Mapping(map) => {
            let mut entries: Vec<(Key, Node)> = Vec::new();
            let mut merged: Vec<(Key, Node)> = Vec::new();
            for (key, value) in map {
                let key_line = key.span.start.line();
                let name = match convert(key)?.value {
                    Value::Scalar { text, .. } => text,
                    Value::Null => "null".into(),
                    _ => {
                        return Err(SyntaxError {
                            line: key_line,
                            message: "a mapping key must be a plain value".into(),
                        });
                    }
                };
                let value = convert(value)?;
                if name == "<<" {
                    merge_sources(&value, &mut merged)?;
                    continue;
                }
                if entries.iter().any(|(k, _)| k.name == name) {
                    return Err(SyntaxError {
                        line: key_line,
                        message: format!("`{name}` is given twice"),
                    });
                }
                entries.push((
                    Key {
                        name,
                        line: key_line,
                    },
                    value,
                ));
            }
            for (key, value) in merged {
                if !entries.iter().any(|(k, _)| k.name == key.name) {
                    entries.push((key, value));
                }
            }
            Value::Map(entries)
        }
        YamlData::Tagged(_, inner) => return convert(inner),
        YamlData::Alias(_) | YamlData::BadValue => {
            return Err(SyntaxError {
                line,
                message: "a value that cannot be read (an unknown alias?)".into(),
            });
        }
    };
    Ok(Node { line, value })
}

/// The entries a `<<` brings in: a mapping, or a list of them (earlier ones winning).
fn merge_sources(value: &Node, merged: &mut Vec<(Key, Node)>) -> Result<(), SyntaxError> {
    let sources: Vec<&Node> = match &value.value {
        Value::Map(_) => vec![value],
        Value::Seq(items) => items.iter().collect(),
        _ => {
            return Err(SyntaxError {
                line: value.line,
                message: "`<<` merges a mapping or a list of mappings".into(),
            });
        }
    };
    for source in sources {
        let Value::Map(entries) = &source.value else {
            return Err(SyntaxError {
                line: source.line,
                message: "`<<` merges a mapping or a list of mappings".into(),
            });
        };
        for (key, node) in entries {
            if !merged.iter().any(|(k, _)| k.name == key.name) {
                merged.push((key.clone(), node.clone()));
            }
        }
    }
    Ok(())
}

fn scalar_value(scalar: &Scalar<'_>) -> Value {
    let text = match scalar {
        Scalar::Null => return Value::Null,
        Scalar::Boolean(b) => b.to_string(),
        Scalar::Integer(i) => i.to_string(),
        Scalar::FloatingPoint(f) => f.to_string(),
        Scalar::String(s) => {
            return Value::Scalar {
                text: s.to_string(),
                plain: false,
            };
        }
    };
    Value::Scalar { text, plain: true }
}

impl Node {
    /// The entries of a mapping.
    pub fn entries(&self) -> Option<&[(Key, Node)]> {
        match &self.value {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// A mapping's value for `name`.
    pub fn get(&self, name: &str) -> Option<&Node> {
        self.entries()?
            .iter()
            .find(|(k, _)| k.name == name)
            .map(|(_, v)| v)
    }

    /// A scalar's text.
    pub fn text(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        match &self.value {
            Value::Null => true,
            Value::Scalar { text, plain: true } => matches!(text.as_str(), "~" | "null" | ""),
            _ => false,
        }
    }

    /// A boolean, as YAML 1.1 and Compose write them.
    pub fn bool(&self) -> Option<bool> {
        match self.text()?.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" => Some(true),
            "false" | "no" | "off" => Some(false),
            _ => None,
        }
    }

    /// Items of a sequence.
    pub fn items(&self) -> Option<&[Node]> {
        match &self.value {
            Value::Seq(items) => Some(items),
            _ => None,
        }
    }

    /// What kind of node this is, for messages.
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Null => "null",
            Value::Scalar { .. } => "a value",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_merge_keys_and_aliases() {
        let text = "x-defaults: &d\n  restart: always\n  init: true\nservices:\n  web:\n    <<: *d\n    restart: \"no\"\n    ports: [\"80:80\"]\n";
        let root = parse(text).unwrap();
        let web = root.get("services").unwrap().get("web").unwrap();
        assert_eq!(web.get("restart").unwrap().text(), Some("no"));
        assert_eq!(web.get("init").unwrap().bool(), Some(true));
        assert_eq!(web.get("ports").unwrap().line, 8);
        let keys: Vec<&str> = web
            .entries()
            .unwrap()
            .iter()
            .map(|(k, _)| k.name.as_str())
            .collect();
        assert_eq!(keys, ["restart", "ports", "init"]);
    }

    #[test]
    fn syntax_errors_and_duplicates_name_their_line() {
        let e = parse("services:\n  web: [\n").unwrap_err();
        assert!(e.line >= 2, "{e:?}");
        let e = parse("services:\n  web:\n    image: a\n    image: b\n").unwrap_err();
        assert_eq!(e.line, 4);
        assert!(e.message.contains("duplicate"), "{e:?}");
    }
}
