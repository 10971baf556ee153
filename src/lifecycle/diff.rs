//! `kiln diff`: which inputs changed between two versions, from the manifests
//! the bake records with each version claim (`/kiln/images/<image>/versions/<n>`
//! in the home region; see [`crate::registry::claim::ClaimRecord`]).

use std::collections::BTreeMap;

use serde::Serialize;

/// One input that differs. `old`/`new` are `None` when it was added/removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// `recipe`, `base-ami`, `java`, `artifact`, `file`, `format`, `package`, …
    pub kind: String,
    /// The file's bundle path, the artifact's or package's name; empty for
    /// single-valued inputs.
    pub key: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

/// (kind, key) → value of one manifest line.
fn parse_line(line: &str) -> ((String, String), String) {
    let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
    match kind {
        // Keyed by name/path: `file <path> mode=… sha256=…`.
        "file" | "artifact" => {
            let (key, value) = rest.split_once(' ').unwrap_or((rest, ""));
            ((kind.to_string(), key.to_string()), value.to_string())
        }
        _ => ((kind.to_string(), String::new()), rest.to_string()),
    }
}

fn keyed<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    parse: impl Fn(&str) -> ((String, String), String),
) -> BTreeMap<(String, String), String> {
    lines
        .into_iter()
        .filter(|l| !l.trim().is_empty())
        .map(parse)
        .collect()
}

fn compare(
    a: &BTreeMap<(String, String), String>,
    b: &BTreeMap<(String, String), String>,
) -> Vec<Change> {
    let mut keys: Vec<&(String, String)> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| Change {
            kind: k.0.clone(),
            key: k.1.clone(),
            old: a.get(k).cloned(),
            new: b.get(k).cloned(),
        })
        .collect()
}

/// Pure: the inputs that differ between two manifests (their lines, as
/// `recipe::hash::Manifest` writes them). The `kiln-manifest` layout line is
/// left out: it changes how, not what, is hashed.
pub fn manifests(a: &[String], b: &[String]) -> Vec<Change> {
    let a = keyed(a.iter().map(String::as_str), parse_line);
    let b = keyed(b.iter().map(String::as_str), parse_line);
    compare(&a, &b)
        .into_iter()
        .filter(|c| c.kind != "kiln-manifest")
        .collect()
}

/// Pure: the package difference between two `dpkg-query -W` outputs
/// (`name<TAB>version` per line).
pub fn packages(a: &[String], b: &[String]) -> Vec<Change> {
    let parse = |l: &str| {
        let (name, version) = l.split_once('\t').unwrap_or((l, ""));
        (
            ("package".to_string(), name.trim().to_string()),
            version.trim().to_string(),
        )
    };
    compare(
        &keyed(a.iter().map(String::as_str), parse),
        &keyed(b.iter().map(String::as_str), parse),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(str::to_string).collect()
    }

    #[test]
    fn names_each_changed_added_and_removed_input() {
        let a = lines(
            "kiln-manifest 1\nformat 1\nimage web\nrecipe sha256=aa\nbase-ami ami-1\n\
             java 1.8.0_412 apt openjdk=8u412\nartifact app sha256=11 dest=/opt/a mode=0644\n\
             file provision.sh mode=0755 sha256=p1\nfile files/etc/web.conf mode=0644 sha256=c1",
        );
        let b = lines(
            "kiln-manifest 1\nformat 1\nimage web\nrecipe sha256=aa\nbase-ami ami-2\n\
             java 1.8.0_412 apt openjdk=8u412\nartifact app sha256=22 dest=/opt/a mode=0644\n\
             file provision.sh mode=0755 sha256=p2\nfile files/etc/new.conf mode=0644 sha256=n1",
        );
        let c = manifests(&a, &b);
        let summary: Vec<(String, String, bool, bool)> = c
            .iter()
            .map(|c| {
                (
                    c.kind.clone(),
                    c.key.clone(),
                    c.old.is_some(),
                    c.new.is_some(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("artifact".into(), "app".into(), true, true),
                ("base-ami".into(), "".into(), true, true),
                ("file".into(), "files/etc/new.conf".into(), false, true),
                ("file".into(), "files/etc/web.conf".into(), true, false),
                ("file".into(), "provision.sh".into(), true, true),
            ]
        );
        assert!(manifests(&a, &a).is_empty());
    }

    #[test]
    fn package_lists_diff_by_name() {
        let a = lines("curl\t7.35.0-1ubuntu2.20\nopenssl\t1.0.1f-1ubuntu2.27\nvim\t2:7.4");
        let b = lines("curl\t7.35.0-1ubuntu2.21\nopenssl\t1.0.1f-1ubuntu2.27\njq\t1.3-1.1");
        let c = packages(&a, &b);
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].key, "curl");
        assert_eq!(c[1].key, "jq");
        assert_eq!(c[1].old, None);
        assert_eq!(c[2].key, "vim");
        assert_eq!(c[2].new, None);
    }
}
