//! The role every rule backend plays for the sync loop: program the model's service ports (all
//! of one family's rules, applying only what differs where it can), and remove everything.

use std::collections::BTreeSet;

use crate::iptables::{Iptables, IptablesError, SyncReport};
use crate::ipvs::{IpvsBackend, IpvsBackendError};
use crate::model::Model;
use crate::nftables::Nftables;
use crate::nftables::netlink::NftError;

/// Why a backend failed. Retryable: the next sync is a full one.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// iptables.
    #[error(transparent)]
    Iptables(#[from] IptablesError),
    /// nftables.
    #[error(transparent)]
    Nftables(#[from] NftError),
    /// IPVS.
    #[error(transparent)]
    Ipvs(#[from] IpvsBackendError),
}

/// A rule backend.
pub trait RuleBackend: Send + std::fmt::Debug {
    /// Programs `model`'s service ports. `changed` names the Services whose ports changed since
    /// this backend's last successful sync, which is all a partial sync needs to look at;
    /// `full` asks for a complete rewrite.
    fn sync(
        &mut self,
        model: &Model,
        changed: &BTreeSet<String>,
        full: bool,
    ) -> Result<SyncReport, BackendError>;
    /// Removes everything this backend programmed.
    fn cleanup(&mut self) -> Result<(), BackendError>;
    /// The proxy mode it implements (`iptables`, `nftables`, `ipvs`), as upstream's
    /// `/proxyMode` names it.
    fn mode(&self) -> &'static str;
}

/// The changed Services with their ports, as the backends' partial syncs take them.
fn changes<'a>(
    model: &'a Model,
    changed: &'a BTreeSet<String>,
) -> impl Iterator<Item = (&'a str, &'a [crate::model::ServicePort])> {
    changed.iter().map(|s| (s.as_str(), model.ports_of(s)))
}

/// A partial sync of the changed Services where the backend can build on an earlier one
/// (`partial` answers `None` when it cannot), else a sync of everything; says which it was.
fn partial_or_full<B, R>(
    backend: &mut B,
    model: &Model,
    changed: &BTreeSet<String>,
    full: bool,
    partial: impl FnOnce(&mut B, &Model, &BTreeSet<String>) -> Option<R>,
    everything: impl FnOnce(&mut B, &Model) -> R,
) -> (bool, R) {
    if !full && let Some(outcome) = partial(backend, model, changed) {
        return (false, outcome);
    }
    (true, everything(backend, model))
}

impl RuleBackend for Iptables {
    /// Upstream's shape: every sync renders every Service's rules (KUBE-SERVICES lists them
    /// all) and writes only the chains that changed.
    fn sync(
        &mut self,
        model: &Model,
        _changed: &BTreeSet<String>,
        full: bool,
    ) -> Result<SyncReport, BackendError> {
        Ok(Iptables::sync(self, model.ports(), full)?)
    }
    fn cleanup(&mut self) -> Result<(), BackendError> {
        Ok(Iptables::cleanup(self)?)
    }
    fn mode(&self) -> &'static str {
        "iptables"
    }
}

impl RuleBackend for Nftables {
    fn sync(
        &mut self,
        model: &Model,
        changed: &BTreeSet<String>,
        full: bool,
    ) -> Result<SyncReport, BackendError> {
        let (full, outcome) = partial_or_full(
            self,
            model,
            changed,
            full,
            |b, m, c| b.sync_services(changes(m, c)),
            |b, m| Nftables::sync(b, m.ports(), true),
        );
        let (messages, chains) = outcome?;
        Ok(SyncReport {
            full,
            written: messages,
            deleted: 0,
            chains,
        })
    }
    fn cleanup(&mut self) -> Result<(), BackendError> {
        Ok(Nftables::cleanup(self)?)
    }
    fn mode(&self) -> &'static str {
        "nftables"
    }
}

impl RuleBackend for IpvsBackend {
    fn sync(
        &mut self,
        model: &Model,
        changed: &BTreeSet<String>,
        full: bool,
    ) -> Result<SyncReport, BackendError> {
        let (_, outcome) = partial_or_full(
            self,
            model,
            changed,
            full,
            |b, m, c| b.sync_services(changes(m, c)),
            |b, m| IpvsBackend::sync(b, m.ports(), true),
        );
        Ok(outcome?)
    }
    fn cleanup(&mut self) -> Result<(), BackendError> {
        Ok(IpvsBackend::cleanup(self)?)
    }
    fn mode(&self) -> &'static str {
        "ipvs"
    }
}
