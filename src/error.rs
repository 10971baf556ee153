//! The top-level error and the documented exit codes.
//!
//! | code | meaning |
//! | ---- | ------- |
//! | 0    | success |
//! | 1    | the operation failed (AWS refused or timed out, a bake step failed) |
//! | 2    | bad input or usage: fix the command, config, recipe or named resource |
//! | 3    | a rollout failed and was rolled back to where it started |
//! | 130  | interrupted (Ctrl-C); temporary resources were cleaned up |

use crate::aws::AwsError;
use crate::bake::BakeError;
use crate::config::ConfigError;
use crate::lifecycle::LifecycleError;
use crate::recipe::base::BaseError;
use crate::recipe::RecipeError;
use crate::registry::RegistryError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const INPUT: u8 = 2;
    pub const ROLLED_BACK: u8 = 3;
    pub const INTERRUPTED: u8 = 130;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error(transparent)]
    Base(#[from] BaseError),
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error(transparent)]
    Bake(#[from] BakeError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    /// A flag or argument the parser could not check on its own.
    #[error("{0}")]
    Usage(String),
    /// `kiln doctor` found problems; each was printed with how to fix it.
    #[error("{0} check(s) failed; fix them as shown above and run kiln doctor again")]
    ChecksFailed(usize),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Recipe(_) | Error::Usage(_) => exit::INPUT,
            Error::Base(e) if e.is_input() => exit::INPUT,
            Error::Aws(e) if e.is_input() => exit::INPUT,
            Error::Bake(e) if e.is_interrupted() => exit::INTERRUPTED,
            Error::Bake(e) if e.is_input() => exit::INPUT,
            Error::Registry(e) if e.is_input() => exit::INPUT,
            Error::Lifecycle(e) if e.is_input() => exit::INPUT,
            Error::Base(_)
            | Error::Aws(_)
            | Error::Bake(_)
            | Error::Registry(_)
            | Error::Lifecycle(_)
            | Error::ChecksFailed(_)
            | Error::Io { .. } => exit::FAILED,
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
