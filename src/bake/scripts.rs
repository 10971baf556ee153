//! The shell the bake sends to instances: the builder's user data (installs the
//! SSM agent on trusty), the bootstrap run through SSM (stages the rendered files
//! and verified artifacts, then runs `provision.sh`), and the smoke test.
//!
//! `AWS-RunShellScript` runs its commands with `sh`, which is dash on Ubuntu, so
//! the bootstrap and smoke scripts are POSIX sh. Every value that comes from the
//! recipe or from AWS is single-quoted with [`quote`].

use crate::recipe::context::STAGING_DIR;
use crate::recipe::RenderedFile;

/// POSIX single-quoting: `'` becomes `'\''`.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// User data for a trusty builder. Ubuntu 14.04 ships without the SSM agent; the
/// agent is what lets kiln provision without SSH, key pairs or inbound rules.
/// Installed from the region's own bucket (the same source `provision.sh` uses),
/// found through IMDSv2 since the builder requires session tokens.
pub fn user_data() -> String {
    r#"#!/bin/bash
# kiln builder: install and start the SSM agent so kiln can provision over Run Command.
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
if dpkg-query -W -f '${Status}' amazon-ssm-agent 2>/dev/null | grep -q ' ok installed'; then
    start amazon-ssm-agent 2>/dev/null || true
    exit 0
fi
imds() {
    local token
    token=$(curl -fsS --retry 10 --retry-delay 1 -X PUT \
        -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' http://169.254.169.254/latest/api/token)
    curl -fsS --retry 10 --retry-delay 1 -H "X-aws-ec2-metadata-token: $token" \
        "http://169.254.169.254/latest/meta-data/$1"
}
region=$(imds placement/region)
domain=$(imds services/domain)
[[ $region =~ ^[a-z0-9-]+$ && $domain =~ ^[a-z0-9.-]+$ ]]
curl -fsSL --retry 10 --retry-delay 5 -o /tmp/amazon-ssm-agent.deb \
    "https://s3.$region.$domain/amazon-ssm-$region/latest/debian_amd64/amazon-ssm-agent.deb"
dpkg -i /tmp/amazon-ssm-agent.deb
rm -f /tmp/amazon-ssm-agent.deb
start amazon-ssm-agent 2>/dev/null || true
"#
    .to_string()
}

/// An artifact for the builder to fetch: a presigned S3 URL for a local
/// artifact, the recipe's URL for a remote one. Either way the sha256 is checked.
#[derive(Debug, Clone)]
pub struct Fetch {
    pub name: String,
    pub url: String,
    pub sha256: String,
}

/// The file `provision.sh` writes its `dpkg-query -W` output to, in the
/// staging directory (templates/trusty/provision.sh.tera).
pub const PACKAGES_FILE: &str = "packages.txt";

/// Where the bootstrap keeps its run-once guard: `<GUARD>.lock` and
/// `<GUARD>.status`. Under /run, a tmpfs, so it is never in the image; a builder
/// serves one bake, so one fixed path is enough.
pub const GUARD: &str = "/run/kiln-provision";

/// The provisioning command: stage every rendered file (base64, so any byte
/// survives), fetch and verify every artifact, then run `provision.sh` with bash.
/// When provisioning succeeded and `packages_url` is given (a presigned S3 PUT
/// URL, signed with `If-None-Match: *`, which curl must send), upload the
/// package list `provision.sh` wrote. The upload is a record,
/// not part of the image: when it fails the script says so and still exits 0,
/// and `kiln diff` later says the version's list cannot be read.
pub fn bootstrap(
    rendered: &[RenderedFile],
    fetches: &[Fetch],
    packages_url: Option<&str>,
) -> String {
    let mut s = String::new();
    s.push_str("set -eu\numask 022\n");
    s.push_str(&format!("d={}\n", quote(STAGING_DIR)));
    // Run once per builder. SendCommand has no client token: when its answer
    // is lost the SDK sends it again, and the agent runs both. The second
    // invocation waits for the first (flock), then reports its exit status
    // instead of provisioning again over it. Provisioning runs with the lock's
    // descriptor closed, so a daemon it starts cannot hold the lock.
    s.push_str(&format!("g={}\n", quote(GUARD)));
    s.push_str(
        r#"exec 9>"$g.lock"
flock 9
if [ -s "$g.status" ]; then
    s=$(cat "$g.status")
    echo "[kiln] provisioning already ran on this builder in an earlier invocation of this bake (a retried SendCommand); its exit status was $s, its output is in that invocation's SSM history"
    exit "$s"
fi
trap 'echo $? >"$g.status"' EXIT
"#,
    );
    s.push_str(
        r#"fail() { echo "[kiln] ERROR: $*" >&2; exit 1; }
rm -rf "$d"
mkdir -p "$d/files" "$d/artifacts"
"#,
    );
    for f in rendered {
        // Bundle paths come from validated dest paths; quoted all the same, with
        // $d left outside the quotes so it expands.
        let target = format!("\"$d\"/{}", quote(&f.bundle_path));
        s.push_str(&format!("mkdir -p \"$(dirname {target})\"\n"));
        s.push_str(&format!("base64 -d >{target} <<'KILN_EOF'\n"));
        let b64 = aws_smithy_types::base64::encode(&f.bytes);
        for chunk in b64.as_bytes().chunks(76) {
            s.push_str(std::str::from_utf8(chunk).expect("base64 is ascii"));
            s.push('\n');
        }
        s.push_str("KILN_EOF\n");
        s.push_str(&format!("chmod {} {target}\n", quote(&f.mode)));
    }
    if !fetches.is_empty() {
        // curl on trusty is 7.35: no --retry-connrefused.
        s.push_str(
            r#"fetch() {
    curl -fsSL --retry 5 --retry-delay 5 --connect-timeout 20 -o "$d/artifacts/$1" "$2" ||
        fail "artifact $1: download failed"
    actual=$(sha256sum <"$d/artifacts/$1" | cut -d' ' -f1)
    [ "$actual" = "$3" ] || fail "artifact $1: sha256 $actual, expected $3"
    echo "[kiln] artifact $1: sha256 $3 verified"
}
"#,
        );
        for f in fetches {
            s.push_str(&format!(
                "fetch {} {} {}\n",
                quote(&f.name),
                quote(&f.url),
                quote(&f.sha256)
            ));
        }
    }
    // Not exec: the guard's trap records the exit status, and the upload runs
    // after it. `set -e` ends the script with provision.sh's exit status when
    // it fails, before any upload.
    s.push_str("bash \"$d/provision.sh\" 9>&-\n");
    let Some(url) = packages_url else {
        return s;
    };
    s.push_str(&format!("p=\"$d\"/{}\n", quote(PACKAGES_FILE)));
    s.push_str(&format!(
        r#"if [ ! -s "$p" ]; then
    echo "[kiln] WARNING: provision.sh wrote no $p: kiln diff cannot compare this version's packages" >&2
elif curl -fsS --retry 5 --retry-delay 5 --connect-timeout 20 -H 'If-None-Match: *' -T "$p" {}; then
    echo "[kiln] package list uploaded: $(grep -c . <"$p") packages"
else
    echo "[kiln] WARNING: uploading $p failed: kiln diff cannot compare this version's packages (HTTP 412 means an earlier try got through and the list is there)" >&2
fi
"#,
        quote(url)
    ));
    s
}

/// The smoke test run on an instance booted from the new image: each command is
/// retried until it succeeds or its timeout passes (the service is still
/// starting when the instance first answers); every failure is reported, and
/// the script exits non-zero if any failed.
pub fn smoke(tests: &[crate::recipe::model::SmokeTest]) -> String {
    let mut s = String::from(
        r#"failed=0
smoke() { # NAME TIMEOUT COMMAND
    deadline=$(( $(date +%s) + $2 ))
    while :; do
        if out=$(bash -c "$3" 2>&1); then
            echo "[kiln] smoke ok: $1"
            return 0
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "[kiln] smoke FAILED after $2 s: $1"
            printf '%s\n' "$out"
            return 1
        fi
        sleep 3
    done
}
"#,
    );
    for t in tests {
        s.push_str(&format!(
            "smoke {} {} {} || failed=1\n",
            quote(&t.name),
            t.timeout_secs,
            quote(&t.run)
        ));
    }
    s.push_str("exit $failed\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::model::SmokeTest;

    fn sh_n(shell: &str, script: &str) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sh");
        std::fs::write(&p, script).unwrap();
        let out = std::process::Command::new(shell)
            .arg("-n")
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{shell} -n: {}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn rendered() -> Vec<RenderedFile> {
        vec![
            RenderedFile {
                bundle_path: "provision.sh".into(),
                dest: None,
                mode: "0755".into(),
                template: "t".into(),
                bytes: b"#!/bin/bash\necho provisioned\n".to_vec(),
            },
            RenderedFile {
                bundle_path: "files/etc/init/web.conf".into(),
                dest: Some("/etc/init/web.conf".into()),
                mode: "0644".into(),
                template: "t".into(),
                bytes: (0u8..=255).collect(),
            },
        ]
    }

    /// `script` with its staging directory at `stage` and its run-once guard
    /// at `guard`, so it can run here.
    fn locally(script: String, stage: &std::path::Path, guard: &std::path::Path) -> String {
        let script = script
            .replace(
                &format!("d={}", quote(STAGING_DIR)),
                &format!("d={}", quote(stage.to_str().unwrap())),
            )
            .replace(
                &format!("g={}", quote(GUARD)),
                &format!("g={}", quote(guard.to_str().unwrap())),
            );
        assert!(!script.contains(GUARD) && !script.contains(STAGING_DIR));
        script
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn scripts_parse() {
        sh_n(
            "sh",
            &bootstrap(
                &rendered(),
                &[Fetch {
                    name: "app".into(),
                    url: "https://b/k?X-Amz-Signature=a&b=c'd".into(),
                    sha256: "ab".repeat(32),
                }],
                None,
            ),
        );
        sh_n("sh", &bootstrap(&rendered(), &[], None));
        sh_n(
            "sh",
            &bootstrap(
                &rendered(),
                &[],
                Some("https://b/k.txt?X-Amz-Signature=a&b=c'd"),
            ),
        );
        sh_n("bash", &user_data());
        sh_n(
            "sh",
            &smoke(&[SmokeTest {
                name: "it's up".into(),
                run: "status web | grep -q 'start/running'".into(),
                timeout_secs: 5,
            }]),
        );
    }

    /// Runs the bootstrap for real with the staging dir redirected, proving the
    /// files land byte for byte and a bad checksum stops before provisioning.
    #[test]
    fn bootstrap_stages_files_byte_for_byte_and_checks_artifacts() {
        let dir = tempfile::tempdir().unwrap();
        let art = dir.path().join("art.bin");
        std::fs::write(&art, b"artifact bytes").unwrap();
        let sha = crate::recipe::hash::sha256_bytes(b"artifact bytes");
        let stage = dir.path().join("stage");
        let run = |sha: &str| {
            // A fresh guard per run: each stands for its own builder.
            let guard = tempfile::tempdir().unwrap();
            let script = locally(
                bootstrap(
                    &rendered(),
                    &[Fetch {
                        name: "app".into(),
                        url: format!("file://{}", art.display()),
                        sha256: sha.into(),
                    }],
                    None,
                ),
                &stage,
                &guard.path().join("guard"),
            );
            std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .output()
                .unwrap()
        };
        let out = run(&sha);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).lines().last(),
            Some("provisioned")
        );
        assert_eq!(
            std::fs::read(stage.join("files/etc/init/web.conf")).unwrap(),
            (0u8..=255).collect::<Vec<_>>()
        );
        assert_eq!(
            std::fs::read(stage.join("artifacts/app")).unwrap(),
            b"artifact bytes"
        );
        let out = run(&"0".repeat(64));
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("artifact app: sha256")
                && !String::from_utf8_lossy(&out.stdout).contains("provisioned"),
            "{err}"
        );
    }

    /// The bootstrap with a package upload, run for real: staging redirected,
    /// `provision` as provision.sh's body, and a `file://` URL standing in for
    /// the presigned PUT (curl -T writes the upload there; `bad_url` gives one
    /// curl cannot write to).
    fn run_with_upload(provision: &str, bad_url: bool) -> (std::process::Output, Option<Vec<u8>>) {
        let dir = tempfile::tempdir().unwrap();
        let stage = dir.path().join("stage");
        let uploaded = dir.path().join("uploaded.txt");
        let url = if bad_url {
            format!("file://{}/no/such/dir/x.txt", dir.path().display())
        } else {
            format!("file://{}", uploaded.display())
        };
        let mut files = rendered();
        files[0].bytes = format!("#!/bin/bash\n{provision}\n").into_bytes();
        let script = locally(
            bootstrap(&files, &[], Some(&url)),
            &stage,
            &dir.path().join("guard"),
        );
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .output()
            .unwrap();
        (out, std::fs::read(&uploaded).ok())
    }

    const WRITES_LIST: &str = r#"printf 'curl\t7.35.0-1ubuntu2.20\nopenssl\t1.0.1f-1ubuntu2.27\n' >"$(dirname "$0")/packages.txt""#;

    #[test]
    fn bootstrap_uploads_the_package_list_after_provisioning() {
        let (out, uploaded) = run_with_upload(&format!("{WRITES_LIST}; echo provisioned"), false);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            uploaded.as_deref(),
            Some(&b"curl\t7.35.0-1ubuntu2.20\nopenssl\t1.0.1f-1ubuntu2.27\n"[..]),
            "{stdout}"
        );
        assert!(
            stdout.contains("provisioned\n[kiln] package list uploaded: 2 packages"),
            "{stdout}"
        );
    }

    #[test]
    fn a_failed_provisioning_uploads_nothing_and_keeps_its_exit_status() {
        let (out, uploaded) = run_with_upload(&format!("{WRITES_LIST}; exit 7"), false);
        assert_eq!(out.status.code(), Some(7));
        assert_eq!(uploaded, None);
    }

    #[test]
    fn no_list_or_a_failed_upload_is_a_warning_not_a_failed_bake() {
        let (out, uploaded) = run_with_upload("echo provisioned", false);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert_eq!(uploaded, None);
        assert!(
            err.contains("wrote no") && err.contains("cannot compare this version's packages"),
            "{err}"
        );

        let (out, _) = run_with_upload(WRITES_LIST, true);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(
            err.contains("uploading") && err.contains("failed: kiln diff cannot compare"),
            "{err}"
        );
    }

    /// A retried SendCommand runs the bootstrap twice on one builder, at the
    /// same time: provisioning runs once, the second invocation waits for it
    /// and ends with its exit status, success or failure.
    #[test]
    fn a_second_invocation_on_one_builder_reports_the_first_instead_of_provisioning_again() {
        for code in [0, 7] {
            let dir = tempfile::tempdir().unwrap();
            let count = dir.path().join("count");
            let mut files = rendered();
            files[0].bytes = format!(
                "#!/bin/bash\necho ran >>{}\nsleep 0.3\nexit {code}\n",
                quote(count.to_str().unwrap())
            )
            .into_bytes();
            let script = locally(
                bootstrap(&files, &[], None),
                &dir.path().join("stage"),
                &dir.path().join("guard"),
            );
            let spawn = || {
                std::process::Command::new("sh")
                    .arg("-c")
                    .arg(&script)
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            };
            let (a, b) = (spawn(), spawn());
            let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
            assert_eq!(
                std::fs::read_to_string(&count).unwrap(),
                "ran\n",
                "provisioned once"
            );
            assert_eq!((a.status.code(), b.status.code()), (Some(code), Some(code)));
            let said = |o: &std::process::Output| {
                String::from_utf8_lossy(&o.stdout).contains("provisioning already ran")
            };
            assert!(said(&a) != said(&b), "exactly one reports the other");
        }
    }

    /// shellcheck as dash (what AWS-RunShellScript runs) finds nothing in the
    /// bootstrap with an upload, when shellcheck is installed.
    #[test]
    fn bootstrap_with_upload_passes_shellcheck() {
        let script = bootstrap(
            &rendered(),
            &[Fetch {
                name: "app".into(),
                url: "https://b/k?X-Amz-Signature=a&b=c'd".into(),
                sha256: "ab".repeat(32),
            }],
            Some("https://b/kiln/packages/web/h.txt?X-Amz-Signature=a&b=c'd"),
        );
        assert!(script.contains("curl -fsS --retry 5 --retry-delay 5 --connect-timeout 20 -H 'If-None-Match: *' -T \"$p\" 'https://b/kiln/packages/web/h.txt?X-Amz-Signature=a&b=c'\\''d'"), "{script}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sh");
        std::fs::write(&p, &script).unwrap();
        match std::process::Command::new("shellcheck")
            .args(["--shell=dash", "--severity=warning"])
            .arg(&p)
            .output()
        {
            Ok(out) => assert!(
                out.status.success(),
                "{}\n{script}",
                String::from_utf8_lossy(&out.stdout)
            ),
            Err(e) => eprintln!("shellcheck not run: {e}"),
        }
    }

    #[test]
    fn smoke_reports_each_failure_and_exits_non_zero() {
        let script = smoke(&[
            SmokeTest {
                name: "passes".into(),
                run: "true".into(),
                timeout_secs: 0,
            },
            SmokeTest {
                name: "fails".into(),
                run: "echo nope; false".into(),
                timeout_secs: 0,
            },
        ]);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("smoke ok: passes")
                && text.contains("smoke FAILED after 0 s: fails")
                && text.contains("nope"),
            "{text}"
        );
    }
}
