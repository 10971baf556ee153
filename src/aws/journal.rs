//! [`SsmJournal`]: the rollout journal and lock as SSM parameters.
//!
//! Why SSM parameters and not ASG tags: a tag value is capped at 256 characters
//! (the journal with its history is kilobytes), tags have no create-if-absent, and
//! they would show on every instance the group tags. SSM gives:
//!
//! * an atomic lock: `PutParameter` without overwrite fails with
//!   `ParameterAlreadyExists` for everyone but the first (also for the first when
//!   its answer was lost and the SDK retried it: reading the value back tells,
//!   see `SsmJournal::create`);
//! * values up to 4 KB (standard) or 8 KB (advanced): parameters are written with
//!   the `Intelligent-Tiering` tier so SSM moves a journal to advanced only when it
//!   outgrows 4 KB;
//! * a version number per write, for compare-and-swap saves;
//! * IAM scoping by path (`arn:aws:ssm:*:*:parameter/kiln/rollout/*`).
//!
//! Layout, per ASG:
//!
//! * `/kiln/rollout/<asg>/lock`: the [`Holder`] as JSON while a rollout runs;
//! * `/kiln/rollout/<asg>/journal`: the head, kept after the rollout ends (the
//!   journal carries the history `kiln rollback` reverts through). Its SSM version
//!   is the journal's [`Revision`]. It holds either
//!   - the [`Journal`] itself as compact JSON, when that fits in one parameter
//!     ([`MAX_VALUE`]): the common case, and the only format older kilns wrote; or
//!   - a [`ChunkedHead`] naming a generation, its chunk count, length and SHA-256,
//!     when it does not (a large group's batch in flight, a long history);
//! * `/kiln/rollout/<asg>/journal/<generation>/<n>`: chunk `n` of a chunked
//!   journal's JSON, at most [`CHUNK_MAX`] bytes (standard tier). Every save of a
//!   chunked journal writes a fresh generation and never rewrites one.
//!
//! A chunked save writes the chunks first, then the head (the commit point), then
//! deletes the generation the head named before. A crash (SIGKILL) between any two
//! of these calls leaves the head naming a complete generation, the old or the new
//! one: the old one is deleted only after the new head is written. A chunk
//! missing or a hash that does not match makes [`JournalStore::load`] read the head
//! again (a concurrent save replaced it) and otherwise fail loudly, never return a
//! mix. Chunks a crashed save left behind are swept by the next chunked save of a
//! later process (or after a failed save), once they are older than
//! [`SWEEP_AFTER`] so a concurrent writer's generation in progress is never taken.
//!
//! `kiln prune` treats any AMI id found under `/kiln/rollout/` as in use, which
//! keeps the images of the last rollouts from being deregistered. It reads every
//! parameter on its own, so chunks are cut only where no run of letters, digits
//! and dashes is split ([`split_chunks`]): each AMI id lies whole in one chunk.
//!
//! The compare-and-swap is read-version-then-overwrite, not atomic: SSM has no
//! conditional put. It is safe because only the lock holder writes the journal; the
//! version check catches a holder whose lock was taken over (`--take-over`) while it
//! was still running, at its next save.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_ssm::types::{ParameterTier, ParameterType};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Aws, AwsError};
use crate::rollout::engine::{JournalStore, Revision, Stored};
use crate::rollout::model::{Holder, Journal};
use crate::rollout::{Result, RolloutError};

/// SSM's limit for an advanced parameter's value: a journal up to this size is
/// stored in the head itself, as it always was.
pub const MAX_VALUE: usize = 8 * 1024;

/// SSM's limit for a standard parameter's value: the size of a chunk at most.
pub const CHUNK_MAX: usize = 4 * 1024;

/// A journal larger than this is refused rather than spread over more than 256
/// parameters: no real rollout comes near (a 1000-instance group at 25% surge
/// with a full history is about 30 KB).
pub const MAX_JOURNAL: usize = 1024 * 1024;

/// Names per `GetParameters` / `DeleteParameters` call (SSM's limit).
const BATCH: usize = 10;

/// Chunks of other generations older than this (by SSM's clock, against the
/// chunks just written) are left over from a crashed save and swept. Long enough
/// that a concurrent writer's generation in progress is never swept under it.
pub const SWEEP_AFTER: Duration = Duration::from_secs(10 * 60);

/// Times [`JournalStore::load`] reads the head again when a concurrent save
/// replaced the generation it was reading.
const LOAD_ATTEMPTS: usize = 3;

/// The head of a journal too large for one parameter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkedHead {
    pub chunked: ChunkRef,
    /// Who saved it, so a compare-and-swap that fails can name the holder without
    /// reading the chunks.
    pub holder: Holder,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub generation: String,
    pub chunks: usize,
    /// Length of the journal's JSON in bytes.
    pub bytes: usize,
    /// SHA-256 of the journal's JSON, hex.
    pub sha256: String,
}

/// Tells a chunked head from an inline journal (which has no `chunked` key)
/// without parsing the journal twice.
#[derive(Deserialize)]
struct Probe {
    chunked: Option<ChunkRef>,
}

/// What a head parameter holds.
enum Head {
    Inline(String),
    Chunked(ChunkedHead),
}

fn parse_head(asg: &str, name: &str, value: String) -> Result<Head> {
    // A head is small JSON; an inline journal is at most MAX_VALUE bytes.
    match serde_json::from_str::<Probe>(&value) {
        Ok(Probe { chunked: Some(_) }) => serde_json::from_str::<ChunkedHead>(&value)
            .map(Head::Chunked)
            .map_err(|e| jerr(asg, format!("{name} is not a kiln journal head: {e}"))),
        _ => Ok(Head::Inline(value)),
    }
}

pub struct SsmJournal {
    aws: Aws,
    ssm: aws_sdk_ssm::Client,
    /// ASGs whose chunk generations this process knows to be clean (swept, and
    /// no save failed since): their chunked saves skip the sweep's listing.
    swept: Mutex<HashSet<String>>,
    sweep_after: Duration,
}

pub fn prefix(asg: &str) -> String {
    format!("/kiln/rollout/{asg}")
}

fn lock_name(asg: &str) -> String {
    format!("{}/lock", prefix(asg))
}

pub fn journal_name(asg: &str) -> String {
    format!("{}/journal", prefix(asg))
}

/// `/kiln/rollout/<asg>/journal/<generation>/<n>`.
pub fn chunk_name(asg: &str, generation: &str, n: usize) -> String {
    format!("{}/{generation}/{n}", journal_name(asg))
}

fn jerr(asg: &str, message: impl Into<String>) -> RolloutError {
    RolloutError::Journal {
        asg: asg.to_string(),
        message: message.into(),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A name no other save uses: a hash of the body, this process and the time.
fn new_generation(body: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut h = Sha256::new();
    h.update(body.as_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(nanos.to_le_bytes());
    h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    hex::encode(&h.finalize()[..8])
}

/// Letters, digits and dashes: the characters of AMI ids, instance ids, names.
fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-'
}

/// Splits `text` into pieces of at most `max` bytes, never inside a UTF-8
/// character and never between two word characters ([`is_word`]), so that every
/// `ami-…` id lies whole in one piece and scanning the pieces one by one (as
/// `kiln prune` does) finds exactly the ids scanning the whole text finds. Only a
/// run of word characters longer than `max` (no journal has one) is cut inside.
pub fn split_chunks(text: &str, max: usize) -> Vec<&str> {
    assert!(max >= 4, "chunks hold at least one character");
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let limit = (start + max).min(text.len());
        if limit == text.len() {
            out.push(&text[start..]);
            break;
        }
        let safe =
            |p: usize| text.is_char_boundary(p) && !(is_word(bytes[p - 1]) && is_word(bytes[p]));
        let cut = (start + 1..=limit)
            .rev()
            .find(|&p| safe(p))
            .unwrap_or_else(|| {
                (start + 1..=limit)
                    .rev()
                    .find(|&p| text.is_char_boundary(p))
                    .expect("a UTF-8 character is at most 4 bytes")
            });
        out.push(&text[start..cut]);
        start = cut;
    }
    out
}

impl SsmJournal {
    pub fn new(aws: &Aws) -> SsmJournal {
        SsmJournal {
            aws: aws.clone(),
            ssm: aws.ssm(),
            swept: Mutex::new(HashSet::new()),
            sweep_after: SWEEP_AFTER,
        }
    }

    /// Sweep leftover chunks older than `age` instead of [`SWEEP_AFTER`] (tests).
    pub fn with_sweep_after(mut self, age: Duration) -> SsmJournal {
        self.sweep_after = age;
        self
    }

    fn mark_dirty(&self, asg: &str) {
        self.swept.lock().unwrap().remove(asg);
    }

    /// The parameter's value and version; `None` if it does not exist.
    async fn get(&self, asg: &str, name: &str) -> Result<Option<(String, i64)>> {
        match self.ssm.get_parameter().name(name).send().await {
            Ok(out) => {
                let p = out
                    .parameter()
                    .ok_or_else(|| jerr(asg, format!("GetParameter {name}: empty answer")))?;
                Ok(Some((
                    p.value().unwrap_or_default().to_string(),
                    p.version(),
                )))
            }
            Err(e) => {
                let e = AwsError::call("ssm", "GetParameter", self.aws.region(), e);
                if e.code() == Some("ParameterNotFound") {
                    Ok(None)
                } else {
                    Err(jerr(asg, e.to_string()))
                }
            }
        }
    }

    /// PutParameter; `Ok(None)` when `overwrite` is false and it already exists.
    async fn put(
        &self,
        asg: &str,
        name: &str,
        value: &str,
        overwrite: bool,
    ) -> Result<Option<i64>> {
        self.put_tier(
            asg,
            name,
            value,
            overwrite,
            ParameterTier::IntelligentTiering,
        )
        .await
    }

    async fn put_tier(
        &self,
        asg: &str,
        name: &str,
        value: &str,
        overwrite: bool,
        tier: ParameterTier,
    ) -> Result<Option<i64>> {
        if value.len() > MAX_VALUE {
            return Err(jerr(
                asg,
                format!(
                    "{name}: {} bytes is over SSM's {MAX_VALUE}-byte limit for a parameter",
                    value.len()
                ),
            ));
        }
        let r = self
            .ssm
            .put_parameter()
            .name(name)
            .value(value)
            .r#type(ParameterType::String)
            .tier(tier)
            .overwrite(overwrite)
            .send()
            .await;
        match r {
            Ok(out) => Ok(Some(out.version())),
            Err(e) => {
                let e = AwsError::call("ssm", "PutParameter", self.aws.region(), e);
                if !overwrite && e.code() == Some("ParameterAlreadyExists") {
                    Ok(None)
                } else {
                    Err(jerr(asg, e.to_string()))
                }
            }
        }
    }

    /// Creates `name` holding `value` unless it exists. `Some(version)` when it now
    /// holds exactly `value`: created by this call, or by an attempt of it whose
    /// answer was lost and which the SDK retried into `ParameterAlreadyExists`.
    /// `None` when it holds something else. Only for values no one else writes: a
    /// lock holder (host, pid, start time) or a journal (rollout id, holder).
    async fn create(&self, asg: &str, name: &str, value: &str) -> Result<Option<i64>> {
        if let Some(version) = self.put(asg, name, value, false).await? {
            return Ok(Some(version));
        }
        Ok(match self.get(asg, name).await? {
            Some((stored, version)) if stored == value => Some(version),
            _ => None,
        })
    }

    /// The chunks of `head`, joined; `None` if one is missing (a concurrent save
    /// deleted the generation) or the whole does not match the head's hash.
    async fn read_chunks(&self, asg: &str, head: &ChunkRef) -> Result<Option<String>> {
        let names: Vec<String> = (0..head.chunks)
            .map(|n| chunk_name(asg, &head.generation, n))
            .collect();
        let mut parts: Vec<Option<String>> = vec![None; head.chunks];
        for batch in names.chunks(BATCH) {
            let out = self
                .ssm
                .get_parameters()
                .set_names(Some(batch.to_vec()))
                .send()
                .await
                .map_err(|e| {
                    let e = AwsError::call("ssm", "GetParameters", self.aws.region(), e);
                    jerr(asg, e.to_string())
                })?;
            for p in out.parameters() {
                let Some(i) = p
                    .name()
                    .and_then(|name| names.iter().position(|n| n == name))
                else {
                    continue;
                };
                parts[i] = Some(p.value().unwrap_or_default().to_string());
            }
        }
        let Some(parts) = parts.into_iter().collect::<Option<Vec<String>>>() else {
            return Ok(None);
        };
        let body = parts.concat();
        if body.len() != head.bytes || sha256_hex(body.as_bytes()) != head.sha256 {
            return Ok(None);
        }
        Ok(Some(body))
    }

    /// DeleteParameters by batches of ten. Best effort: a chunk left behind costs
    /// nothing but a parameter, and the sweep takes it later. True if all went.
    async fn delete_all(&self, asg: &str, names: &[String]) -> bool {
        let mut all = true;
        for batch in names.chunks(BATCH) {
            if let Err(e) = self
                .ssm
                .delete_parameters()
                .set_names(Some(batch.to_vec()))
                .send()
                .await
            {
                let e = AwsError::call("ssm", "DeleteParameters", self.aws.region(), e);
                tracing::warn!(asg, error = %e, "could not delete old journal chunks");
                self.mark_dirty(asg);
                all = false;
            }
        }
        all
    }

    fn generation_names(asg: &str, head: &ChunkRef) -> Vec<String> {
        (0..head.chunks)
            .map(|n| chunk_name(asg, &head.generation, n))
            .collect()
    }

    /// Deletes chunks under the journal of generations other than `keep` whose
    /// last change is [`Self::sweep_after`] older than `keep`'s: what crashed
    /// saves left. Best effort; true when no other generation is left.
    async fn sweep(&self, asg: &str, keep: &str) -> bool {
        let root = format!("{}/", journal_name(asg));
        let mut found: Vec<(String, String, Option<aws_smithy_types::DateTime>)> = Vec::new();
        let mut pages = self
            .ssm
            .get_parameters_by_path()
            .path(journal_name(asg))
            .recursive(true)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = match page {
                Ok(page) => page,
                Err(e) => {
                    let e = AwsError::call("ssm", "GetParametersByPath", self.aws.region(), e);
                    tracing::warn!(asg, error = %e, "could not list journal chunks");
                    return false;
                }
            };
            for p in page.parameters() {
                let name = p.name().unwrap_or_default();
                let Some(generation) = name
                    .strip_prefix(&root)
                    .and_then(|rest| rest.split('/').next())
                else {
                    continue;
                };
                found.push((
                    name.to_string(),
                    generation.to_string(),
                    p.last_modified_date().cloned(),
                ));
            }
        }
        let newest_kept = found
            .iter()
            .filter(|(_, g, _)| g == keep)
            .filter_map(|(_, _, t)| t.map(|t| t.as_secs_f64()))
            .fold(None, |a: Option<f64>, t| Some(a.map_or(t, |a| a.max(t))));
        let Some(reference) = newest_kept else {
            return false;
        };
        let cutoff = reference - self.sweep_after.as_secs_f64();
        let others = found.iter().filter(|(_, g, _)| g != keep).count();
        let stale: Vec<String> = found
            .into_iter()
            .filter(|(_, g, t)| g != keep && t.is_some_and(|t| t.as_secs_f64() <= cutoff))
            .map(|(name, _, _)| name)
            .collect();
        // Younger ones (a failed delete, a concurrent writer): look again next time.
        let all_stale = stale.len() == others;
        if !stale.is_empty() {
            tracing::info!(
                asg,
                chunks = stale.len(),
                "sweeping journal chunks of crashed saves"
            );
            return self.delete_all(asg, &stale).await && all_stale;
        }
        all_stale
    }

    /// Writes `value` as chunks of a new generation; the head to commit them.
    async fn write_chunks(&self, asg: &str, journal: &Journal, value: &str) -> Result<ChunkedHead> {
        if value.len() > MAX_JOURNAL {
            return Err(jerr(
                asg,
                format!(
                    "the journal is {} bytes, over kiln's {MAX_JOURNAL}-byte limit",
                    value.len()
                ),
            ));
        }
        let generation = new_generation(value);
        let chunks = split_chunks(value, CHUNK_MAX);
        for (n, chunk) in chunks.iter().enumerate() {
            let name = chunk_name(asg, &generation, n);
            self.put_tier(asg, &name, chunk, true, ParameterTier::Standard)
                .await?;
        }
        Ok(ChunkedHead {
            chunked: ChunkRef {
                generation,
                chunks: chunks.len(),
                bytes: value.len(),
                sha256: sha256_hex(value.as_bytes()),
            },
            holder: journal.holder.clone(),
        })
    }

    async fn current_holder(&self, asg: &str) -> Result<Option<Holder>> {
        match self.get(asg, &lock_name(asg)).await? {
            None => Ok(None),
            Some((v, _)) => serde_json::from_str(&v)
                .map(Some)
                .map_err(|e| jerr(asg, format!("{}: not a lock holder: {e}", lock_name(asg)))),
        }
    }

    async fn save_inner(
        &self,
        asg: &str,
        journal: &Journal,
        expected: Option<&Revision>,
    ) -> Result<Revision> {
        let name = journal_name(asg);
        let json = serde_json::to_string(journal).expect("journals serialize");
        let lost = |holder: Option<String>| RolloutError::LockLost {
            asg: asg.to_string(),
            holder: holder.unwrap_or_else(|| "another kiln".to_string()),
        };
        // The generation the head names now: deleted once the new head is written.
        let mut previous: Option<ChunkRef> = None;
        if let Some(rev) = expected {
            let current = self.get(asg, &name).await?;
            let matches = current
                .as_ref()
                .is_some_and(|(_, v)| v.to_string() == rev.0);
            let head = match current {
                Some((value, _)) => Some(parse_head(asg, &name, value)?),
                None => None,
            };
            if !matches {
                let h = match head {
                    Some(Head::Inline(v)) => serde_json::from_str::<Journal>(&v)
                        .ok()
                        .map(|j| j.holder.to_string()),
                    Some(Head::Chunked(c)) => Some(c.holder.to_string()),
                    None => None,
                };
                return Err(lost(h));
            }
            if let Some(Head::Chunked(c)) = head {
                previous = Some(c.chunked);
            }
        }
        let mine = if json.len() > MAX_VALUE {
            Some(self.write_chunks(asg, journal, &json).await?)
        } else {
            None
        };
        let value = match &mine {
            Some(head) => serde_json::to_string(head).expect("heads serialize"),
            None => json,
        };
        let written = match expected {
            Some(_) => self.put(asg, &name, &value, true).await?,
            None => self.create(asg, &name, &value).await?,
        };
        let version = match written {
            Some(v) => v,
            None => {
                // Created meanwhile by another kiln: our chunks are garbage.
                if let Some(mine) = &mine {
                    self.delete_all(asg, &Self::generation_names(asg, &mine.chunked))
                        .await;
                }
                let h = self.current_holder(asg).await.ok().flatten();
                return Err(lost(h.map(|h| h.to_string())));
            }
        };
        // Committed. Clean up after it; nothing below can fail the save.
        if let Some(prev) = previous {
            self.delete_all(asg, &Self::generation_names(asg, &prev))
                .await;
        }
        if let Some(mine) = &mine {
            let clean = self.swept.lock().unwrap().contains(asg);
            if !clean && self.sweep(asg, &mine.chunked.generation).await {
                self.swept.lock().unwrap().insert(asg.to_string());
            }
        }
        Ok(Revision(version.to_string()))
    }
}

fn holder_json(h: &Holder) -> String {
    serde_json::to_string(h).expect("holders serialize")
}

impl JournalStore for SsmJournal {
    async fn load(&self, asg: &str) -> Result<Option<Stored>> {
        let name = journal_name(asg);
        let mut last_version = None;
        for _ in 0..LOAD_ATTEMPTS {
            let Some((value, version)) = self.get(asg, &name).await? else {
                return Ok(None);
            };
            if last_version == Some(version) {
                break; // The head did not move: the generation it names is damaged.
            }
            last_version = Some(version);
            let body = match parse_head(asg, &name, value)? {
                Head::Inline(body) => body,
                Head::Chunked(head) => match self.read_chunks(asg, &head.chunked).await? {
                    Some(body) => body,
                    // Replaced by a concurrent save and deleted: read the new head.
                    None => continue,
                },
            };
            let journal: Journal = serde_json::from_str(&body)
                .map_err(|e| jerr(asg, format!("{name} is not a kiln journal: {e}")))?;
            return Ok(Some(Stored {
                revision: Revision(version.to_string()),
                journal,
            }));
        }
        Err(jerr(
            asg,
            format!(
                "{name}: the chunks it names are missing or do not match its SHA-256 \
                 (changed or deleted by something other than kiln?)"
            ),
        ))
    }

    async fn save(
        &self,
        asg: &str,
        journal: &Journal,
        expected: Option<&Revision>,
    ) -> Result<Revision> {
        let r = self.save_inner(asg, journal, expected).await;
        if r.is_err() {
            // Chunks of this save may be left behind: sweep at the next one.
            self.mark_dirty(asg);
        }
        r
    }
    async fn acquire(&self, asg: &str, holder: &Holder, replace: Option<&Holder>) -> Result<()> {
        let name = lock_name(asg);
        let json = holder_json(holder);
        if self.put(asg, &name, &json, false).await?.is_some() {
            return Ok(());
        }
        let Some(current) = self.current_holder(asg).await? else {
            // Released between our attempt and the read: try once more.
            return match self.create(asg, &name, &json).await? {
                Some(_) => Ok(()),
                None => Err(jerr(
                    asg,
                    format!("{name}: the lock changed hands twice; try again"),
                )),
            };
        };
        // Ours: re-acquiring, or the SDK retried our create after its answer was lost.
        if &current == holder {
            return Ok(());
        }
        if replace != Some(&current) {
            return Err(RolloutError::Locked {
                asg: asg.to_string(),
                holder: current,
            });
        }
        self.put(asg, &name, &json, true).await?;
        // Two take-overs at once: the last write wins the lock; the loser sees it
        // here (and its journal saves would fail the version check anyway).
        match self.current_holder(asg).await? {
            Some(h) if &h == holder => Ok(()),
            Some(h) => Err(RolloutError::Locked {
                asg: asg.to_string(),
                holder: h,
            }),
            None => Err(jerr(
                asg,
                format!("{name}: the lock vanished during a take-over"),
            )),
        }
    }

    async fn release(&self, asg: &str, holder: &Holder) -> Result<()> {
        if self.current_holder(asg).await?.as_ref() != Some(holder) {
            return Ok(());
        }
        match self
            .ssm
            .delete_parameter()
            .name(lock_name(asg))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = AwsError::call("ssm", "DeleteParameter", self.aws.region(), e);
                if e.code() == Some("ParameterNotFound") {
                    Ok(())
                } else {
                    Err(jerr(asg, e.to_string()))
                }
            }
        }
    }

    async fn holder(&self, asg: &str) -> Result<Option<Holder>> {
        self.current_holder(asg).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::history::ami_ids_in;

    fn check(text: &str, max: usize) {
        let chunks = split_chunks(text, max);
        assert_eq!(chunks.concat(), text);
        assert!(chunks.iter().all(|c| !c.is_empty() && c.len() <= max));
        let mut seen: Vec<String> = chunks.iter().flat_map(|c| ami_ids_in(c)).collect();
        seen.sort();
        seen.dedup();
        let mut whole = ami_ids_in(text);
        whole.sort();
        assert_eq!(seen, whole, "{chunks:?}");
    }

    #[test]
    fn chunks_never_split_an_ami_id_wherever_it_falls() {
        let ids = [
            "ami-0123456789abcdef0",
            "ami-12345678",
            "ami-0123456789abcdef0123",
        ];
        for id in ids {
            for pad in 0..40 {
                let text = format!(
                    "{{\"r\":\"{}\",\"to\":\"{id}\",\"x\":\"xami-12345678 é {id}g\"}}",
                    "y".repeat(pad)
                );
                for max in [24, 25, 31, 40, 64] {
                    check(&text, max);
                }
            }
        }
    }

    #[test]
    fn chunks_respect_utf8_and_the_limit_even_inside_long_words() {
        check(&"é".repeat(5000), CHUNK_MAX);
        check(&"a".repeat(10_000), CHUNK_MAX);
        check("", CHUNK_MAX);
        let text = "ab-cd ".repeat(3000);
        let chunks = split_chunks(&text, CHUNK_MAX);
        assert!(chunks.iter().all(|c| c.ends_with(' ')));
    }

    #[test]
    fn heads_and_inline_journals_are_told_apart() {
        let head = r#"{"chunked":{"generation":"g","chunks":2,"bytes":9000,"sha256":"00"},
            "holder":{"who":"op","host":"h","pid":1,"started":"2024-01-01T00:00:00Z"}}"#;
        assert!(matches!(
            parse_head("a", "n", head.to_string()),
            Ok(Head::Chunked(h)) if h.chunked.chunks == 2
        ));
        assert!(matches!(
            parse_head("a", "n", r#"{"rollout_id":"r1"}"#.to_string()),
            Ok(Head::Inline(_))
        ));
        assert!(matches!(
            parse_head("a", "n", "not json".to_string()),
            Ok(Head::Inline(_))
        ));
        assert_ne!(new_generation("x"), new_generation("x"));
    }
}
