use std::path::PathBuf;

/// Everything that can be wrong with a recipe, its templates or its local files.
/// All of these are the operator's input to fix (exit code 2), and all are found
/// before any AWS call.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("no image {name:?}: {path} does not exist ({available}); create it or check the name")]
    UnknownImage {
        name: String,
        path: PathBuf,
        available: String,
    },
    #[error("invalid image name {name:?}: use letters, digits, '-' and '_' (it names a folder under images/)")]
    BadImageName { name: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{col}: {message}; fix the recipe there (README.md, \"Recipe format\")")]
    Parse {
        path: PathBuf,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}: {field}: {value:?} leaves the project root {root}; keep recipe paths inside the project")]
    EscapesRoot {
        path: PathBuf,
        field: String,
        value: String,
        root: PathBuf,
    },
    #[error("{path}: {field}: template {template} not found; create it or fix the path (template paths are relative to the project root)")]
    MissingTemplate {
        path: PathBuf,
        field: String,
        template: String,
    },
    #[error("{path}: artifact {artifact:?}: file {file} not found; fix `path` (relative to the image folder) or add the file")]
    MissingArtifact {
        path: PathBuf,
        artifact: String,
        file: PathBuf,
    },
    #[error("{path}: artifact {artifact:?}: {file} has sha256 {actual}, but the recipe pins {expected}; update the pin if the new file is intended")]
    ArtifactMismatch {
        path: PathBuf,
        artifact: String,
        file: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("template {template}:{line}:{col}: syntax error: {message}")]
    TemplateSyntax {
        template: String,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("template {template}: {message}; use only the names of the template context (see README, \"Templates\") or declare a variable in [vars]")]
    TemplateRender { template: String, message: String },
    #[error("variable {name:?}: {message}")]
    Var { name: String, message: String },
}
