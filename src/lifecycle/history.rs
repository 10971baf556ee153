//! The seam between prune and the rollout history.
//!
//! Prune must keep every image an ASG could be reverted to. The rollout journal
//! (one SSM-backed history per ASG under [`ROOT`], issue 3) is being written
//! alongside this; until it lands with a typed reader and a revert window, this
//! module reads every parameter under [`ROOT`] and counts any `ami-…` string in
//! any value as protected, whatever the JSON around it looks like. For a
//! deletion guard that is the right failure mode: a shape change in the journal
//! can only make prune keep more, never delete an image a revert needs.
//!
//! When the journal's reader exists, [`images_in_rollout_history`] is the one
//! function to replace (keeping its signature), narrowing it to the entries
//! inside the revert window.

use std::collections::BTreeMap;

use crate::aws::{Aws, AwsError};

/// Where the rollout journal and history live in Parameter Store.
pub const ROOT: &str = "/kiln/rollout";

/// AMI id → the history parameters that mention it, in `aws`'s region.
/// No parameters (no rollout has run here yet) is an empty map, not an error.
pub async fn images_in_rollout_history(
    aws: &Aws,
) -> Result<BTreeMap<String, Vec<String>>, AwsError> {
    let region = aws.region();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut pages = aws
        .ssm()
        .get_parameters_by_path()
        .path(ROOT)
        .recursive(true)
        // A SecureString journal entry must be read as text, not ciphertext.
        .with_decryption(true)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| AwsError::call("ssm", "GetParametersByPath", region, e))?;
        for p in page.parameters() {
            let name = p.name().unwrap_or_default();
            for ami in ami_ids_in(p.value().unwrap_or_default()) {
                let names = out.entry(ami).or_default();
                if !names.iter().any(|n| n == name) {
                    names.push(name.to_string());
                }
            }
        }
    }
    Ok(out)
}

/// Every `ami-` followed by 8 or 17 hex digits in `text`, wherever it appears
/// (JSON value, key, nested object or plain text), in order, duplicates kept out.
pub fn ami_ids_in(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while let Some(pos) = text[i..].find("ami-") {
        let start = i + pos;
        let digits_start = start + 4;
        let mut end = digits_start;
        while end < bytes.len() && bytes[end].is_ascii_hexdigit() {
            end += 1;
        }
        let n = end - digits_start;
        // Not glued to a longer word on the left (e.g. "xami-…").
        let left_ok = start == 0 || !bytes[start - 1].is_ascii_alphanumeric();
        if left_ok && (n == 8 || n == 17) {
            let id = text[start..end].to_ascii_lowercase();
            if !out.contains(&id) {
                out.push(id);
            }
        }
        i = digits_start;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ami_ids_anywhere_in_any_shape() {
        let journal = r#"{"asg":"web-prod","history":[
            {"image":"ami-0123456789abcdef0","at":"2024"},
            {"from":{"ami":"ami-12345678"},"to":"ami-0123456789abcdef0"}],
            "note":"not ami-xyz nor ami-123 nor xami-12345678"}"#;
        assert_eq!(
            ami_ids_in(journal),
            vec!["ami-0123456789abcdef0", "ami-12345678"]
        );
        assert!(ami_ids_in("").is_empty());
        assert_eq!(ami_ids_in("ami-ABCDEF12"), vec!["ami-abcdef12"]);
    }
}
