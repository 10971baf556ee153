//! A fault-injecting HTTP proxy to put between an AWS SDK client (in-process, or a
//! `kiln` child process) and moto.
//!
//! moto answers every call at once and never fails on its own; real AWS throttles,
//! has bad moments, drops connections, and sometimes applies a change whose answer
//! never arrives. This proxy adds those, per test and reproducibly: every random
//! decision comes from a seeded PRNG, so the same seed and the same sequence of
//! requests give the same faults.
//!
//! Self-contained on purpose (tokio, hyper, hyper-util, http-body-util, bytes, http
//! only): a benchmark binary can include it with `#[path = "../tests/support/proxy.rs"]`.
//! The proxy runs on its own thread with its own runtime, so it works the same from a
//! `#[test]`, a `#[tokio::test]` (whose runtime may be blocked waiting on a child
//! process) or a `main`.
//!
//! ```ignore
//! let proxy = Proxy::start(moto::endpoint());
//! proxy.set_throttle_rate(0.3);
//! proxy.rewrite("ssm:GetCommandInvocation", |body| replace(body, "Success", "Failed"));
//! // ... point the client at proxy.endpoint() ...
//! assert_eq!(proxy.mutating_calls(), 0, "{}", proxy.summary());
//! ```

// Not every binary that includes this file uses every knob.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};

/// Seed used by [`Proxy::start`]: runs reproduce unless a test picks another.
pub const DEFAULT_SEED: u64 = 0x6b69_6c6e_7465_7374;

/// What the proxy did to a request instead of (or after) forwarding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// Answered with the service's own throttling error (EC2 `RequestLimitExceeded`,
    /// Auto Scaling/ELBv2 `Throttling`, SSM `ThrottlingException`, S3 `SlowDown`).
    /// Never reached moto.
    Throttle,
    /// Answered with HTTP 500 in the service's error shape. Never reached moto.
    ServerError,
    /// The connection was reset (TCP RST) without an answer. Never reached moto.
    Reset,
    /// Forwarded to moto, so its effect happened, then the connection was reset
    /// instead of returning the answer: the client cannot tell whether it worked.
    LoseResponse,
}

impl Fault {
    /// Whether a request given this fault reached moto (and may have changed state).
    pub fn reached_backend(self) -> bool {
        matches!(self, Fault::LoseResponse)
    }
}

/// Random fault rates and latency. Rates are probabilities per request, drawn in
/// the order reset, throttle, server error, lose-response; their sum must be ≤ 1.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Added to every request, faulted or not.
    pub latency: Duration,
    /// Latency is uniform in `latency ± jitter` (never below zero).
    pub jitter: Duration,
    pub throttle: f64,
    pub server_error: f64,
    pub reset: f64,
    pub lose_response: f64,
    /// When not empty, random faults (not latency) only hit operations matching one
    /// of these patterns (see [`Operation::matches`]).
    pub only: Vec<String>,
}

/// The AWS operation a request calls.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Operation {
    /// SigV4 signing name: `ec2`, `autoscaling`, `elasticloadbalancing`, `ssm`, `s3`,
    /// or `unknown`.
    pub service: String,
    /// `DescribeImages`, `SendCommand`, `PutObject`, …; empty when not recognised.
    pub name: String,
}

impl Operation {
    /// `"DescribeImages"` matches that name in any service; `"ec2:DescribeImages"`
    /// only in that service; `"ec2:*"` any operation of the service.
    pub fn matches(&self, pattern: &str) -> bool {
        match pattern.split_once(':') {
            Some((service, "*")) => service == self.service,
            Some((service, name)) => service == self.service && name == self.name,
            None => pattern == self.name,
        }
    }

    /// Whether the call may change state. Read-only are EC2/Auto Scaling/ELBv2/SSM
    /// operations named `Describe*`, `List*`, `Get*` or `Head*`, and S3 `GET`/`HEAD`
    /// requests; everything else, including a request the proxy could not
    /// identify, counts as mutating (a false alarm beats a missed mutation).
    fn is_mutating(&self, method: &Method) -> bool {
        if self.service == "s3" {
            return !(method == Method::GET || method == Method::HEAD);
        }
        if self.name.is_empty() || self.service == "unknown" {
            return true;
        }
        !["Describe", "List", "Get", "Head"]
            .iter()
            .any(|prefix| self.name.starts_with(prefix))
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.service, self.name)
    }
}

/// One request the proxy received, as recorded when it was answered (or dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub operation: Operation,
    pub mutating: bool,
    /// `None`: forwarded to moto and its answer passed back.
    pub fault: Option<Fault>,
    /// Whether moto saw the request (no fault, or [`Fault::LoseResponse`]).
    pub forwarded: bool,
    /// The HTTP status the client received; `None` when the connection was reset.
    pub status: Option<u16>,
    /// Whether a [`ProxyHandle::rewrite`] changed the answer's body.
    pub rewritten: bool,
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.operation)?;
        match self.fault {
            Some(fault) => write!(f, " {fault:?}")?,
            None => write!(f, " forwarded")?,
        }
        match self.status {
            Some(status) => write!(f, " {status}")?,
            None => write!(f, " (no answer)")?,
        }
        if self.rewritten {
            write!(f, " rewritten")?;
        }
        Ok(())
    }
}

/// splitmix64: tiny, fast, and good enough to decide faults reproducibly.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// (request body, answer body) → new answer body.
type RewriteFn = dyn Fn(&[u8], &[u8]) -> Vec<u8> + Send + Sync;

struct State {
    faults: Faults,
    rng: SplitMix64,
    /// Faults for the next calls of an operation (whose request body contains the
    /// text, when one is given), used before any random draw.
    scripted: VecDeque<(String, Option<String>, Fault)>,
    rewrites: Vec<(String, Arc<RewriteFn>)>,
    calls: Vec<Call>,
}

/// What to do with one request, decided under the lock in arrival order.
struct Decision {
    fault: Option<Fault>,
    delay: Duration,
    rewrite: Option<Arc<RewriteFn>>,
    request_id: String,
}

impl State {
    fn decide(&mut self, op: &Operation, body: &[u8]) -> Decision {
        // Always the same number of draws per request, whatever the configuration,
        // so changing one rate does not shift every later decision.
        let fault_draw = self.rng.unit();
        let latency_draw = self.rng.unit();
        let request_id = uuid_like(self.rng.next_u64(), self.rng.next_u64());

        let f = &self.faults;
        let jitter = f.jitter.as_secs_f64() * (2.0 * latency_draw - 1.0);
        let delay = Duration::from_secs_f64((f.latency.as_secs_f64() + jitter).max(0.0));

        let scripted = self
            .scripted
            .iter()
            .position(|(pattern, text, _)| {
                op.matches(pattern) && text.as_deref().is_none_or(|t| contains(body, t.as_bytes()))
            })
            .and_then(|i| self.scripted.remove(i))
            .map(|(_, _, fault)| fault);
        let fault = scripted.or_else(|| {
            if !f.only.is_empty() && !f.only.iter().any(|p| op.matches(p)) {
                return None;
            }
            let mut edge = 0.0;
            for (rate, fault) in [
                (f.reset, Fault::Reset),
                (f.throttle, Fault::Throttle),
                (f.server_error, Fault::ServerError),
                (f.lose_response, Fault::LoseResponse),
            ] {
                edge += rate;
                if fault_draw < edge {
                    return Some(fault);
                }
            }
            None
        });
        let rewrite = self
            .rewrites
            .iter()
            .rev()
            .find(|(pattern, _)| op.matches(pattern))
            .map(|(_, f)| f.clone());
        Decision {
            fault,
            delay,
            rewrite,
            request_id,
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

fn uuid_like(a: u64, b: u64) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

struct Shared {
    addr: SocketAddr,
    /// `host:port` of moto.
    upstream: String,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not take every later assertion down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Cloneable control of a running [`Proxy`]: change faults at any time, read what
/// it saw. Counters count requests as the proxy received them, that is every SDK
/// attempt, retries included.
#[derive(Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
}

impl ProxyHandle {
    /// `http://127.0.0.1:<port>`: give this to the SDK or to kiln as the endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    pub fn faults(&self) -> Faults {
        self.shared.state().faults.clone()
    }

    /// Replace the whole fault configuration.
    ///
    /// # Panics
    /// If a rate is outside `[0, 1]` or the rates add up to more than 1.
    pub fn set_faults(&self, faults: Faults) {
        let rates = [
            faults.throttle,
            faults.server_error,
            faults.reset,
            faults.lose_response,
        ];
        assert!(
            rates.iter().all(|r| (0.0..=1.0).contains(r))
                && rates.iter().sum::<f64>() <= 1.0 + 1e-9,
            "fault rates must each be in [0, 1] and add up to at most 1: {faults:?}"
        );
        self.shared.state().faults = faults;
    }

    fn update(&self, change: impl FnOnce(&mut Faults)) {
        let mut faults = self.faults();
        change(&mut faults);
        self.set_faults(faults);
    }

    pub fn set_latency(&self, mean: Duration, jitter: Duration) {
        self.update(|f| {
            f.latency = mean;
            f.jitter = jitter;
        });
    }

    pub fn set_throttle_rate(&self, rate: f64) {
        self.update(|f| f.throttle = rate);
    }

    pub fn set_server_error_rate(&self, rate: f64) {
        self.update(|f| f.server_error = rate);
    }

    pub fn set_reset_rate(&self, rate: f64) {
        self.update(|f| f.reset = rate);
    }

    pub fn set_lose_response_rate(&self, rate: f64) {
        self.update(|f| f.lose_response = rate);
    }

    /// Restrict random faults to operations matching these patterns (empty: all).
    pub fn set_only(&self, patterns: &[&str]) {
        self.update(|f| f.only = patterns.iter().map(|p| p.to_string()).collect());
    }

    /// No latency, no random faults, no scripted faults (rewrites stay).
    pub fn clear_faults(&self) {
        let mut state = self.shared.state();
        state.faults = Faults::default();
        state.scripted.clear();
    }

    /// Give the next call matching `pattern` this fault, before any random draw.
    /// Calls queue: `inject("CreateImage", LoseResponse)` twice hits the next two.
    pub fn inject(&self, pattern: &str, fault: Fault) {
        self.shared
            .state()
            .scripted
            .push_back((pattern.to_string(), None, fault));
    }

    /// Like [`ProxyHandle::inject`], for the next call matching `pattern` whose
    /// request body contains `text`: `inject_when("ssm:PutParameter", "/journal",
    /// LoseResponse)` hits the journal's write and lets the lock's through.
    pub fn inject_when(&self, pattern: &str, text: &str, fault: Fault) {
        self.shared.state().scripted.push_back((
            pattern.to_string(),
            Some(text.to_string()),
            fault,
        ));
    }

    /// Scripted faults not yet used.
    pub fn pending_injections(&self) -> usize {
        self.shared.state().scripted.len()
    }

    /// Pass every forwarded answer of operations matching `pattern` through `f`
    /// (body bytes in, new body out; `Content-Length` is fixed up). A later rewrite
    /// for the same operation wins.
    pub fn rewrite(&self, pattern: &str, f: impl Fn(&[u8]) -> Vec<u8> + Send + Sync + 'static) {
        self.rewrite_exchange(pattern, move |_request, body| f(body));
    }

    /// Like [`ProxyHandle::rewrite`], with the request's body too (`f(request,
    /// answer)`): for answers that depend on what was asked, such as serving
    /// moto's unpaginated list one page per `NextToken`.
    pub fn rewrite_exchange(
        &self,
        pattern: &str,
        f: impl Fn(&[u8], &[u8]) -> Vec<u8> + Send + Sync + 'static,
    ) {
        self.shared
            .state()
            .rewrites
            .push((pattern.to_string(), Arc::new(f)));
    }

    pub fn clear_rewrites(&self) {
        self.shared.state().rewrites.clear();
    }

    /// Restart the fault sequence from `seed`.
    pub fn reseed(&self, seed: u64) {
        self.shared.state().rng = SplitMix64::new(seed);
    }

    /// Every call so far, in the order they were answered.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.state().calls.clone()
    }

    /// Forget the calls recorded so far (faults and rewrites stay).
    pub fn clear_calls(&self) {
        self.shared.state().calls.clear();
    }

    fn count_where(&self, pred: impl Fn(&Call) -> bool) -> usize {
        self.shared.state().calls.iter().filter(|c| pred(c)).count()
    }

    /// Every request received, faulted or forwarded.
    pub fn total_calls(&self) -> usize {
        self.shared.state().calls.len()
    }

    /// Requests for operations matching `pattern`, faulted or forwarded.
    pub fn count(&self, pattern: &str) -> usize {
        self.count_where(|c| c.operation.matches(pattern))
    }

    /// Requests for operations matching `pattern` that reached moto.
    pub fn count_forwarded(&self, pattern: &str) -> usize {
        self.count_where(|c| c.forwarded && c.operation.matches(pattern))
    }

    /// Calls per operation (`service:Name` → count), faulted or forwarded.
    pub fn per_operation(&self) -> BTreeMap<String, usize> {
        let mut map = BTreeMap::new();
        for call in self.shared.state().calls.iter() {
            *map.entry(call.operation.to_string()).or_default() += 1;
        }
        map
    }

    /// Every mutating request received: those forwarded to moto **and** those the
    /// proxy answered with a fault (a throttled `CreateSecurityGroup` still counts:
    /// the client tried to change something). "Zero mutating calls" means the
    /// client never even tried. See [`Operation`] for what counts as mutating.
    pub fn mutating_calls(&self) -> usize {
        self.count_where(|c| c.mutating)
    }

    /// Mutating requests that reached moto (forwarded, or forwarded and then their
    /// answer lost), i.e. the ones that may have changed state.
    pub fn mutating_forwarded(&self) -> usize {
        self.count_where(|c| c.mutating && c.forwarded)
    }

    /// Mutating requests the proxy answered itself or dropped without forwarding.
    pub fn mutating_faulted(&self) -> usize {
        self.count_where(|c| c.mutating && !c.forwarded)
    }

    /// Requests given this fault.
    pub fn faulted(&self, fault: Fault) -> usize {
        self.count_where(|c| c.fault == Some(fault))
    }

    /// Requests given any fault.
    pub fn faulted_any(&self) -> usize {
        self.count_where(|c| c.fault.is_some())
    }

    /// One line per operation with its outcomes, for assertion messages.
    pub fn summary(&self) -> String {
        let mut per: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for call in self.shared.state().calls.iter() {
            let outcome = match call.fault {
                Some(fault) => format!("{fault:?}"),
                None => format!("{}", call.status.unwrap_or(0)),
            };
            *per.entry(call.operation.to_string())
                .or_default()
                .entry(outcome)
                .or_default() += 1;
        }
        let mut out = format!("proxy {} saw {} calls", self.endpoint(), self.total_calls());
        for (op, outcomes) in per {
            let outcomes: Vec<String> = outcomes.iter().map(|(k, v)| format!("{k}×{v}")).collect();
            out.push_str(&format!("\n  {op}: {}", outcomes.join(", ")));
        }
        out
    }
}

impl fmt::Debug for ProxyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyHandle")
            .field("endpoint", &self.endpoint())
            .field("upstream", &self.shared.upstream)
            .finish()
    }
}

/// A running proxy; stops when dropped. Derefs to its [`ProxyHandle`].
pub struct Proxy {
    handle: ProxyHandle,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Proxy {
    /// Listen on a free loopback port and forward to `upstream` (`http://host:port`).
    pub fn start(upstream: &str) -> Proxy {
        Self::start_seeded(upstream, DEFAULT_SEED)
    }

    pub fn start_seeded(upstream: &str, seed: u64) -> Proxy {
        let authority = upstream
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("proxy upstream must be http://host:port, got {upstream}"))
            .trim_end_matches('/')
            .to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("listener address");
        let shared = Arc::new(Shared {
            addr,
            upstream: authority,
            state: Mutex::new(State {
                faults: Faults::default(),
                rng: SplitMix64::new(seed),
                scripted: VecDeque::new(),
                rewrites: Vec::new(),
                calls: Vec::new(),
            }),
        });
        let (shutdown, stop) = oneshot::channel();
        let server = shared.clone();
        let thread = thread::Builder::new()
            .name(format!("kiln-proxy-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                runtime.block_on(serve(listener, server, stop));
                // Cancel connections still open (e.g. sleeping on latency).
                runtime.shutdown_background();
            })
            .expect("spawn proxy thread");
        Proxy {
            handle: ProxyHandle { shared },
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }
}

impl std::ops::Deref for Proxy {
    type Target = ProxyHandle;

    fn deref(&self) -> &ProxyHandle {
        &self.handle
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = TcpListener::from_std(listener).expect("tokio listener");
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(stream, shared.clone()));
                }
                // e.g. EMFILE: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

/// Lets a request handler drop its own connection with a TCP reset.
#[derive(Default)]
struct ConnControl {
    reset: Notify,
    /// Set `SO_LINGER 0` when the socket is dropped, so the close is an RST.
    abort: AtomicBool,
}

/// The accepted socket, which can be closed with a reset instead of a FIN.
struct ClientIo {
    stream: TcpStream,
    control: Arc<ConnControl>,
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        if self.control.abort.load(Ordering::SeqCst) {
            let _ = self.stream.set_zero_linger();
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let control = Arc::new(ConnControl::default());
    let io = TokioIo::new(ClientIo {
        stream,
        control: control.clone(),
    });
    let handler_control = control.clone();
    let service = service_fn(move |req| handle(req, shared.clone(), handler_control.clone()));
    let connection = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
    tokio::select! {
        _ = connection => {}
        // Dropping the connection drops the socket, which `abort` turns into an RST.
        _ = control.reset.notified() => {}
    }
}

type ProxyResponse = Response<Full<Bytes>>;

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    control: Arc<ConnControl>,
) -> Result<ProxyResponse, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Ok(plain(
                StatusCode::BAD_REQUEST,
                format!("unreadable request body: {e}"),
            ))
        }
    };
    let operation = identify(&parts.method, &parts.uri, &parts.headers, &body);
    let mutating = operation.is_mutating(&parts.method);
    let decision = shared.state().decide(&operation, &body);
    if !decision.delay.is_zero() {
        tokio::time::sleep(decision.delay).await;
    }
    let mut call = Call {
        operation,
        mutating,
        fault: decision.fault,
        forwarded: false,
        status: None,
        rewritten: false,
    };

    match decision.fault {
        Some(Fault::Reset) => {
            shared.state().calls.push(call);
            reset_connection(&control).await
        }
        Some(fault @ (Fault::Throttle | Fault::ServerError)) => {
            let response = error_response(&call.operation.service, fault, &decision.request_id);
            call.status = Some(response.status().as_u16());
            shared.state().calls.push(call);
            Ok(response)
        }
        None | Some(Fault::LoseResponse) => {
            let head_request = parts.method == Method::HEAD;
            call.forwarded = true;
            let request_body = body.clone();
            let (mut head, mut body) = match forward(&shared.upstream, parts, body).await {
                Ok(answer) => answer,
                Err(e) => {
                    let response = plain(
                        StatusCode::BAD_GATEWAY,
                        format!("kiln test proxy: upstream {} failed: {e}", shared.upstream),
                    );
                    call.status = Some(response.status().as_u16());
                    shared.state().calls.push(call);
                    return Ok(response);
                }
            };
            if let Some(rewrite) = &decision.rewrite {
                body = Bytes::from(rewrite(&request_body, &body));
                call.rewritten = true;
                head.headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            }
            if decision.fault == Some(Fault::LoseResponse) {
                shared.state().calls.push(call);
                return reset_connection(&control).await;
            }
            let bodiless = head.status == StatusCode::NO_CONTENT
                || head.status == StatusCode::NOT_MODIFIED
                || (head_request && !call.rewritten);
            // A HEAD answer has no body but keeps the length moto announced; 204 and
            // 304 must not carry a length at all.
            if !bodiless && !head.headers.contains_key(header::CONTENT_LENGTH) {
                head.headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            }
            call.status = Some(head.status.as_u16());
            shared.state().calls.push(call);
            Ok(Response::from_parts(head, Full::new(body)))
        }
    }
}

/// Never answers: wakes the connection task, which drops the socket with an RST.
async fn reset_connection(control: &ConnControl) -> Result<ProxyResponse, Infallible> {
    control.abort.store(true, Ordering::SeqCst);
    control.reset.notify_one();
    std::future::pending().await
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One fresh upstream connection per request: simple, and loopback connects are
/// cheap next to moto's own time per call.
async fn forward(
    upstream: &str,
    parts: http::request::Parts,
    body: Bytes,
) -> Result<(http::response::Parts, Bytes), BoxError> {
    let stream = TcpStream::connect(upstream).await?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await?;
    tokio::spawn(connection);

    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let mut headers = parts.headers;
    let had_length = headers.contains_key(header::CONTENT_LENGTH)
        || headers.contains_key(header::TRANSFER_ENCODING);
    strip_hop_by_hop(&mut headers);
    // The client already sent the whole body to the proxy; moto need not ask.
    headers.remove(header::EXPECT);
    // The body was collected whole; say how long it is instead of re-chunking.
    if had_length || !body.is_empty() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let mut request = Request::builder()
        .method(parts.method)
        .uri(path)
        .body(Full::new(body))?;
    *request.headers_mut() = headers;

    let response = sender.send_request(request).await?;
    let (mut head, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    let was_chunked = head.headers.contains_key(header::TRANSFER_ENCODING);
    strip_hop_by_hop(&mut head.headers);
    if was_chunked {
        head.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    Ok((head, body))
}

fn plain(status: StatusCode, text: String) -> ProxyResponse {
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The error real AWS sends for this service, so the SDK parses and classifies it
/// exactly as it would in production.
fn error_response(service: &str, fault: Fault, request_id: &str) -> ProxyResponse {
    let throttle = fault == Fault::Throttle;
    let (status, content_type, body, id_header) = match service {
        "ec2" => {
            let (status, code, message) = if throttle {
                (503, "RequestLimitExceeded", "Request limit exceeded.")
            } else {
                (500, "InternalError", "An internal error has occurred")
            };
            (
                status,
                "text/xml;charset=UTF-8",
                format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>"
                ),
                None,
            )
        }
        "autoscaling" | "elasticloadbalancing" => {
            let namespace = if service == "autoscaling" {
                "http://autoscaling.amazonaws.com/doc/2011-01-01/"
            } else {
                "http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/"
            };
            // InternalFailure is the query protocol's common server error.
            let (status, kind, code, message) = if throttle {
                (400, "Sender", "Throttling", "Rate exceeded")
            } else {
                (
                    500,
                    "Receiver",
                    "InternalFailure",
                    "An internal error occurred",
                )
            };
            (
                status,
                "text/xml",
                format!(
                    "<ErrorResponse xmlns=\"{namespace}\"><Error><Type>{kind}</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>"
                ),
                Some("x-amzn-requestid"),
            )
        }
        "ssm" => {
            // InternalServerError is SSM's modeled 500.
            let (status, code, message) = if throttle {
                (400, "ThrottlingException", "Rate exceeded")
            } else {
                (500, "InternalServerError", "An internal error occurred")
            };
            (
                status,
                "application/x-amz-json-1.1",
                format!("{{\"__type\":\"{code}\",\"message\":\"{message}\"}}"),
                Some("x-amzn-requestid"),
            )
        }
        _ => {
            // S3, and anything unrecognised: S3's REST-XML shape.
            let (status, code, message) = if throttle {
                (503, "SlowDown", "Please reduce your request rate.")
            } else {
                (
                    500,
                    "InternalError",
                    "We encountered an internal error. Please try again.",
                )
            };
            (
                status,
                "application/xml",
                format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>{request_id}</RequestId><HostId>kiln-test-proxy</HostId></Error>"
                ),
                Some("x-amz-request-id"),
            )
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = StatusCode::from_u16(status).expect("valid status");
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(name) = id_header {
        if let Ok(value) = HeaderValue::from_str(request_id) {
            headers.insert(name, value);
        }
    }
    response
}

/// Work out service and operation from what the SDK sends: the SigV4 credential
/// scope names the service; the query protocols put `Action=` in the form body,
/// SSM's JSON protocol uses `X-Amz-Target`, S3 is REST (the SDK adds `x-id=`).
fn identify(method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Operation {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let service = signing_service(headers, uri)
        .or_else(|| {
            target
                .as_deref()
                .filter(|t| t.starts_with("AmazonSSM."))
                .map(|_| "ssm".to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());
    let name = if let Some(target) = target {
        target.rsplit('.').next().unwrap_or_default().to_string()
    } else if service == "s3" {
        s3_operation(method, uri, headers)
    } else {
        std::str::from_utf8(body)
            .ok()
            .and_then(|b| form_value(b, "Action"))
            .or_else(|| uri.query().and_then(|q| form_value(q, "Action")))
            .unwrap_or_default()
    };
    Operation { service, name }
}

/// The service in `Credential=AKID/date/region/SERVICE/aws4_request`, from the
/// `Authorization` header or a presigned URL's `X-Amz-Credential`.
fn signing_service(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    let scope = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|auth| {
            let start = auth.find("Credential=")? + "Credential=".len();
            let rest = &auth[start..];
            let end = rest.find([',', ' ']).unwrap_or(rest.len());
            Some(rest[..end].to_string())
        })
        .or_else(|| uri.query().and_then(|q| form_value(q, "X-Amz-Credential")))?;
    scope.split('/').nth(3).map(str::to_string)
}

/// Every field of `a=1&b=2` (a Query-protocol request body), percent-decoded.
pub fn form(body: &str) -> BTreeMap<String, String> {
    body.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// A value from `a=1&b=2` (form body or query string), percent-decoded.
fn form_value(form: &str, key: &str) -> Option<String> {
    form.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Best effort: the SDK names most S3 operations in `x-id=`; otherwise guess from
/// the method, whether the path has a key, and the sub-resource parameters.
fn s3_operation(method: &Method, uri: &Uri, headers: &HeaderMap) -> String {
    let query = uri.query().unwrap_or("");
    if let Some(id) = form_value(query, "x-id") {
        return id;
    }
    let params: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').map_or(p, |(k, _)| k))
        .collect();
    let has = |name: &str| params.contains(&name);
    let path = uri.path().trim_start_matches('/');
    let (bucket, key) = match path.split_once('/') {
        Some((bucket, key)) if !key.is_empty() => (bucket, Some(key)),
        Some((bucket, _)) => (bucket, None),
        None => (path, None),
    };
    let copy = headers.contains_key("x-amz-copy-source");
    let name = match (method.as_str(), bucket.is_empty(), key.is_some()) {
        ("GET", true, _) => "ListBuckets".to_string(),
        ("GET", _, true) if has("tagging") => "GetObjectTagging".into(),
        ("GET", _, true) if has("acl") => "GetObjectAcl".into(),
        ("GET", _, true) if has("uploadId") => "ListParts".into(),
        ("GET", _, true) => "GetObject".into(),
        ("HEAD", _, true) => "HeadObject".into(),
        ("PUT", _, true) if has("partNumber") && copy => "UploadPartCopy".into(),
        ("PUT", _, true) if has("partNumber") => "UploadPart".into(),
        ("PUT", _, true) if has("tagging") => "PutObjectTagging".into(),
        ("PUT", _, true) if has("acl") => "PutObjectAcl".into(),
        ("PUT", _, true) if copy => "CopyObject".into(),
        ("PUT", _, true) => "PutObject".into(),
        ("DELETE", _, true) if has("uploadId") => "AbortMultipartUpload".into(),
        ("DELETE", _, true) if has("tagging") => "DeleteObjectTagging".into(),
        ("DELETE", _, true) => "DeleteObject".into(),
        ("POST", _, true) if has("uploads") => "CreateMultipartUpload".into(),
        ("POST", _, true) if has("uploadId") => "CompleteMultipartUpload".into(),
        ("POST", false, false) if has("delete") => "DeleteObjects".into(),
        ("GET", false, false) if form_value(query, "list-type").as_deref() == Some("2") => {
            "ListObjectsV2".into()
        }
        ("GET", false, false) if has("versions") => "ListObjectVersions".into(),
        ("GET", false, false) if has("uploads") => "ListMultipartUploads".into(),
        ("GET", false, false) if has("location") => "GetBucketLocation".into(),
        ("HEAD", false, false) => "HeadBucket".into(),
        (verb @ ("GET" | "PUT" | "DELETE"), false, false) => {
            let prefix = match verb {
                "GET" => "Get",
                "PUT" => "Put",
                _ => "Delete",
            };
            match params.first().map(|p| capitalize(p)) {
                Some(sub) => format!("{prefix}Bucket{sub}"),
                None => match verb {
                    "GET" => "ListObjects".into(),
                    "PUT" => "CreateBucket".into(),
                    _ => "DeleteBucket".into(),
                },
            }
        }
        _ => String::new(),
    };
    name
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

/// Replace every `from` with `to` in a body; a building block for
/// [`ProxyHandle::rewrite`] (`|b| replace_all(b, "\"Success\"", "\"Failed\"")`).
pub fn replace_all(body: &[u8], from: &str, to: &str) -> Vec<u8> {
    let (from, to) = (from.as_bytes(), to.as_bytes());
    if from.is_empty() {
        return body.to_vec();
    }
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(body[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod unit {
    use super::*;

    fn op(service: &str, name: &str) -> Operation {
        Operation {
            service: service.into(),
            name: name.into(),
        }
    }

    #[test]
    fn mutating_is_by_operation_name_and_s3_method() {
        assert!(!op("ec2", "DescribeImages").is_mutating(&Method::POST));
        assert!(op("ec2", "CreateSecurityGroup").is_mutating(&Method::POST));
        assert!(!op("ssm", "GetCommandInvocation").is_mutating(&Method::POST));
        assert!(op("ssm", "SendCommand").is_mutating(&Method::POST));
        assert!(!op("s3", "HeadObject").is_mutating(&Method::HEAD));
        assert!(op("s3", "PutObject").is_mutating(&Method::PUT));
        assert!(op("ec2", "").is_mutating(&Method::POST));
    }
}
