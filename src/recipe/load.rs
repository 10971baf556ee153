//! Reading and validating `images/<name>/image.toml`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use super::context::VarValue;
use super::error::RecipeError;
use super::model::{RecipeFile, VarType, FORMAT_VERSION};
use crate::config::{line_col, one_line};

/// A recipe that parsed and passed validation. Paths are absolute.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub name: String,
    /// Canonical project root.
    pub root: PathBuf,
    /// `<root>/images/<name>`.
    pub dir: PathBuf,
    /// `<root>/images/<name>/image.toml`.
    pub path: PathBuf,
    /// sha256 of image.toml's bytes.
    pub sha256: String,
    pub file: RecipeFile,
}

impl Recipe {
    pub fn load(root: &Path, name: &str) -> Result<Recipe, RecipeError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(RecipeError::BadImageName {
                name: name.to_string(),
            });
        }
        let root = root.canonicalize().map_err(|source| RecipeError::Read {
            path: root.to_path_buf(),
            source,
        })?;
        let dir = root.join("images").join(name);
        let path = dir.join("image.toml");
        if !path.is_file() {
            let names = list_images(&root);
            let available = if names.is_empty() {
                "no images exist under images/".to_string()
            } else {
                format!("available: {}", names.join(", "))
            };
            return Err(RecipeError::UnknownImage {
                name: name.to_string(),
                path,
                available,
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|source| RecipeError::Read {
            path: path.clone(),
            source,
        })?;
        let file: RecipeFile = toml::from_str(&text).map_err(|e| {
            let (line, col) = line_col(&text, e.span().map(|s| s.start).unwrap_or(0));
            RecipeError::Parse {
                path: path.clone(),
                line,
                col,
                message: one_line(e.message()),
            }
        })?;
        let recipe = Recipe {
            name: name.to_string(),
            root,
            dir,
            path,
            sha256: super::hash::sha256_bytes(text.as_bytes()),
            file,
        };
        recipe.validate()?;
        Ok(recipe)
    }

    fn invalid(&self, field: impl Into<String>, message: impl Into<String>) -> RecipeError {
        RecipeError::Invalid {
            path: self.path.clone(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn validate(&self) -> Result<(), RecipeError> {
        let f = &self.file;
        if f.format != FORMAT_VERSION {
            return Err(self.invalid(
                "format",
                format!(
                    "format {} is not supported; this kiln reads format {FORMAT_VERSION}",
                    f.format
                ),
            ));
        }

        let b = &f.base;
        match (&b.ami, &b.owner, &b.name, &b.ssm_parameter) {
            (Some(ami), None, None, None) => {
                if !is_ami_id(ami) {
                    return Err(self.invalid(
                        "base.ami",
                        format!("{ami:?} is not an AMI id (ami- followed by 8 or 17 hex digits)"),
                    ));
                }
            }
            (None, Some(owner), Some(name), None) => {
                if owner.is_empty() || name.is_empty() {
                    return Err(self.invalid("base", "owner and name must not be empty"));
                }
            }
            (None, None, None, Some(p)) => {
                if !p.starts_with('/') {
                    return Err(self.invalid(
                        "base.ssm_parameter",
                        format!("{p:?} is not a parameter path (it starts with '/')"),
                    ));
                }
            }
            _ => {
                return Err(self.invalid(
                    "base",
                    "give exactly one of: ami = \"ami-…\"; owner = \"…\" with name = \"pattern\"; or ssm_parameter = \"/…\"",
                ))
            }
        }

        if let Some(gib) = f.builder.root_volume_gib {
            // EBS volume sizes: 1 GiB to 16 TiB (gp2/gp3).
            if !(1..=16384).contains(&gib) {
                return Err(self.invalid(
                    "builder.root_volume_gib",
                    format!("{gib} is not an EBS volume size (1 to 16384 GiB)"),
                ));
            }
        }

        let j = &f.java;
        if j.version.trim().is_empty() {
            return Err(self.invalid(
                "java.version",
                "must be what `java -version` reports, e.g. \"1.8.0_412\"",
            ));
        }
        match (&j.tarball, &j.apt) {
            (Some(t), None) => {
                check_sha256(&t.sha256).map_err(|m| self.invalid("java.tarball.sha256", m))?;
                if !t.url.starts_with("https://") {
                    return Err(self.invalid(
                        "java.tarball.url",
                        format!("{:?} must be an https:// URL", t.url),
                    ));
                }
            }
            (None, Some(a)) => {
                if a.package.is_empty() || a.version.is_empty() {
                    return Err(
                        self.invalid("java.apt", "package and an exact version are both required")
                    );
                }
            }
            _ => return Err(self.invalid(
                "java",
                "give exactly one of [java.tarball] (url, sha256) or [java.apt] (package, version)",
            )),
        }

        let mut names = BTreeSet::new();
        let mut dests = BTreeSet::new();
        for (i, a) in f.artifacts.iter().enumerate() {
            let field = format!("artifact[{i}]");
            if !is_simple_name(&a.name) {
                return Err(self.invalid(
                    format!("{field}.name"),
                    format!("{:?}: use letters, digits, '.', '-' and '_'", a.name),
                ));
            }
            if !names.insert(a.name.as_str()) {
                return Err(self.invalid(
                    format!("{field}.name"),
                    format!("{:?} is used twice", a.name),
                ));
            }
            if let Some(sha) = &a.sha256 {
                check_sha256(sha).map_err(|m| self.invalid(format!("{field}.sha256"), m))?;
            }
            match (&a.path, &a.url) {
                (Some(p), None) => {
                    let file = self.inside_root(&self.dir, p, &format!("{field}.path"))?;
                    if !file.is_file() {
                        return Err(RecipeError::MissingArtifact {
                            path: self.path.clone(),
                            artifact: a.name.clone(),
                            file,
                        });
                    }
                }
                (None, Some(url)) => {
                    if !(url.starts_with("https://") || url.starts_with("http://")) {
                        return Err(self.invalid(
                            format!("{field}.url"),
                            format!("{url:?} is not an http(s) URL"),
                        ));
                    }
                    if a.sha256.is_none() {
                        return Err(self.invalid(
                            format!("{field}.sha256"),
                            "a URL artifact needs its sha256 pinned",
                        ));
                    }
                }
                _ => {
                    return Err(self.invalid(
                        field,
                        "give exactly one of path = \"…\" (local file) or url = \"…\"",
                    ))
                }
            }
            check_dest(&a.dest).map_err(|m| self.invalid(format!("{field}.dest"), m))?;
            check_mode(&a.mode).map_err(|m| self.invalid(format!("{field}.mode"), m))?;
            if !dests.insert(a.dest.as_str()) {
                return Err(self.invalid(
                    format!("{field}.dest"),
                    format!("{} is written twice", a.dest),
                ));
            }
        }

        for (name, decl) in &f.vars {
            if !is_identifier(name) {
                return Err(self.invalid(
                    format!("vars.{name}"),
                    "variable names are identifiers: letters, digits and '_', not starting with a digit",
                ));
            }
            if let Some(default) = &decl.default {
                typed_value(decl.ty, default)
                    .map_err(|m| self.invalid(format!("vars.{name}.default"), m))?;
            }
        }

        let s = &f.service;
        if !is_simple_name(&s.name) {
            return Err(self.invalid(
                "service.name",
                format!("{:?}: use letters, digits, '.', '-' and '_'", s.name),
            ));
        }
        if !is_unix_user(&s.user) || s.user == "root" {
            return Err(self.invalid(
                "service.user",
                format!(
                    "{:?}: a dedicated user name (lowercase letters, digits, '_', '-'; not root)",
                    s.user
                ),
            ));
        }
        if s.exec.trim().is_empty() {
            return Err(self.invalid("service.exec", "must not be empty"));
        }
        check_dest(&s.working_dir).map_err(|m| self.invalid("service.working_dir", m))?;
        for key in s.env.keys() {
            if !is_identifier(key) {
                return Err(self.invalid(
                    format!("service.env.{key}"),
                    "environment variable names are identifiers",
                ));
            }
        }

        for (i, t) in f.smoke.iter().enumerate() {
            if t.run.trim().is_empty() {
                return Err(self.invalid(format!("smoke[{i}].run"), "must not be empty"));
            }
        }

        self.template_path(&f.provision.template, "provision.template")?;
        for (i, r) in f.renders.iter().enumerate() {
            let field = format!("render[{i}]");
            self.template_path(&r.template, &format!("{field}.template"))?;
            check_dest(&r.dest).map_err(|m| self.invalid(format!("{field}.dest"), m))?;
            check_mode(&r.mode).map_err(|m| self.invalid(format!("{field}.mode"), m))?;
            if !dests.insert(r.dest.as_str()) {
                return Err(self.invalid(
                    format!("{field}.dest"),
                    format!("{} is written twice", r.dest),
                ));
            }
        }
        Ok(())
    }

    /// The absolute path of a template named in the recipe; it must exist and stay
    /// inside the project root.
    pub fn template_path(&self, value: &str, field: &str) -> Result<PathBuf, RecipeError> {
        let p = self.inside_root(&self.root, value, field)?;
        if !p.is_file() {
            return Err(RecipeError::MissingTemplate {
                path: self.path.clone(),
                field: field.to_string(),
                template: value.to_string(),
            });
        }
        Ok(p)
    }

    /// Joins a relative path onto `base` and refuses anything that ends up outside
    /// the project root, lexically or through a symlink.
    fn inside_root(&self, base: &Path, value: &str, field: &str) -> Result<PathBuf, RecipeError> {
        let escape = || RecipeError::EscapesRoot {
            path: self.path.clone(),
            field: field.to_string(),
            value: value.to_string(),
            root: self.root.clone(),
        };
        let rel = Path::new(value);
        if value.is_empty() || rel.is_absolute() {
            return Err(escape());
        }
        let mut out = base.to_path_buf();
        for c in rel.components() {
            match c {
                Component::Normal(part) => out.push(part),
                Component::CurDir => {}
                Component::ParentDir => {
                    if !out.pop() {
                        return Err(escape());
                    }
                }
                Component::RootDir | Component::Prefix(_) => return Err(escape()),
            }
        }
        if !out.starts_with(&self.root) {
            return Err(escape());
        }
        if let Ok(real) = out.canonicalize() {
            if !real.starts_with(&self.root) {
                return Err(escape());
            }
        }
        Ok(out)
    }

    /// Variable values: declared defaults, then `name=value` overrides.
    pub fn resolve_vars(
        &self,
        overrides: &[(String, String)],
    ) -> Result<BTreeMap<String, VarValue>, RecipeError> {
        let mut out = BTreeMap::new();
        for (name, decl) in &self.file.vars {
            if let Some(d) = &decl.default {
                let v = typed_value(decl.ty, d).map_err(|message| RecipeError::Var {
                    name: name.clone(),
                    message,
                })?;
                out.insert(name.clone(), v);
            }
        }
        for (name, raw) in overrides {
            let decl = self.file.vars.get(name).ok_or_else(|| RecipeError::Var {
                name: name.clone(),
                message: format!(
                    "not declared in {}; declare it under [vars] or fix the name",
                    self.path.display()
                ),
            })?;
            let v = parse_var(decl.ty, raw).map_err(|message| RecipeError::Var {
                name: name.clone(),
                message,
            })?;
            out.insert(name.clone(), v);
        }
        for name in self.file.vars.keys() {
            if !out.contains_key(name) {
                return Err(RecipeError::Var {
                    name: name.clone(),
                    message: format!("has no default; pass --var {name}=VALUE"),
                });
            }
        }
        Ok(out)
    }
}

/// The image names under `<root>/images/`, sorted.
pub fn list_images(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join("images"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("image.toml").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

pub fn is_ami_id(s: &str) -> bool {
    s.strip_prefix("ami-").is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17) && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// A sha256 pin is exactly 64 hex digits.
pub fn check_sha256(s: &str) -> Result<(), String> {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a sha256 (64 hex digits, e.g. the first field `sha256sum FILE` prints)"
        ))
    }
}

fn check_dest(s: &str) -> Result<(), String> {
    let p = Path::new(s);
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) || s == "/" {
        return Err(format!("{s:?} must be an absolute path without '..'"));
    }
    if s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || "'\"$`\\".contains(c))
    {
        return Err(format!(
            "{s:?} contains whitespace, quotes or shell characters; use a plain path"
        ));
    }
    Ok(())
}

fn check_mode(s: &str) -> Result<(), String> {
    if (3..=4).contains(&s.len()) && s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        Ok(())
    } else {
        Err(format!("{s:?} is not an octal file mode like \"0644\""))
    }
}

fn is_simple_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !s.starts_with('.')
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_unix_user(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 32
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn typed_value(ty: VarType, v: &toml::Value) -> Result<VarValue, String> {
    match (ty, v) {
        (VarType::String, toml::Value::String(s)) => Ok(VarValue::String(s.clone())),
        (VarType::Integer, toml::Value::Integer(i)) => Ok(VarValue::Integer(*i)),
        (VarType::Boolean, toml::Value::Boolean(b)) => Ok(VarValue::Boolean(*b)),
        (ty, v) => Err(format!("{v} is not a {ty}")),
    }
}

fn parse_var(ty: VarType, raw: &str) -> Result<VarValue, String> {
    match ty {
        VarType::String => Ok(VarValue::String(raw.to_string())),
        VarType::Integer => raw
            .parse()
            .map(VarValue::Integer)
            .map_err(|_| format!("{raw:?} is not an integer")),
        VarType::Boolean => raw
            .parse()
            .map(VarValue::Boolean)
            .map_err(|_| format!("{raw:?} is not true or false")),
    }
}
