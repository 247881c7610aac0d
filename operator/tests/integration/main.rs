//! Integration tests of Tandem against the real control plane from testenv.
//! One test binary (modules below) links faster than many.

mod api;
mod chart;
mod gateway;
mod gatewayapi;
mod migration;
mod observability;
mod operator;
mod scale;
mod services;
mod support;
