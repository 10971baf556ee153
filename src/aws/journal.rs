//! [`SsmJournal`]: the rollout journal and lock as SSM parameters.
//!
//! Why SSM parameters and not ASG tags: a tag value is capped at 256 characters
//! (the journal with its history is kilobytes), tags have no create-if-absent, and
//! they would show on every instance the group tags. SSM gives:
//!
//! * an atomic lock: `PutParameter` without overwrite fails with
//!   `ParameterAlreadyExists` for everyone but the first;
//! * values up to 4 KB (standard) or 8 KB (advanced): parameters are written with
//!   the `Intelligent-Tiering` tier so SSM moves a journal to advanced only when it
//!   outgrows 4 KB;
//! * a version number per write, for compare-and-swap saves;
//! * IAM scoping by path (`arn:aws:ssm:*:*:parameter/kiln/rollout/*`).
//!
//! Layout, per ASG:
//!
//! * `/kiln/rollout/<asg>/lock`: the [`Holder`] as JSON while a rollout runs;
//! * `/kiln/rollout/<asg>/journal`: the [`Journal`] as compact JSON, kept after
//!   the rollout ends (it carries the history `kiln rollback` reverts through).
//!   `kiln prune` treats any AMI id found under `/kiln/rollout/` as in use, which
//!   keeps the images of the last rollouts from being deregistered.
//!
//! The compare-and-swap is read-version-then-overwrite, not atomic: SSM has no
//! conditional put. It is safe because only the lock holder writes the journal; the
//! version check catches a holder whose lock was taken over (`--take-over`) while it
//! was still running, at its next save.

use aws_sdk_ssm::types::{ParameterTier, ParameterType};

use super::{Aws, AwsError};
use crate::rollout::engine::{JournalStore, Revision, Stored};
use crate::rollout::model::{Holder, Journal};
use crate::rollout::{Result, RolloutError};

/// SSM's limit for an advanced parameter's value.
const MAX_VALUE: usize = 8 * 1024;

pub struct SsmJournal {
    aws: Aws,
    ssm: aws_sdk_ssm::Client,
}

pub fn prefix(asg: &str) -> String {
    format!("/kiln/rollout/{asg}")
}

fn lock_name(asg: &str) -> String {
    format!("{}/lock", prefix(asg))
}

fn journal_name(asg: &str) -> String {
    format!("{}/journal", prefix(asg))
}

fn jerr(asg: &str, message: impl Into<String>) -> RolloutError {
    RolloutError::Journal {
        asg: asg.to_string(),
        message: message.into(),
    }
}

impl SsmJournal {
    pub fn new(aws: &Aws) -> SsmJournal {
        SsmJournal {
            aws: aws.clone(),
            ssm: aws.ssm(),
        }
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
            .tier(ParameterTier::IntelligentTiering)
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

    async fn current_holder(&self, asg: &str) -> Result<Option<Holder>> {
        match self.get(asg, &lock_name(asg)).await? {
            None => Ok(None),
            Some((v, _)) => serde_json::from_str(&v)
                .map(Some)
                .map_err(|e| jerr(asg, format!("{}: not a lock holder: {e}", lock_name(asg)))),
        }
    }
}

fn holder_json(h: &Holder) -> String {
    serde_json::to_string(h).expect("holders serialize")
}

impl JournalStore for SsmJournal {
    async fn load(&self, asg: &str) -> Result<Option<Stored>> {
        let name = journal_name(asg);
        match self.get(asg, &name).await? {
            None => Ok(None),
            Some((value, version)) => {
                let journal: Journal = serde_json::from_str(&value)
                    .map_err(|e| jerr(asg, format!("{name} is not a kiln journal: {e}")))?;
                Ok(Some(Stored {
                    revision: Revision(version.to_string()),
                    journal,
                }))
            }
        }
    }

    async fn save(
        &self,
        asg: &str,
        journal: &Journal,
        expected: Option<&Revision>,
    ) -> Result<Revision> {
        let name = journal_name(asg);
        let value = serde_json::to_string(journal).expect("journals serialize");
        let lost = |holder: Option<String>| RolloutError::LockLost {
            asg: asg.to_string(),
            holder: holder.unwrap_or_else(|| "another kiln".to_string()),
        };
        match expected {
            None => match self.put(asg, &name, &value, false).await? {
                Some(v) => Ok(Revision(v.to_string())),
                None => {
                    let h = self.current_holder(asg).await.ok().flatten();
                    Err(lost(h.map(|h| h.to_string())))
                }
            },
            Some(rev) => {
                let current = self.get(asg, &name).await?;
                let matches = current
                    .as_ref()
                    .is_some_and(|(_, v)| v.to_string() == rev.0);
                if !matches {
                    let h = current
                        .and_then(|(v, _)| serde_json::from_str::<Journal>(&v).ok())
                        .map(|j| j.holder.to_string());
                    return Err(lost(h));
                }
                let v = self
                    .put(asg, &name, &value, true)
                    .await?
                    .expect("overwrite always writes");
                Ok(Revision(v.to_string()))
            }
        }
    }

    async fn acquire(&self, asg: &str, holder: &Holder, replace: Option<&Holder>) -> Result<()> {
        let name = lock_name(asg);
        let json = holder_json(holder);
        if self.put(asg, &name, &json, false).await?.is_some() {
            return Ok(());
        }
        let Some(current) = self.current_holder(asg).await? else {
            // Released between our attempt and the read: try once more.
            return match self.put(asg, &name, &json, false).await? {
                Some(_) => Ok(()),
                None => Err(jerr(
                    asg,
                    format!("{name}: the lock changed hands twice; try again"),
                )),
            };
        };
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
