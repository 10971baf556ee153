//! Image lifecycle after the bake: pruning old versions safely ([`prune`]),
//! what changed between two versions ([`diff`]), and fleets that no longer run
//! what their launch templates say ([`drift`]). Promotion channels live in the
//! registry (`registry::channel`) because refs resolve through them.

pub mod diff;
pub mod drift;
pub mod history;
pub mod prune;

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// Some removals failed; the others were done (exit 1).
    #[error("{failed} of {total} image removals failed: {details}")]
    PartialPrune {
        failed: usize,
        total: usize,
        details: String,
    },
    /// Part of what must be observed before deleting could not be read (exit 1).
    #[error("{0}")]
    Unobserved(String),
    /// `kiln drift` found drift (exit 1, so a scheduled check can alert).
    #[error("{0}")]
    Drift(String),
    /// An ASG or version the operator named does not exist (exit 2).
    #[error("{0}")]
    NotFound(String),
}

impl LifecycleError {
    pub fn is_input(&self) -> bool {
        match self {
            LifecycleError::NotFound(_) => true,
            LifecycleError::PartialPrune { .. }
            | LifecycleError::Unobserved(_)
            | LifecycleError::Drift(_) => false,
        }
    }
}
