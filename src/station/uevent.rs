//! The kernel's device events (uevents), read from its netlink socket: no
//! udevd is needed, so a minimal host or a CI container sees cards come and
//! go as the kernel does. A card reader's disk (`sdb`) stays when its card is
//! pulled; the kernel raises `change` on it, and its size reads 0 until a
//! card is pushed in again.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::socket::{
    AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
};

/// The kernel's own multicast group (udevd re-broadcasts on group 2).
const KERNEL_GROUP: u32 = 1;
/// One uevent is at most a few KiB (the kernel's UEVENT_BUFFER_SIZE is 2 KiB).
const MAX_EVENT: usize = 8192;

/// One event about a whole disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskEvent {
    pub action: String,
    /// Kernel name: `sdb`, `mmcblk0`, `loop3`.
    pub name: String,
}

pub struct Uevents {
    socket: OwnedFd,
}

impl Uevents {
    pub fn open() -> Result<Self> {
        let socket = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkKObjectUEvent,
        )
        .context("opening the kernel's uevent socket")?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            &NetlinkAddr::new(std::process::id(), KERNEL_GROUP),
        )
        .context(
            "listening to the kernel's uevents (needs root, or CAP_NET_ADMIN in a container)",
        )?;
        Ok(Self { socket })
    }

    /// The next event about a whole disk, waiting at most `wait`.
    pub fn next_disk_event(&self, wait: Duration) -> Result<Option<DiskEvent>> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let deadline = std::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let timeout = PollTimeout::from(left.as_millis().min(60_000) as u16);
            let mut fds = [PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e).context("waiting for uevents"),
            }
            let mut buf = [0u8; MAX_EVENT];
            let n = recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.socket),
                &mut buf,
                nix::sys::socket::MsgFlags::empty(),
            )
            .context("reading a uevent")?;
            if let Some(event) = parse(&buf[..n]) {
                return Ok(Some(event));
            }
            if left.is_zero() {
                return Ok(None);
            }
        }
    }
}

/// `ACTION@DEVPATH\0KEY=VALUE\0…`: a disk's event, or `None` for anything else
/// (partitions, other subsystems, libudev's own messages).
pub fn parse(raw: &[u8]) -> Option<DiskEvent> {
    let mut fields = raw.split(|&b| b == 0).filter(|f| !f.is_empty());
    let header = std::str::from_utf8(fields.next()?).ok()?;
    header.split_once('@')?;
    let vars: BTreeMap<&str, &str> = fields
        .filter_map(|f| std::str::from_utf8(f).ok()?.split_once('='))
        .collect();
    if vars.get("SUBSYSTEM") != Some(&"block") || vars.get("DEVTYPE") != Some(&"disk") {
        return None;
    }
    let name = vars.get("DEVNAME")?;
    // A kernel name is one path component of a device node under /dev.
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return None;
    }
    Some(DiskEvent {
        action: (*vars.get("ACTION")?).to_string(),
        name: (*name).to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_change_is_read_and_a_partition_is_not() {
        let disk = b"change@/devices/virtual/block/loop3\0ACTION=change\0DEVPATH=/devices/virtual/block/loop3\0SUBSYSTEM=block\0DEVNAME=loop3\0DEVTYPE=disk\0SEQNUM=42\0";
        assert_eq!(
            parse(disk),
            Some(DiskEvent {
                action: "change".into(),
                name: "loop3".into()
            })
        );
        let part = b"add@/devices/virtual/block/loop3/loop3p1\0ACTION=add\0SUBSYSTEM=block\0DEVNAME=loop3p1\0DEVTYPE=partition\0";
        assert_eq!(parse(part), None);
        let odd = b"add@/x\0ACTION=add\0SUBSYSTEM=block\0DEVNAME=../sda\0DEVTYPE=disk\0";
        assert_eq!(parse(odd), None);
        assert_eq!(parse(b"libudev\0\xfe\xed"), None);
    }
}
