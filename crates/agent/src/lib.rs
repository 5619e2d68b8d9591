//! `coffer-agent`: the only trusted process the untrusted host talks to.
//!
//! The agent policy ([`policy`]): Rego (regorus), package `agent_policy`, one rule per request
//! name with the full request as `input`, a default that denies exec, stdin writes, file copies
//! and policy changes, replaced only by the `policy.rego` of the attested initdata; every
//! decision is audited. The gRPC API ([`api`]) gates every request on it. At start the binary
//! checks its initdata against HOST_DATA ([`startup`]) before serving. Containers run on an OCI
//! runtime ([`container`]) from images the agent pulls with keys it gets from the KBS after
//! attesting ([`keys`]); exec can be allowed per request by the owner's signature ([`owner`]);
//! output can leave the guest only sealed to the owner ([`sealed`]). See docs/agent.md.

// Unsafe code only in `dm` (the device-mapper ioctls), each block with its reason.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod cloud;
pub mod container;
#[allow(unsafe_code)]
pub mod dm;
pub mod egress;
pub mod keys;
pub mod mesh;
pub mod net;
pub mod owner;
pub mod policy;
pub mod port;
/// Generated protobuf types and service traits.
#[allow(missing_docs, clippy::all)]
pub mod proto;
pub mod remote;
pub mod sandbox;
pub mod sealed;
pub mod startup;
pub mod sys;
mod tty;
pub mod vm;
