//! Whether a namespace-scoped drain's namespace is still the one it started in.
//!
//! A drain of a pod's namespace names it by inode, and the kernel reuses inodes (the lowest
//! free one, `proc_alloc_inum`): once the pod is gone, a new pod may get the same inode. Its
//! connections would be counted in the gone pod's drain, its `/health` gated by it, its own
//! listener taken for "there at the end", and with `on_timeout=close` its connections reset
//! at the gone pod's deadline. So a drain keeps its namespace's cookie (`SO_NETNS_COOKIE`,
//! never reused while the system runs) from its start, in the state file too, and ends once
//! its inode is another namespace's (another cookie): the namespace it started in is then
//! freed (a live namespace keeps its inode), so no connection of it can remain (a socket
//! holds its namespace); it is drained ([`super::DrainEnd::Drained`]), closes nothing, and
//! holds its gate with no listener of its own (a gone namespace's, `[]`).
//!
//! A namespace the scan does not find ([`NamespaceNow::Gone`]) ends nothing: the scan
//! proves no namespace freed. A socket whose process is in another namespace, a bind mount
//! outside the scanned directories, or processes the agent may not look into (without
//! `CAP_SYS_PTRACE`, another user's) keep a namespace alive unseen, with its connections;
//! ending its drain `drained` would be a false "drained". Such a drain goes on counting
//! what the kernel counts for the inode, as before. Where the kernel has no cookies (before
//! Linux 5.14) nothing is concluded.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{drain::lock, sys::netns};

/// How often a drain in progress of one namespace checks that its namespace is still the
/// one it started in: a thread entering the namespace (~0.1 ms) each time, and a scan of
/// `/proc` when the path that opened it last no longer does.
pub const NAMESPACE_RECHECK: Duration = Duration::from_secs(1);

/// What a network namespace (by inode) is now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NamespaceNow {
    /// A complete scan does not find it (`netns::is_gone`): it may be gone, or alive where
    /// the scan cannot see (module documentation). Concludes nothing.
    Gone,
    /// It exists; its cookie (`None`: the kernel has none, before Linux 5.14).
    Is(Option<u64>),
    /// It could not be told (an incomplete scan, a failed read): nothing is concluded.
    Unknown,
}

impl NamespaceNow {
    /// Whether a drain that started in the namespace with cookie `started` (`None`: not
    /// known) is over: its inode is another namespace's now (another cookie), so the one it
    /// started in is freed. Never on a scan's miss ([`NamespaceNow::Gone`]).
    pub fn replaces(self, started: Option<u64>) -> bool {
        match self {
            Self::Is(Some(now)) => started.is_some_and(|started| started != now),
            Self::Gone | Self::Is(None) | Self::Unknown => false,
        }
    }

    /// The cookie to keep for a drain starting now.
    pub fn cookie(self) -> Option<u64> {
        match self {
            Self::Is(cookie) => cookie,
            Self::Gone | Self::Unknown => None,
        }
    }
}

/// Reads what a network namespace is now (blocking: called off the async workers).
pub trait Namespaces: Send + Sync + 'static {
    fn now(&self, inode: u32) -> NamespaceNow;
}

/// The kernel's namespaces: the one of `inode` opened at the path that opened it last (a
/// process's or a name's, checked to be that inode), else found by a scan, and its cookie
/// read on a thread inside it.
#[derive(Default)]
pub struct KernelNamespaces {
    paths: Mutex<HashMap<u32, PathBuf>>,
}

/// Paths remembered at most (one per namespace a drain is of; forgotten past it).
const PATHS_MAX: usize = 4096;

impl Namespaces for KernelNamespaces {
    fn now(&self, inode: u32) -> NamespaceNow {
        let known = lock(&self.paths).get(&inode).cloned();
        let opened = known.and_then(|path| {
            netns::open_checked(inode, &path)
                .ok()
                .map(|file| (file, path))
        });
        let (file, path) = match opened {
            Some(opened) => opened,
            None => {
                let found = match netns::all_namespaces() {
                    Ok(found) => found,
                    Err(problem) => {
                        log::debug!("network namespace {inode} may still exist: {problem:#}");
                        return NamespaceNow::Unknown;
                    }
                };
                let Some(path) = found.get(&inode) else {
                    lock(&self.paths).remove(&inode);
                    return NamespaceNow::Gone;
                };
                match netns::open_checked(inode, path) {
                    Ok(file) => (file, path.clone()),
                    Err(problem) => {
                        log::debug!("network namespace {inode}: {problem:#}");
                        return NamespaceNow::Unknown;
                    }
                }
            }
        };
        {
            let mut paths = lock(&self.paths);
            if paths.len() >= PATHS_MAX && !paths.contains_key(&inode) {
                paths.clear();
            }
            paths.insert(inode, path.clone());
        }
        match netns::run_in_file(file, path.display().to_string(), netns::thread_cookie) {
            Ok(cookie) => NamespaceNow::Is(cookie),
            Err(problem) => {
                log::debug!("the cookie of network namespace {inode}: {problem:#}");
                NamespaceNow::Unknown
            }
        }
    }
}

/// [`Namespaces::now`] off the async workers (`Unknown` if that thread failed).
pub(super) async fn now_of(namespaces: &Arc<dyn Namespaces>, inode: u32) -> NamespaceNow {
    let namespaces = Arc::clone(namespaces);
    tokio::task::spawn_blocking(move || namespaces.now(inode))
        .await
        .unwrap_or(NamespaceNow::Unknown)
}

impl super::Drains {
    /// The cookie of `filter`'s namespace now, kept by a drain starting for it (`None`: no
    /// namespace, no check here, or its cookie cannot be read).
    pub(super) async fn namespace_cookie(&self, filter: &crate::tracker::Filter) -> Option<u64> {
        let (Some(inode), Some(namespaces)) = (filter.netns, &self.namespaces) else {
            return None;
        };
        now_of(namespaces, inode).await.cookie()
    }

    /// What `filter`'s namespace is now (`Unknown`: no namespace, or no check here).
    pub(super) async fn namespace_now(&self, filter: &crate::tracker::Filter) -> NamespaceNow {
        let (Some(inode), Some(namespaces)) = (filter.netns, &self.namespaces) else {
            return NamespaceNow::Unknown;
        };
        now_of(namespaces, inode).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's own namespace is found, with the cookie a socket made here reads; an
    /// inode no namespace has is gone.
    #[test]
    fn the_kernels_namespaces_are_told_by_inode_and_cookie() {
        let own = netns::inode_of(std::path::Path::new("/proc/self/ns/net")).expect("own");
        let namespaces = KernelNamespaces::default();
        let here = netns::thread_cookie().expect("cookie");
        assert_eq!(namespaces.now(own), NamespaceNow::Is(here));
        // Again, by the path that opened it.
        assert_eq!(namespaces.now(own), NamespaceNow::Is(here));
        assert_eq!(namespaces.now(1), NamespaceNow::Gone);
        // A miss of the scan proves nothing freed (a namespace alive where it cannot look).
        assert!(!NamespaceNow::Gone.replaces(None));
        assert!(!NamespaceNow::Gone.replaces(Some(1)));
        assert!(NamespaceNow::Is(Some(2)).replaces(Some(1)));
        assert!(!NamespaceNow::Is(Some(1)).replaces(Some(1)));
        assert!(!NamespaceNow::Is(Some(2)).replaces(None));
        assert!(!NamespaceNow::Is(None).replaces(Some(1)));
        assert!(!NamespaceNow::Unknown.replaces(Some(1)));
    }

    /// A real namespace: found with its own cookie while its process lives; once it exits,
    /// the inode is not found (which ends no drain: the scan proves nothing freed) or, reused
    /// meanwhile, another namespace's (which ends a drain that started in it).
    #[test]
    #[ignore = "kernel test: needs root (makes a namespace); run by cargo xtask test (or cargo test -- --include-ignored)"]
    fn a_namespace_whose_process_exited_is_not_found_with_its_cookie() {
        let own = netns::thread_cookie().expect("cookie");
        let self_path = std::path::Path::new("/proc/self/ns/net");
        let mut child = std::process::Command::new("unshare")
            .args(["-n", "sleep", "600"])
            .spawn()
            .expect("unshare");
        let path = std::path::Path::new("/proc")
            .join(child.id().to_string())
            .join("ns/net");
        let mut inode = None;
        for _ in 0..200 {
            let found = netns::inode_of(&path).ok();
            if found.is_some() && found != netns::inode_of(self_path).ok() {
                inode = found;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let namespaces = KernelNamespaces::default();
        let now = inode.map(|inode| namespaces.now(inode));
        let _ = child.kill();
        let _ = child.wait();
        let inode = inode.expect("the child's namespace");
        let started = match now {
            Some(NamespaceNow::Is(Some(cookie))) => cookie,
            other => panic!("{other:?}"),
        };
        assert_ne!(Some(started), own);
        assert!(!NamespaceNow::Is(Some(started)).replaces(Some(started)));
        match namespaces.now(inode) {
            NamespaceNow::Gone => assert!(!NamespaceNow::Gone.replaces(Some(started))),
            after @ NamespaceNow::Is(Some(cookie)) => {
                assert_ne!(cookie, started, "a freed namespace's cookie");
                assert!(after.replaces(Some(started)));
            }
            other => panic!("{other:?}"),
        }
    }
}
