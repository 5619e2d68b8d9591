//! The cgroups that hold a sandbox's containers: `/coffer/<name>` under every mounted
//! hierarchy (v1 controllers and the unified v2 one), removed deepest first when the sandbox
//! ends.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::SandboxError;

/// The cgroup (under each mounted hierarchy) that holds a sandbox's containers.
pub fn cgroup_parent(name: &str) -> String {
    format!("/coffer/{name}")
}

/// The mount points of the cgroup hierarchies (v1 controllers and the unified v2 one).
fn cgroup_mounts() -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            (fstype == "cgroup" || fstype == "cgroup2")
                .then(|| left.split(' ').nth(4).map(PathBuf::from))
                .flatten()
        })
        .collect()
}

/// The cgroup directories a sandbox left (every hierarchy).
pub fn leftover_cgroups(name: &str) -> Vec<PathBuf> {
    cgroup_mounts()
        .into_iter()
        .map(|m| m.join(cgroup_parent(name).trim_start_matches('/')))
        .filter(|p| p.is_dir())
        .collect()
}

/// Removes a sandbox's cgroups, deepest first, waiting up to 5 s for their processes to die.
pub fn remove_cgroups(name: &str) -> Result<(), SandboxError> {
    fn rmdir_tree(p: &Path) -> std::io::Result<()> {
        for e in std::fs::read_dir(p)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                rmdir_tree(&e.path())?;
            }
        }
        match std::fs::remove_dir(p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let mut last = None;
        for p in leftover_cgroups(name) {
            if let Err(e) = rmdir_tree(&p) {
                last = Some((p, e));
            }
        }
        match last {
            None => return Ok(()),
            Some((path, source)) if Instant::now() > until => {
                return Err(SandboxError::Cgroup { path, source })
            }
            Some(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
