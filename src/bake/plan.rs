//! The bake's decisions as pure functions over what was observed: what to reuse,
//! what to build or copy, what to clean up and what `kiln gc` removes. The AWS
//! code in the parent module only observes and executes.

use std::collections::BTreeMap;

use crate::registry::Ami;

/// What happens in the home region (where images are built).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Home {
    /// An available, ready AMI with this hash exists: nothing to do.
    Reuse(Ami),
    /// It exists but is still `pending` (a bake whose wait timed out or was
    /// interrupted): wait for it, then boot-test it unless it is ready.
    Wait(Ami),
    /// It exists and is available but never passed its boot test (the run that
    /// made it was stopped during the test): test it, then tag it ready.
    Test(Ami),
    /// Nothing usable: build a new version.
    Build,
}

/// What happens in one copy region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Copy {
    /// An available copy with this hash exists.
    Reuse(Ami),
    /// A copy is on its way: wait for it.
    Wait(Ami),
    /// No copy: make one from the home region's AMI.
    Create,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub home_region: String,
    pub home: Home,
    /// region → what to do there, for every requested copy region.
    pub copies: BTreeMap<String, Copy>,
}

impl Plan {
    /// Nothing to create, wait for or test anywhere: the bake makes no mutating call.
    pub fn is_noop(&self) -> bool {
        matches!(self.home, Home::Reuse(_))
            && self.copies.values().all(|c| matches!(c, Copy::Reuse(_)))
    }

    /// Whether a builder or test instance may be launched (so the launch settings
    /// must be checked first).
    pub fn launches(&self) -> bool {
        matches!(self.home, Home::Build | Home::Test(_) | Home::Wait(_))
    }
}

/// Picks the most useful of several AMIs with the same hash in one region:
/// ready and available first, then available, then pending; failed ones never.
fn best(found: &[Ami]) -> Option<&Ami> {
    found
        .iter()
        .filter(|a| a.is_available() || a.is_pending())
        .max_by_key(|a| (a.is_available() && a.ready, a.is_available(), &a.created))
}

/// Decides the bake from the AMIs found with the content hash in each region.
/// `found` holds every requested region, home included (an empty list where
/// nothing was found).
pub fn plan(home_region: &str, found: &BTreeMap<String, Vec<Ami>>) -> Plan {
    let none = Vec::new();
    let home = match best(found.get(home_region).unwrap_or(&none)) {
        Some(a) if a.is_available() && a.ready => Home::Reuse(a.clone()),
        Some(a) if a.is_available() => Home::Test(a.clone()),
        Some(a) => Home::Wait(a.clone()),
        None => Home::Build,
    };
    let copies = found
        .iter()
        .filter(|(r, _)| r.as_str() != home_region)
        .map(|(r, amis)| {
            let c = match best(amis) {
                Some(a) if a.is_available() => Copy::Reuse(a.clone()),
                Some(a) => Copy::Wait(a.clone()),
                None => Copy::Create,
            };
            (r.clone(), c)
        })
        .collect();
    Plan {
        home_region: home_region.to_string(),
        home,
        copies,
    }
}

/// How far an image this run created got, which decides what a failure does to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageProgress {
    /// CreateImage returned; `available` has not been observed.
    Pending,
    /// Observed `available` (snapshots known).
    Available,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Deregister the image and delete its snapshots: a failed bake leaves no AMI.
    Remove,
    /// Leave it: it may still become available, and a re-run finds it by hash and
    /// waits for it. Deregistering an image mid-snapshot would waste the work and
    /// the snapshot could be left behind without an image to find it by.
    Keep,
}

/// Pure: what a failed or interrupted bake does with the image it created.
pub fn image_on_failure(progress: ImageProgress) -> OnFailure {
    match progress {
        ImageProgress::Available => OnFailure::Remove,
        ImageProgress::Pending => OnFailure::Keep,
    }
}

/// A temporary resource found by `kiln gc`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Temporary {
    pub region: String,
    /// `instance` or `security-group`.
    pub kind: &'static str,
    pub id: String,
    pub role: String,
    pub run_id: String,
    /// RFC 3339, from the `kiln:expires` tag; empty when the tag is missing.
    pub expires: String,
    /// For instances: EC2 state name.
    pub state: String,
}

/// Pure: which temporaries `kiln gc` removes at `now` (RFC 3339, UTC). A
/// resource is removed once its expiry has passed; one without a parseable
/// expiry is kept (kiln always sets it, so someone else made it). Instances
/// already terminated are skipped.
pub fn gc_select(now: &str, found: &[Temporary]) -> Vec<Temporary> {
    let now = parse_time(now);
    found
        .iter()
        .filter(|t| t.state != "terminated" && t.state != "shutting-down")
        .filter(|t| match (parse_time(&t.expires), now) {
            (Some(exp), Some(now)) => exp <= now,
            _ => false,
        })
        .cloned()
        .collect()
}

fn parse_time(s: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ami(region: &str, id: &str, state: &str, ready: bool) -> Ami {
        Ami {
            region: region.into(),
            id: id.into(),
            name: "kiln-web-1".into(),
            state: state.into(),
            image: "web".into(),
            version: Some(1),
            hash: "h".into(),
            base_ami: "ami-0f6b3c9d25e4a5c33".into(),
            java: "1.8.0_422".into(),
            ready,
            created: "2024-01-01T00:00:00.000Z".into(),
            snapshots: vec![],
            run_id: "r".into(),
        }
    }

    fn found(list: &[(&str, Vec<Ami>)]) -> BTreeMap<String, Vec<Ami>> {
        list.iter()
            .map(|(r, a)| (r.to_string(), a.clone()))
            .collect()
    }

    #[test]
    fn everything_present_and_ready_is_a_noop() {
        let p = plan(
            "us-east-1",
            &found(&[
                (
                    "us-east-1",
                    vec![ami("us-east-1", "ami-1", "available", true)],
                ),
                (
                    "eu-west-1",
                    vec![ami("eu-west-1", "ami-2", "available", true)],
                ),
            ]),
        );
        assert!(p.is_noop());
        assert!(!p.launches());
    }

    #[test]
    fn missing_only_in_some_regions_copies_only_there() {
        let p = plan(
            "us-east-1",
            &found(&[
                (
                    "us-east-1",
                    vec![ami("us-east-1", "ami-1", "available", true)],
                ),
                (
                    "eu-west-1",
                    vec![ami("eu-west-1", "ami-2", "available", true)],
                ),
                ("ap-south-1", vec![]),
            ]),
        );
        assert!(!p.is_noop());
        assert!(!p.launches());
        assert_eq!(p.copies["ap-south-1"], Copy::Create);
        assert!(matches!(p.copies["eu-west-1"], Copy::Reuse(_)));
    }

    #[test]
    fn pending_is_waited_for_and_untested_is_tested() {
        let p = plan(
            "us-east-1",
            &found(&[(
                "us-east-1",
                vec![ami("us-east-1", "ami-1", "pending", false)],
            )]),
        );
        assert!(matches!(p.home, Home::Wait(_)));
        let p = plan(
            "us-east-1",
            &found(&[(
                "us-east-1",
                vec![ami("us-east-1", "ami-1", "available", false)],
            )]),
        );
        assert!(matches!(p.home, Home::Test(_)));
        assert!(p.launches());
    }

    #[test]
    fn failed_images_are_ignored_and_ready_wins_over_untested() {
        let p = plan(
            "us-east-1",
            &found(&[("us-east-1", vec![ami("us-east-1", "ami-1", "failed", true)])]),
        );
        assert_eq!(p.home, Home::Build);
        let p = plan(
            "us-east-1",
            &found(&[(
                "us-east-1",
                vec![
                    ami("us-east-1", "ami-1", "available", false),
                    ami("us-east-1", "ami-2", "available", true),
                    ami("us-east-1", "ami-3", "pending", false),
                ],
            )]),
        );
        assert!(matches!(&p.home, Home::Reuse(a) if a.id == "ami-2"));
    }

    #[test]
    fn a_timed_out_image_is_never_deregistered() {
        assert_eq!(image_on_failure(ImageProgress::Pending), OnFailure::Keep);
        assert_eq!(
            image_on_failure(ImageProgress::Available),
            OnFailure::Remove
        );
    }

    #[test]
    fn gc_removes_only_expired_live_temporaries() {
        let t = |id: &str, expires: &str, state: &str| Temporary {
            region: "us-east-1".into(),
            kind: "instance",
            id: id.into(),
            role: "builder".into(),
            run_id: "r".into(),
            expires: expires.into(),
            state: state.into(),
        };
        let found = vec![
            t("i-expired", "2024-01-01T00:00:00Z", "running"),
            t("i-future", "2024-01-01T02:00:00Z", "running"),
            t("i-gone", "2024-01-01T00:00:00Z", "terminated"),
            t("i-untagged", "", "running"),
            t("i-stopped", "2024-01-01T00:59:59Z", "stopped"),
        ];
        let ids: Vec<String> = gc_select("2024-01-01T01:00:00Z", &found)
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, ["i-expired", "i-stopped"]);
    }
}
