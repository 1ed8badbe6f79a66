//! xDS for vmesh: who a proxy is ([`node`]), what it should run
//! ([`translate`], with its mutual TLS from [`mtls`] and its RBAC from
//! [`authz`]), the DNS name table its agent answers from ([`nds`]), and the
//! ADS stream that delivers them ([`ads`]), and what a proxy was sent in
//! the shape of Envoy's admin config dump ([`config_dump`]).
//!
//! This crate translates; it does not own the mesh model nor decide which
//! rules apply to a host or a workload (the registry crate does, with lookups
//! on its `Snapshot`), nor the gRPC listener's address and authentication
//! (the server does).

#![forbid(unsafe_code)]

pub mod ads;
pub mod authz;
pub mod config_dump;
pub mod metrics;
pub mod mtls;
pub mod nds;
pub mod node;
pub mod translate;

#[cfg(test)]
mod testing;
