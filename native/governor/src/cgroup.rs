//! Where this process's memory cgroup is, and what its files say.
//!
//! [`locate`] reads `/proc/self/cgroup` and `/proc/self/mountinfo` once and returns the
//! process's own memory cgroup directory and its ancestors up to the mount point ([`Cgroup`]).
//! Every read after that ([`Cgroup::levels`]) opens the limit and statistics files again: limits
//! can be changed at runtime (a Kubernetes in-place resize, `systemctl set-property`, a YARN
//! container update), so nothing read from them is cached.
//!
//! v1 and v2 differ in names only:
//!
//! | | v2 (unified) | v1 (memory controller) |
//! |---|---|---|
//! | limit | `memory.max`, `memory.high` (`max` = none) | `memory.limit_in_bytes` (≥ 2^62 = none); `hierarchical_memory_limit` of `memory.stat` also covers ancestors above the mount |
//! | anonymous usage | `anon` of `memory.stat` | `total_rss` of `memory.stat` (anonymous and swap cache, huge pages included) |
//! | page cache (shown, never used) | `file` | `total_cache` |
//! | OOM kills | `oom_kill` of `memory.events` | `oom_kill` of `memory.oom_control` |
//!
//! Usage is anonymous memory, never `memory.current` / `memory.usage_in_bytes`: those include
//! page cache, which the kernel reclaims before it kills anything, so a threshold on them fires
//! while a job merely reads files.
//!
//! All paths go through a [`FsRoot`], `/` in production and a recorded tree in tests.

use std::io;
use std::path::{Path, PathBuf};

/// The file system the files are read from: `/`, or a directory holding a recorded tree
/// (`proc/self/cgroup`, `proc/self/mountinfo`, `sys/fs/cgroup/...`).
#[derive(Clone, Debug)]
pub struct FsRoot(PathBuf);

impl FsRoot {
    /// The real file system.
    pub fn system() -> Self {
        FsRoot(PathBuf::from("/"))
    }

    /// A recorded tree under `dir`.
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        FsRoot(dir.into())
    }

    /// `absolute` (a path as the process sees it) under this root.
    pub fn path(&self, absolute: &Path) -> PathBuf {
        self.0.join(absolute.strip_prefix("/").unwrap_or(absolute))
    }

    fn read(&self, absolute: &Path) -> io::Result<String> {
        std::fs::read_to_string(self.path(absolute))
    }
}

/// Which cgroup hierarchy holds the memory controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// cgroup v1: a `cgroup` mount with the `memory` controller.
    V1,
    /// cgroup v2: the unified `cgroup2` mount, memory controller enabled.
    V2,
}

/// The process's memory cgroup: its directory and the directories above it, as far as the
/// mount shows them.
#[derive(Clone, Debug)]
pub struct Cgroup {
    /// v1 or v2.
    pub version: Version,
    /// Own directory first, then each parent up to the mount point (paths as the process sees them).
    pub dirs: Vec<PathBuf>,
    root: FsRoot,
}

/// What one directory of the hierarchy says now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LevelReading {
    /// The directory.
    pub dir: PathBuf,
    /// The smallest limit set at this directory (v2: `memory.max` and `memory.high`), if any,
    /// and the file that set it.
    pub limit: Option<(u64, &'static str)>,
    /// Anonymous bytes charged to this directory and everything below it.
    pub anon: u64,
    /// Page cache charged here (for logs: it is never counted as usage).
    pub cache: u64,
}

/// v1 writes "no limit" as the largest page-aligned `i64`; anything this large is none.
const V1_UNLIMITED: u64 = 1 << 62;

/// Keeps the smaller of `limit` and `bytes` (with the file that set it).
fn consider(limit: &mut Option<(u64, &'static str)>, bytes: Option<u64>, file: &'static str) {
    if let Some(b) = bytes {
        if limit.is_none_or(|(l, _)| b < l) {
            *limit = Some((b, file));
        }
    }
}

/// `/proc/self/cgroup` now (what changes when the process is moved to another cgroup).
pub fn membership(root: &FsRoot) -> Option<String> {
    root.read(Path::new("/proc/self/cgroup")).ok()
}

/// Finds the process's memory cgroup; `None` when no memory controller applies (no cgroup
/// files, the v2 root cgroup, or a v2 hierarchy without the memory controller).
pub fn locate(root: &FsRoot) -> Option<Cgroup> {
    let membership = membership(root)?;
    let mounts = root.read(Path::new("/proc/self/mountinfo")).ok()?;
    let mounts = parse_mountinfo(&mounts);
    // v1 first: on a hybrid system the unified mount exists but the memory controller is v1's.
    for (version, path) in parse_membership(&membership) {
        let mount = mounts.iter().find(|m| match version {
            Version::V1 => {
                m.fstype == "cgroup" && m.super_options.split(',').any(|o| o == "memory")
            }
            Version::V2 => m.fstype == "cgroup2",
        });
        let Some(mount) = mount else { continue };
        let own = mount.dir_of(&path);
        // The memory controller is on for this directory when its statistics file exists (the
        // v2 root cgroup has none, nor has a v2 cgroup whose parent did not enable memory).
        if root.path(&own.join("memory.stat")).is_file() {
            let mut dirs = vec![own.clone()];
            let mut at = own.as_path();
            while at != mount.point.as_path() {
                match at.parent() {
                    Some(parent) if parent.starts_with(&mount.point) => {
                        dirs.push(parent.to_path_buf());
                        at = parent;
                    }
                    _ => break,
                }
            }
            return Some(Cgroup {
                version,
                dirs,
                root: root.clone(),
            });
        }
    }
    None
}

impl Cgroup {
    /// Reads the own directory and every ancestor that sets a limit (own first). An ancestor
    /// whose files cannot be read is left out; an error only if the own directory cannot be read.
    pub fn levels(&self) -> io::Result<Vec<LevelReading>> {
        let mut out = Vec::with_capacity(2);
        for (i, dir) in self.dirs.iter().enumerate() {
            match self.level(dir, i == 0) {
                Ok(Some(level)) => out.push(level),
                Ok(None) => {}
                Err(e) if i == 0 => return Err(e),
                Err(_) => {} // an ancestor without memory files (e.g. the v1 mount root): no limit there
            }
        }
        Ok(out)
    }

    /// One directory's reading; `None` for an ancestor without a limit (its statistics are not
    /// read: they are the costly part of a sample, and only a limit makes them matter).
    fn level(&self, dir: &Path, own: bool) -> io::Result<Option<LevelReading>> {
        let mut limit: Option<(u64, &'static str)> = None;
        match self.version {
            Version::V2 => {
                consider(
                    &mut limit,
                    self.read_limit_v2(dir, "memory.max"),
                    "memory.max",
                );
                consider(
                    &mut limit,
                    self.read_limit_v2(dir, "memory.high"),
                    "memory.high",
                );
                if !own && limit.is_none() {
                    return Ok(None);
                }
                let stat = self.root.read(&dir.join("memory.stat"))?;
                let value = |key: &str| stat_value(&stat, key);
                Ok(Some(LevelReading {
                    dir: dir.to_path_buf(),
                    limit,
                    anon: value("anon").unwrap_or(0),
                    cache: value("file").unwrap_or(0),
                }))
            }
            Version::V1 => {
                let own_limit = self
                    .root
                    .read(&dir.join("memory.limit_in_bytes"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .filter(|&b| b < V1_UNLIMITED);
                consider(&mut limit, own_limit, "memory.limit_in_bytes");
                if !own && limit.is_none() {
                    return Ok(None);
                }
                let stat = self.root.read(&dir.join("memory.stat"))?;
                let value = |key: &str| stat_value(&stat, key);
                if own {
                    // Covers ancestors the mount does not show (a container's view of v1).
                    consider(
                        &mut limit,
                        value("hierarchical_memory_limit").filter(|&b| b < V1_UNLIMITED),
                        "hierarchical_memory_limit",
                    );
                }
                Ok(Some(LevelReading {
                    dir: dir.to_path_buf(),
                    limit,
                    anon: value("total_rss").or_else(|| value("rss")).unwrap_or(0),
                    cache: value("total_cache").or_else(|| value("cache")).unwrap_or(0),
                }))
            }
        }
    }

    fn read_limit_v2(&self, dir: &Path, file: &str) -> Option<u64> {
        let text = self.root.read(&dir.join(file)).ok()?;
        let text = text.trim();
        if text == "max" {
            None
        } else {
            text.parse().ok()
        }
    }

    /// OOM kills the kernel counted in the own cgroup (and below it), if the file says.
    pub fn oom_kills(&self) -> Option<u64> {
        let own = &self.dirs[0];
        let file = match self.version {
            Version::V2 => "memory.events",
            Version::V1 => "memory.oom_control",
        };
        let text = self.root.read(&own.join(file)).ok()?;
        stat_value(&text, "oom_kill")
    }
}

/// The value of `key` in a "key value" per line file (`memory.stat`, `memory.events`, `memory.oom_control`).
pub fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut parts = line.split_ascii_whitespace();
        (parts.next()? == key).then(|| parts.next()?.parse().ok())?
    })
}

/// `/proc/self/cgroup`: the v1 memory line and the v2 line, v1 first.
fn parse_membership(text: &str) -> Vec<(Version, PathBuf)> {
    let mut v1 = None;
    let mut v2 = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some((Version::V2, PathBuf::from(path)));
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some((Version::V1, PathBuf::from(path)));
        }
    }
    v1.into_iter().chain(v2).collect()
}

/// One cgroup mount of `/proc/self/mountinfo`.
#[derive(Debug)]
struct Mount {
    /// The directory of the hierarchy mounted (the `root` field: `/` unless a container sees a sub-tree).
    root: PathBuf,
    point: PathBuf,
    fstype: String,
    super_options: String,
}

impl Mount {
    /// The directory of cgroup `path` (as `/proc/self/cgroup` names it) under this mount.
    fn dir_of(&self, path: &Path) -> PathBuf {
        // A container sees a sub-tree mounted at the mount point: strip the mounted root. With a
        // cgroup namespace the path is relative to it already ("/").
        let relative = path.strip_prefix(&self.root).unwrap_or(path);
        let relative = relative.strip_prefix("/").unwrap_or(relative);
        if relative.as_os_str().is_empty() {
            self.point.clone()
        } else {
            self.point.join(relative)
        }
    }
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let mut post = after.split(' ');
            let fstype = post.next()?;
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            let _source = post.next()?;
            Some(Mount {
                root: PathBuf::from(unescape(fields.get(3)?)),
                point: PathBuf::from(unescape(fields.get(4)?)),
                fstype: fstype.to_string(),
                super_options: post.next().unwrap_or("").to_string(),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        if let (b'\\', Some(byte)) = (bytes[i], octal) {
            out.push(byte);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests;
