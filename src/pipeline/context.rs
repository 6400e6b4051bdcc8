//! What one config load builds ([`Generation`]), and what one request
//! carries through the pipeline ([`Ctx`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::auth::{Gate, Identity};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::remote::offline::Offline;
use crate::remote::registry::ClientError;
use crate::remote::{Remote, UpstreamClient};
use crate::route::rewrite::Rewrites;
use crate::route::{Route, Router};
use crate::store::Store;
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
    /// Identities and tenants.
    pub gate: Gate,
}

impl Generation {
    /// `instance` is what this pullgate calls itself in the hop header;
    /// offline upstreams answer from `offline` (the first store holding an
    /// answer).
    pub fn build(
        config: Config,
        metrics: &Arc<Metrics>,
        instance: &Arc<str>,
        offline: &[Arc<dyn Store>],
    ) -> Result<Generation, ClientError> {
        let remotes = config
            .upstreams
            .iter()
            .map(|u| {
                if u.offline() {
                    let name = Arc::from(u.name.as_str());
                    return Ok(Arc::new(Offline::new(name, offline.to_vec())) as Arc<dyn Remote>);
                }
                UpstreamClient::new(u, metrics.clone(), instance.clone())
                    .map(|c| Arc::new(c) as Arc<dyn Remote>)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Generation {
            gate: Gate::new(&config, metrics),
            id: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            router: Router::for_upstreams(&config.upstreams),
            policies: Policies::new(config.policies.clone()),
            rewrites: Rewrites::new(&config.rewrites),
            config: Arc::new(config),
            remotes,
        })
    }
}

/// The client end of a connection: its address, and the names of the
/// certificate it verified with (TLS with `client_ca`).
#[derive(Debug, Clone)]
pub struct Client {
    pub addr: SocketAddr,
    pub cert: Option<Arc<crate::tls::ClientCert>>,
}

impl Client {
    pub fn anonymous(addr: SocketAddr) -> Client {
        Client { addr, cert: None }
    }
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
    /// The tenant of `identity`, when tenants are configured.
    pub tenant: Option<Arc<str>>,
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
            tenant: None,
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
