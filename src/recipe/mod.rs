//! Recipes: the model (`image.toml`), Tera rendering with a typed context, and the
//! content hash that identifies a baked image.
//!
//! Everything here is offline except resolving an `owner` + `name` or
//! `ssm_parameter` base image ([`base::resolve`]).

pub mod base;
pub mod context;
mod error;
pub mod hash;
mod load;
pub mod model;
pub mod render;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use context::VarValue;
pub use error::RecipeError;
pub use hash::{ArtifactSource, Manifest, ResolvedArtifact};
pub use load::{check_sha256, is_ami_id, list_images, Recipe};
pub use render::RenderedFile;

/// A recipe with its artifacts hashed and its templates rendered: everything
/// needed for the manifest except the resolved base AMI.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub recipe: Recipe,
    pub artifacts: Vec<ResolvedArtifact>,
    pub vars: BTreeMap<String, VarValue>,
    pub rendered: Vec<RenderedFile>,
}

impl Prepared {
    /// Loads `images/<name>/image.toml` under `root`, hashes local artifacts and
    /// renders every template. No AWS call.
    pub fn load(
        root: &Path,
        name: &str,
        var_overrides: &[(String, String)],
    ) -> Result<Prepared, RecipeError> {
        let recipe = Recipe::load(root, name)?;
        let vars = recipe.resolve_vars(var_overrides)?;
        let artifacts = hash::resolve_artifacts(&recipe)?;
        let ctx = render::context(&recipe, &artifacts, &vars);
        let rendered = render::render(&recipe, &ctx)?;
        Ok(Prepared {
            recipe,
            artifacts,
            vars,
            rendered,
        })
    }

    pub fn manifest(&self, base_ami: &str) -> Manifest {
        Manifest::build(&self.recipe, base_ami, &self.artifacts, &self.rendered)
    }

    /// Writes the rendered bundle under `out` exactly as it is staged on the
    /// builder: `provision.sh` and `files/<dest>`. Returns the paths written.
    pub fn write_bundle(&self, out: &Path) -> std::io::Result<Vec<PathBuf>> {
        let mut written = Vec::new();
        for f in &self.rendered {
            let path = out.join(&f.bundle_path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, &f.bytes)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = u32::from_str_radix(&f.mode, 8).unwrap_or(0o644);
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            }
            written.push(path);
        }
        Ok(written)
    }
}
