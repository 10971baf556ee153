//! `kiln render`: write what would go onto the builder, for review.

use std::path::PathBuf;

use serde::Serialize;

use super::Ctx;
use crate::recipe::{ArtifactSource, Prepared};
use crate::{Error, Result};

/// Render an image's templates into a folder, exactly as they are staged on the
/// builder: provision.sh (run as root), files/<path on the image>, and
/// artifacts/<name> (local artifacts copied; URL artifacts as <name>.url with the
/// pinned sha256, since the builder fetches them). No AWS call.
///
/// Examples:
///   kiln render web --out /tmp/web-bundle
///   kiln render web --out /tmp/web-bundle --force
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Image name: a folder under images/ with an image.toml
    pub image: String,
    /// Folder to write into; must be empty or absent unless --force
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Write into a non-empty folder, overwriting files with the same names
    #[arg(long)]
    pub force: bool,
    /// Set a recipe variable, overriding its default (repeatable)
    #[arg(long = "var", value_name = "NAME=VALUE", value_parser = super::parse_var)]
    pub vars: Vec<(String, String)>,
}

#[derive(Serialize)]
struct Output {
    image: String,
    out: PathBuf,
    files: Vec<PathBuf>,
}

pub async fn run(ctx: &mut Ctx, args: Args) -> Result<()> {
    let root = ctx.config()?.root.clone();
    let prepared = Prepared::load(&root, &args.image, &args.vars)?;
    let non_empty = std::fs::read_dir(&args.out)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if non_empty && !args.force {
        return Err(Error::Usage(format!(
            "--out {} is not empty; choose an empty folder or pass --force",
            args.out.display()
        )));
    }
    let io = |e| Error::io(format!("writing into {}", args.out.display()), e);
    let mut files = prepared.write_bundle(&args.out).map_err(io)?;
    let art_dir = args.out.join("artifacts");
    if !prepared.artifacts.is_empty() {
        std::fs::create_dir_all(&art_dir).map_err(io)?;
    }
    for a in &prepared.artifacts {
        match &a.source {
            ArtifactSource::Local { path, .. } => {
                let to = art_dir.join(&a.name);
                std::fs::copy(path, &to).map_err(io)?;
                files.push(to);
            }
            ArtifactSource::Url(url) => {
                let to = art_dir.join(format!("{}.url", a.name));
                std::fs::write(&to, format!("{url}\nsha256 {}\n", a.sha256)).map_err(io)?;
                files.push(to);
            }
        }
    }
    if ctx.ui.json() {
        ctx.ui.print_json(&Output {
            image: args.image,
            out: args.out,
            files,
        });
    } else {
        for f in &files {
            println!("{}", f.display());
        }
    }
    Ok(())
}
