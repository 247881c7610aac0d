//! The autoscaler: a pure scaling algorithm ([`algorithm`]) and the loop in
//! the operator that feeds it the gateways' demand and stats ([`run`]).

pub mod algorithm;
pub mod run;

pub use algorithm::{Autoscaler, Observation, Reason, ScaleDecision, ScalingPolicy};
