//! MCP prompts: Markdown files with `+++` TOML front matter, validated when
//! the gateway starts, rendered by `prompts/get` with `{{argument}}`
//! substitution.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod builtin {
    include!(concat!(env!("OUT_DIR"), "/prompts.rs"));
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prompt {
    pub name: String,
    pub title: Option<String>,
    pub description: String,
    #[serde(default)]
    pub arguments: Vec<PromptArg>,
    #[serde(skip)]
    pub body: String,
    #[serde(skip)]
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptArg {
    pub name: String,
    pub description: String,
    #[serde(default)]
    pub required: bool,
}

/// A prompt file that cannot be served, and why.
#[derive(Debug, thiserror::Error)]
pub enum PromptFileError {
    #[error("prompt file {source_name}: {problem}")]
    Invalid { source_name: String, problem: String },
    #[error("prompt file {source_name}: front matter is not valid TOML")]
    FrontMatter {
        source_name: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("cannot read prompts directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why `prompts/get` cannot render; the caller can fix each of these.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PromptGetError {
    #[error("no prompt named `{0}`; prompts/list shows the available prompts")]
    Unknown(String),
    #[error("prompt `{prompt}` needs argument `{argument}`")]
    Missing { prompt: String, argument: String },
    #[error("prompt `{prompt}` has no argument `{argument}`; it takes: {known}")]
    Unexpected { prompt: String, argument: String, known: String },
}

#[derive(Debug, Clone, Default)]
pub struct Prompts {
    by_name: BTreeMap<String, Prompt>,
}

impl Prompts {
    /// The built-in prompts, then those in `extra_dir` (which replace built-ins of the same name).
    pub fn load(extra_dir: Option<&Path>) -> Result<Prompts, PromptFileError> {
        let mut prompts = Prompts::default();
        for (file, text) in builtin::BUILTIN {
            prompts.insert(parse(&format!("(built-in) {file}"), text)?, false)?;
        }
        if let Some(dir) = extra_dir {
            let dir_err = |source| PromptFileError::Dir { path: dir.into(), source };
            let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(dir_err)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "md") && p.file_name().is_some_and(|n| n != "README.md"))
                .collect();
            paths.sort();
            for path in paths {
                let text = std::fs::read_to_string(&path).map_err(dir_err)?;
                prompts.insert(parse(&path.display().to_string(), &text)?, true)?;
            }
        }
        Ok(prompts)
    }

    fn insert(&mut self, prompt: Prompt, may_replace: bool) -> Result<(), PromptFileError> {
        if let Some(existing) = self.by_name.get(&prompt.name)
            && !(may_replace && existing.source.starts_with("(built-in)"))
        {
            return Err(PromptFileError::Invalid {
                source_name: prompt.source.clone(),
                problem: format!("prompt name `{}` is also used by {}", prompt.name, existing.source),
            });
        }
        self.by_name.insert(prompt.name.clone(), prompt);
        Ok(())
    }

    pub fn all(&self) -> impl Iterator<Item = &Prompt> {
        self.by_name.values()
    }

    /// Renders a prompt's body with `args`.
    pub fn render(&self, name: &str, args: &BTreeMap<String, String>) -> Result<(&Prompt, String), PromptGetError> {
        let prompt = self.by_name.get(name).ok_or_else(|| PromptGetError::Unknown(name.into()))?;
        for given in args.keys() {
            if !prompt.arguments.iter().any(|a| &a.name == given) {
                let known: Vec<&str> = prompt.arguments.iter().map(|a| a.name.as_str()).collect();
                return Err(PromptGetError::Unexpected {
                    prompt: name.into(),
                    argument: given.clone(),
                    known: if known.is_empty() { "no arguments".into() } else { known.join(", ") },
                });
            }
        }
        let mut body = prompt.body.clone();
        for arg in &prompt.arguments {
            let value = match args.get(&arg.name) {
                Some(v) => v.as_str(),
                None if arg.required => {
                    return Err(PromptGetError::Missing { prompt: name.into(), argument: arg.name.clone() });
                }
                None => "",
            };
            body = body.replace(&format!("{{{{{}}}}}", arg.name), value);
        }
        Ok((prompt, body))
    }
}

fn parse(source_name: &str, text: &str) -> Result<Prompt, PromptFileError> {
    let invalid = |problem: String| PromptFileError::Invalid { source_name: source_name.into(), problem };
    let rest = text
        .strip_prefix("+++\n")
        .ok_or_else(|| invalid("must start with a `+++` line opening TOML front matter".into()))?;
    let (front, body) =
        rest.split_once("\n+++\n").ok_or_else(|| invalid("front matter is not closed by a `+++` line".into()))?;
    let mut prompt: Prompt = toml::from_str(front)
        .map_err(|source| PromptFileError::FrontMatter { source_name: source_name.into(), source })?;
    prompt.body = body.trim().to_string();
    prompt.source = source_name.into();
    let valid_ident =
        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !valid_ident(&prompt.name) {
        return Err(invalid(format!("name `{}` must be non-empty [a-z0-9_]", prompt.name)));
    }
    if prompt.body.is_empty() {
        return Err(invalid("the body after the front matter is empty".into()));
    }
    let declared: BTreeSet<&str> = prompt.arguments.iter().map(|a| a.name.as_str()).collect();
    if declared.len() != prompt.arguments.len() {
        return Err(invalid("an argument is declared twice".into()));
    }
    let used = placeholders(&prompt.body);
    if let Some(undeclared) = used.iter().find(|u| !declared.contains(u.as_str())) {
        return Err(invalid(format!("body uses {{{{{undeclared}}}}} but declares no argument `{undeclared}`")));
    }
    if let Some(unused) = declared.iter().find(|d| !used.contains(**d)) {
        return Err(invalid(format!("argument `{unused}` is declared but the body never uses {{{{{unused}}}}}")));
    }
    Ok(prompt)
}

/// The `{{name}}` placeholders in a body.
fn placeholders(body: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = body;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                found.insert(after[..end].trim().to_string());
                rest = &after[end + 2..];
            }
            None => break,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_load_and_render() {
        let p = Prompts::load(None).unwrap();
        let names: Vec<&str> = p.all().map(|p| p.name.as_str()).collect();
        assert!(names.contains(&"choose_node") && names.contains(&"getting_started"), "{names:?}");
        let sandbox = BTreeMap::from([("name".to_string(), "dev".to_string())]);
        let (_, body) = p.render("workspace_sandbox", &sandbox).unwrap();
        assert!(body.contains("workspace_create {name: \"dev\"") && !body.contains("{{"), "{body}");
        let args = BTreeMap::from([("vcpus".to_string(), "4".to_string()), ("memory_mib".into(), "2048".into())]);
        let (_, body) = p.render("choose_node", &args).unwrap();
        assert!(body.contains("needs 4 vCPUs and\n2048 MiB"), "{body}");
        assert!(!body.contains("{{"), "{body}");
    }

    #[test]
    fn render_errors() {
        let p = Prompts::load(None).unwrap();
        let none = BTreeMap::new();
        assert_eq!(p.render("nope", &none).unwrap_err(), PromptGetError::Unknown("nope".into()));
        assert!(
            matches!(p.render("choose_node", &none), Err(PromptGetError::Missing { argument, .. }) if argument == "vcpus")
        );
        let extra = BTreeMap::from([("x".to_string(), "1".to_string())]);
        let err = p.render("getting_started", &extra).unwrap_err();
        assert!(err.to_string().contains("no arguments"), "{err}");
    }

    #[test]
    fn bad_files_are_explained() {
        let cases = [
            ("no front matter", "needs to start"),
            ("+++\nname = \"a\"\ndescription = \"d\"\nbody", "not closed"),
            ("+++\nname = \"a\"\n+++\nbody", "front matter is not valid TOML"),
            ("+++\nname = \"A B\"\ndescription = \"d\"\n+++\nbody", "[a-z0-9_]"),
            ("+++\nname = \"a\"\ndescription = \"d\"\n+++\nhi {{who}}", "declares no argument `who`"),
            (
                "+++\nname = \"a\"\ndescription = \"d\"\n[[arguments]]\nname = \"x\"\ndescription = \"d\"\n+++\nbody",
                "never uses",
            ),
            ("+++\nname = \"a\"\ndescription = \"d\"\n+++\n", "empty"),
        ];
        for (text, want) in cases {
            let err = parse("t.md", text).unwrap_err();
            let shown = format!("{err}");
            let want = if want == "needs to start" { "must start with" } else { want };
            assert!(shown.contains(want) || format!("{err:?}").contains(want), "{text:?}: {shown}");
            assert!(shown.starts_with("prompt file t.md"), "{shown}");
        }
    }

    #[test]
    fn extra_dir_overrides_builtin_but_not_itself() {
        let dir = tempfile::tempdir().unwrap();
        let file = "+++\nname = \"getting_started\"\ndescription = \"mine\"\n+++\nlocal body\n";
        std::fs::write(dir.path().join("a.md"), file).unwrap();
        let p = Prompts::load(Some(dir.path())).unwrap();
        assert_eq!(p.render("getting_started", &BTreeMap::new()).unwrap().1, "local body");
        std::fs::write(dir.path().join("b.md"), file).unwrap();
        let err = Prompts::load(Some(dir.path())).unwrap_err();
        assert!(err.to_string().contains("also used by"), "{err}");
    }
}
