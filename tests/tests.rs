//! All integration tests, in one binary: one link of the AWS SDK, one moto server
//! per test process (see `support::moto`). Add a `mod` line per test file.

mod support;

mod bake;
mod base_image;
mod cli_polish;
mod doctor;
mod faults;
mod harness;
mod journal;
mod lifecycle;
mod quickstart;
mod recipe;
mod rollout;
mod rollout_sim;
