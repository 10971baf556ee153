//! Parse, dispatch, map the error to a documented exit code; nothing else.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = kiln::cli::Cli::parse();
    let filter = match cli.global.verbose {
        // The SDK logs provider fallbacks as warnings; kiln's own errors say what
        // failed and how to fix it, so the SDK is heard from only with -vv.
        0 => "error,kiln=warn",
        1 => "error,kiln=debug",
        2 => "info,kiln=debug",
        _ => "debug,kiln=trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| filter.into()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime starts");
    match runtime.block_on(kiln::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
