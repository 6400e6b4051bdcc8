//! What one config load builds ([`Generation`]), and what one request
//! carries through the pipeline ([`Ctx`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::remote::registry::ClientError;
use crate::remote::{Remote, UpstreamClient};
use crate::route::rewrite::Rewrites;
use crate::route::{Route, Router};
use crate::trace::Trace;

/// Numbers config generations; verdicts are cached per generation.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// Everything that changes together on a config reload.
pub struct Generation {
    /// Unique per load of the config.
    pub id: u64,
    pub config: Arc<Config>,
    pub router: Router,
    pub rewrites: Rewrites,
    pub policies: Policies,
    /// One remote per configured upstream, in config order.
    pub remotes: Vec<Arc<dyn Remote>>,
}

impl Generation {
    pub fn build(config: Config, metrics: &Arc<Metrics>) -> Result<Generation, ClientError> {
        let remotes = config
            .upstreams
            .iter()
            .map(|u| {
                UpstreamClient::new(u, metrics.clone()).map(|c| Arc::new(c) as Arc<dyn Remote>)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Generation {
            id: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            router: Router::for_upstreams(&config.upstreams),
            policies: Policies::new(config.policies.clone()),
            rewrites: Rewrites::new(&config.rewrites),
            config: Arc::new(config),
            remotes,
        })
    }
}

/// Who is asking. Today every client is anonymous; the site gateway fills
/// this from a client certificate or an htpasswd user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Identity {
    #[default]
    Anonymous,
}

/// One request on its way through the pipeline.
pub struct Ctx {
    pub gen: Arc<Generation>,
    pub route: Route,
    /// Where this route's content comes from when the store lacks it.
    pub remote: Arc<dyn Remote>,
    /// The client's address, for the audit log.
    pub peer: SocketAddr,
    pub identity: Identity,
    pub head: bool,
    /// The decision in words, for `pullgate verify`; `None` for pulls.
    pub trace: Option<Arc<Trace>>,
}

impl Ctx {
    pub fn new(gen: Arc<Generation>, route: Route, peer: SocketAddr, head: bool) -> Ctx {
        Ctx {
            remote: gen.remotes[route.upstream].clone(),
            gen,
            route,
            peer,
            identity: Identity::Anonymous,
            head,
            trace: None,
        }
    }

    pub fn trace(&self) -> Option<&Trace> {
        self.trace.as_deref()
    }

    /// The name as a denial shows it: under a rewrite, the name the client
    /// asked for too.
    pub fn shown_name(&self) -> std::borrow::Cow<'_, str> {
        match &self.route.rewritten_from {
            Some(asked) => std::borrow::Cow::Owned(format!(
                "{}, served for {asked} by a rewrite",
                self.route.canonical
            )),
            None => std::borrow::Cow::Borrowed(self.route.canonical.as_str()),
        }
    }
}
