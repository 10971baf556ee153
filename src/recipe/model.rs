//! The recipe file format: `images/<name>/image.toml`.
//!
//! Every struct denies unknown fields so a typo is an error naming the field, not a
//! silently ignored setting. Paths of templates are relative to the project root
//! (they are shared between images); paths of local artifacts are relative to the
//! image's folder.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The only recipe format this kiln understands. It is part of the content hash, so
/// a format change rebakes every image.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    /// Recipe format version; must equal [`FORMAT_VERSION`].
    pub format: u32,
    /// One line saying what the image is for; becomes the AMI description.
    #[serde(default)]
    pub description: String,
    pub base: BaseImage,
    #[serde(default)]
    pub builder: Builder,
    pub java: JavaPin,
    #[serde(default, rename = "artifact")]
    pub artifacts: Vec<Artifact>,
    #[serde(default)]
    pub vars: BTreeMap<String, VarDecl>,
    pub service: Service,
    #[serde(default, rename = "smoke")]
    pub smoke: Vec<SmokeTest>,
    pub provision: Provision,
    #[serde(default, rename = "render")]
    pub renders: Vec<RenderSpec>,
}

/// Where the image starts from. Exactly one of `ami`, `owner` + `name`, or
/// `ssm_parameter` is given.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BaseImage {
    /// A fixed AMI id, e.g. `ami-0123456789abcdef0`.
    pub ami: Option<String>,
    /// Account that owns the image (e.g. Canonical's `099720109477`, or `self`).
    pub owner: Option<String>,
    /// Image name pattern (`*` wildcards); the most recently created match wins.
    pub name: Option<String>,
    /// An SSM parameter holding an AMI id, e.g. a public `/aws/service/...` one.
    pub ssm_parameter: Option<String>,
    /// CPU architecture filter for `owner` + `name` lookups.
    #[serde(default = "default_arch")]
    pub architecture: String,
}

fn default_arch() -> String {
    "x86_64".to_string()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Builder {
    /// EC2 instance type of the temporary builder.
    #[serde(default = "default_instance_type")]
    pub instance_type: String,
    /// Size of the root volume in GiB; the base image's size when absent.
    pub root_volume_gib: Option<u32>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            instance_type: default_instance_type(),
            root_volume_gib: None,
        }
    }
}

fn default_instance_type() -> String {
    "t3.small".to_string()
}

/// The pinned Java runtime: exactly one of `tarball` or `apt`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JavaPin {
    /// What `java -version` must report, e.g. `1.8.0_412`. The bake fails otherwise.
    pub version: String,
    pub tarball: Option<JavaTarball>,
    pub apt: Option<JavaApt>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JavaTarball {
    /// Vendor download URL (https).
    pub url: String,
    /// sha256 of the tarball, 64 hex digits.
    pub sha256: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JavaApt {
    pub package: String,
    /// Exact package version; installed as `package=version`.
    pub version: String,
}

/// A file the application needs on the image.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Name templates refer to it by (`artifacts` list in the context).
    pub name: String,
    /// Local file, relative to the image folder.
    pub path: Option<String>,
    /// Remote file, fetched on the builder and checked against `sha256`.
    pub url: Option<String>,
    /// Required for `url`; for `path` it is computed and, when given, must match.
    pub sha256: Option<String>,
    /// Absolute install path on the image.
    pub dest: String,
    /// Octal file mode on the image.
    #[serde(default = "default_artifact_mode")]
    pub mode: String,
}

fn default_artifact_mode() -> String {
    "0644".to_string()
}

/// A typed variable templates can use as `vars.<name>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VarDecl {
    #[serde(rename = "type")]
    pub ty: VarType,
    pub default: Option<toml::Value>,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VarType {
    String,
    Integer,
    Boolean,
}

impl std::fmt::Display for VarType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VarType::String => "string",
            VarType::Integer => "integer",
            VarType::Boolean => "boolean",
        })
    }
}

/// The long-running process the image exists to run (an upstart job on trusty).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Job name (`/etc/init/<name>.conf`, `start <name>`).
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Dedicated system user the service runs as; created during the bake.
    pub user: String,
    /// Command line, run by the user in `working_dir`.
    pub exec: String,
    pub working_dir: String,
    /// TCP port the service listens on, if any (health checks, smoke tests).
    pub port: Option<u16>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// A command run on an instance booted from the new image; non-zero fails the bake.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmokeTest {
    pub name: String,
    pub run: String,
    /// Seconds to keep retrying the command while the service starts.
    #[serde(default = "default_smoke_timeout")]
    pub timeout_secs: u32,
}

fn default_smoke_timeout() -> u32 {
    60
}

/// The script run as root on the builder, after the rendered files are in place.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provision {
    /// Template path relative to the project root.
    pub template: String,
}

/// A template rendered onto the image at `dest`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenderSpec {
    /// Template path relative to the project root.
    pub template: String,
    /// Absolute path on the image.
    pub dest: String,
    #[serde(default = "default_artifact_mode")]
    pub mode: String,
}
