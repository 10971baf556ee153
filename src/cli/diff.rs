//! `kiln diff`: what changed between two versions of an image.

use serde::Serialize;

use super::Ctx;
use crate::lifecycle::diff::{self, Change};
use crate::registry::{self, claim, packages, ImageVersion};
use crate::Result;

/// Show which inputs changed between two versions: rendered templates and
/// files, artifacts, the Java pin, the base AMI, the recipe file. Read from
/// the manifest each bake records in the home region; for versions baked
/// before manifests were recorded, only the base AMI, Java pin and content
/// hash (from the AMI tags) are compared. Installed packages (`dpkg-query -W`
/// at the end of provisioning) are compared when both versions recorded their
/// package list; the lists are read from the `[bake] bucket` they were
/// uploaded to. Packages are an output of the bake, not part of the content
/// hash.
///
/// Examples:
///   kiln diff web@6 web@7
///   kiln diff web@previous web@latest --output json
///   kiln diff web@prod web@canary
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The older version (any ref)
    pub from: String,
    /// The newer version (any ref)
    pub to: String,
}

#[derive(Serialize)]
struct Side {
    image: String,
    version: u64,
    hash: String,
    manifest_recorded: bool,
    packages_recorded: bool,
}

#[derive(Serialize)]
struct Report {
    from: Side,
    to: Side,
    same_content: bool,
    /// Inputs that differ (empty when the content hash is the same).
    changes: Vec<Change>,
    /// Installed packages that differ; null unless both recorded their list.
    packages: Option<Vec<Change>>,
    /// What could not be compared, if anything.
    notes: Vec<String>,
}

pub async fn run(ctx: &mut Ctx, args: Args) -> Result<()> {
    registry::parse_ref(&args.from)?;
    registry::parse_ref(&args.to)?;
    ctx.single_region()?;
    let aws = ctx.aws().await?;
    let (a, b) = futures::try_join!(
        registry::resolve_ref(&aws, &args.from),
        registry::resolve_ref(&aws, &args.to)
    )?;
    let (ma, mb) = futures::try_join!(
        claim::read_claim(&aws, &a.image, a.version),
        claim::read_claim(&aws, &b.image, b.version)
    )?;
    let mut notes = Vec::new();
    let changes = match (&ma, &mb) {
        (Some(x), Some(y)) if !x.manifest.is_empty() && !y.manifest.is_empty() => {
            diff::manifests(&x.manifest, &y.manifest)
        }
        _ => {
            for (v, m) in [(&a, &ma), (&b, &mb)] {
                if m.as_ref().is_none_or(|m| m.manifest.is_empty()) {
                    notes.push(format!(
                        "{}@{} has no recorded manifest (baked before kiln recorded them); \
                         only its tags are compared",
                        v.image, v.version
                    ));
                }
            }
            from_tags(&a, &b)
        }
    };
    // The lists are in S3 (a claim parameter holds only where, and the sha256).
    let list_of = |m: &Option<claim::ClaimRecord>| m.as_ref().and_then(|m| m.package_list.clone());
    let (la, lb) = (list_of(&ma), list_of(&mb));
    let packages = match (&la, &lb) {
        (Some(x), Some(y)) => {
            let (pa, pb) = futures::join!(packages::fetch(&aws, x), packages::fetch(&aws, y));
            match (pa, pb) {
                (Ok(pa), Ok(pb)) => Some(diff::packages(&pa, &pb)),
                (pa, pb) => {
                    for (v, r) in [(&a, pa), (&b, pb)] {
                        if let Err(why) = r {
                            notes.push(format!(
                                "installed packages are not compared: the package list of {}@{} cannot be read: {why}",
                                v.image, v.version
                            ));
                        }
                    }
                    None
                }
            }
        }
        _ => {
            for (v, l) in [(&a, &la), (&b, &lb)] {
                if l.is_none() {
                    notes.push(format!(
                        "installed packages are not compared: {}@{} has no package list recorded",
                        v.image, v.version
                    ));
                }
            }
            None
        }
    };
    let side = |v: &ImageVersion, m: &Option<claim::ClaimRecord>| Side {
        image: v.image.clone(),
        version: v.version,
        hash: v.hash.clone(),
        manifest_recorded: m.as_ref().is_some_and(|m| !m.manifest.is_empty()),
        packages_recorded: m.as_ref().is_some_and(|m| m.package_list.is_some()),
    };
    let report = Report {
        from: side(&a, &ma),
        to: side(&b, &mb),
        same_content: a.hash == b.hash,
        changes,
        packages,
        notes,
    };
    if ctx.ui.json() {
        ctx.ui.print_json(&report);
        return Ok(());
    }
    println!(
        "{}@{} (sha256:{}) -> {}@{} (sha256:{})",
        a.image,
        a.version,
        &a.hash[..a.hash.len().min(12)],
        b.image,
        b.version,
        &b.hash[..b.hash.len().min(12)]
    );
    if report.same_content {
        println!("same content hash: nothing changed");
    }
    for c in report
        .changes
        .iter()
        .chain(report.packages.iter().flatten())
    {
        let what = if c.key.is_empty() {
            c.kind.clone()
        } else {
            format!("{} {}", c.kind, c.key)
        };
        match (&c.old, &c.new) {
            (Some(o), Some(n)) => println!("changed {what}: {o} -> {n}"),
            (None, Some(n)) => println!("added   {what}: {n}"),
            (Some(o), None) => println!("removed {what}: {o}"),
            (None, None) => {}
        }
    }
    for n in &report.notes {
        println!("note: {n}");
    }
    Ok(())
}

/// The inputs the AMI tags record, for versions without a manifest.
fn from_tags(a: &ImageVersion, b: &ImageVersion) -> Vec<Change> {
    [
        ("base-ami", &a.base_ami, &b.base_ami),
        ("java", &a.java, &b.java),
        ("content-hash", &a.hash, &b.hash),
    ]
    .into_iter()
    .filter(|(_, x, y)| x != y)
    .map(|(kind, x, y)| Change {
        kind: kind.into(),
        key: String::new(),
        old: Some(x.clone()),
        new: Some(y.clone()),
    })
    .collect()
}
