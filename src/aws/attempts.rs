//! How many times a call was sent.
//!
//! The SDK retries a call whose answer did not arrive (a reset connection, a
//! timeout) as it retries a throttled one, so a call that creates something
//! may have created it twice: the first attempt ran, its answer was lost, the
//! retry ran again. EC2 deduplicates RunInstances and CopyImage by client
//! token; CreateImage, CreateSecurityGroup and SendCommand have none, and moto
//! honours no token. A call counted with [`Attempts`] tells whether a check for
//! such duplicates is needed, so the check costs nothing when the first
//! attempt answered.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

/// Counts the attempts of the calls it is attached to
/// (`.customize().interceptor(attempts.clone())`).
#[derive(Debug, Clone, Default)]
pub struct Attempts(Arc<AtomicU32>);

impl Attempts {
    pub fn new() -> Attempts {
        Attempts::default()
    }

    pub fn count(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }

    /// More than one attempt was sent: an earlier one may have run too.
    pub fn retried(&self) -> bool {
        self.count() > 1
    }
}

impl Intercept for Attempts {
    fn name(&self) -> &'static str {
        "kiln attempt counter"
    }

    fn read_before_attempt(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}
