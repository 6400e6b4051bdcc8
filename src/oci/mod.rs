//! The OCI vocabulary every other module speaks: parsed names and digests
//! ([`names`]), typed manifests ([`manifest`]) and the distribution spec's
//! error responses ([`error`]). Depends on nothing else in the crate.

pub mod error;
pub mod manifest;
pub mod names;

pub use error::ApiError;
pub use manifest::{Kind, Manifest, Platform};
pub use names::{Digest, Reference, RepoName, Tag};
