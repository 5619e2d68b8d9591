//! Peer pods: `coffer-cloud`, the node daemon that creates a sandbox's pod VM through an
//! infrastructure API instead of nesting it on the node (docs/peer-pods.md).
//!
//! - [`api`]: the versioned local API (gRPC on a unix socket), its types and a client
//!   ([`client`]) for the node's sandbox keepers.
//! - [`config`]: the daemon's configuration: cluster and node, the provider, the allowed
//!   instance types.
//! - [`provider`]: what a provider does ([`provider::Provider`]: create, delete, list by tag)
//!   and the checks every request passes before any provider call.
//! - [`lease`]: whether a sandbox still lives (its keeper holds `keeper.lock`).
//! - [`server`]: the API service and the reconciler: a VM without a live sandbox is deleted, on
//!   start and periodically.
//! - `libvirt` (feature `libvirt`): the libvirt provider, local or remote URI.
//! - `aws` (feature `aws`): the AWS provider (EC2).
//! - `azure` (feature `azure`): the Azure provider (confidential VMs through Resource Manager).
//! - `ibmcloud` (feature `ibmcloud`): the IBM Cloud provider (VPC instances).
//! - `rest` (with `azure` or `ibmcloud`): the JSON REST client those two share.
//!
//! A VM's agent is reached over mutual TLS with keys the keeper made for it
//! (`coffer_podvm::remote`); this daemon hands them to the VM and never uses them.

#![deny(missing_docs)]

pub mod api {
    //! The generated local API (`proto/coffer/cloud/v1/cloud.proto`).
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("coffer.cloud.v1");
}
#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "azure")]
pub mod azure;
pub mod client;
pub mod config;
#[cfg(feature = "ibmcloud")]
pub mod ibmcloud;
pub mod lease;
#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod provider;
#[cfg(feature = "rest")]
pub mod rest;
pub mod server;

pub use config::Config;
pub use provider::{CloudError, Provider, Vm, VmSpec};

/// Where the daemon listens by default.
pub const DEFAULT_SOCKET: &str = "/run/coffer/cloud.sock";
