//! xDS for vmesh: who a proxy is ([`node`]), what it should run
//! ([`translate`]), the DNS name table its agent answers from ([`nds`]),
//! and the ADS stream that delivers them ([`ads`]).
//!
//! This crate does not own the mesh model (the registry crate does) nor the
//! gRPC listener's address and authentication (the server does).

#![forbid(unsafe_code)]

pub mod ads;
pub mod authz;
pub mod mtls;
pub mod nds;
pub mod node;
pub mod translate;
