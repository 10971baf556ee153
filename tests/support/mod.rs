//! The integration-test harness: one moto server per test process ([`moto`]), a
//! fault-injecting proxy each test can put in front of it ([`proxy`]), and a way
//! to run the real `kiln` binary on a throwaway project ([`cli`]).

// Each test module uses only some helpers; the re-exports are for convenience.
#![allow(dead_code, unused_imports)]

pub mod cli;
pub mod moto;
pub mod proxy;

pub use cli::{kiln_command, Project, Run};
pub use moto::{aws_env, endpoint, sdk_config, sdk_config_loader, unique};
pub use proxy::{Fault, Faults, Proxy, ProxyHandle};
