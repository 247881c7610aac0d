//! Tandem: a Kubernetes operator and gateway for hybrid applications, whose
//! HTTP routes are served by scale-to-zero functions, always-on deployments,
//! or a weighted split of both.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod autoscaler;
pub mod controller;
pub mod fleet;
pub mod gateway;
pub mod gatewayapi;
pub mod keepalive;
pub mod leader;
pub mod migration;
pub mod operator;
pub mod protocol;
pub mod telemetry;
pub mod watch;
