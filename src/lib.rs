//! pullgate: a caching reverse proxy for OCI and Docker registries that
//! serves only approved content.
//!
//! A request moves down these modules; dependencies point down this list,
//! never up (a lower module never names a higher one):
//!
//! - [`server`]: listeners, connections, graceful shutdown, the admin
//!   endpoints.
//! - [`pipeline`]: the only module that spells out the flow, one request
//!   context per request, errors turned into responses in one place;
//!   `pullgate verify` runs it with a trace.
//! - [`route`]: `/v2/<name>/...` to an upstream and a repository; name
//!   rewrites.
//! - [`policy`]: which rule governs a name, its verdict and reasons.
//! - [`verify`]: signatures (local approvals, cosign `.sig` tags, sigstore
//!   bundles), base images, and the verdict cache.
//! - [`content`]: the store first, then a remote; one fetch per blob,
//!   manifest or tag however many clients ask; stale-if-error.
//! - [`store`]: content by digest and its metadata, a trait with a
//!   filesystem and a memory implementation.
//! - [`remote`]: where content comes from when the store lacks it (an
//!   upstream registry today).
//! - [`audit`], [`metrics`]: what is recorded and counted.
//! - [`oci`]: names, digests, typed manifests, the spec's error JSON.
//! - [`auth`]: who is asking (a client certificate, an htpasswd user)
//!   and the tenant whose repositories they may pull.
//! - [`config`] (with [`keys`], [`tls`], [`htpasswd`]): the TOML file,
//!   validated before anything starts, the files it names read and
//!   checked; a leaf.
//! - [`bundle`]: `pullgate export` and `import`, approved images across an
//!   air gap (beside the pipeline, which both ends run).
//! - [`zerocopy`], [`body`], [`fsutil`], [`trace`]: small shared pieces.

#![forbid(unsafe_code)]

pub mod audit;
pub mod auth;
pub mod body;
pub mod bundle;
pub mod config;
pub mod content;
pub mod fsutil;
pub mod htpasswd;
pub mod keyless;
pub mod keys;
pub mod metrics;
pub mod oci;
pub mod pipeline;
pub mod policy;
pub mod remote;
pub mod route;
pub mod server;
pub mod store;
pub mod tls;
pub mod trace;
pub mod verify;
pub mod zerocopy;

#[doc(hidden)]
pub mod fuzz;

pub use config::Config;
pub use oci::names;
pub use pipeline::App;
pub use server::{serve, serve_admin, Shutdown};
pub use verify::{approvals, bases, cosign};
