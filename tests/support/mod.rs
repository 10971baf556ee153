//! The integration-test harness: one moto server per test process ([`moto`]), a
//! fault-injecting proxy each test can put in front of it ([`proxy`]), and a way
//! to run the real `kiln` binary on a throwaway project ([`cli`]).
//!
//! ```ignore
//! use crate::support::{cli::Project, moto, proxy::{Fault, Proxy}};
//!
//! // In-process SDK client straight to moto (shared by all tests: unique names).
//! let ec2 = aws_sdk_ec2::Client::new(&moto::sdk_config(moto::endpoint()).await);
//! let group = moto::unique("web"); // web-<pid>-<n>
//!
//! // The real CLI through a proxy that throttles 30% of SSM calls.
//! let proxy = Proxy::start(moto::endpoint());
//! proxy.set_throttle_rate(0.3);
//! proxy.set_only(&["ssm:*"]);
//! let project = Project::minimal("web");
//! let run = project.kiln(&proxy.endpoint(), &["-v", "hash", "web"]);
//! run.expect_ok();
//! assert_eq!(run.value_of("base-ami"), Some(moto::TRUSTY_NEWEST));
//! assert_eq!(proxy.mutating_calls(), 0, "{}", proxy.summary());
//! ```

// Each test module uses only some helpers; the re-exports are for convenience.
#![allow(dead_code, unused_imports)]

pub mod cli;
pub mod moto;
pub mod proxy;

pub use cli::{kiln_command, Project, Run};
pub use moto::{aws_env, endpoint, sdk_config, sdk_config_loader, unique};
pub use proxy::{Fault, Faults, Proxy, ProxyHandle};
