//! The autoscaler: a pure scaling algorithm per workload ([`algorithm`]),
//! a pure state type over every workload that turns demand, stats and time
//! into writes ([`state`]), and the loop in the operator that feeds it and
//! executes them ([`run`]).

pub mod algorithm;
pub mod costs;
pub mod learned;
pub mod metrics;
pub mod placed;
pub mod run;
pub mod state;
pub mod window;

pub use algorithm::{Autoscaler, Observation, Reason, ScaleDecision, ScalingPolicy};
