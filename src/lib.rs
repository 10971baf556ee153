//! kiln: bake content-hashed AWS machine images from templated recipes and roll
//! auto-scaling groups onto them by replacing instances, never by patching them.
//!
//! The binary (`src/main.rs`) only parses arguments, dispatches to [`cli`] and maps
//! the error to an exit code ([`error::Error::exit_code`]).

pub mod aws;
pub mod bake;
pub mod cli;
pub mod config;
pub mod error;
pub mod lifecycle;
pub mod recipe;
pub mod registry;
pub mod rollout;
pub mod ui;

pub use error::{Error, Result};
