//! Image references (`web@7`, `web@latest`, `web@previous`, `web@sha256:<prefix>`,
//! `ami-…`) and choosing the version one names. Parsing and choosing are pure, so
//! every rule here is unit-tested without AWS.

use super::{ImageVersion, RegistryError};

/// What an operator wrote to name one baked version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// `web@7`
    Version { image: String, version: u64 },
    /// `web@latest` (also plain `web`): the newest ready version.
    Latest { image: String },
    /// `web@previous`: the ready version before the latest one.
    Previous { image: String },
    /// `web@sha256:<prefix>`: a content hash, or an unambiguous prefix of 4+ digits.
    Hash { image: String, prefix: String },
    /// `ami-…`: one AMI id (kiln reads its tags to know the image and version).
    Ami(String),
    /// `web@prod`: whatever AMI the channel parameter points at in the region
    /// (`kiln promote web@7 --channel prod`).
    Channel { image: String, channel: String },
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageRef::Version { image, version } => write!(f, "{image}@{version}"),
            ImageRef::Latest { image } => write!(f, "{image}@latest"),
            ImageRef::Previous { image } => write!(f, "{image}@previous"),
            ImageRef::Hash { image, prefix } => write!(f, "{image}@sha256:{prefix}"),
            ImageRef::Ami(id) => f.write_str(id),
            ImageRef::Channel { image, channel } => write!(f, "{image}@{channel}"),
        }
    }
}

impl ImageRef {
    /// The image name the ref is about, when it says (an AMI id does not).
    pub fn image(&self) -> Option<&str> {
        match self {
            ImageRef::Version { image, .. }
            | ImageRef::Latest { image }
            | ImageRef::Previous { image }
            | ImageRef::Hash { image, .. }
            | ImageRef::Channel { image, .. } => Some(image),
            ImageRef::Ami(_) => None,
        }
    }
}

const MIN_HASH_PREFIX: usize = 4;

fn bad(input: &str, why: &str) -> RegistryError {
    RegistryError::BadRef {
        input: input.to_string(),
        why: why.to_string(),
    }
}

fn valid_image_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Whether `name` may name a promotion channel: it starts with a letter (so it
/// is never a version number), uses letters, digits, '-' and '_', and is not one
/// of the words a ref already gives a meaning to.
pub fn valid_channel_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let starts_with_letter = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    if name.is_empty() || name.len() > 64 || !ok_chars || !starts_with_letter {
        return Err(format!(
            "channel {name:?}: use 1 to 64 letters, digits, '-' and '_', starting with a letter"
        ));
    }
    if matches!(name, "latest" | "previous" | "sha256") {
        return Err(format!(
            "channel {name:?}: {name} already means something in a ref (web@{name})"
        ));
    }
    Ok(())
}

/// Parses a ref. An image name alone means `@latest`.
pub fn parse_ref(input: &str) -> Result<ImageRef, RegistryError> {
    let s = input.trim();
    if s.starts_with("ami-") {
        if crate::recipe::is_ami_id(s) {
            return Ok(ImageRef::Ami(s.to_string()));
        }
        return Err(bad(
            input,
            "an AMI id is ami- followed by 8 or 17 hex digits",
        ));
    }
    let (image, selector) = match s.split_once('@') {
        Some((i, sel)) => (i, Some(sel)),
        None => (s, None),
    };
    if !valid_image_name(image) {
        return Err(bad(
            input,
            "the image name before @ uses letters, digits, '-' and '_'",
        ));
    }
    let image = image.to_string();
    match selector {
        None | Some("latest") => Ok(ImageRef::Latest { image }),
        Some("previous") => Ok(ImageRef::Previous { image }),
        Some(sel) if sel.starts_with("sha256:") => {
            let prefix = sel["sha256:".len()..].to_ascii_lowercase();
            if prefix.len() < MIN_HASH_PREFIX
                || prefix.len() > 64
                || !prefix.chars().all(|c| c.is_ascii_hexdigit())
            {
                return Err(bad(
                    input,
                    "sha256: takes 4 to 64 hex digits of the content hash",
                ));
            }
            Ok(ImageRef::Hash { image, prefix })
        }
        Some(sel) if sel.bytes().all(|b| b.is_ascii_digit()) && !sel.is_empty() => {
            match sel.parse::<u64>() {
                Ok(version) if version > 0 => Ok(ImageRef::Version { image, version }),
                _ => Err(bad(input, "versions are numbered from 1")),
            }
        }
        Some(sel) => match valid_channel_name(sel) {
            Ok(()) => Ok(ImageRef::Channel {
                image,
                channel: sel.to_string(),
            }),
            Err(_) => Err(bad(
                input,
                "after @ write a version number (7), latest, previous, sha256:<prefix> \
                 or a channel name (letters, digits, '-' and '_', starting with a letter)",
            )),
        },
    }
}

/// Chooses the version a ref names among the versions of its image (any order).
///
/// `latest` and `previous` count only versions that are ready (boot-tested, or
/// baked with the test skipped) and available in the home region; an explicit
/// version or hash may name any version, so an operator can still reach an
/// untested one on purpose.
pub fn select<'a>(
    versions: &'a [ImageVersion],
    r: &ImageRef,
    region: &str,
) -> Result<&'a ImageVersion, RegistryError> {
    let not_found = |why: String| RegistryError::NotFound {
        reference: r.to_string(),
        region: region.to_string(),
        why,
    };
    let mut ready: Vec<&ImageVersion> = versions
        .iter()
        .filter(|v| {
            v.ami_in(region)
                .is_some_and(|a| a.ready && a.is_available())
        })
        .collect();
    ready.sort_by_key(|v| std::cmp::Reverse(v.version));
    match r {
        ImageRef::Latest { image } => ready.first().copied().ok_or_else(|| {
            not_found(format!(
                "no ready version of {image}; bake it with `kiln bake {image}`"
            ))
        }),
        ImageRef::Previous { image } => ready.get(1).copied().ok_or_else(|| {
            not_found(format!(
                "{image} has {} ready version(s), so there is no previous one",
                ready.len()
            ))
        }),
        ImageRef::Version { image, version } => versions
            .iter()
            .find(|v| v.version == *version && v.ami_in(region).is_some())
            .ok_or_else(|| {
                not_found(format!(
                    "{image} has no version {version} here; list them with `kiln images {image}`"
                ))
            }),
        ImageRef::Hash { image, prefix } => {
            let matches: Vec<&ImageVersion> = versions
                .iter()
                .filter(|v| v.hash.starts_with(prefix.as_str()) && v.ami_in(region).is_some())
                .collect();
            match matches.as_slice() {
                [one] => Ok(one),
                [] => Err(not_found(format!(
                    "no version of {image} has a content hash starting with {prefix}"
                ))),
                many => Err(RegistryError::Ambiguous {
                    reference: r.to_string(),
                    versions: many
                        .iter()
                        .map(|v| v.version.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
            }
        }
        ImageRef::Ami(id) => versions
            .iter()
            .find(|v| v.amis.values().any(|a| &a.id == id))
            .ok_or_else(|| not_found(format!("{id} is not an AMI kiln baked in this account"))),
        // The channel's AMI id lives in Parameter Store; `resolve_ref` reads it
        // and selects by that id.
        ImageRef::Channel { image, channel } => Err(not_found(format!(
            "channel {channel} of {image} is read from SSM; resolve it with registry::resolve_ref"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Ami;

    fn version(v: u64, hash: &str, ready: bool, state: &str) -> ImageVersion {
        let ami = Ami {
            region: "us-east-1".into(),
            id: format!("ami-{:017x}", v),
            name: format!("kiln-web-{v}"),
            state: state.into(),
            image: "web".into(),
            version: Some(v),
            hash: hash.into(),
            base_ami: "ami-0f6b3c9d25e4a5c33".into(),
            java: "1.8.0_422".into(),
            ready,
            created: format!("2024-01-0{v}T00:00:00.000Z"),
            snapshots: vec![],
            run_id: String::new(),
        };
        ImageVersion::from_amis(vec![ami]).remove(0)
    }

    fn fleet() -> Vec<ImageVersion> {
        vec![
            version(3, "cc33", true, "available"),
            version(1, "aaaa11", true, "available"),
            version(5, "ee55", false, "available"), // never passed its boot test
            version(4, "dd44", true, "pending"),    // still copying
            version(2, "aaaa22", true, "available"),
        ]
    }

    #[test]
    fn parses_every_form() {
        let web = || "web".to_string();
        assert_eq!(
            parse_ref("web@7").unwrap(),
            ImageRef::Version {
                image: web(),
                version: 7
            }
        );
        assert_eq!(
            parse_ref("web@latest").unwrap(),
            ImageRef::Latest { image: web() }
        );
        assert_eq!(parse_ref("web").unwrap(), ImageRef::Latest { image: web() });
        assert_eq!(
            parse_ref("web@previous").unwrap(),
            ImageRef::Previous { image: web() }
        );
        assert_eq!(
            parse_ref("web@sha256:ABCDef12").unwrap(),
            ImageRef::Hash {
                image: web(),
                prefix: "abcdef12".into()
            }
        );
        assert_eq!(
            parse_ref("ami-0123456789abcdef0").unwrap(),
            ImageRef::Ami("ami-0123456789abcdef0".into())
        );
    }

    #[test]
    fn rejects_malformed_refs_with_the_fix() {
        for bad in [
            "web@0",
            "web@-1",
            "web@7x",
            "web@1prod",
            "web@pro d",
            "web@sha256",
            "web@sha256:ab",
            "web@sha256:xyz1",
            "ami-12",
            "we b@1",
            "@1",
            "web@",
        ] {
            let err = parse_ref(bad).unwrap_err();
            assert!(matches!(err, RegistryError::BadRef { .. }), "{bad}: {err}");
            assert!(err.is_input());
            assert!(!err.to_string().contains('\n'));
        }
    }

    #[test]
    fn a_name_after_at_is_a_channel() {
        assert_eq!(
            parse_ref("web@prod").unwrap(),
            ImageRef::Channel {
                image: "web".into(),
                channel: "prod".into()
            }
        );
        assert_eq!(
            parse_ref("web@canary-2").unwrap().to_string(),
            "web@canary-2"
        );
        assert!(valid_channel_name("latest").is_err());
        assert!(valid_channel_name("7").is_err());
        assert!(valid_channel_name("prod").is_ok());
    }

    #[test]
    fn latest_and_previous_skip_untested_and_pending_versions() {
        let f = fleet();
        let r = |s| select(&f, &parse_ref(s).unwrap(), "us-east-1").map(|v| v.version);
        assert_eq!(r("web@latest").unwrap(), 3);
        assert_eq!(r("web@previous").unwrap(), 2);
        assert_eq!(
            r("web@5").unwrap(),
            5,
            "an explicit version may name an untested one"
        );
        assert!(
            parse_ref("web@sha256:cc3").is_err(),
            "a prefix under 4 digits is a parse error"
        );
        assert_eq!(r("web@sha256:cc33").unwrap(), 3);
        assert!(r("web@9")
            .unwrap_err()
            .to_string()
            .contains("kiln images web"));
        assert_eq!(r("ami-00000000000000003").unwrap(), 3);
    }

    #[test]
    fn ambiguous_hash_prefix_lists_the_candidates() {
        let f = fleet();
        let err = select(&f, &parse_ref("web@sha256:aaaa").unwrap(), "us-east-1").unwrap_err();
        assert!(matches!(err, RegistryError::Ambiguous { .. }), "{err}");
        assert!(
            err.to_string().contains("1, 2") || err.to_string().contains("2, 1"),
            "{err}"
        );
        assert!(select(&f, &parse_ref("web@sha256:aaaa2").unwrap(), "us-east-1").is_ok());
    }

    #[test]
    fn previous_needs_two_ready_versions() {
        let f = vec![version(1, "aa11", true, "available")];
        let err = select(&f, &parse_ref("web@previous").unwrap(), "us-east-1").unwrap_err();
        assert!(err.to_string().contains("1 ready version"), "{err}");
        let err = select(&f, &parse_ref("web@latest").unwrap(), "eu-west-1").unwrap_err();
        assert!(err.to_string().contains("eu-west-1"), "{err}");
    }
}
