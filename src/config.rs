//! `kiln.toml`: the project file. Its folder is the project root, where `images/`
//! and `templates/` live.
//!
//! Precedence, highest first: command-line flags, environment (`AWS_REGION`,
//! `AWS_PROFILE`, `AWS_ENDPOINT_URL`, exactly as the aws CLI reads them), this file,
//! then the AWS shared config of the chosen profile.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub const FILE_NAME: &str = "kiln.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no {FILE_NAME} in {start} or any parent folder: create one at the project root (see kiln.toml.example) or pass --config PATH")]
    NotFound { start: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{col}: {message}; fix the file there (README.md, \"Configuration\")")]
    Parse {
        path: PathBuf,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
}

/// The parsed file plus where it was found.
#[derive(Debug, Clone)]
pub struct Config {
    /// Absolute path of the kiln.toml that was read.
    pub path: PathBuf,
    /// The folder holding it: `images/` and `templates/` are looked up here.
    pub root: PathBuf,
    pub file: ConfigFile,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Default region when neither `--region` nor `AWS_REGION` is set.
    pub region: Option<String>,
    /// Default AWS profile when neither `--profile` nor `AWS_PROFILE` is set.
    pub profile: Option<String>,
    /// Send every AWS call here (a local emulator); `AWS_ENDPOINT_URL` wins.
    pub endpoint_url: Option<String>,
    #[serde(default)]
    pub bake: BakeConfig,
    #[serde(default)]
    pub rollout: RolloutConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BakeConfig {
    /// Regions the image is copied to besides the one it is baked in.
    #[serde(default)]
    pub copy_regions: Vec<String>,
    /// S3 bucket local artifacts are uploaded to, content-addressed by sha256.
    pub bucket: Option<String>,
    /// Subnet the builder runs in (private is fine: the builder needs only
    /// outbound HTTPS to SSM, S3 and the package mirrors).
    pub subnet: Option<String>,
    /// Instance profile for the builder (SSM managed-instance + read of the bucket).
    pub instance_profile: Option<String>,
    /// Security group for the builder; a temporary one with no inbound rules is
    /// created (and deleted) when absent.
    pub security_group: Option<String>,
    /// How long temporary resources (builder, boot-test instance, temporary
    /// security group) live before `kiln gc` may remove them, e.g. "3h". Longer
    /// than the longest bake. Default 3h.
    pub ttl: Option<String>,
    /// Longest wait for a new AMI or a copy to become available, e.g. "40m".
    /// A timeout keeps the image; the next bake finds it and waits again.
    pub image_timeout: Option<String>,
    /// Longest wait for the builder's SSM agent to accept a command. Default 10m.
    pub agent_timeout: Option<String>,
    /// Longest provisioning run (the script's execution timeout). Default 60m.
    pub provision_timeout: Option<String>,
}

impl BakeConfig {
    fn duration(value: &Option<String>, default: Duration) -> Duration {
        value
            .as_deref()
            .and_then(|v| humantime::parse_duration(v).ok())
            .unwrap_or(default)
    }

    pub fn ttl(&self) -> Duration {
        Self::duration(&self.ttl, Duration::from_secs(3 * 3600))
    }

    pub fn image_timeout(&self) -> Duration {
        Self::duration(&self.image_timeout, Duration::from_secs(40 * 60))
    }

    pub fn agent_timeout(&self) -> Duration {
        Self::duration(&self.agent_timeout, Duration::from_secs(10 * 60))
    }

    pub fn provision_timeout(&self) -> Duration {
        Self::duration(&self.provision_timeout, Duration::from_secs(60 * 60))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// Default `--max-surge` (count or percent), e.g. "25%".
    pub max_surge: Option<String>,
    /// Default `--min-healthy` (count or percent of the original desired).
    pub min_healthy: Option<String>,
    /// Default `--warmup`, e.g. "60s".
    pub warmup: Option<String>,
    /// Default `--deadline`, e.g. "15m".
    pub deadline: Option<String>,
    /// Default `--poll`: the pause between observations while waiting, e.g. "5s".
    pub poll: Option<String>,
}

impl Config {
    /// Reads `explicit` if given, else the first kiln.toml found walking up from `cwd`.
    pub fn load(explicit: Option<&Path>, cwd: &Path) -> Result<Config, ConfigError> {
        let path = match explicit {
            Some(p) => {
                let p = if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    cwd.join(p)
                };
                if p.is_dir() {
                    p.join(FILE_NAME)
                } else {
                    p
                }
            }
            None => find_upwards(cwd).ok_or_else(|| ConfigError::NotFound {
                start: cwd.to_path_buf(),
            })?,
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let file: ConfigFile = toml::from_str(&text).map_err(|e| {
            let (line, col) = line_col(&text, e.span().map(|s| s.start).unwrap_or(0));
            ConfigError::Parse {
                path: path.clone(),
                line,
                col,
                message: one_line(e.message()),
            }
        })?;
        let path = path.canonicalize().map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let root = path
            .parent()
            .expect("a file path has a parent")
            .to_path_buf();
        let config = Config { path, root, file };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.file.endpoint_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::Invalid {
                    path: self.path.clone(),
                    field: "endpoint_url",
                    message: format!("{url:?} is not an http(s) URL"),
                });
            }
        }
        let b = &self.file.bake;
        for (field, value) in [
            ("bake.ttl", &b.ttl),
            ("bake.image_timeout", &b.image_timeout),
            ("bake.agent_timeout", &b.agent_timeout),
            ("bake.provision_timeout", &b.provision_timeout),
        ] {
            if let Some(v) = value {
                if humantime::parse_duration(v).is_err() {
                    return Err(ConfigError::Invalid {
                        path: self.path.clone(),
                        field,
                        message: format!(
                            "{v:?} is not a duration; write e.g. \"90s\", \"40m\" or \"3h\""
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

fn find_upwards(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .map(|dir| dir.join(FILE_NAME))
        .find(|p| p.is_file())
}

/// 1-based line and column of a byte offset, for `file:line:col` messages.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Errors from parsers often span several lines; operators get one.
pub fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_file_in_a_parent_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "region = \"eu-west-1\"\n").unwrap();
        let sub = dir.path().join("images/web");
        std::fs::create_dir_all(&sub).unwrap();
        let c = Config::load(None, &sub).unwrap();
        assert_eq!(c.root, dir.path().canonicalize().unwrap());
        assert_eq!(c.file.region.as_deref(), Some("eu-west-1"));
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FILE_NAME),
            "region = \"eu-west-1\"\n[bake]\nbukket = \"x\"\n",
        )
        .unwrap();
        let err = Config::load(None, dir.path()).unwrap_err().to_string();
        assert!(err.contains("kiln.toml:3:1"), "{err}");
        assert!(err.contains("bukket"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn missing_file_says_how_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let err = Config::load(None, dir.path()).unwrap_err().to_string();
        assert!(err.contains("--config"), "{err}");
    }
}
