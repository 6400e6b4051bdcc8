//! pullgate: a caching reverse proxy for OCI and Docker registries that
//! serves only approved content.
//!
//! A request moves through these modules, each with one job; dependencies
//! point down this list, never up:
//!
//! - [`server`]: listeners, connections, graceful shutdown.
//! - [`zerocopy`]: cached blobs sent with `sendfile` under hyper.
//! - [`handler`]: the pipeline, the only module that spells out the flow.
//! - [`route`]: `/v2/<name>/...` to an upstream and a repository.
//! - [`policy`]: which rule governs a name, and its verdict.
//! - [`verify`]: the signature requirement, with cached verdicts.
//! - [`fetch`]: one upstream fetch shared by every waiting client.
//! - [`upstream`]: HTTP to registries, token auth, redirects.
//! - [`store`]: content-addressed files, tags, LRU eviction.
//! - [`config`]: the TOML file, validated before anything starts.
//! - [`keys`]: trusted public keys and signature checks.
//! - [`cosign`]: the cosign signature wire format.
//! - [`approvals`]: approvals pullgate holds itself (`pullgate approve`).
//! - [`audit`]: the audit log and the decisions behind the dashboard.
//! - [`metrics`], [`error`], [`body`], [`names`]: shared vocabulary.

#![forbid(unsafe_code)]

pub mod approvals;
pub mod audit;
pub mod bases;
pub mod body;
pub mod config;
pub mod cosign;
pub mod error;
pub mod explain;
pub mod fetch;
pub mod handler;
pub mod keys;
pub mod metrics;
pub mod names;
pub mod policy;
pub mod rewrite;
pub mod route;
pub mod server;
pub mod store;
pub mod upstream;
pub mod verify;
pub mod zerocopy;

pub use config::Config;
pub use handler::App;
pub use server::{serve, serve_admin, Shutdown};
