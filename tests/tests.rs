//! All integration tests, in one binary: one link of the AWS SDK.

mod recipe;
