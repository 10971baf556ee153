//! The installed-package list of a version: the `dpkg-query -W` output the
//! builder wrote at the end of provisioning.
//!
//! It is an output of the bake, not an input, so it is not part of the content
//! hash. The builder uploads it with curl to a presigned S3 PUT URL kiln signed
//! for [`key`] (SSM Run Command output is truncated and moto returns none, so the
//! command's output cannot carry it). The bake does not read it back: it costs a
//! full bake no call. The version claim records where it is ([`PackageList`]);
//! `kiln diff` reads it. The list itself (tens of KB) stays in S3: a claim
//! parameter holds at most 8 KB.
//!
//! The key is one per bake run, and the URL is signed with `If-None-Match: *`,
//! so S3 accepts one upload to it and refuses any later one: what `kiln diff`
//! reads is what that run's builder wrote.

use serde::{Deserialize, Serialize};

use crate::aws::{Aws, AwsError};

/// Key prefix of package lists in the bake bucket.
pub const PREFIX: &str = "kiln/packages/";

/// The largest list read back; trusty with a JDK lists about 500 packages
/// (about 20 KB), so anything near this is not a `dpkg-query -W` output.
pub const MAX_BYTES: usize = 4 * 1024 * 1024;

/// Where a bake run's package list goes:
/// `kiln/packages/<image>/<hash>/<run id>.txt`. One object per run, not per
/// content hash: a re-bake of the same content (after a failed attempt, or
/// after its image was pruned) installs from the same recipe but may get newer
/// packages from the archive, and must not replace the list an earlier version
/// recorded.
pub fn key(image: &str, hash: &str, run_id: &str) -> String {
    format!("{PREFIX}{image}/{hash}/{run_id}.txt")
}

/// What a version claim records about its package list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageList {
    pub bucket: String,
    pub key: String,
    /// sha256 of the object's bytes, for lists recorded by kiln versions that
    /// read the list back at bake time (keys per content hash, which a re-bake
    /// could replace). Checked by [`fetch`] when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Number of packages, recorded alongside `sha256` by those versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
}

impl PackageList {
    /// Where the builder of a bake run was told to upload its list.
    pub fn at(bucket: &str, key: &str) -> PackageList {
        PackageList {
            bucket: bucket.to_string(),
            key: key.to_string(),
            sha256: None,
            count: None,
        }
    }

    pub fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }

    /// Pure: the list's lines from the object's `bytes`, or why they are not
    /// the ones recorded (an older record's sha256 no longer matches).
    pub fn check(&self, bytes: &[u8]) -> Result<Vec<String>, String> {
        if let Some(recorded) = &self.sha256 {
            let sha = crate::recipe::hash::sha256_bytes(bytes);
            if &sha != recorded {
                return Err(format!(
                    "{} has sha256 {}, not the {} recorded at the bake (replaced since)",
                    self.location(),
                    &sha[..12],
                    &recorded[..recorded.len().min(12)]
                ));
            }
        }
        Ok(lines(bytes))
    }
}

/// The list's lines (`name<TAB>version`), blank lines dropped.
pub fn lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// Reads an object: `Ok(None)` when it does not exist (the builder uploaded
/// nothing: an older kiln, a provision script that writes no list, no network
/// path to S3, or moto, whose instances run nothing).
pub async fn read(aws: &Aws, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, AwsError> {
    let region = aws.region().to_string();
    let out = match aws.s3().get_object().bucket(bucket).key(key).send().await {
        Ok(o) => o,
        Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
        Err(e) => return Err(AwsError::call("s3", "GetObject", &region, e)),
    };
    if out
        .content_length()
        .is_some_and(|n| n < 0 || n as usize > MAX_BYTES)
    {
        return Err(AwsError::Call {
            service: "s3",
            operation: "GetObject",
            region,
            code: None,
            message: format!(
                "s3://{bucket}/{key} is {} bytes, more than a package list ({MAX_BYTES} at most)",
                out.content_length().unwrap_or_default()
            ),
        });
    }
    let bytes = out.body.collect().await.map_err(|e| AwsError::Call {
        service: "s3",
        operation: "GetObject",
        region: region.clone(),
        code: None,
        message: format!("reading s3://{bucket}/{key}: {e}"),
    })?;
    Ok(Some(bytes.into_bytes().to_vec()))
}

/// A recorded list, read back for `kiln diff`: its lines, or why not.
pub async fn fetch(aws: &Aws, list: &PackageList) -> Result<Vec<String>, String> {
    match read(aws, &list.bucket, &list.key).await {
        Ok(Some(bytes)) => list.check(&bytes),
        Ok(None) => Err(format!(
            "{} does not exist: the builder did not upload it (its provision.sh wrote no \
             list, or it could not reach S3; the bake's provisioning output says which) \
             or it was deleted",
            list.location()
        )),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_per_image_content_hash_and_run() {
        assert_eq!(
            key("web", &"ab".repeat(32), "r1"),
            format!("kiln/packages/web/{}/r1.txt", "ab".repeat(32))
        );
        assert_ne!(key("web", "h", "r1"), key("web", "h", "r2"));
    }

    #[test]
    fn lines_drop_blanks_and_carriage_returns() {
        let bytes = b"curl\t7.35.0-1ubuntu2.20\n\nopenssl\t1.0.1f-1ubuntu2.27\r\n";
        assert_eq!(
            PackageList::at("b", "k").check(bytes).unwrap(),
            ["curl\t7.35.0-1ubuntu2.20", "openssl\t1.0.1f-1ubuntu2.27"]
        );
        assert_eq!(PackageList::at("b", "k").location(), "s3://b/k");
    }

    /// A record is only where the list is; one written by an older kiln
    /// (with the sha256 it read back) still parses, and a list replaced since
    /// is refused rather than compared.
    #[test]
    fn records_old_and_new_parse_and_old_ones_are_verified() {
        let new = serde_json::to_string(&PackageList::at("b", "k")).unwrap();
        assert_eq!(new, r#"{"bucket":"b","key":"k"}"#);
        let bytes = b"curl\t1\n";
        let old: PackageList = serde_json::from_str(&format!(
            r#"{{"bucket":"b","key":"k","sha256":"{}","count":1}}"#,
            crate::recipe::hash::sha256_bytes(bytes)
        ))
        .unwrap();
        assert_eq!(old.check(bytes).unwrap(), ["curl\t1"]);
        let err = old.check(b"curl\t2\n").unwrap_err();
        assert!(
            err.contains("s3://b/k") && err.contains("replaced since"),
            "{err}"
        );
    }
}
