//! The parsers against recorded trees: this machine's v1 hybrid layout, a container's v1 view,
//! Kubernetes-style nested v2, the v2 root, missing files and escaped mount points.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::view::{CgroupProbe, Probe, Source, CONFIGURED_LIMIT};

/// A recorded file tree in a fresh temporary directory, removed on drop.
struct Tree(PathBuf);

impl Tree {
    fn new() -> Tree {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nativemem-governor-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Tree(dir)
    }

    fn file(&self, path: &str, text: &str) -> &Self {
        let p = self.0.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
        self
    }

    fn root(&self) -> FsRoot {
        FsRoot::at(&self.0)
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// Recorded on the CI machine (cgroup v1 memory controller beside an unified mount without it).
const HYBRID_CGROUP: &str = "9:name=systemd:/\n8:pids:/\n7:blkio:/\n6:freezer:/\n5:devices:/\n\
4:memory:/process_api/4468cc51fc93ca7ee8b8cb97efc89241\n3:cpuset:/\n2:cpuacct:/\n1:cpu:/\n0::/\n";
const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
const V1_STAT: &str =
    "cache 10543370240\nrss 967557120\nrss_huge 0\nshmem 0\nmapped_file 19210240\n\
inactive_anon 967323648\nactive_anon 57344\nhierarchical_memory_limit 9223372036854771712\n\
hierarchical_memsw_limit 9223372036854771712\ntotal_cache 10543370240\ntotal_rss 967557120\n\
total_rss_huge 0\ntotal_shmem 0\ntotal_mapped_file 19210240\n";
const V1_UNLIMITED_TEXT: &str = "9223372036854771712\n";

// Recorded shape of a Kubernetes node with cgroup v2 and systemd (no cgroup namespace).
const K8S_CGROUP: &str = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b.slice/cri-containerd-9f8e.scope\n";
const K8S_MOUNTINFO: &str = "\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
27 24 0:25 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
const POD: &str =
    "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b.slice";
fn v2_stat(anon: u64, file: u64) -> String {
    format!("anon {anon}\nfile {file}\nkernel 10088448\nkernel_stack 1343488\npagetables 4575232\nsock 0\nshmem 0\nfile_mapped 0\n")
}

#[test]
fn hybrid_v1_without_limits_reads_total_rss() {
    let own = "/sys/fs/cgroup/memory/process_api/4468cc51fc93ca7ee8b8cb97efc89241";
    let t = Tree::new();
    t.file("/proc/self/cgroup", HYBRID_CGROUP)
        .file("/proc/self/mountinfo", HYBRID_MOUNTINFO)
        .file(&format!("{own}/memory.stat"), V1_STAT)
        .file(&format!("{own}/memory.limit_in_bytes"), V1_UNLIMITED_TEXT)
        .file("/sys/fs/cgroup/memory/process_api/memory.stat", V1_STAT)
        .file(
            "/sys/fs/cgroup/memory/process_api/memory.limit_in_bytes",
            V1_UNLIMITED_TEXT,
        )
        .file(
            &format!("{own}/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        );
    let cg = locate(&t.root()).expect("the v1 memory cgroup");
    assert_eq!(cg.version, Version::V1);
    assert_eq!(
        cg.dirs,
        [
            own,
            "/sys/fs/cgroup/memory/process_api",
            "/sys/fs/cgroup/memory"
        ]
        .map(PathBuf::from)
    );
    assert_eq!(cg.oom_kills(), Some(3));
    let mut probe = CgroupProbe::new(t.root(), None);
    let view = probe.read().unwrap();
    assert_eq!(view.source, Source::CgroupV1);
    assert_eq!(view.limit, None, "2^63 - page is no limit");
    assert_eq!(view.usage, 967_557_120, "total_rss, not usage_in_bytes");
    assert_eq!(view.cache, 10_543_370_240);
    assert_eq!(view.headroom(), None);
}

#[test]
fn v1_parent_limit_binds_against_the_parent_usage() {
    let t = Tree::new();
    let own = "/sys/fs/cgroup/memory/yarn/container_01";
    t.file("/proc/self/cgroup", "4:memory:/yarn/container_01\n")
        .file("/proc/self/mountinfo", HYBRID_MOUNTINFO)
        .file(
            &format!("{own}/memory.stat"),
            "total_rss 1000\ntotal_cache 5\nhierarchical_memory_limit 4096\n",
        )
        .file(&format!("{own}/memory.limit_in_bytes"), "8192\n")
        .file(
            "/sys/fs/cgroup/memory/yarn/memory.stat",
            "total_rss 3000\ntotal_cache 7\n",
        )
        .file("/sys/fs/cgroup/memory/yarn/memory.limit_in_bytes", "4096\n");
    let view = CgroupProbe::new(t.root(), None).read().unwrap();
    assert_eq!(view.limit, Some(4096));
    assert_eq!(
        view.usage, 3000,
        "the parent's limit counts the parent's usage (siblings too)"
    );
    assert_eq!(view.cache, 7);
    assert_eq!(
        view.limit_from,
        "/sys/fs/cgroup/memory/yarn/memory.limit_in_bytes"
    );
    assert_eq!(view.headroom(), Some(1096));
}

#[test]
fn v1_container_sees_its_subtree_at_the_mount_point() {
    // Docker without a cgroup namespace: the mount's root is the container's own cgroup.
    let t = Tree::new();
    t.file("/proc/self/cgroup", "11:memory:/docker/ab12\n")
        .file(
            "/proc/self/mountinfo",
            "600 590 0:40 /docker/ab12 /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n",
        )
        .file(
            "/sys/fs/cgroup/memory/memory.stat",
            "total_rss 500\ntotal_cache 9000\nhierarchical_memory_limit 2048\n",
        )
        .file(
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            V1_UNLIMITED_TEXT,
        );
    let cg = locate(&t.root()).unwrap();
    assert_eq!(cg.dirs, [PathBuf::from("/sys/fs/cgroup/memory")]);
    let view = CgroupProbe::new(t.root(), None).read().unwrap();
    assert_eq!(
        view.limit,
        Some(2048),
        "hierarchical_memory_limit covers the host's ancestors"
    );
    assert_eq!(
        view.limit_from,
        "/sys/fs/cgroup/memory/hierarchical_memory_limit"
    );
    assert_eq!(view.usage, 500, "page cache (9000) is not usage");
}

#[test]
fn v2_nested_takes_the_least_headroom_and_high_counts() {
    let t = Tree::new();
    let own = format!("{POD}/cri-containerd-9f8e.scope");
    t.file("/proc/self/cgroup", K8S_CGROUP)
        .file("/proc/self/mountinfo", K8S_MOUNTINFO)
        .file(&format!("{own}/memory.stat"), &v2_stat(1_000, 50))
        .file(&format!("{own}/memory.max"), "max\n")
        .file(&format!("{own}/memory.high"), "3000\n")
        .file(
            &format!("{own}/memory.events"),
            "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n",
        )
        .file(&format!("{POD}/memory.stat"), &v2_stat(2_500, 60))
        .file(&format!("{POD}/memory.max"), "4000\n")
        .file(&format!("{POD}/memory.high"), "max\n")
        // The slices above: no limits; the mount root has no memory.max at all.
        .file(
            "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/memory.stat",
            &v2_stat(9_000, 0),
        )
        .file(
            "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/memory.max",
            "max\n",
        )
        .file(
            "/sys/fs/cgroup/kubepods.slice/memory.stat",
            &v2_stat(9_000, 0),
        )
        .file("/sys/fs/cgroup/kubepods.slice/memory.max", "max\n")
        .file("/sys/fs/cgroup/memory.stat", &v2_stat(20_000, 0));
    let cg = locate(&t.root()).unwrap();
    assert_eq!(cg.version, Version::V2);
    assert_eq!(
        cg.dirs.len(),
        5,
        "own, pod, two slices, the mount: {:?}",
        cg.dirs
    );
    assert_eq!(cg.oom_kills(), Some(1));
    let view = CgroupProbe::new(t.root(), None).read().unwrap();
    // own: high 3000 - 1000 = 2000 left; pod: max 4000 - 2500 = 1500 left -> the pod binds.
    assert_eq!((view.limit, view.usage), (Some(4000), 2500));
    assert_eq!(view.limit_from, format!("{POD}/memory.max"));
    assert_eq!(view.source, Source::CgroupV2);

    // Limits are read again on every sample: lowering the own memory.high makes it bind.
    t.file(&format!("{own}/memory.high"), "1200\n");
    let view = CgroupProbe::new(t.root(), None).read().unwrap();
    assert_eq!((view.limit, view.usage), (Some(1200), 1000));
    assert_eq!(view.limit_from, format!("{own}/memory.high"));
}

#[test]
fn configured_limit_binds_when_smaller() {
    let t = Tree::new();
    let own = format!("{POD}/cri-containerd-9f8e.scope");
    t.file("/proc/self/cgroup", K8S_CGROUP)
        .file("/proc/self/mountinfo", K8S_MOUNTINFO)
        .file(&format!("{own}/memory.stat"), &v2_stat(1_000, 0))
        .file(&format!("{own}/memory.max"), "100000\n");
    let view = CgroupProbe::new(t.root(), Some(1_500)).read().unwrap();
    assert_eq!((view.limit, view.usage), (Some(1500), 1000));
    assert_eq!(view.limit_from, CONFIGURED_LIMIT);
}

#[test]
fn v2_root_or_no_cgroup_falls_back_to_the_process() {
    let t = Tree::new();
    t.file("/proc/self/cgroup", "0::/\n")
        .file("/proc/self/mountinfo", K8S_MOUNTINFO)
        .file(
            "/proc/self/status",
            "Name:\tjava\nVmRSS:\t  204800 kB\nRssAnon:\t  102400 kB\nRssFile:\t  102400 kB\n",
        );
    // The v2 root cgroup has no memory.stat: no memory controller applies.
    assert!(locate(&t.root()).is_none());
    let mut probe = CgroupProbe::new(t.root(), None);
    let view = probe.read().unwrap();
    assert_eq!(view.source, Source::Process);
    assert_eq!(view.usage, 100 << 20, "RssAnon, not VmRSS");
    assert_eq!(view.limit, None);
    let view = CgroupProbe::new(t.root(), Some(1 << 30)).read().unwrap();
    assert_eq!(view.limit, Some(1 << 30));

    // No cgroup files at all (not Linux, or /proc hidden): no cgroup, and a read error, not a panic.
    let empty = Tree::new();
    assert!(locate(&empty.root()).is_none());
    assert!(CgroupProbe::new(empty.root(), None).read().is_err());
}

#[test]
fn missing_files_mean_no_limit_not_an_error() {
    let t = Tree::new();
    let own = format!("{POD}/cri-containerd-9f8e.scope");
    t.file("/proc/self/cgroup", K8S_CGROUP)
        .file("/proc/self/mountinfo", K8S_MOUNTINFO)
        .file(&format!("{own}/memory.stat"), &v2_stat(1_000, 0))
        .file(&format!("{own}/memory.max"), "garbage\n");
    let view = CgroupProbe::new(t.root(), None).read().unwrap();
    assert_eq!(view.limit, None);
    assert_eq!(view.usage, 1000);
    assert_eq!(locate(&t.root()).unwrap().oom_kills(), None);

    // The own statistics vanishing (cgroup removed) is a read error.
    let cg = locate(&t.root()).unwrap();
    std::fs::remove_file(t.root().path(Path::new(&format!("{own}/memory.stat")))).unwrap();
    assert!(cg.levels().is_err());
}

#[test]
fn hybrid_prefers_v1_memory_even_when_v2_has_statistics() {
    let t = Tree::new();
    t.file("/proc/self/cgroup", "4:memory:/a\n0::/b\n")
        .file("/proc/self/mountinfo", HYBRID_MOUNTINFO)
        .file("/sys/fs/cgroup/memory/a/memory.stat", "total_rss 1\n")
        .file("/sys/fs/cgroup/unified/b/memory.stat", "anon 2\n");
    assert_eq!(locate(&t.root()).unwrap().version, Version::V1);
    // Without the v1 files, v2 is used.
    let t2 = Tree::new();
    t2.file("/proc/self/cgroup", "4:memory:/a\n0::/b\n")
        .file("/proc/self/mountinfo", HYBRID_MOUNTINFO)
        .file("/sys/fs/cgroup/unified/b/memory.stat", "anon 2\n");
    assert_eq!(locate(&t2.root()).unwrap().version, Version::V2);
}

#[test]
fn mountinfo_escapes_and_stat_values() {
    let t = Tree::new();
    t.file("/proc/self/cgroup", "0::/x y\n")
        .file(
            "/proc/self/mountinfo",
            "27 24 0:25 / /mnt/cg\\040root rw - cgroup2 cgroup2 rw\n",
        )
        .file("/mnt/cg root/x y/memory.stat", "anon 7\n");
    let cg = locate(&t.root()).unwrap();
    assert_eq!(cg.dirs[0], PathBuf::from("/mnt/cg root/x y"));
    assert_eq!(
        unescape("a\\134b\\011c\\777\\0"),
        "a\\b\tc\\777\\0",
        "bad escapes are kept as text"
    );
    assert_eq!(stat_value("anon 5\nanon_thp 9\n", "anon"), Some(5));
    assert_eq!(stat_value("anon_thp 9\n", "anon"), None);
    assert_eq!(stat_value("anon x\n", "anon"), None);
}

#[test]
fn a_process_moved_to_another_cgroup_is_followed() {
    let t = Tree::new();
    t.file("/proc/self/cgroup", "4:memory:/a\n")
        .file("/proc/self/mountinfo", HYBRID_MOUNTINFO)
        .file("/sys/fs/cgroup/memory/a/memory.stat", "total_rss 10\n")
        .file(
            "/sys/fs/cgroup/memory/a/memory.limit_in_bytes",
            V1_UNLIMITED_TEXT,
        )
        .file(
            "/sys/fs/cgroup/memory/a/limited/memory.stat",
            "total_rss 3\n",
        )
        .file(
            "/sys/fs/cgroup/memory/a/limited/memory.limit_in_bytes",
            "100\n",
        );
    let mut probe = CgroupProbe::new(t.root(), None);
    assert_eq!(probe.read().unwrap().limit, None);
    t.file("/proc/self/cgroup", "4:memory:/a/limited\n");
    let view = probe.read().unwrap();
    assert_eq!((view.limit, view.usage), (Some(100), 3));
    assert_eq!(
        probe.cgroup().unwrap().dirs[0],
        PathBuf::from("/sys/fs/cgroup/memory/a/limited")
    );
}
