//! The root filesystem shrunk to what it uses plus a margin, and the image cut
//! after it. e2fsprogs do the filesystem (`e2fsck -f`, then `resize2fs` to its
//! `-P` minimum plus the margin) on a sparse copy of the partition: no root, no
//! mount, SRC untouched. util-linux's `sfdisk` moves the partition's end in the
//! table, MBR or GPT, and puts a GPT's backup header at the new end.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};

use crate::cancel;
use crate::image::{FsKind, Image, PartitionRole, TableKind};

const MIB: u64 = 1 << 20;
/// Room left on the shrunk filesystem for the first boot before it grows
/// (logs, the agent's state): a twentieth of it, at least this much.
const MARGIN_MIN: u64 = 64 * MIB;

/// The partition to shrink: the last one on the disk, when it holds ext4.
#[derive(Debug, Clone)]
pub struct Part {
    pub number: u32,
    pub start: u64,
    pub len: u64,
    table: TableKind,
}

pub fn candidate<D>(image: &Image<D>) -> Option<Part>
where
    D: std::io::Read + std::io::Write + std::io::Seek + std::fmt::Debug + 'static,
{
    let last = image
        .table()
        .partitions
        .iter()
        .filter(|p| p.role != PartitionRole::Extended)
        .max_by_key(|p| p.start)?;
    (image.probe(last) == FsKind::Ext).then(|| Part {
        number: last.number,
        start: last.start,
        len: last.size,
        table: image.table().kind,
    })
}

/// Checks and shrinks `root` (the partition's copy), puts it back into
/// `image` in its place, moves the partition's end and cuts the image: its
/// new length.
pub fn shrink(
    image: &Path,
    root: &Path,
    part: &Part,
    source: &Path,
    cancel: &AtomicBool,
) -> Result<u64> {
    let what = format!("{} partition {}", source.display(), part.number);
    fsck(root, &what)?;
    cancel::check(cancel)?;
    let (blocks, block_size) = blocks_of(root)?;
    let minimum = minimum_blocks(root).with_context(|| format!("sizing {what}"))?;
    let margin = (minimum * block_size / 20).max(MARGIN_MIN) / block_size;
    let target = minimum + margin;
    if target < blocks {
        run(
            Command::new("resize2fs").arg(root).arg(target.to_string()),
            None,
            &format!("shrinking {what}"),
        )?;
    }
    cancel::check(cancel)?;
    let (blocks, block_size) = blocks_of(root)?;
    let fs_len = blocks
        .checked_mul(block_size)
        .context("the shrunk filesystem gives a size past 2^64 bytes")?;
    let part_len = fs_len.div_ceil(MIB) * MIB;
    if part_len >= part.len {
        // Nothing to gain: the copy goes back as it is.
        copy_data(root, image, part.start, part.len)?;
        return File::open(image)?
            .metadata()
            .map(|m| m.len())
            .map_err(Into::into);
    }
    copy_data(root, image, part.start, part_len)?;
    let end = part.start + part_len;
    // A GPT keeps its backup (33 sectors) after the last partition.
    let new_len = match part.table {
        TableKind::Mbr => end,
        TableKind::Gpt => end + MIB,
    };
    cut(image, part, part_len, new_len)?;
    Ok(new_len)
}

/// The table as it was (sfdisk's dump: disk and partition ids kept), the
/// partition's size changed, written again on the image cut to `new_len`: a
/// GPT's headers both land where the new length puts them.
fn cut(image: &Path, part: &Part, part_len: u64, new_len: u64) -> Result<()> {
    let out = Command::new("sfdisk")
        .arg("-d")
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .context("running sfdisk (util-linux)")?;
    if !out.status.success() {
        bail!(
            "reading the partition table: sfdisk: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let dump = String::from_utf8_lossy(&out.stdout);
    let start = format!("start={:>12},", part.start / 512);
    let mut changed = false;
    let table: Vec<String> = dump
        .lines()
        // Worked out again from the new length.
        .filter(|line| !line.starts_with("last-lba:"))
        .map(|line| match line.find(&start) {
            Some(_) => {
                changed = true;
                resize_line(line, part_len / 512)
            }
            None => line.to_string(),
        })
        .collect();
    if !changed {
        bail!(
            "sfdisk's dump of the table has no partition starting at sector {}",
            part.start / 512
        );
    }
    // Boot code, if any, is kept: sfdisk writes a new first sector.
    let head = {
        let file = File::open(image)?;
        let mut code = [0u8; 440];
        file.read_exact_at(&mut code, 0)?;
        code
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .with_context(|| format!("opening {}", image.display()))?;
    file.set_len(new_len)
        .context("cutting the image after its last partition")?;
    run(
        Command::new("sfdisk")
            .args([
                "--no-reread",
                "--no-tell-kernel",
                "-q",
                "--wipe",
                "never",
                "--wipe-partitions",
                "never",
            ])
            .arg(image),
        Some(&(table.join("\n") + "\n")),
        "writing the partition table with the partition's new end",
    )?;
    file.write_all_at(&head, 0)
        .context("keeping the boot code")?;
    file.sync_all().context("flushing the image")?;
    Ok(())
}

/// A dump line with its `size=` set to `sectors`.
fn resize_line(line: &str, sectors: u64) -> String {
    let Some(at) = line.find("size=") else {
        return line.to_string();
    };
    let rest = &line[at + 5..];
    let end = rest.find(',').unwrap_or(rest.len());
    format!("{}size={sectors:>12}{}", &line[..at], &rest[end..])
}

/// `e2fsck -f -p`: a filesystem with errors it cannot mend without asking is
/// refused, naming them; one it mended (on the copy) goes on.
fn fsck(root: &Path, what: &str) -> Result<()> {
    let out = Command::new("e2fsck")
        .args(["-f", "-p"])
        .arg(root)
        .stdin(Stdio::null())
        .output()
        .context("running e2fsck (e2fsprogs)")?;
    // 0: clean, 1: errors corrected.
    if matches!(out.status.code(), Some(0 | 1)) {
        return Ok(());
    }
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let said: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
    let said = said[said.len().saturating_sub(6)..].join("\n  ");
    bail!(
        "the ext4 filesystem of {what} has errors e2fsck will not mend unattended (exit \
         status {}): run e2fsck on the card in its Pi or here, then capture again:\n  {said}",
        out.status.code().unwrap_or(-1)
    )
}

/// `resize2fs -P`: the smallest the filesystem can be, in its blocks.
fn minimum_blocks(root: &Path) -> Result<u64> {
    let out = Command::new("resize2fs")
        .arg("-P")
        .arg(root)
        .output()
        .context("running resize2fs (e2fsprogs)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Estimated minimum size of the filesystem:"))
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| {
            format!(
                "resize2fs -P did not say the minimum size: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
}

/// The filesystem's block count and block size, from its superblock.
fn blocks_of(root: &Path) -> Result<(u64, u64)> {
    let file = File::open(root).with_context(|| format!("opening {}", root.display()))?;
    let mut sb = [0u8; 1024];
    file.read_exact_at(&mut sb, 1024)
        .context("reading the ext4 superblock")?;
    let le32 = |at: usize| u64::from(u32::from_le_bytes(sb[at..at + 4].try_into().unwrap()));
    let log = le32(24);
    if log > 6 {
        bail!("the ext4 superblock gives a block size of 2^{} KiB", log);
    }
    let block_size = 1024u64 << log;
    let incompat = le32(0x60);
    let mut blocks = le32(4);
    // 64bit: the count's high half.
    if incompat & 0x80 != 0 {
        blocks |= le32(0x150) << 32;
    }
    Ok((blocks, block_size))
}

/// The data of `from` (first `len` bytes) into `to` at `at`; holes stay holes.
fn copy_data(from: &Path, to: &Path, at: u64, len: u64) -> Result<()> {
    let src = File::open(from).with_context(|| format!("opening {}", from.display()))?;
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .open(to)
        .with_context(|| format!("opening {}", to.display()))?;
    // The old partition's bytes past the new end go: holes, not old blocks.
    punch(&dst, at, len)?;
    let mut buf = vec![0u8; 4 << 20];
    for (start, end) in data_runs(&src, len)? {
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], pos)?;
            dst.write_all_at(&buf[..n], at + pos)?;
            pos += n as u64;
        }
    }
    Ok(())
}

/// Zeroes (a hole) over the partition's old place before the copy lands.
fn punch(file: &File, at: u64, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    let r = unsafe {
        nix::libc::fallocate(
            file.as_raw_fd(),
            nix::libc::FALLOC_FL_PUNCH_HOLE | nix::libc::FALLOC_FL_KEEP_SIZE,
            at as i64,
            len as i64,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("clearing the partition's old place");
    }
    Ok(())
}

/// The runs of data in the first `len` bytes of a sparse file (SEEK_DATA/HOLE).
fn data_runs(file: &File, len: u64) -> Result<Vec<(u64, u64)>> {
    use nix::unistd::{Whence, lseek};
    let mut runs = Vec::new();
    let mut at = 0i64;
    let len = len as i64;
    while at < len {
        let start = match lseek(file, at, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e).context("finding the data of the shrunk filesystem"),
        };
        if start >= len {
            break;
        }
        let end = lseek(file, start, Whence::SeekHole)
            .context("finding the data of the shrunk filesystem")?
            .min(len);
        runs.push((start as u64, end as u64));
        at = end;
    }
    Ok(runs)
}

/// Runs `command` (with `input` on its stdin); its stderr is the error.
fn run(command: &mut Command, input: Option<&str>, what: &str) -> Result<()> {
    use std::io::Write;
    let mut child = command
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{what}: running {:?}", command.get_program()))?;
    if let Some(input) = input {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{what}: {:?} failed: {}",
            command.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
