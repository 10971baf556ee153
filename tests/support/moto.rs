//! One moto server per test process, shared by every test in it; each test makes
//! its own resources with [`unique`] names.
//!
//! Started on first use on a port moto picks (`-p 0`; the port is read from its
//! log), or not at all when `KILN_TEST_ENDPOINT` names a server already running.
//! Rust never drops statics, so the server is stopped by a watchdog instead: a
//! `sh` that started moto and then reads its stdin, a pipe whose only writer is
//! this process. When the process exits, however it exits, the pipe closes, `cat`
//! returns, and the watchdog kills moto and removes the scratch folder.
//!
//! # Base images
//! moto's built-in AMI list has one Canonical trusty image, with no creation date
//! (moto stamps it with the time it loads). To test "newest image matching a name
//! pattern" properly, moto is started with `MOTO_AMIS_PATH` pointing at
//! `tests/support/amis.json`, which replaces that list (in every region): three
//! Canonical trusty amd64 images of different dates, in no particular order, and
//! decoys that are newer but must not be chosen (xenial, trusty i386, and a trusty
//! name under another owner). An external server (`KILN_TEST_ENDPOINT`) must be
//! started with `MOTO_AMIS_PATH=tests/support/amis.json` too.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, ConfigLoader, Region, SdkConfig};
use aws_sdk_ec2::config::Credentials;

/// The region every test uses.
pub const REGION: &str = "us-east-1";
/// Canonical's account, owner of the official Ubuntu images.
pub const CANONICAL: &str = "099720109477";
/// The name pattern of Ubuntu 14.04 amd64 EBS-SSD images.
pub const TRUSTY_PATTERN: &str = "ubuntu/images/hvm-ssd/ubuntu-trusty-14.04-amd64-server-*";
/// The newest image matching [`CANONICAL`] + [`TRUSTY_PATTERN`] in `amis.json`.
pub const TRUSTY_NEWEST: &str = "ami-0f6b3c9d25e4a5c33";
pub const TRUSTY_NEWEST_NAME: &str =
    "ubuntu/images/hvm-ssd/ubuntu-trusty-14.04-amd64-server-20190514";
/// Every image matching [`CANONICAL`] + [`TRUSTY_PATTERN`] in `amis.json`.
pub const TRUSTY_ALL: [&str; 3] = [
    "ami-0d4f1c9a07b2e3a11",
    TRUSTY_NEWEST,
    "ami-0c9e6f2a52b7d8f66",
];
/// The AMI list moto is started with.
pub const AMIS_JSON: &str = include_str!("amis.json");

/// Fake credentials moto accepts.
pub const ACCESS_KEY: &str = "testing";
pub const SECRET_KEY: &str = "testing";

/// How long moto may take to come up (it imports every service; slow under load).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(90);

struct Scratch {
    dir: PathBuf,
    /// Writer end of the watchdog's stdin; never dropped, closed by process exit.
    _lifeline: ChildStdin,
}

struct Moto {
    endpoint: String,
}

static SCRATCH: OnceLock<Scratch> = OnceLock::new();
static MOTO: OnceLock<Moto> = OnceLock::new();

/// The watchdog: `$1` scratch folder, then the server command, if any.
///
/// It ignores SIGINT/SIGTERM/SIGHUP (set after starting moto, which would inherit
/// them): Ctrl-C or a signal to the whole process group then still ends with the
/// cleanup, once the test process is gone. Only SIGKILL can leak the folder,
/// which the next run sweeps up ([`sweep_stale_scratch`]).
const WATCHDOG: &str = r#"
dir=$1; shift
if [ $# -gt 0 ]; then
    "$@" >"$dir/moto.log" 2>&1 </dev/null &
    server=$!
fi
trap '' INT TERM HUP
cat >/dev/null
if [ -n "$server" ]; then
    kill "$server" 2>/dev/null
    wait "$server" 2>/dev/null
fi
rm -rf "$dir"
"#;

/// A folder that lives as long as this test process (removed by the watchdog).
pub fn scratch_dir() -> &'static Path {
    &scratch().dir
}

fn scratch() -> &'static Scratch {
    SCRATCH.get_or_init(|| {
        let server: Vec<String> = if std::env::var_os("KILN_TEST_ENDPOINT").is_some() {
            Vec::new()
        } else {
            ["moto_server", "-H", "127.0.0.1", "-p", "0"]
                .map(String::from)
                .to_vec()
        };
        start_watchdog(&server)
    })
}

fn start_watchdog(server: &[String]) -> Scratch {
    sweep_stale_scratch();
    let dir = std::env::temp_dir().join(format!("kiln-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    std::fs::write(dir.join("amis.json"), AMIS_JSON).expect("write amis.json");
    // An empty AWS config/credentials file keeps the developer's ~/.aws out.
    std::fs::write(dir.join("empty-aws-config"), "").expect("write empty AWS config");
    // Never waited for: the watchdog must outlive this process to clean up after it.
    #[allow(clippy::zombie_processes)]
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG)
        .arg("kiln-moto-watchdog")
        .arg(&dir)
        .args(server)
        .env("MOTO_AMIS_PATH", dir.join("amis.json"))
        // Don't hold the test runner's output open after this process is gone.
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start sh for the moto watchdog: {e}"));
    let lifeline = child.stdin.take().expect("watchdog stdin");
    Scratch {
        dir,
        _lifeline: lifeline,
    }
}

/// Remove `kiln-tests-<pid>` folders of test processes that no longer exist (a
/// SIGKILLed watchdog cannot clean up). Only where `/proc` tells which exist.
fn sweep_stale_scratch() {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("kiln-tests-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The moto endpoint (`http://127.0.0.1:PORT`), starting moto on first use.
///
/// # Panics
/// If moto does not answer within 90 s; the message names its log file.
pub fn endpoint() -> &'static str {
    &MOTO
        .get_or_init(|| {
            if let Ok(endpoint) = std::env::var("KILN_TEST_ENDPOINT") {
                let endpoint = endpoint.trim_end_matches('/').to_string();
                let addr = endpoint.trim_start_matches("http://").to_string();
                wait_until_answers(&addr, None);
                return Moto { endpoint };
            }
            let log = scratch_dir().join("moto.log");
            let addr = wait_for_port(&log);
            wait_until_answers(&addr, Some(&log));
            Moto {
                endpoint: format!("http://{addr}"),
            }
        })
        .endpoint
}

/// Reads moto's log until werkzeug says where it listens.
fn wait_for_port(log: &Path) -> String {
    const BANNER: &str = "Running on http://";
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(start) = text.find(BANNER) {
            let rest = &text[start + BANNER.len()..];
            let end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
            return rest[..end].trim_end_matches('/').to_string();
        }
        if text.contains("Traceback") || text.contains("not found") || Instant::now() > deadline {
            panic!(
                "moto_server did not start (is `moto[server]` 5.x installed and moto_server on PATH? \
                 or set KILN_TEST_ENDPOINT); its log {}:\n{}",
                log.display(),
                tail(&text, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `GET /` until moto answers with any HTTP status.
fn wait_until_answers(addr: &str, log: Option<&Path>) {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut last_error = String::new();
    while Instant::now() < deadline {
        match http_get_status(addr) {
            Ok(_) => return,
            Err(e) => last_error = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log_text = log
        .map(|log| {
            format!(
                "; its log {}:\n{}",
                log.display(),
                tail(&std::fs::read_to_string(log).unwrap_or_default(), 40)
            )
        })
        .unwrap_or_default();
    panic!("moto at {addr} did not answer within {STARTUP_TIMEOUT:?}: {last_error}{log_text}");
}

fn http_get_status(addr: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut head = [0u8; 16];
    let n = stream.read(&mut head)?;
    let line = String::from_utf8_lossy(&head[..n]).to_string();
    if line.starts_with("HTTP/") {
        Ok(line)
    } else {
        Err(std::io::Error::other(format!("not HTTP: {line:?}")))
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A name no other test in this run (or a concurrent run) uses: `web-<pid>-<n>`.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Environment for a `kiln` child process talking to `endpoint` (moto, or a
/// proxy in front of it) with test credentials, and never to the developer's
/// real AWS configuration.
pub fn aws_env(endpoint: &str) -> Vec<(&'static str, String)> {
    let empty = scratch_dir().join("empty-aws-config").display().to_string();
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
        ("AWS_REGION", REGION.to_string()),
        ("AWS_CONFIG_FILE", empty.clone()),
        ("AWS_SHARED_CREDENTIALS_FILE", empty),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
    ]
}

/// Put [`aws_env`] on `cmd`, after removing every inherited `AWS_*` variable (a
/// developer's `AWS_PROFILE`, `AWS_SESSION_TOKEN` or `AWS_ENDPOINT_URL_EC2` would
/// otherwise leak into the child).
pub fn apply_aws_env(cmd: &mut Command, endpoint: &str) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(name);
        }
    }
    cmd.envs(aws_env(endpoint));
}

/// An SDK config loader for in-process clients talking to `endpoint` with test
/// credentials; add e.g. `.retry_config(..)` before `.load().await`.
// `ProfileFiles` is deprecated in favour of a type in aws-runtime, which is not a
// dependency; the alias is the same type.
#[allow(deprecated)]
pub fn sdk_config_loader(endpoint: &str) -> ConfigLoader {
    use aws_config::profile::profile_file::{ProfileFileKind, ProfileFiles};
    let empty = scratch_dir().join("empty-aws-config");
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new(REGION))
        .credentials_provider(Credentials::new(
            ACCESS_KEY,
            SECRET_KEY,
            None,
            None,
            "kiln-tests",
        ))
        .profile_files(
            ProfileFiles::builder()
                .with_file(ProfileFileKind::Config, &empty)
                .with_file(ProfileFileKind::Credentials, &empty)
                .build(),
        )
}

/// [`sdk_config_loader`] with the SDK's default retries, loaded.
pub async fn sdk_config(endpoint: &str) -> SdkConfig {
    sdk_config_loader(endpoint).load().await
}

/// A moto server of one test's own, with moto's built-in AMI list, for tests
/// that need a second region. With `MOTO_AMIS_PATH` (the shared server's custom
/// list) moto 5.2.1 parses the list's creation dates in place when the first
/// region's EC2 backend loads, and every EC2 call in any later region then
/// answers 500 ("Parser must be a string or character stream, not datetime").
/// The built-in list has Canonical's trusty image in every region. Stopped like
/// the shared server: a watchdog `sh` kills it when its stdin (held here, closed
/// when this is dropped or the process exits) closes.
pub struct Dedicated {
    endpoint: String,
    _lifeline: ChildStdin,
}

impl Dedicated {
    pub fn start() -> Dedicated {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a free port")
            .local_addr()
            .expect("its address")
            .port();
        // Never waited for: the watchdog outlives this handle on purpose.
        #[allow(clippy::zombie_processes)]
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("moto_server -H 127.0.0.1 -p \"$1\" >/dev/null 2>&1 </dev/null & s=$!; cat >/dev/null; kill $s")
            .arg("kiln-dedicated-moto")
            .arg(port.to_string())
            .env_remove("MOTO_AMIS_PATH")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let lifeline = child.stdin.take().expect("watchdog stdin");
        let addr = format!("127.0.0.1:{port}");
        wait_until_answers(&addr, None);
        Dedicated {
            endpoint: format!("http://{addr}"),
            _lifeline: lifeline,
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

/// [`sdk_config_loader`] for `endpoint` in `region`, loaded.
pub async fn sdk_config_in(endpoint: &str, region: &str) -> SdkConfig {
    sdk_config_loader(endpoint)
        .region(Region::new(region.to_string()))
        .load()
        .await
}
