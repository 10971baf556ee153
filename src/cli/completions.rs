//! `kiln completions`: shell completion scripts.

use clap::CommandFactory;
use clap_complete::Shell;

use super::{Cli, Ctx};
use crate::Result;

/// Print a shell completion script on stdout. No config or AWS access needed.
///
/// Examples:
///   kiln completions bash > ~/.local/share/bash-completion/completions/kiln
///   kiln completions zsh > ~/.zfunc/_kiln     # with fpath+=(~/.zfunc) before compinit
///   kiln completions fish > ~/.config/fish/completions/kiln.fish
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The shell to complete for
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

pub async fn run(_ctx: &mut Ctx, args: Args) -> Result<()> {
    let shell = match args.shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "kiln", &mut std::io::stdout());
    Ok(())
}
