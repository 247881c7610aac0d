//! The autoscaler. So far: the pure scaling algorithm. The loop that feeds it
//! the gateways' demand and stats and writes the `scale` subresource is the
//! next step (see the project's issues).

pub mod algorithm;

pub use algorithm::{Autoscaler, Observation, Reason, ScaleDecision, ScalingPolicy};
