//! [`SsmJournal`] against moto: journals too large for one SSM parameter are
//! stored as chunks under a generation that the head parameter commits, without
//! changing what the engine sees (load, compare-and-swap save, the lock), and
//! without costing a small journal one call more than before.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use kiln::aws::journal::{
    chunk_name, journal_name, split_chunks, ChunkedHead, SsmJournal, CHUNK_MAX, MAX_VALUE,
};
use kiln::aws::Aws;
use kiln::lifecycle::history::{ami_ids_in, images_in_rollout_history};
use kiln::rollout::engine::{JournalStore, Revision};
use kiln::rollout::model::*;
use kiln::rollout::RolloutError;

use crate::support::moto;
use crate::support::proxy::{Fault, Proxy, ProxyHandle};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// An `Aws` through `endpoint` with one attempt per call: an injected fault is
/// the call failing, as a process killed before it would have made it.
async fn aws(endpoint: &str) -> Aws {
    let config = moto::sdk_config_loader(endpoint)
        .retry_config(RetryConfig::disabled())
        .load()
        .await;
    Aws::from_sdk_config(config).unwrap()
}

fn holder(n: u32) -> Holder {
    Holder {
        who: format!("op{n}"),
        host: "laptop".into(),
        pid: 1000 + n,
        started: Timestamp(1_700_000_000_000),
    }
}

/// A journal of a rollout of `asg` with `in_flight` instances launched and as
/// many draining, and `history` finished rollouts; `tag` makes journals differ.
fn journal(asg: &str, in_flight: usize, history: usize, tag: u32) -> Journal {
    let obs = Observation {
        now: Timestamp(1_700_000_000_000),
        group: GroupState {
            name: asg.to_string(),
            min: 1,
            max: 2000,
            desired: 1000,
            launch: LaunchSource::Template {
                id: "lt-0123456789abcdef0".into(),
                version: 1,
                image_id: "ami-00000000000000001".into(),
                mixed_instances_policy: false,
            },
            suspended: BTreeSet::new(),
            target_groups: vec![],
            health_check_grace: Duration::from_secs(60),
        },
        instances: vec![],
        target_health: BTreeMap::new(),
    };
    let spec = RolloutSpec::new("ami-00000000000000002");
    let mut j = Journal::begin(format!("r{tag}"), holder(tag), spec, &obs, None).unwrap();
    for i in 0..in_flight {
        j.batch
            .launched
            .insert(format!("i-{:017x}", (tag as usize) << 32 | i));
        j.batch.draining.insert(
            format!("i-{:017x}", (tag as usize) << 40 | i),
            Timestamp(1_700_000_000_000 + i as u64),
        );
    }
    for i in 0..history {
        j.history.push(HistoryEntry {
            rollout_id: format!("r{tag}-{i}"),
            from_image: format!("ami-{:017x}", 0x1000 + i),
            from_launch_template_version: Some(i as u64),
            to_image: format!("ami-{:017x}", 0x1001 + i),
            to_launch_template_version: Some(i as u64 + 1),
            started: Timestamp(1_600_000_000_000),
            ended: Timestamp(1_600_000_100_000),
            outcome: Outcome::Succeeded,
            reason: Some("a reason long enough to make the history weigh something".into()),
        });
    }
    j
}

fn json_len(j: &Journal) -> usize {
    serde_json::to_string(j).unwrap().len()
}

/// Names and values of every parameter under the ASG's journal chunks.
async fn chunk_params(aws: &Aws, asg: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut pages = aws
        .ssm()
        .get_parameters_by_path()
        .path(journal_name(asg))
        .recursive(true)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        for p in page.unwrap().parameters() {
            out.insert(
                p.name().unwrap().to_string(),
                p.value().unwrap().to_string(),
            );
        }
    }
    out
}

async fn head(aws: &Aws, asg: &str) -> String {
    aws.ssm()
        .get_parameter()
        .name(journal_name(asg))
        .send()
        .await
        .unwrap()
        .parameter()
        .unwrap()
        .value()
        .unwrap()
        .to_string()
}

/// Fails the `n`th (1-based) PutParameter from now on, and only that one.
fn fail_nth_put(proxy: &ProxyHandle, n: usize, fault: Fault) {
    proxy.clear_rewrites();
    if n == 1 {
        proxy.inject("ssm:PutParameter", fault);
        return;
    }
    let seen = Arc::new(AtomicUsize::new(0));
    let handle = proxy.clone();
    // Runs before the answer of a forwarded PutParameter goes back, so the next
    // PutParameter (sent only after this answer) finds the fault queued.
    proxy.rewrite_exchange("ssm:PutParameter", move |_, answer| {
        if seen.fetch_add(1, Ordering::SeqCst) + 1 == n - 1 {
            handle.inject("ssm:PutParameter", fault);
        }
        answer.to_vec()
    });
}

#[test]
fn a_100_kb_journal_round_trips_in_standard_chunks() {
    rt().block_on(async {
        let proxy = Proxy::start(moto::endpoint());
        let aws = aws(&proxy.endpoint()).await;
        let store = SsmJournal::new(&aws);
        let asg = moto::unique("big");
        let j = journal(&asg, 1300, 20, 1);
        let len = json_len(&j);
        assert!((90_000..200_000).contains(&len), "{len} bytes");

        proxy.clear_calls();
        let rev = store.save(&asg, &j, None).await.unwrap();
        let chunks = split_chunks(&serde_json::to_string(&j).unwrap(), CHUNK_MAX).len();
        assert!(chunks >= len.div_ceil(CHUNK_MAX));
        // Every chunk, then the head; this process's first chunked save also lists
        // the journal's chunks once (ten a page) to sweep a crashed save's.
        assert_eq!(
            proxy.handle().per_operation(),
            BTreeMap::from([
                ("ssm:PutParameter".to_string(), chunks + 1),
                ("ssm:GetParametersByPath".to_string(), chunks.div_ceil(10)),
            ]),
            "{}",
            proxy.summary()
        );

        let h: ChunkedHead = serde_json::from_str(&head(&aws, &asg).await).unwrap();
        assert_eq!(h.holder, j.holder);
        assert_eq!(h.chunked.bytes, len);
        let params = chunk_params(&aws, &asg).await;
        assert_eq!(params.len(), h.chunked.chunks, "{:?}", params.keys());
        assert!(params
            .values()
            .all(|v| !v.is_empty() && v.len() <= CHUNK_MAX));

        proxy.clear_calls();
        let loaded = store.load(&asg).await.unwrap().unwrap();
        assert_eq!(loaded.journal, j);
        assert_eq!(loaded.revision, rev);
        // One GetParameter for the head, one GetParameters per ten chunks.
        assert_eq!(proxy.count("ssm:GetParameter"), 1, "{}", proxy.summary());
        assert_eq!(
            proxy.count("ssm:GetParameters"),
            h.chunked.chunks.div_ceil(10),
            "{}",
            proxy.summary()
        );

        // Saving again replaces the generation and deletes the previous one.
        let j2 = journal(&asg, 1200, 20, 2);
        let chunks2 = split_chunks(&serde_json::to_string(&j2).unwrap(), CHUNK_MAX).len();
        proxy.clear_calls();
        let rev2 = store.save(&asg, &j2, Some(&rev)).await.unwrap();
        // The head (compare), every chunk, the head; the old generation deleted ten
        // at a time. No listing: this process swept already.
        assert_eq!(
            proxy.handle().per_operation(),
            BTreeMap::from([
                ("ssm:GetParameter".to_string(), 1),
                ("ssm:PutParameter".to_string(), chunks2 + 1),
                ("ssm:DeleteParameters".to_string(), chunks.div_ceil(10)),
            ]),
            "{}",
            proxy.summary()
        );
        assert_ne!(rev2, rev);
        let h2: ChunkedHead = serde_json::from_str(&head(&aws, &asg).await).unwrap();
        assert_ne!(h2.chunked.generation, h.chunked.generation);
        let params = chunk_params(&aws, &asg).await;
        assert_eq!(params.len(), h2.chunked.chunks, "old generation deleted");
        assert!(params
            .keys()
            .all(|k| k.contains(&format!("/{}/", h2.chunked.generation))));
        assert_eq!(store.load(&asg).await.unwrap().unwrap().journal, j2);

        // Shrinking back to one parameter: today's format, chunks deleted.
        let small = journal(&asg, 3, 2, 3);
        assert!(json_len(&small) <= MAX_VALUE);
        let rev3 = store.save(&asg, &small, Some(&rev2)).await.unwrap();
        let value = head(&aws, &asg).await;
        assert_eq!(serde_json::from_str::<Journal>(&value).unwrap(), small);
        assert!(chunk_params(&aws, &asg).await.is_empty());
        let loaded = store.load(&asg).await.unwrap().unwrap();
        assert_eq!((loaded.journal, loaded.revision), (small, rev3));
    });
}

/// A save that dies before any of its PutParameter calls (every chunk, then the
/// head) leaves the previous journal loadable at its revision; the next save by
/// the same holder succeeds and sweeps what the dead ones left.
#[test]
fn a_save_killed_between_chunk_writes_leaves_the_previous_journal() {
    rt().block_on(async {
        let proxy = Proxy::start(moto::endpoint());
        let aws = aws(&proxy.endpoint()).await;
        let store = SsmJournal::new(&aws).with_sweep_after(Duration::ZERO);
        let asg = moto::unique("crash");
        let before = journal(&asg, 150, 20, 1);
        let rev = store.save(&asg, &before, None).await.unwrap();
        let old_head = head(&aws, &asg).await;

        let after = journal(&asg, 160, 20, 2);
        let chunks = split_chunks(&serde_json::to_string(&after).unwrap(), CHUNK_MAX).len();
        assert!(chunks >= 3, "{chunks}");
        // Chunk 1..=chunks, then the head (chunks + 1).
        for n in 1..=chunks + 1 {
            fail_nth_put(&proxy.handle(), n, Fault::Reset);
            let err = store.save(&asg, &after, Some(&rev)).await.unwrap_err();
            assert!(
                matches!(err, RolloutError::Journal { .. }),
                "put {n}: {err}"
            );
            assert_eq!(proxy.pending_injections(), 0, "put {n}: fault not used");
            proxy.clear_rewrites();
            assert_eq!(head(&aws, &asg).await, old_head, "put {n}");
            let loaded = store.load(&asg).await.unwrap().unwrap();
            assert_eq!(loaded.journal, before, "put {n}");
            assert_eq!(loaded.revision, rev, "put {n}");
        }
        assert!(
            chunk_params(&aws, &asg).await.len() > chunks,
            "leftovers exist"
        );

        // The head written but its answer lost: the new journal, whole.
        fail_nth_put(&proxy.handle(), chunks + 1, Fault::LoseResponse);
        store.save(&asg, &after, Some(&rev)).await.unwrap_err();
        proxy.clear_rewrites();
        let loaded = store.load(&asg).await.unwrap().unwrap();
        assert_eq!(loaded.journal, after);
        // The retry after a lost answer sees the moved revision, like today.
        assert!(matches!(
            store.save(&asg, &after, Some(&rev)).await,
            Err(RolloutError::LockLost { .. })
        ));

        let again = journal(&asg, 170, 20, 3);
        let rev3 = store
            .save(&asg, &again, Some(&loaded.revision))
            .await
            .unwrap();
        let h: ChunkedHead = serde_json::from_str(&head(&aws, &asg).await).unwrap();
        let params = chunk_params(&aws, &asg).await;
        assert_eq!(
            params.keys().cloned().collect::<BTreeSet<_>>(),
            (0..h.chunked.chunks)
                .map(|n| chunk_name(&asg, &h.chunked.generation, n))
                .collect::<BTreeSet<_>>(),
            "the sweep left only the committed generation"
        );
        let loaded = store.load(&asg).await.unwrap().unwrap();
        assert_eq!((loaded.journal, loaded.revision), (again, rev3));
    });
}

#[test]
fn a_stale_revision_is_lock_lost_naming_the_holder_small_or_chunked() {
    rt().block_on(async {
        let aws = aws(moto::endpoint()).await;
        let store = SsmJournal::new(&aws);
        for (name, in_flight) in [("cas-small", 2), ("cas-big", 300)] {
            let asg = moto::unique(name);
            let first = journal(&asg, in_flight, 20, 1);
            let rev1 = store.save(&asg, &first, None).await.unwrap();
            // Someone took over and saved.
            let theirs = journal(&asg, in_flight, 20, 7);
            let rev2 = store.save(&asg, &theirs, Some(&rev1)).await.unwrap();
            let mine = journal(&asg, in_flight, 20, 1);
            match store.save(&asg, &mine, Some(&rev1)).await {
                Err(RolloutError::LockLost { holder, .. }) => {
                    assert_eq!(holder, theirs.holder.to_string(), "{name}")
                }
                other => panic!("{name}: {other:?}"),
            }
            // Creating when one exists is lost too.
            assert!(
                matches!(
                    store.save(&asg, &mine, None).await,
                    Err(RolloutError::LockLost { .. })
                ),
                "{name}"
            );
            let loaded = store.load(&asg).await.unwrap().unwrap();
            assert_eq!((loaded.journal, loaded.revision), (theirs, rev2), "{name}");
            // The refused create left no chunks of its own behind.
            if in_flight > 100 {
                let h: ChunkedHead = serde_json::from_str(&head(&aws, &asg).await).unwrap();
                assert_eq!(chunk_params(&aws, &asg).await.len(), h.chunked.chunks);
            }
        }
        assert!(store.load(&moto::unique("none")).await.unwrap().is_none());
    });
}

/// Exactly today's calls for a journal that fits one parameter: load one
/// GetParameter; a first save one PutParameter; a later save one GetParameter and
/// one PutParameter. An old single-parameter journal loads as is.
#[test]
fn a_small_journal_costs_the_same_calls_as_before() {
    rt().block_on(async {
        let proxy = Proxy::start(moto::endpoint());
        let aws = aws(&proxy.endpoint()).await;
        let store = SsmJournal::new(&aws);
        let asg = moto::unique("small");
        // Near the limit: still one parameter.
        let mut j = journal(&asg, 40, 10, 1);
        while json_len(&j) > MAX_VALUE {
            j.history.pop();
        }
        assert!(json_len(&j) > 4 * 1024, "{}", json_len(&j));
        let calls = |p: &Proxy| -> BTreeMap<String, usize> { p.handle().per_operation() };

        proxy.clear_calls();
        let rev = store.save(&asg, &j, None).await.unwrap();
        assert_eq!(
            calls(&proxy),
            BTreeMap::from([("ssm:PutParameter".to_string(), 1)])
        );
        proxy.clear_calls();
        let loaded = store.load(&asg).await.unwrap().unwrap();
        assert_eq!(loaded.journal, j);
        assert_eq!(
            calls(&proxy),
            BTreeMap::from([("ssm:GetParameter".to_string(), 1)])
        );
        proxy.clear_calls();
        store.save(&asg, &j, Some(&rev)).await.unwrap();
        assert_eq!(
            calls(&proxy),
            BTreeMap::from([
                ("ssm:GetParameter".to_string(), 1),
                ("ssm:PutParameter".to_string(), 1)
            ])
        );
        // The stored value is the journal itself, as older kilns wrote and read it.
        assert_eq!(
            serde_json::from_str::<Journal>(&head(&aws, &asg).await).unwrap(),
            j
        );

        // A journal an older kiln wrote loads unchanged.
        let old = moto::unique("old");
        let oj = journal(&old, 5, 3, 4);
        aws.ssm()
            .put_parameter()
            .name(journal_name(&old))
            .value(serde_json::to_string(&oj).unwrap())
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .send()
            .await
            .unwrap();
        let loaded = store.load(&old).await.unwrap().unwrap();
        assert_eq!(loaded.journal, oj);
        assert_eq!(loaded.revision, Revision("1".into()));
    });
}

/// `kiln prune` reads every parameter under /kiln/rollout/ separately: an AMI id
/// that a blind 4 KB cut would split across two chunks is still found whole, and
/// every id of the journal is found.
#[test]
fn prune_sees_every_ami_id_of_a_chunked_journal() {
    rt().block_on(async {
        // A server of its own: moto pages GetParametersByPath by offset, so other
        // tests deleting parameters meanwhile would make the listing skip some.
        let moto = moto::Dedicated::start();
        let aws = aws(moto.endpoint()).await;
        let store = SsmJournal::new(&aws);
        let asg = moto::unique("prune");
        let mut j = journal(&asg, 150, 0, 1);
        // Pad the journal so that an AMI id in the reason straddles byte CHUNK_MAX.
        let ami = "ami-0fedcba9876543210";
        let prefix_len = serde_json::to_string(&j)
            .unwrap()
            .find("\"reason\":null")
            .unwrap()
            + "\"reason\":\"".len();
        let pad = CHUNK_MAX - 10 - prefix_len;
        j.reason = Some(format!("{} {ami} failed", "x".repeat(pad)));
        let json = serde_json::to_string(&j).unwrap();
        let at = json.find(ami).unwrap();
        assert!(at < CHUNK_MAX && at + ami.len() > CHUNK_MAX, "{at}");
        assert!(json.len() > MAX_VALUE);
        store.save(&asg, &j, None).await.unwrap();
        let h: ChunkedHead = serde_json::from_str(&head(&aws, &asg).await).unwrap();
        let generation = h.chunked.generation;

        let found = images_in_rollout_history(&aws).await.unwrap();
        for id in ami_ids_in(&json) {
            let names = found.get(&id).unwrap_or_else(|| panic!("{id} not seen"));
            assert!(
                names.iter().all(|n| n.starts_with(&journal_name(&asg))),
                "{id}: {names:?}"
            );
        }
        assert_eq!(found[ami], vec![chunk_name(&asg, &generation, 1)]);
        assert!(found.contains_key("ami-00000000000000001"));
        assert!(found.contains_key("ami-00000000000000002"));
    });
}

/// A chunk changed or lost behind kiln's back is an error naming the journal,
/// never a journal pieced together from the wrong parts.
#[test]
fn a_damaged_chunk_is_an_error_not_a_mix() {
    rt().block_on(async {
        let aws = aws(moto::endpoint()).await;
        let store = SsmJournal::new(&aws);
        let asg = moto::unique("damaged");
        store
            .save(&asg, &journal(&asg, 150, 5, 1), None)
            .await
            .unwrap();
        let h: ChunkedHead = serde_json::from_str(&head(&aws, &asg).await).unwrap();
        let first = chunk_name(&asg, &h.chunked.generation, 0);
        let params = chunk_params(&aws, &asg).await;
        // Same length, one character different: only the hash can tell.
        let altered = params[&first].replacen("op1", "op2", 1);
        assert_ne!(altered, params[&first]);
        aws.ssm()
            .put_parameter()
            .name(&first)
            .value(altered)
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .overwrite(true)
            .send()
            .await
            .unwrap();
        let err = store.load(&asg).await.unwrap_err();
        assert!(
            matches!(&err, RolloutError::Journal { message, .. } if message.contains("SHA-256")),
            "{err}"
        );
        aws.ssm()
            .delete_parameter()
            .name(&first)
            .send()
            .await
            .unwrap();
        assert!(matches!(
            store.load(&asg).await,
            Err(RolloutError::Journal { .. })
        ));
    });
}
