//! The typed context every template is rendered with.
//!
//! A template can use only what is listed here: a misspelt or undeclared name is a
//! render error naming the template, never an empty string baked into an image.

use std::collections::BTreeMap;

use serde::Serialize;

/// Where the bake stages things on the builder. Templates refer to these paths
/// through [`KilnCtx`], never by hard-coding them.
pub const STAGING_DIR: &str = "/var/lib/kiln";

#[derive(Debug, Clone, Serialize)]
pub struct TemplateContext {
    pub image: ImageCtx,
    pub java: JavaCtx,
    pub artifacts: Vec<ArtifactCtx>,
    pub service: ServiceCtx,
    pub smoke: Vec<SmokeCtx>,
    /// Rendered files other than the provisioning script, in recipe order.
    pub files: Vec<FileCtx>,
    /// Declared variables with their resolved values (`vars.<name>`).
    pub vars: BTreeMap<String, VarValue>,
    pub kiln: KilnCtx,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageCtx {
    pub name: String,
    pub description: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct JavaCtx {
    /// What `java -version` must report, e.g. `1.8.0_412`.
    pub version: String,
    /// Where a tarball runtime is unpacked; `bin/java` lives below it.
    pub home: String,
    pub tarball: Option<JavaTarballCtx>,
    pub apt: Option<JavaAptCtx>,
}

#[derive(Debug, Clone, Serialize)]
pub struct JavaTarballCtx {
    pub url: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct JavaAptCtx {
    pub package: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ArtifactCtx {
    pub name: String,
    pub sha256: String,
    /// Absolute install path on the image.
    pub dest: String,
    /// Octal mode, e.g. `0644`.
    pub mode: String,
    /// Where the bake has put the verified file on the builder before provisioning.
    pub staged: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceCtx {
    pub name: String,
    pub description: String,
    pub user: String,
    pub exec: String,
    pub working_dir: String,
    pub port: Option<u16>,
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SmokeCtx {
    pub name: String,
    pub run: String,
    pub timeout_secs: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileCtx {
    /// Absolute path on the image.
    pub dest: String,
    pub mode: String,
    /// Where the bake has put the rendered file on the builder before provisioning.
    pub staged: String,
}

/// A variable's value: the declared type decides which variant.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum VarValue {
    String(String),
    Integer(i64),
    Boolean(bool),
}

impl std::fmt::Display for VarValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VarValue::String(s) => f.write_str(s),
            VarValue::Integer(i) => write!(f, "{i}"),
            VarValue::Boolean(b) => write!(f, "{b}"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct KilnCtx {
    /// Recipe format version.
    pub format: u32,
    /// Root of everything the bake stages on the builder (`/var/lib/kiln`).
    pub staging_dir: String,
    /// Directory holding verified artifacts (`<staging_dir>/artifacts`).
    pub artifacts_dir: String,
    /// Directory holding rendered files (`<staging_dir>/files`).
    pub files_dir: String,
}

impl KilnCtx {
    pub fn new(format: u32) -> Self {
        KilnCtx {
            format,
            staging_dir: STAGING_DIR.to_string(),
            artifacts_dir: format!("{STAGING_DIR}/artifacts"),
            files_dir: format!("{STAGING_DIR}/files"),
        }
    }
}
