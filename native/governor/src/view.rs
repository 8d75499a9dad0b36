//! The container as one figure pair: the limit that binds and the anonymous memory charged
//! against it.
//!
//! A process may sit under several limits: its own cgroup's, a parent's (a Kubernetes pod around
//! the executor container, a YARN container around a launcher script), and a limit the user
//! configured (`spark.nativemem.containerLimit`). Each limit is compared with the usage of the
//! cgroup it is set on (a pod limit counts the sidecar too), and the one with the least headroom
//! binds. Without any cgroup the process's own anonymous resident memory is the usage and only
//! the configured limit applies; with no limit at all there is nothing to govern.

use std::io;
use std::path::{Path, PathBuf};

use crate::cgroup::{self, Cgroup, FsRoot, Version};

/// Where the usage figure comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A cgroup v1 memory controller.
    CgroupV1,
    /// A cgroup v2 memory controller.
    CgroupV2,
    /// No memory cgroup: the process's anonymous resident memory (`RssAnon`).
    Process,
}

/// One reading of the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerView {
    /// Where the usage is read.
    pub source: Source,
    /// The limit that binds (least headroom), bytes; `None`: nothing limits this process.
    pub limit: Option<u64>,
    /// Which limit binds: a cgroup file with its directory, or the configured setting.
    pub limit_from: String,
    /// Anonymous memory charged against that limit, bytes.
    pub usage: u64,
    /// Page cache charged there, bytes (shown, never counted as usage).
    pub cache: u64,
    /// OOM kills the kernel counted in the process's cgroup, if it says.
    pub oom_kills: Option<u64>,
}

impl ContainerView {
    /// Bytes left under the limit (0 when over it); `None` without a limit.
    pub fn headroom(&self) -> Option<u64> {
        self.limit.map(|l| l.saturating_sub(self.usage))
    }
}

/// Something that reads the container: [`CgroupProbe`] in production, a script in tests.
pub trait Probe: Send {
    /// Reads limits and usage now.
    fn read(&mut self) -> io::Result<ContainerView>;
}

/// Reads the process's memory cgroup or, without one, `/proc/self/status`. Limits and usage are
/// read on every call; the cgroup is located again whenever `/proc/self/cgroup` changed (a
/// process can be moved to another cgroup while it runs).
#[derive(Debug)]
pub struct CgroupProbe {
    root: FsRoot,
    cgroup: Option<Cgroup>,
    /// `/proc/self/cgroup` when the cgroup was located.
    membership: Option<String>,
    configured: Option<u64>,
}

/// Setting name of the configured limit, as the error and the view name it.
pub const CONFIGURED_LIMIT: &str = "spark.nativemem.containerLimit";

impl CgroupProbe {
    /// Locates the cgroup under `root`; `configured`: a limit set by the user, bytes.
    pub fn new(root: FsRoot, configured: Option<u64>) -> Self {
        let membership = cgroup::membership(&root);
        let cgroup = cgroup::locate(&root);
        CgroupProbe {
            root,
            cgroup,
            membership,
            configured,
        }
    }

    /// Locates the cgroup again if the process moved.
    fn follow_moves(&mut self) {
        let now = cgroup::membership(&self.root);
        if now != self.membership {
            self.cgroup = cgroup::locate(&self.root);
            self.membership = now;
            log::info!(
                "nativemem governor: the process moved to another cgroup: {:?}",
                self.cgroup.as_ref().map(|c| &c.dirs[0])
            );
        }
    }

    /// The cgroup found, if any.
    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    fn process_anon(&self) -> io::Result<u64> {
        let status = std::fs::read_to_string(self.root.path(Path::new("/proc/self/status")))?;
        // RssAnon (Linux 4.5+) is anonymous memory only; VmRSS adds mapped files.
        let kib = |key: &str| {
            status.lines().find_map(|l| {
                let rest = l.strip_prefix(key)?.strip_prefix(':')?;
                rest.split_ascii_whitespace().next()?.parse::<u64>().ok()
            })
        };
        kib("RssAnon")
            .or_else(|| kib("VmRSS"))
            .map(|k| k * 1024)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "no RssAnon or VmRSS in /proc/self/status",
                )
            })
    }
}

impl Probe for CgroupProbe {
    fn read(&mut self) -> io::Result<ContainerView> {
        self.follow_moves();
        let Some(cgroup) = &self.cgroup else {
            let usage = self.process_anon()?;
            return Ok(ContainerView {
                source: Source::Process,
                limit: self.configured,
                limit_from: CONFIGURED_LIMIT.to_string(),
                usage,
                cache: 0,
                oom_kills: None,
            });
        };
        let levels = cgroup.levels()?;
        let own = &levels[0];
        // (limit, usage, cache, from): the configured limit against the own cgroup's usage, then
        // every cgroup limit against its own cgroup's usage.
        let mut best: Option<(u64, u64, u64, String)> = None;
        let mut consider = |limit: u64, usage: u64, cache: u64, from: String| {
            let headroom = limit.saturating_sub(usage);
            if best
                .as_ref()
                .is_none_or(|(l, u, _, _)| headroom < l.saturating_sub(*u))
            {
                best = Some((limit, usage, cache, from));
            }
        };
        if let Some(limit) = self.configured {
            consider(limit, own.anon, own.cache, CONFIGURED_LIMIT.to_string());
        }
        for level in &levels {
            if let Some((limit, file)) = level.limit {
                consider(limit, level.anon, level.cache, describe(&level.dir, file));
            }
        }
        let source = match cgroup.version {
            Version::V1 => Source::CgroupV1,
            Version::V2 => Source::CgroupV2,
        };
        let oom_kills = cgroup.oom_kills();
        Ok(match best {
            Some((limit, usage, cache, from)) => ContainerView {
                source,
                limit: Some(limit),
                limit_from: from,
                usage,
                cache,
                oom_kills,
            },
            None => ContainerView {
                source,
                limit: None,
                limit_from: String::new(),
                usage: own.anon,
                cache: own.cache,
                oom_kills,
            },
        })
    }
}

fn describe(dir: &Path, file: &str) -> String {
    let mut p = PathBuf::from(dir);
    p.push(file);
    p.display().to_string()
}
