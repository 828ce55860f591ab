//! rtnetlink helpers shared by the plugin's dataplane and netd.

use futures::TryStreamExt;
use rtnetlink::Handle;
use rtnetlink::packet_route::link::LinkMessage;

/// Whether a netlink error means "no such device/route/object": gone is not a failure for
/// lookups and deletions.
pub fn is_not_found(error: &rtnetlink::Error) -> bool {
    matches!(error, rtnetlink::Error::NetlinkError(m) if [nix::libc::ENODEV, nix::libc::ENOENT, nix::libc::ESRCH].contains(&-m.raw_code()))
}

/// The link called `name`, or `None` when there is none.
pub async fn link_by_name(
    handle: &Handle,
    name: &str,
) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    match handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}
