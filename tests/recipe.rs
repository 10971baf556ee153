//! Recipes, rendering and the content hash, through the real `kiln` binary and
//! the example images shipped in this repository. No AWS: `--base-ami` keeps
//! `kiln hash` offline, and a listener stands in for the endpoint to prove that
//! bad input is refused before any call.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BASE: &str = "ami-0123456789abcdef0";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// A throwaway project: the repo's images/ and templates/ plus a kiln.toml.
pub(crate) struct Project {
    pub(crate) dir: tempfile::TempDir,
}

impl Project {
    pub(crate) fn new() -> Project {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&repo().join("images"), &dir.path().join("images"));
        copy_dir(&repo().join("templates"), &dir.path().join("templates"));
        std::fs::write(dir.path().join("kiln.toml"), "region = \"us-east-1\"\n").unwrap();
        Project { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap()
    }

    fn write(&self, rel: &str, text: &str) {
        std::fs::write(self.path(rel), text).unwrap();
    }

    /// Replaces exactly one occurrence of `from` in a file.
    fn edit(&self, rel: &str, from: &str, to: &str) {
        let text = self.read(rel);
        assert_eq!(text.matches(from).count(), 1, "{from:?} once in {rel}");
        self.write(rel, &text.replacen(from, to, 1));
    }

    fn kiln(&self, args: &[&str]) -> Output {
        kiln_in(self.dir.path(), args)
    }

    fn hash(&self, image: &str) -> String {
        hash_in(self.dir.path(), image, BASE)
    }
}

/// Runs kiln in `cwd` with an AWS environment that points at nothing real.
fn kiln_in(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(cwd)
        .env_remove("KILN_CONFIG")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .output()
        .expect("kiln runs")
}

fn hash_in(cwd: &Path, image: &str, base: &str) -> String {
    let out = kiln_in(cwd, &["hash", image, "--base-ami", base]);
    assert!(
        out.status.success(),
        "kiln hash {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let hash = stdout.trim().to_string();
    assert_eq!(hash.len(), 64, "one 64-hex line: {stdout:?}");
    assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
    hash
}

fn manifest(p: &Project, image: &str) -> Vec<String> {
    let out = p.kiln(&["-v", "hash", image, "--base-ami", BASE]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.pop(); // the hash
    lines
}

#[test]
fn hash_is_stable_across_runs_directories_and_mtimes() {
    let p = Project::new();
    let first = p.hash("web");
    assert_eq!(p.hash("web"), first, "same inputs, same hash");

    // From a subfolder: kiln.toml is found by walking up.
    let sub = p.path("images/web/app");
    assert_eq!(hash_in(&sub, "web", BASE), first);

    // From an unrelated folder with --config.
    let elsewhere = tempfile::tempdir().unwrap();
    let cfg = p.path("kiln.toml");
    let out = kiln_in(
        elsewhere.path(),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "hash",
            "web",
            "--base-ami",
            BASE,
        ],
    );
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), first);

    // touch every file: timestamps are not content.
    let status = Command::new("find")
        .arg(p.dir.path())
        .args([
            "-type",
            "f",
            "-exec",
            "touch",
            "-d",
            "2001-02-03 04:05",
            "{}",
            "+",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(p.hash("web"), first);

    // A copy in another place (new inode, new path, new mtimes) hashes the same.
    let q = Project::new();
    assert_eq!(q.hash("web"), first);

    // Both example images hash, and differently.
    assert_ne!(p.hash("worker"), first);
}

#[test]
fn hash_is_the_same_on_a_fresh_clone() {
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--", "images", "templates"])
        .current_dir(repo())
        .output()
        .expect("git runs");
    if !dirty.stdout.is_empty() {
        // Uncommitted recipe edits cannot be in a clone; CI always runs clean.
        eprintln!("images/ or templates/ have uncommitted changes: comparing a copy instead");
        return;
    }
    let clone = tempfile::tempdir().unwrap();
    let status = Command::new("git")
        .args(["clone", "--quiet", "--no-hardlinks"])
        .arg(repo())
        .arg(clone.path())
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::write(clone.path().join("kiln.toml"), "region = \"us-east-1\"\n").unwrap();
    let p = Project::new();
    for image in ["web", "worker"] {
        assert_eq!(hash_in(clone.path(), image, BASE), p.hash(image), "{image}");
    }
}

#[test]
fn any_single_byte_of_any_input_changes_the_hash() {
    let p = Project::new();
    let original = p.hash("web");
    let mut seen = std::collections::BTreeSet::from([original.clone()]);
    let mut check = |what: &str, hash: String| {
        assert_ne!(hash, original, "{what} must change the hash");
        assert!(seen.insert(hash), "{what} collided with another change");
    };

    // A template: one byte more in the upstart job.
    let tpl = "templates/trusty/upstart.conf.tera";
    let text = p.read(tpl);
    p.write(tpl, &format!("{text}#"));
    check("a template byte", p.hash("web"));
    p.write(tpl, &text);
    assert_eq!(p.hash("web"), original, "restoring restores");

    // image.toml: a comment is still a byte of the recipe.
    let recipe = "images/web/image.toml";
    let text = p.read(recipe);
    p.write(recipe, &format!("{text}#"));
    check("an image.toml byte", p.hash("web"));
    p.write(recipe, &text);

    // An artifact: flip the last byte of the jar.
    let jar = "images/web/files/web-demo.jar";
    let bytes = std::fs::read(p.path(jar)).unwrap();
    let mut flipped = bytes.clone();
    *flipped.last_mut().unwrap() ^= 1;
    std::fs::write(p.path(jar), &flipped).unwrap();
    check("an artifact byte", p.hash("web"));
    std::fs::write(p.path(jar), &bytes).unwrap();

    // The Java pin: version and checksum each change the manifest's java line.
    let before = manifest(&p, "web");
    p.edit(recipe, "version = \"1.8.0_422\"", "version = \"1.8.0_423\"");
    let after = manifest(&p, "web");
    check("the Java version", p.hash("web"));
    let java = |m: &[String]| m.iter().find(|l| l.starts_with("java ")).cloned();
    assert_ne!(java(&before), java(&after));
    p.write(recipe, &text);
    p.edit(recipe, "sha256 = \"0ac5", "sha256 = \"1ac5");
    check("the Java checksum", p.hash("web"));
    p.write(recipe, &text);

    // The base AMI id.
    check(
        "the base AMI",
        hash_in(p.dir.path(), "web", "ami-0123456789abcdef1"),
    );

    // Renaming a rendered file (where it lands on the image).
    p.edit(
        recipe,
        "dest = \"/etc/init/web.conf\"",
        "dest = \"/etc/init/web2.conf\"",
    );
    check("renaming a rendered file", p.hash("web"));
    p.write(recipe, &text);
    assert_eq!(p.hash("web"), original);
}

#[test]
fn verbose_hash_prints_the_manifest_it_covers() {
    let p = Project::new();
    let lines = manifest(&p, "web");
    let has = |prefix: &str| lines.iter().any(|l| l.starts_with(prefix));
    assert!(has("format 1"), "{lines:?}");
    assert!(lines.contains(&format!("base-ami {BASE}")), "{lines:?}");
    assert!(has("recipe sha256="));
    assert!(has("java 1.8.0_422 tarball sha256=0ac516cc"));
    assert!(has("artifact app sha256="));
    assert!(has("file provision.sh mode=0755 sha256="));
    assert!(has("file files/etc/init/web.conf mode=0644 sha256="));

    let out = p.kiln(&["--output", "json", "hash", "web", "--base-ami", BASE]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["image"], "web");
    assert_eq!(v["base_ami"], BASE);
    assert_eq!(v["hash"].as_str().unwrap(), p.hash("web"));
    assert_eq!(v["manifest"].as_array().unwrap().len(), lines.len());
}

#[test]
fn render_writes_what_goes_onto_the_builder() {
    let p = Project::new();
    let out_dir = tempfile::tempdir().unwrap();
    let target = out_dir.path().join("bundle");
    let out = p.kiln(&["render", "web", "--out", target.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = std::fs::read_to_string(target.join("provision.sh")).unwrap();
    assert!(script.starts_with("#!/bin/bash"));
    assert!(script.contains("0ac516cc1eadffb4cd3cfc9736a33d58ea6a396bf85729036c973482f7c063d9"));
    let job = std::fs::read_to_string(target.join("files/etc/init/web.conf")).unwrap();
    assert!(job.contains("setuid web"), "{job}");
    assert_eq!(
        std::fs::read(target.join("artifacts/app")).unwrap(),
        std::fs::read(p.path("images/web/files/web-demo.jar")).unwrap()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(target.join("provision.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);

    // A non-empty folder is not overwritten without --force.
    let again = p.kiln(&["render", "web", "--out", target.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
}

#[test]
fn rendered_provisioning_scripts_pass_bash_n_and_shellcheck() {
    let p = Project::new();
    for image in ["web", "worker"] {
        let out_dir = tempfile::tempdir().unwrap();
        let out = p.kiln(&["render", image, "--out", out_dir.path().to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = out_dir.path().join("provision.sh");
        let bash = Command::new("bash")
            .arg("-n")
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            bash.status.success(),
            "{image}: bash -n: {}",
            String::from_utf8_lossy(&bash.stderr)
        );
        let sc = Command::new("shellcheck")
            .arg(&script)
            .output()
            .expect("shellcheck is installed (apt-get install shellcheck; .ci/run does it)");
        assert!(
            sc.status.success(),
            "{image}: shellcheck:\n{}",
            String::from_utf8_lossy(&sc.stdout)
        );
    }
}

/// One bad-input case: how to break the project, the command, and what the one
/// error line must name.
pub(crate) struct Bad {
    pub(crate) name: &'static str,
    pub(crate) breaks: fn(&Project),
    pub(crate) args: &'static [&'static str],
    pub(crate) says: &'static [&'static str],
}

const RECIPE: &str = "images/web/image.toml";
const UPSTART: &str = "templates/trusty/upstart.conf.tera";

pub(crate) fn bad_inputs() -> Vec<Bad> {
    vec![
        Bad {
            name: "malformed TOML",
            breaks: |p| p.edit(RECIPE, "format = 1", "format = = 1"),
            args: &["hash", "web"],
            says: &["image.toml:3:", "fix"],
        },
        Bad {
            name: "unknown field",
            breaks: |p| p.edit(RECIPE, "[builder]\n", "[builder]\ninstance_typo = \"x\"\n"),
            args: &["hash", "web"],
            says: &["image.toml:", "instance_typo"],
        },
        Bad {
            name: "missing template",
            breaks: |p| {
                p.edit(
                    RECIPE,
                    "templates/trusty/upstart.conf.tera",
                    "templates/trusty/nope.conf.tera",
                )
            },
            args: &["hash", "web"],
            says: &[
                "render[0].template",
                "templates/trusty/nope.conf.tera",
                "not found",
            ],
        },
        Bad {
            name: "template syntax error",
            breaks: |p| {
                let t = p.read(UPSTART);
                p.write(UPSTART, &format!("{t}\n{{% if %}}\n"));
            },
            args: &["hash", "web"],
            says: &["templates/trusty/upstart.conf.tera:", "syntax error"],
        },
        Bad {
            name: "variable the context lacks",
            breaks: |p| {
                let t = p.read(UPSTART);
                p.write(UPSTART, &format!("{t}\n{{{{ service.colour }}}}\n"));
            },
            args: &["hash", "web"],
            says: &["templates/trusty/upstart.conf.tera", "service.colour"],
        },
        Bad {
            name: "missing artifact file",
            breaks: |p| std::fs::remove_file(p.path("images/web/files/web-demo.jar")).unwrap(),
            args: &["hash", "web"],
            says: &["artifact \"app\"", "web-demo.jar", "not found"],
        },
        Bad {
            name: "malformed sha256",
            breaks: |p| p.edit(RECIPE, "sha256 = \"0ac5", "sha256 = \"zz0ac5"),
            args: &["hash", "web"],
            says: &["java.tarball.sha256", "not a sha256"],
        },
        Bad {
            name: "local artifact whose sha256 does not match the pin",
            breaks: |p| {
                p.edit(
                    RECIPE,
                    "path = \"files/web-demo.jar\"",
                    &format!(
                        "path = \"files/web-demo.jar\"\nsha256 = \"{}\"",
                        "ab".repeat(32)
                    ),
                )
            },
            args: &["hash", "web"],
            says: &["artifact \"app\"", "pins", "abab"],
        },
        Bad {
            name: "image that does not exist",
            breaks: |_| {},
            args: &["hash", "wbe"],
            says: &["no image \"wbe\"", "available: web, worker"],
        },
        Bad {
            name: "template path escaping the project root",
            breaks: |p| {
                p.edit(
                    RECIPE,
                    "template = \"templates/trusty/provision.sh.tera\"",
                    "template = \"../../../etc/passwd\"",
                )
            },
            args: &["hash", "web"],
            says: &["provision.template", "leaves the project root"],
        },
        Bad {
            name: "artifact path escaping the project root",
            breaks: |p| {
                p.edit(
                    RECIPE,
                    "path = \"files/web-demo.jar\"",
                    "path = \"../../../x.jar\"",
                )
            },
            args: &["hash", "web"],
            says: &["artifact[0].path", "leaves the project root"],
        },
        Bad {
            name: "unsupported recipe format",
            breaks: |p| p.edit(RECIPE, "format = 1", "format = 2"),
            args: &["hash", "web"],
            says: &["format 2 is not supported"],
        },
        Bad {
            name: "two base image forms",
            breaks: |p| p.edit(RECIPE, "[base]\n", "[base]\nami = \"ami-12345678\"\n"),
            args: &["hash", "web"],
            says: &["base", "exactly one"],
        },
        Bad {
            name: "undeclared --var",
            breaks: |_| {},
            args: &["hash", "web", "--var", "heap=1g"],
            says: &["variable \"heap\"", "declare it"],
        },
        Bad {
            name: "malformed --base-ami",
            breaks: |_| {},
            args: &["hash", "web", "--base-ami", "ubuntu"],
            says: &["--base-ami", "not an AMI id"],
        },
        Bad {
            name: "unknown field in kiln.toml",
            breaks: |p| p.write("kiln.toml", "region = \"us-east-1\"\nregoin = \"x\"\n"),
            args: &["hash", "web"],
            says: &["kiln.toml:2:1", "regoin"],
        },
    ]
}

#[test]
fn bad_input_exits_2_with_one_line_and_no_aws_call() {
    for case in bad_inputs() {
        let p = Project::new();
        (case.breaks)(&p);
        // A listener as the AWS endpoint: any call kiln made would connect here.
        let endpoint = TcpListener::bind("127.0.0.1:0").unwrap();
        endpoint.set_nonblocking(true).unwrap();
        let url = format!("http://{}", endpoint.local_addr().unwrap());
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(case.args)
            .current_dir(p.dir.path())
            .env_remove("KILN_CONFIG")
            .env("AWS_ENDPOINT_URL", &url)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {stderr}", case.name);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{}: one line, got {stderr}", case.name);
        assert!(lines[0].starts_with("error: "), "{}: {stderr}", case.name);
        for s in case.says {
            assert!(stderr.contains(s), "{}: {s:?} not in {stderr}", case.name);
        }
        assert!(out.stdout.is_empty(), "{}: nothing on stdout", case.name);
        assert!(
            endpoint.accept().is_err(),
            "{}: kiln connected to AWS on bad input",
            case.name
        );
    }
}
