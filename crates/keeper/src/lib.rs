//! The sandbox keeper: the process that holds one sandbox — a process sandbox or a pod VM — for
//! its whole life and tears it down when it ends, and what launchers and tools need to manage
//! sandboxes.
//!
//! - [`launch`]: starting a keeper (`coffer __sandbox`) and waiting for its agent — the one
//!   launch path `coffer run` and the containerd shim share ([`KeeperArgs`], [`Keeper`]).
//! - [`run`]: the keeper itself ([`keep`]), which runs a [`process`] sandbox, a pod [`vm`] or a
//!   peer pod ([`remote`]: a VM `coffer-cloud` creates),
//!   serves the emulated PSP to it alone and forwards its outbound connections ([`egress`]).
//! - [`dir`]: a sandbox's directory ([`SandboxDir`]): alive or failed, reaping what a killed
//!   keeper left, reaching its agent and stopping it; [`cgroup`]: the cgroups of its
//!   containers.
//!
//! The CLI (`coffer run`, `ps`, `rm`, `exec`, `logs`, and the hidden `__sandbox`) and the shim
//! are argument parsing and protocol translation over this crate.

pub mod cgroup;
pub mod cni;
pub mod dir;
pub mod egress;
mod error;
pub mod hotplug;
pub mod launch;
mod lifetime;
pub mod podnet;
pub mod process;
pub mod remote;
pub mod run;
pub mod vm;

pub use dir::{check_name, SandboxDir, DEFAULT_STATE_DIR};
pub use error::SandboxError;
pub use launch::*;
pub use process::measure_agent;
pub use run::keep;
