//! Rolling an auto-scaling group onto an image by replacing its instances.
//!
//! Level-triggered, like a Kubernetes controller (issue 3):
//!
//! * [`model`]: what is observed ([`Observation`]), asked for ([`RolloutSpec`]) and
//!   remembered ([`Journal`]);
//! * [`plan`]: the pure decision [`decide`] (observation + journal → one [`Step`])
//!   and [`plan_schedule`] for `kiln rollout --plan`;
//! * [`engine`]: the executor loop over two seams, [`Fleet`] (the ASG and its
//!   instances: the AWS adapter, or the simulator) and [`JournalStore`] (the journal
//!   and lock in the cloud);
//! * [`status`]: `kiln status`, from one observation, the journal and `decide`;
//! * [`sim`]: an in-memory fleet on virtual time for tests and benchmarks.

pub mod engine;
pub mod model;
pub mod plan;
pub mod sim;
pub mod status;

pub use engine::{
    abort, drive, history, local_holder_is_gone, previous_image, start, BatchSummary, EngineConfig,
    Event, Fleet, JournalStore, Progress, Report, Revision, StartRequest, Stored,
};
pub use model::{
    Amount, Capacity, HistoryEntry, Holder, Instance, Journal, Observation, Outcome, Phase,
    RolloutSpec,
};
pub use plan::{decide, plan_schedule, Plan, PlanAssumptions, Step, WaitFor};
pub use status::{status, status_of, Status};

/// Everything that can stop a rollout command, with what the operator needs to act.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(
        "ASG {asg} uses launch configuration {launch_configuration}; kiln rolls launch templates only. \
         Create a launch template from it (`aws ec2 create-launch-template` with the same AMI, instance type, \
         security groups and user data) and point the ASG at it (`aws autoscaling update-auto-scaling-group \
         --auto-scaling-group-name {asg} --launch-template LaunchTemplateId=<id>,Version=<n>`), then run kiln again"
    )]
    LaunchConfiguration {
        asg: String,
        launch_configuration: String,
    },

    #[error("ASG {asg} has the {process} process suspended, so no replacement can launch; resume it first")]
    ProcessSuspended { asg: String, process: String },

    #[error(
        "ASG {asg}: instance(s) {instances} in Standby would stay on their image; bring them back \
         (`aws autoscaling exit-standby --auto-scaling-group-name {asg} --instance-ids …`) or detach them, then run kiln again"
    )]
    InstancesInStandby { asg: String, instances: String },

    #[error(
        "ASG {asg}: instance(s) {instances} are protected from scale-in and a rollout would terminate them; \
         remove the protection (`aws autoscaling set-instance-protection --auto-scaling-group-name {asg} \
         --no-protected-from-scale-in --instance-ids {instances}`) when they may be replaced, then run kiln again"
    )]
    InstancesProtected { asg: String, instances: String },

    #[error(
        "ASG {asg}: a floor of {floor} healthy instances is above its desired capacity {desired}"
    )]
    FloorAboveDesired {
        asg: String,
        floor: u32,
        desired: u32,
    },

    #[error("ASG {asg} is being rolled by {holder}; wait for it, or if that process is gone run again with --take-over")]
    Locked { asg: String, holder: model::Holder },

    #[error("ASG {asg}: the rollout lock was taken over by {holder}; stopping")]
    LockLost { asg: String, holder: String },

    #[error(
        "ASG {asg} has a rollout to {target_image} in progress ({phase:?}); run `kiln rollout {asg} {target_image}` \
         to finish it or `kiln abort {asg}` to roll it back"
    )]
    InProgress {
        asg: String,
        target_image: String,
        phase: model::Phase,
    },

    #[error("ASG {asg} has no rollout in progress")]
    NothingInProgress { asg: String },

    #[error("ASG {asg} has no earlier image in its rollout history; pass --to <image-ref>")]
    NoPreviousImage { asg: String },

    #[error("ASG {asg} not found")]
    GroupNotFound { asg: String },

    #[error("ASG {asg}: {operation} failed: {source}")]
    Fleet {
        asg: String,
        operation: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("ASG {asg}: rollout journal: {message}")]
    Journal { asg: String, message: String },

    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = RolloutError> = std::result::Result<T, E>;
