//! The content hash: sha256 over a canonical manifest of everything that decides
//! what a baked image contains. Same inputs give the same hash on any machine; any
//! input change gives a new one. File timestamps, the working directory and the
//! order files happen to be listed in never enter it.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::RecipeError;
use super::load::Recipe;
use super::model::FORMAT_VERSION;
use super::render::RenderedFile;

/// Version of the manifest layout itself; bump it when the lines below change.
const MANIFEST_VERSION: u32 = 1;

/// Read size for streaming: large enough to keep the hasher busy, small enough
/// that memory stays flat whatever the artifact size.
const CHUNK: usize = 1 << 20;

/// An artifact with its sha256 known.
#[derive(Debug, Clone)]
pub struct ResolvedArtifact {
    pub name: String,
    pub sha256: String,
    pub dest: String,
    pub mode: String,
    pub source: ArtifactSource,
}

#[derive(Debug, Clone)]
pub enum ArtifactSource {
    /// A file in the project; `size` in bytes.
    Local { path: PathBuf, size: u64 },
    /// Fetched on the builder and checked against the pinned sha256.
    Url(String),
}

/// sha256 of a file, streamed in fixed-size chunks.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Resolves every artifact's sha256: local files are hashed in parallel (one
/// thread each, bounded by the machine's cores) and checked against a pin if the
/// recipe gives one; URL artifacts keep their pin.
pub fn resolve_artifacts(recipe: &Recipe) -> Result<Vec<ResolvedArtifact>, RecipeError> {
    let arts = &recipe.file.artifacts;
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(arts.len().max(1));
    let mut results: Vec<Option<Result<ResolvedArtifact, RecipeError>>> =
        (0..arts.len()).map(|_| None).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots = std::sync::Mutex::new(&mut results);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(a) = arts.get(i) else { break };
                let r = resolve_one(recipe, a);
                slots.lock().expect("no worker panics while holding it")[i] = Some(r);
            });
        }
    });
    results
        .into_iter()
        .map(|r| r.expect("every index was taken by a worker"))
        .collect()
}

fn resolve_one(
    recipe: &Recipe,
    a: &super::model::Artifact,
) -> Result<ResolvedArtifact, RecipeError> {
    let pinned = a.sha256.as_ref().map(|s| s.to_ascii_lowercase());
    let (sha256, source) = match (&a.path, &a.url) {
        (Some(p), _) => {
            let path = recipe.dir.join(p);
            let (actual, size) = sha256_file(&path).map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    RecipeError::MissingArtifact {
                        path: recipe.path.clone(),
                        artifact: a.name.clone(),
                        file: path.clone(),
                    }
                } else {
                    RecipeError::Read {
                        path: path.clone(),
                        source,
                    }
                }
            })?;
            if let Some(expected) = pinned {
                if expected != actual {
                    return Err(RecipeError::ArtifactMismatch {
                        path: recipe.path.clone(),
                        artifact: a.name.clone(),
                        file: path,
                        expected,
                        actual,
                    });
                }
            }
            (actual, ArtifactSource::Local { path, size })
        }
        (None, Some(url)) => (
            pinned.expect("validated: URL artifacts are pinned"),
            ArtifactSource::Url(url.clone()),
        ),
        (None, None) => unreachable!("validated: every artifact has a path or a url"),
    };
    Ok(ResolvedArtifact {
        name: a.name.clone(),
        sha256,
        dest: a.dest.clone(),
        mode: a.mode.clone(),
        source,
    })
}

/// The canonical manifest: one line per input, in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub lines: Vec<String>,
}

impl Manifest {
    pub fn build(
        recipe: &Recipe,
        base_ami: &str,
        artifacts: &[ResolvedArtifact],
        rendered: &[RenderedFile],
    ) -> Manifest {
        let mut lines = vec![
            format!("kiln-manifest {MANIFEST_VERSION}"),
            format!("format {FORMAT_VERSION}"),
            format!("image {}", recipe.name),
            // The recipe file itself, byte for byte: smoke tests, builder settings
            // and even comments are inputs. Conservative on purpose: an edit
            // costs a bake, never a wrongly reused image.
            format!("recipe sha256={}", recipe.sha256),
            format!("base-ami {base_ami}"),
        ];
        let java = &recipe.file.java;
        lines.push(match (&java.tarball, &java.apt) {
            (Some(t), _) => format!(
                "java {} tarball sha256={}",
                java.version,
                t.sha256.to_ascii_lowercase()
            ),
            (None, Some(a)) => format!("java {} apt {}={}", java.version, a.package, a.version),
            (None, None) => unreachable!("validated: java has a tarball or an apt pin"),
        });
        let mut arts: Vec<&ResolvedArtifact> = artifacts.iter().collect();
        arts.sort_by(|a, b| a.name.cmp(&b.name));
        for a in arts {
            lines.push(format!(
                "artifact {} sha256={} dest={} mode={}",
                a.name, a.sha256, a.dest, a.mode
            ));
        }
        let mut files: Vec<&RenderedFile> = rendered.iter().collect();
        files.sort_by(|a, b| a.bundle_path.cmp(&b.bundle_path));
        for f in files {
            lines.push(format!(
                "file {} mode={} sha256={}",
                f.bundle_path,
                f.mode,
                sha256_bytes(&f.bytes)
            ));
        }
        Manifest { lines }
    }

    pub fn text(&self) -> String {
        let mut t = self.lines.join("\n");
        t.push('\n');
        t
    }

    /// The content hash: 64 lowercase hex digits.
    pub fn hash(&self) -> String {
        sha256_bytes(self.text().as_bytes())
    }
}
