//! What the base check and the base refresh read, through the content
//! layer: the same store, single flights and stale-if-error as pulls.

use std::sync::Arc;

use super::context::{Ctx, Generation};
use super::App;
use crate::config::BaseRef;
use crate::content::{Accept, Lookup, Small};
use crate::oci::names::{Digest, Reference};
use crate::oci::{Manifest, Platform, RepoName};
use crate::remote::Remote;
use crate::store::TagKey;
use crate::verify::bases::{self, BaseError};

/// Largest image config read for its platform.
const MAX_CONFIG: u64 = 1024 * 1024;

/// Manifests and configs of one repository, for the base check of a pull.
pub struct RouteSource<'a> {
    pub app: &'a Arc<App>,
    pub gen: &'a Generation,
    pub remote: &'a Arc<dyn Remote>,
    pub repo: &'a RepoName,
}

impl<'a> RouteSource<'a> {
    pub fn of(app: &'a Arc<App>, ctx: &'a Ctx) -> RouteSource<'a> {
        RouteSource {
            app,
            gen: &ctx.gen,
            remote: &ctx.remote,
            repo: &ctx.route.repo,
        }
    }
}

impl bases::Source for RouteSource<'_> {
    async fn manifest(&self, digest: Digest) -> Result<Arc<Manifest>, BaseError> {
        let max = self.gen.config.server.max_manifest_size;
        let m = self
            .app
            .content
            .manifest(
                self.remote,
                self.repo,
                digest,
                Accept::Any,
                max,
                Lookup::Internal,
            )
            .await?;
        Ok(m)
    }

    /// From the config blob in the store, else from the remote (not
    /// stored: the client fetching it next stores it the usual way).
    async fn platform(&self, config: Digest) -> Option<Platform> {
        let small = self
            .app
            .content
            .small_blob(&**self.remote, self.repo, config, MAX_CONFIG)
            .await
            .ok()?;
        match small {
            Small::Body(b) if Digest::of(&b) == config => Platform::from_config(&b),
            _ => None,
        }
    }
}

/// Resolves base references the way a pull of them would be resolved,
/// asking the remote every time (a refresh is when bases move).
pub struct Resolver<'a> {
    pub app: &'a Arc<App>,
    pub gen: &'a Generation,
}

impl Resolver<'_> {
    fn route(&self, base: &BaseRef) -> Result<(&Arc<dyn Remote>, RepoName), BaseError> {
        let name: RepoName = base
            .canonical
            .parse()
            .map_err(|e| BaseError::Route(format!("{e}")))?;
        let route = self
            .gen
            .router
            .route(&name, None)
            .map_err(|e| BaseError::Route(e.to_string()))?;
        Ok((&self.gen.remotes[route.upstream], route.repo))
    }
}

impl bases::Resolver for Resolver<'_> {
    async fn resolve(&self, base: &BaseRef) -> Result<Digest, BaseError> {
        let Reference::Tag(tag) = &base.reference else {
            return Err(BaseError::Route(format!("{} is not a tag", base.image)));
        };
        let (remote, repo) = self.route(base)?;
        let key = TagKey {
            upstream: remote.name().clone(),
            repo,
            tag: tag.clone(),
        };
        let storage = &self.gen.config.storage;
        let max = self.gen.config.server.max_manifest_size;
        let m = self
            .app
            .content
            .resolve_tag(remote, &key, Accept::Any, max, storage.tag_ttl)
            .await?;
        Ok(m.digest)
    }

    async fn manifest(&self, base: &BaseRef, digest: Digest) -> Result<Arc<Manifest>, BaseError> {
        let (remote, repo) = self.route(base)?;
        let source = RouteSource {
            app: self.app,
            gen: self.gen,
            remote,
            repo: &repo,
        };
        bases::Source::manifest(&source, digest).await
    }
}
