//! The installed-package list of a version: the `dpkg-query -W` output the
//! builder wrote at the end of provisioning.
//!
//! It is an output of the bake, not an input, so it is not part of the content
//! hash. The builder uploads it with curl to a presigned S3 PUT URL kiln signed
//! for [`key`] (SSM Run Command output is truncated and moto returns none, so the
//! command's output cannot carry it); the bake reads it back once and records
//! where it is and its sha256 ([`PackageList`]) in the version claim. The list
//! itself (tens of KB) stays in S3: a claim parameter holds at most 8 KB.

use serde::{Deserialize, Serialize};

use crate::aws::{Aws, AwsError};

/// Key prefix of package lists in the bake bucket.
pub const PREFIX: &str = "kiln/packages/";

/// The largest list read back; trusty with a JDK lists about 500 packages
/// (about 20 KB), so anything near this is not a `dpkg-query -W` output.
pub const MAX_BYTES: usize = 4 * 1024 * 1024;

/// Where a version's package list is: `kiln/packages/<image>/<hash>.txt`. One
/// object per content hash: a re-bake of the same content (after its image was
/// pruned, or after a failed attempt) replaces it, and the sha256 recorded with
/// each version tells whether the object is still the one that version shipped.
pub fn key(image: &str, hash: &str) -> String {
    format!("{PREFIX}{image}/{hash}.txt")
}

/// What a version claim records about its package list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageList {
    pub bucket: String,
    pub key: String,
    /// sha256 of the object's bytes as the bake read them.
    pub sha256: String,
    /// Number of packages (non-empty lines).
    pub count: usize,
}

impl PackageList {
    /// The record of `bytes` read from `bucket`/`key`.
    pub fn of(bucket: &str, key: &str, bytes: &[u8]) -> PackageList {
        PackageList {
            bucket: bucket.to_string(),
            key: key.to_string(),
            sha256: crate::recipe::hash::sha256_bytes(bytes),
            count: lines(bytes).len(),
        }
    }

    pub fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
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

/// A recorded list, read back for `kiln diff`: its lines when the object is
/// still there with the recorded sha256, otherwise why not.
pub async fn fetch(aws: &Aws, list: &PackageList) -> Result<Vec<String>, String> {
    match read(aws, &list.bucket, &list.key).await {
        Ok(Some(bytes)) => {
            let sha = crate::recipe::hash::sha256_bytes(&bytes);
            if sha == list.sha256 {
                Ok(lines(&bytes))
            } else {
                Err(format!(
                    "{} has sha256 {}, not the {} recorded at the bake (replaced since)",
                    list.location(),
                    &sha[..12],
                    &list.sha256[..list.sha256.len().min(12)]
                ))
            }
        }
        Ok(None) => Err(format!("{} is gone", list.location())),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_per_image_and_content_hash() {
        assert_eq!(
            key("web", &"ab".repeat(32)),
            format!("kiln/packages/web/{}.txt", "ab".repeat(32))
        );
    }

    #[test]
    fn record_counts_packages_and_hashes_the_bytes() {
        let bytes = b"curl\t7.35.0-1ubuntu2.20\n\nopenssl\t1.0.1f-1ubuntu2.27\r\n";
        let l = PackageList::of("b", "k", bytes);
        assert_eq!(l.count, 2);
        assert_eq!(l.sha256, crate::recipe::hash::sha256_bytes(bytes));
        assert_eq!(
            lines(bytes),
            ["curl\t7.35.0-1ubuntu2.20", "openssl\t1.0.1f-1ubuntu2.27"]
        );
        assert_eq!(l.location(), "s3://b/k");
    }
}
