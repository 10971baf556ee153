//! Rendering a recipe's templates with the typed [`TemplateContext`].

use std::collections::BTreeMap;
use std::path::Path;

use tera::Tera;

use super::context::{
    ArtifactCtx, FileCtx, ImageCtx, JavaAptCtx, JavaCtx, JavaTarballCtx, KilnCtx, ServiceCtx,
    SmokeCtx, TemplateContext, VarValue,
};
use super::error::RecipeError;
use super::hash::ResolvedArtifact;
use super::load::Recipe;
use super::model::FORMAT_VERSION;

/// Bundle path of the provisioning script; the bake runs it as root.
pub const PROVISION_SCRIPT: &str = "provision.sh";

/// One rendered file as it goes onto the builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedFile {
    /// Path inside the bundle: `provision.sh`, or `files/<dest without leading />`.
    pub bundle_path: String,
    /// Absolute path on the image (none for the provisioning script).
    pub dest: Option<String>,
    pub mode: String,
    /// Template it came from, relative to the project root.
    pub template: String,
    pub bytes: Vec<u8>,
}

/// Bundle path of a file rendered to `dest` on the image.
pub fn bundle_path_for(dest: &str) -> String {
    format!("files/{}", dest.trim_start_matches('/'))
}

/// Builds the context; a template can use only what this returns.
pub fn context(
    recipe: &Recipe,
    artifacts: &[ResolvedArtifact],
    vars: &BTreeMap<String, VarValue>,
) -> TemplateContext {
    let f = &recipe.file;
    let kiln = KilnCtx::new(FORMAT_VERSION);
    let java_home = format!("/opt/java/{}", sanitize(&f.java.version));
    TemplateContext {
        image: ImageCtx {
            name: recipe.name.clone(),
            description: f.description.clone(),
        },
        java: JavaCtx {
            version: f.java.version.clone(),
            home: java_home,
            tarball: f.java.tarball.as_ref().map(|t| JavaTarballCtx {
                url: t.url.clone(),
                sha256: t.sha256.to_ascii_lowercase(),
            }),
            apt: f.java.apt.as_ref().map(|a| JavaAptCtx {
                package: a.package.clone(),
                version: a.version.clone(),
            }),
        },
        artifacts: artifacts
            .iter()
            .map(|a| ArtifactCtx {
                name: a.name.clone(),
                sha256: a.sha256.clone(),
                dest: a.dest.clone(),
                mode: a.mode.clone(),
                staged: format!("{}/{}", kiln.artifacts_dir, a.name),
            })
            .collect(),
        service: ServiceCtx {
            name: f.service.name.clone(),
            description: f.service.description.clone(),
            user: f.service.user.clone(),
            exec: f.service.exec.clone(),
            working_dir: f.service.working_dir.clone(),
            port: f.service.port,
            env: f.service.env.clone(),
        },
        smoke: f
            .smoke
            .iter()
            .map(|s| SmokeCtx {
                name: s.name.clone(),
                run: s.run.clone(),
                timeout_secs: s.timeout_secs,
            })
            .collect(),
        files: f
            .renders
            .iter()
            .map(|r| FileCtx {
                dest: r.dest.clone(),
                mode: r.mode.clone(),
                staged: format!("{}/{}", kiln.staging_dir, bundle_path_for(&r.dest)),
            })
            .collect(),
        vars: vars.clone(),
        kiln,
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Renders the provisioning script and every `[[render]]` entry.
///
/// Every `*.tera` file under `<root>/templates/` is loaded (so templates can
/// `include` and `extend` one another), plus the templates the recipe names.
/// Autoescaping is off: these are shell scripts and config files, not HTML.
pub fn render(recipe: &Recipe, ctx: &TemplateContext) -> Result<Vec<RenderedFile>, RecipeError> {
    let f = &recipe.file;
    let mut sources: BTreeMap<String, String> = BTreeMap::new();
    collect_templates(&recipe.root, &recipe.root.join("templates"), &mut sources)?;
    let mut wanted = vec![(
        f.provision.template.clone(),
        "provision.template".to_string(),
    )];
    for (i, r) in f.renders.iter().enumerate() {
        wanted.push((r.template.clone(), format!("render[{i}].template")));
    }
    let mut names = Vec::new();
    for (value, field) in &wanted {
        let path = recipe.template_path(value, field)?;
        let name = template_name(&recipe.root, &path);
        if !sources.contains_key(&name) {
            let text = std::fs::read_to_string(&path).map_err(|source| RecipeError::Read {
                path: path.clone(),
                source,
            })?;
            sources.insert(name.clone(), text);
        }
        names.push(name);
    }

    let mut tera = Tera::default();
    tera.autoescape_on(vec![]);
    // Add one at a time first so a syntax error names its own template; then all
    // together so `extends` chains are resolved.
    for (name, text) in &sources {
        Tera::default()
            .add_raw_template(name, text)
            .map_err(|e| syntax_error(name, &e))?;
    }
    tera.add_raw_templates(sources.iter().map(|(n, t)| (n.as_str(), t.as_str())))
        .map_err(|e| RecipeError::TemplateSyntax {
            template: names[0].clone(),
            line: 1,
            col: 1,
            message: error_chain(&e),
        })?;
    let context = tera::Context::from_serialize(ctx).expect("the context struct serializes");

    let render_one = |name: &str| -> Result<Vec<u8>, RecipeError> {
        tera.render(name, &context)
            .map(String::into_bytes)
            .map_err(|e| RecipeError::TemplateRender {
                template: name.to_string(),
                message: render_message(&e),
            })
    };

    let mut out = vec![RenderedFile {
        bundle_path: PROVISION_SCRIPT.to_string(),
        dest: None,
        mode: "0755".to_string(),
        template: names[0].clone(),
        bytes: render_one(&names[0])?,
    }];
    for (r, name) in f.renders.iter().zip(&names[1..]) {
        out.push(RenderedFile {
            bundle_path: bundle_path_for(&r.dest),
            dest: Some(r.dest.clone()),
            mode: r.mode.clone(),
            template: name.clone(),
            bytes: render_one(name)?,
        });
    }
    Ok(out)
}

fn template_name(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn collect_templates(
    root: &Path,
    dir: &Path,
    out: &mut BTreeMap<String, String>,
) -> Result<(), RecipeError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        if path.is_dir() {
            collect_templates(root, &path, out)?;
        } else if path.extension().is_some_and(|x| x == "tera") {
            let text = std::fs::read_to_string(&path).map_err(|source| RecipeError::Read {
                path: path.clone(),
                source,
            })?;
            out.insert(template_name(root, &path), text);
        }
    }
    Ok(())
}

/// Tera's parse errors are several lines of pest output (` --> 3:5`, a caret
/// diagram, `= expected …`); an operator gets `template:line:col: expected …`.
fn syntax_error(name: &str, e: &tera::Error) -> RecipeError {
    let text = error_chain_raw(e);
    let (mut line, mut col) = (1, 1);
    let mut message = String::new();
    for l in text.lines() {
        let l = l.trim();
        if let Some(pos) = l.strip_prefix("--> ") {
            let mut it = pos.split(':');
            if let (Some(a), Some(b)) = (it.next(), it.next()) {
                line = a.trim().parse().unwrap_or(1);
                col = b.trim().parse().unwrap_or(1);
            }
        } else if let Some(m) = l.strip_prefix("= ") {
            message = m.to_string();
        }
    }
    if message.is_empty() {
        message = crate::config::one_line(&text);
    }
    RecipeError::TemplateSyntax {
        template: name.to_string(),
        line,
        col,
        message,
    }
}

fn error_chain_raw(e: &tera::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        parts.push(s.to_string());
        src = s.source();
    }
    parts.join("\n")
}

fn error_chain(e: &tera::Error) -> String {
    crate::config::one_line(&error_chain_raw(e))
}

/// The innermost cause says what is wrong ("Variable `x` not found in context");
/// the outer ones only repeat the template name.
fn render_message(e: &tera::Error) -> String {
    let mut last = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        last = s.to_string();
        src = s.source();
    }
    crate::config::one_line(&last)
}
