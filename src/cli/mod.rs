//! The command line: global flags, one module per subcommand (an `Args` struct
//! whose doc comments are the help text, and a `run` function).

pub mod abort;
pub mod bake;
pub mod channels;
pub mod completions;
pub mod diff;
pub mod doctor;
pub mod drift;
pub mod gc;
pub mod hash;
pub mod history;
pub mod images;
pub mod promote;
pub mod prune;
pub mod render;
pub mod rollback;
pub mod rollout;
pub mod status;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::aws::{Aws, AwsSettings};
use crate::config::Config;
use crate::ui::{OutputFormat, Ui};
use crate::{Error, Result};

const AFTER_HELP: &str = "\
Examples:
  kiln doctor --asg web-prod     check credentials, config, bucket, subnet, profile, group
  kiln bake web                  bake images/web, or find the AMI it already is
  kiln images web                list the baked versions of web
  kiln gc --dry-run              list what a killed bake left behind
  kiln completions bash          shell completions (bash, zsh, fish)
  scripts/try                    the whole demo on a local AWS emulator

Exit codes:
  0    success
  1    the operation failed (AWS refused or timed out, a bake step failed)
  2    bad input or usage: fix the command, config, recipe or named resource
  3    a rollout failed and was rolled back to where it started
  130  interrupted (Ctrl-C); temporary resources were cleaned up

AWS access uses the same chain as the aws CLI: AWS_PROFILE, AWS_REGION,
AWS_ENDPOINT_URL and the usual credential sources all work.";

/// Bake content-hashed AWS machine images from templated recipes and roll
/// auto-scaling groups onto them by replacing instances, never by patching them.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, after_help = AFTER_HELP, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Args)]
pub struct GlobalArgs {
    /// AWS region [default: AWS_REGION, then kiln.toml `region`, then the profile's].
    /// `bake`, `images`, `gc`, `prune`, `promote`, `channels` and `drift` take it
    /// more than once: the first region is where images are built, the others
    /// hold copies
    #[arg(long, global = true, value_name = "REGION", action = clap::ArgAction::Append)]
    pub region: Vec<String>,
    /// AWS profile from ~/.aws/config [default: AWS_PROFILE, then kiln.toml `profile`]
    #[arg(long, global = true, value_name = "NAME")]
    pub profile: Option<String>,
    /// Output format of the command's result on stdout
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// More detail: -v shows what a command covers and kiln's debug log, -vv the AWS SDK's too
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Project file [default: kiln.toml in the current folder or the nearest parent]
    #[arg(long, global = true, env = "KILN_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    // Listed in the order an operator meets them: images, then fleets, then
    // housekeeping. The one-line `about`s keep `kiln --help` scannable; each
    // command's own --help has the full text and examples.
    #[command(about = "Print an image's content hash (-v: the manifest it covers)")]
    Hash(hash::Args),
    #[command(about = "Write what would go onto the builder into a folder, for review")]
    Render(render::Args),
    #[command(about = "Find the AMI with the recipe's content hash, or bake a new version")]
    Bake(bake::Args),
    #[command(about = "List an image's versions, or resolve a ref like web@latest")]
    Images(images::Args),
    #[command(about = "Roll an auto-scaling group onto an image by replacing its instances")]
    Rollout(rollout::Args),
    #[command(about = "Roll a group back onto the image it ran before (or --to a ref)")]
    Rollback(rollback::Args),
    #[command(about = "Show a group's image, rollout in progress and lock holder")]
    Status(status::Args),
    #[command(about = "Show which images a group ran, when, and how each rollout ended")]
    History(history::Args),
    #[command(about = "Stop a rollout (even a killed one) and roll it back")]
    Abort(abort::Args),
    #[command(about = "Point a channel (web@prod) at a version in every region")]
    Promote(promote::Args),
    #[command(about = "List an image's channels and their promotion history")]
    Channels(channels::Args),
    #[command(about = "Show which inputs changed between two versions")]
    Diff(diff::Args),
    #[command(about = "Find instances off their launch template's image")]
    Drift(drift::Args),
    #[command(about = "Remove old versions nothing uses (a dry run unless --execute)")]
    Prune(prune::Args),
    #[command(about = "Remove temporaries a killed bake left behind")]
    Gc(gc::Args),
    #[command(about = "Check credentials, config, network and groups; say how to fix each")]
    Doctor(doctor::Args),
    #[command(about = "Print a shell completion script (bash, zsh, fish)")]
    Completions(completions::Args),
}

/// What every subcommand gets: the global flags, the output, and lazily the
/// project config and an AWS connection.
pub struct Ctx {
    pub global: GlobalArgs,
    pub ui: Ui,
    config: Option<Config>,
}

impl Ctx {
    pub fn new(global: GlobalArgs) -> Ctx {
        let ui = Ui::new(global.output);
        Ctx {
            global,
            ui,
            config: None,
        }
    }

    /// The project config (kiln.toml), read on first use.
    pub fn config(&mut self) -> Result<&Config> {
        if self.config.is_none() {
            let cwd = std::env::current_dir()
                .map_err(|e| Error::io("cannot read the current directory", e))?;
            self.config = Some(Config::load(self.global.config.as_deref(), &cwd)?);
        }
        Ok(self.config.as_ref().expect("just set"))
    }

    /// `[rollout]` of the config already read (every rollout command reads the
    /// config before it connects to AWS); the defaults if none was read.
    pub fn rollout_config(&self) -> crate::config::RolloutConfig {
        self.config
            .as_ref()
            .map(|c| c.file.rollout.clone())
            .unwrap_or_default()
    }

    /// Connects to AWS in the selected region; fails early, with the fix, when no
    /// region or credentials are configured.
    pub async fn aws(&mut self) -> Result<Aws> {
        let file = self.config()?.file.clone();
        let settings = AwsSettings {
            region: self.global.region.first().cloned(),
            profile: self.global.profile.clone(),
            default_region: file.region,
            default_profile: file.profile,
            default_endpoint_url: file.endpoint_url,
        };
        Ok(Aws::connect(&settings).await?)
    }

    /// The regions a multi-region command works on: every `--region` given (the
    /// first is home), else `aws`'s region followed by kiln.toml's
    /// `[bake] copy_regions`. Duplicates are dropped, order kept.
    pub fn regions(&mut self, aws: &Aws) -> Result<Vec<String>> {
        let mut out: Vec<String> = if self.global.region.is_empty() {
            let mut v = vec![aws.region().to_string()];
            v.extend(self.config()?.file.bake.copy_regions.iter().cloned());
            v
        } else {
            self.global.region.clone()
        };
        let mut seen = std::collections::BTreeSet::new();
        out.retain(|r| seen.insert(r.clone()));
        Ok(out)
    }

    /// Commands that work in one region refuse a repeated `--region`.
    pub fn single_region(&self) -> Result<()> {
        if self.global.region.len() > 1 {
            return Err(Error::Usage(format!(
                "--region was given {} times; only bake, images, gc, prune, promote, channels and drift work on several regions",
                self.global.region.len()
            )));
        }
        Ok(())
    }
}

pub async fn run(cli: Cli) -> Result<()> {
    let mut ctx = Ctx::new(cli.global);
    match cli.command {
        Command::Hash(args) => {
            ctx.single_region()?;
            hash::run(&mut ctx, args).await
        }
        Command::Render(args) => render::run(&mut ctx, args).await,
        Command::Bake(args) => bake::run(&mut ctx, args).await,
        Command::Images(args) => images::run(&mut ctx, args).await,
        Command::Gc(args) => gc::run(&mut ctx, args).await,
        Command::Prune(args) => prune::run(&mut ctx, args).await,
        Command::Promote(args) => promote::run(&mut ctx, args).await,
        Command::Channels(args) => channels::run(&mut ctx, args).await,
        Command::Drift(args) => drift::run(&mut ctx, args).await,
        Command::Diff(args) => diff::run(&mut ctx, args).await,
        Command::Doctor(args) => {
            ctx.single_region()?;
            doctor::run(&mut ctx, args).await
        }
        Command::Completions(args) => completions::run(&mut ctx, args).await,
        Command::Rollout(args) => rollout::run(&mut ctx, args).await,
        Command::Rollback(args) => rollback::run(&mut ctx, args).await,
        Command::Status(args) => status::run(&mut ctx, args).await,
        Command::History(args) => history::run(&mut ctx, args).await,
        Command::Abort(args) => abort::run(&mut ctx, args).await,
    }
}

/// The recipe's base image as an AMI id, with a progress step while AWS is asked;
/// a fixed `ami` needs no call.
pub async fn resolve_base(
    ui: &Ui,
    aws: &Aws,
    base: &crate::recipe::model::BaseImage,
) -> Result<String> {
    if let Some(ami) = &base.ami {
        return Ok(ami.clone());
    }
    let step = ui.step(format!("resolving base image in {}", aws.region()));
    match crate::recipe::base::resolve(aws, base).await {
        Ok(ami) => {
            step.done(&ami);
            Ok(ami)
        }
        Err(e) => {
            step.fail("");
            Err(e.into())
        }
    }
}

/// `--var name=value`
pub fn parse_var(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every command's --help shows how to use it (issue 4).
    #[test]
    fn every_help_has_examples() {
        let mut cli = Cli::command();
        let top = cli.render_long_help().to_string();
        assert!(top.contains("Examples:"), "{top}");
        // clap's generated `help` subcommand is the one without examples.
        for sub in cli.get_subcommands_mut().filter(|s| s.get_name() != "help") {
            let help = sub.render_long_help().to_string();
            assert!(
                help.contains("Examples:\n  kiln "),
                "kiln {} --help has no examples:\n{help}",
                sub.get_name()
            );
        }
    }
}
