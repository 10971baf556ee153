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
use crate::rollout::{Outcome, RolloutError};

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
    #[error(transparent)]
    Rollout(#[from] RolloutError),
    /// A rollout that ran to its end without reaching its target image.
    #[error("ASG {asg}: rollout to {target} {}: {reason}", match outcome {
        Outcome::RolledBack => "failed and was rolled back",
        Outcome::Aborted => "was aborted",
        Outcome::Failed => "failed; instances may run either image",
        Outcome::Succeeded => "succeeded",
    })]
    RolloutEnded {
        asg: String,
        target: String,
        outcome: Outcome,
        reason: String,
    },
    /// `kiln status`: a rollout is failing, stuck, or ended failed.
    #[error("ASG {asg}: {why}")]
    Unhealthy { asg: String, why: String },
    /// Ctrl-C; the message says what was left and how to continue.
    #[error("interrupted: {0}")]
    Interrupted(String),
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
            Error::Rollout(e) => rollout_exit(e),
            Error::RolloutEnded { outcome, .. } => match outcome {
                Outcome::RolledBack => exit::ROLLED_BACK,
                Outcome::Succeeded | Outcome::Aborted => exit::OK,
                Outcome::Failed => exit::FAILED,
            },
            Error::Unhealthy { .. } => exit::FAILED,
            Error::Interrupted(_) => exit::INTERRUPTED,
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

/// Refusals about the named group, its lock or the flags are input (2): nothing
/// was changed and the command must be fixed or the holder waited for. Failures
/// talking to AWS or storing the journal are 1.
fn rollout_exit(e: &RolloutError) -> u8 {
    match e {
        RolloutError::LaunchConfiguration { .. }
        | RolloutError::ProcessSuspended { .. }
        | RolloutError::InstancesInStandby { .. }
        | RolloutError::InstancesProtected { .. }
        | RolloutError::FloorAboveDesired { .. }
        | RolloutError::Locked { .. }
        | RolloutError::InProgress { .. }
        | RolloutError::NothingInProgress { .. }
        | RolloutError::NoPreviousImage { .. }
        | RolloutError::GroupNotFound { .. } => exit::INPUT,
        // A launch template or target group the group names but that does not
        // exist is the operator's setup to fix, like a missing group (issue 5).
        RolloutError::Fleet { source, .. } => match source.downcast_ref::<AwsError>() {
            Some(a) if a.is_input() || a.is_missing_resource() => exit::INPUT,
            _ => exit::FAILED,
        },
        RolloutError::LockLost { .. }
        | RolloutError::Journal { .. }
        | RolloutError::Internal(_) => exit::FAILED,
    }
}
