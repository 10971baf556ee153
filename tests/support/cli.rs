//! Running the real `kiln` binary against a throwaway project folder.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::moto;

/// Exit codes of the CLI contract.
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_BAD_INPUT: i32 = 2;

/// The smallest recipe kiln accepts: trusty base by owner + name pattern, a pinned
/// Java, a service, and a provision template at `templates/p.sh.tera`.
pub const MINIMAL_RECIPE: &str = r#"format = 1
[base]
owner = "099720109477"
name = "ubuntu/images/hvm-ssd/ubuntu-trusty-14.04-amd64-server-*"
[java]
version = "1.8.0_412"
[java.apt]
package = "openjdk-8-jre-headless"
version = "8u412-1"
[service]
name = "svc"
user = "svc"
exec = "/usr/bin/java -jar /opt/svc/app.jar"
working_dir = "/opt/svc"
[provision]
template = "templates/p.sh.tera"
"#;

/// The template [`MINIMAL_RECIPE`] names.
pub const MINIMAL_TEMPLATE: &str = "#!/bin/bash\necho {{ image.name }}\n";

/// A temporary project root holding `kiln.toml`; removed when dropped.
pub struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    /// A project whose `kiln.toml` only sets the test region.
    pub fn new() -> Project {
        let dir = tempfile::Builder::new()
            .prefix("kiln-project-")
            .tempdir()
            .expect("temp project folder");
        let project = Project { dir };
        project.write("kiln.toml", &format!("region = \"{}\"\n", moto::REGION));
        project
    }

    /// A project with image `name` built from [`MINIMAL_RECIPE`].
    pub fn minimal(name: &str) -> Project {
        let project = Project::new();
        project.image(name, MINIMAL_RECIPE);
        project.write("templates/p.sh.tera", MINIMAL_TEMPLATE);
        project
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `<root>/kiln.toml`, to pass as `--config`.
    pub fn config(&self) -> PathBuf {
        self.root().join("kiln.toml")
    }

    /// Write `contents` to `<root>/<relative>`, creating folders.
    pub fn write(&self, relative: &str, contents: &str) -> &Project {
        let path = self.root().join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
        }
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        self
    }

    /// Write `images/<name>/image.toml`.
    pub fn image(&self, name: &str, recipe: &str) -> &Project {
        self.write(&format!("images/{name}/image.toml"), recipe)
    }

    /// `kiln --config <root>/kiln.toml <args…>` against `endpoint`, to completion.
    pub fn kiln(&self, endpoint: &str, args: &[&str]) -> Run {
        let mut cmd = kiln_command(endpoint);
        cmd.arg("--config").arg(self.config()).args(args);
        Run::of(&mut cmd)
    }
}

impl Default for Project {
    fn default() -> Self {
        Project::new()
    }
}

/// The `kiln` binary with the test AWS environment for `endpoint`, run from a
/// folder that holds no `kiln.toml`.
pub fn kiln_command(endpoint: &str) -> Command {
    let mut cmd = Command::new(kiln_binary());
    moto::apply_aws_env(&mut cmd, endpoint);
    cmd.current_dir(std::env::temp_dir())
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    cmd
}

/// A private copy of the `kiln` this test binary was built with, made on first
/// use: every worktree shares the cargo target folder, and another build may
/// replace `target/debug/kiln` while a long trial run is still starting it.
/// `KILN_BIN` names another binary instead (bench/faults.sh passes its copy).
pub fn kiln_binary() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("KILN_BIN").filter(|b| !b.is_empty()) {
            return PathBuf::from(bin);
        }
        let copy = moto::scratch_dir().join("kiln");
        let tmp = moto::scratch_dir().join(format!("kiln.{}", std::process::id()));
        std::fs::copy(env!("CARGO_BIN_EXE_kiln"), &tmp)
            .unwrap_or_else(|e| panic!("copy {}: {e}", env!("CARGO_BIN_EXE_kiln")));
        std::fs::rename(&tmp, &copy).expect("move the kiln copy in place");
        copy
    })
}

/// A finished kiln run.
#[derive(Debug)]
pub struct Run {
    pub command: String,
    /// `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn of(cmd: &mut Command) -> Run {
        let command = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let Output {
            status,
            stdout,
            stderr,
        } = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {command}: {e}"));
        Run {
            command,
            code: status.code(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }

    /// Panics, showing both streams, unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &Run {
        assert_eq!(self.code, Some(code), "unexpected exit code\n{self}");
        self
    }

    pub fn expect_ok(&self) -> &Run {
        self.expect_code(EXIT_OK)
    }

    pub fn stdout_lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    /// The last non-empty stdout line.
    pub fn last_line(&self) -> &str {
        self.stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_else(|| panic!("no output\n{self}"))
    }

    /// The value after `key ` on the stdout line that starts with it
    /// (`value_of("base-ami")` on `base-ami ami-123` → `ami-123`).
    pub fn value_of(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key} ");
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "$ {}\nexit: {:?}\n--- stdout\n{}--- stderr\n{}---",
            self.command, self.code, self.stdout, self.stderr
        )
    }
}

/// Whether `s` is a 64-character lowercase hex sha256.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
