//! The role every rule backend plays for the sync loop: program a set of service ports (all of
//! one family's rules, applying only what differs where it can), and remove everything.

use crate::iptables::{Iptables, IptablesError, SyncReport};
use crate::ipvs::{IpvsBackend, IpvsBackendError};
use crate::model::ServicePort;
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
    /// Programs `ports`; `full` asks for a complete rewrite.
    fn sync(&mut self, ports: &[ServicePort], full: bool) -> Result<SyncReport, BackendError>;
    /// Removes everything this backend programmed.
    fn cleanup(&mut self) -> Result<(), BackendError>;
    /// The proxy mode it implements (`iptables`, `nftables`, `ipvs`), as upstream's
    /// `/proxyMode` names it.
    fn mode(&self) -> &'static str;
}

impl RuleBackend for Iptables {
    fn sync(&mut self, ports: &[ServicePort], full: bool) -> Result<SyncReport, BackendError> {
        Ok(Iptables::sync(self, ports, full)?)
    }
    fn cleanup(&mut self) -> Result<(), BackendError> {
        Ok(Iptables::cleanup(self)?)
    }
    fn mode(&self) -> &'static str {
        "iptables"
    }
}

impl RuleBackend for Nftables {
    fn sync(&mut self, ports: &[ServicePort], full: bool) -> Result<SyncReport, BackendError> {
        let (messages, chains) = Nftables::sync(self, ports, full)?;
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
    fn sync(&mut self, ports: &[ServicePort], full: bool) -> Result<SyncReport, BackendError> {
        Ok(IpvsBackend::sync(self, ports, full)?)
    }
    fn cleanup(&mut self) -> Result<(), BackendError> {
        Ok(IpvsBackend::cleanup(self)?)
    }
    fn mode(&self) -> &'static str {
        "ipvs"
    }
}
