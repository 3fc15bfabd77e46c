//! Network namespaces: finding them all, naming them by inode, and running code inside one.

use std::{
    collections::BTreeMap,
    fs::File,
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

/// Namespace files live on nsfs (include/uapi/linux/magic.h: NSFS_MAGIC).
/// Compared as u64: `statfs.f_type` is signed in glibc, unsigned in musl (static builds).
const NSFS_MAGIC: u64 = 0x6e73_6673;

/// Where `ip netns add` keeps named namespaces (they may have no process in them).
pub const NAMED_NETNS_DIR: &str = "/run/netns";

/// The inode number of the network namespace at `path` (`/proc/PID/ns/net`,
/// `/run/netns/NAME`): the same number the kernel has in `net->ns.inum`.
pub fn inode_of(path: &Path) -> Result<u32> {
    // O_PATH: resolve without opening for I/O, so a FIFO or device named by a client
    // cannot block or trigger anything.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("cannot open network namespace {}", path.display()))?;
    let stat = rustix::fs::fstatfs(&file)
        .map_err(std::io::Error::from)
        .with_context(|| format!("cannot stat {}", path.display()))?;
    if stat.f_type as u64 != NSFS_MAGIC {
        bail!("{} is not a namespace file", path.display());
    }
    let metadata = file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?;
    u32::try_from(metadata.ino()).with_context(|| format!("inode of {} too big", path.display()))
}

/// The one answer to every `netns=` path that is refused, whatever the reason (missing,
/// not a namespace, another kind of namespace, outside the allowed directories): a client
/// must not learn anything about the file system from it.
pub const REFUSED_PATH: &str = "netns: not a network namespace; give an inode number or a path /proc/PID/ns/net, /run/netns/NAME or /var/run/netns/NAME";

/// Whether `text` names a namespace file where network namespaces live: `/proc/PID/ns/net`,
/// `/run/netns/NAME` or `/var/run/netns/NAME` (NAME a single path component).
fn is_allowed_netns_path(text: &str) -> bool {
    let component =
        |name: &str| !name.is_empty() && name != "." && name != ".." && !name.contains('/');
    if let Some(rest) = text.strip_prefix("/proc/")
        && let Some(pid) = rest.strip_suffix("/ns/net")
    {
        return !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
    }
    ["/run/netns/", "/var/run/netns/"]
        .iter()
        .any(|dir| text.strip_prefix(dir).is_some_and(component))
}

/// The inode of the *network* namespace at a client-given path, or `None` for anything
/// else; the caller answers [`REFUSED_PATH`] for every `None`.
pub fn inode_of_client_path(text: &str) -> Option<u32> {
    if !is_allowed_netns_path(text) {
        return None;
    }
    // Not O_PATH: the namespace-type ioctl needs a real descriptor. O_NONBLOCK so that a
    // FIFO left in /run/netns cannot block us. /proc/PID/ns/net is a link that must be
    // followed; a named namespace is a bind-mounted file, so a link there is refused.
    let follow = if text.starts_with("/proc/") {
        0
    } else {
        libc::O_NOFOLLOW
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | follow)
        .open(text)
        .ok()?;
    let stat = rustix::fs::fstatfs(&file).ok()?;
    if stat.f_type as u64 != NSFS_MAGIC {
        return None;
    }
    // NS_GET_NSTYPE (include/uapi/linux/nsfs.h: _IO(0xb7, 0x3)): the namespace's kind.
    // Neither std nor rustix has a safe call for it (rustix's `ioctl` is unsafe too, and
    // its no-argument form drops the result this ioctl answers with).
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an ioctl without argument on a file we hold open (and checked to be on nsfs,
    // where 0xb703 is NS_GET_NSTYPE: fs/nsfs.c ns_ioctl); it reads and writes no memory of
    // ours, its answer is the return value.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return None;
    }
    let metadata = file.metadata().ok()?;
    u32::try_from(metadata.ino()).ok()
}

/// Every network namespace that has a process in it or a name under [`NAMED_NETNS_DIR`],
/// keyed by inode, with one path that opens it.
pub fn all_namespaces() -> BTreeMap<u32, PathBuf> {
    let mut found = BTreeMap::new();
    let mut consider = |path: PathBuf| match inode_of(&path) {
        Ok(inode) => {
            found.entry(inode).or_insert(path);
        }
        // Processes come and go while we look (a vanished one is simply skipped); without
        // CAP_SYS_PTRACE, other users' processes cannot be opened.
        Err(problem) => log::debug!("skipping {}: {problem:#}", path.display()),
    };
    consider(PathBuf::from("/proc/self/ns/net"));
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                consider(entry.path().join("ns/net"));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(NAMED_NETNS_DIR) {
        for entry in entries.flatten() {
            consider(entry.path());
        }
    }
    found
}

/// Whose user namespace owns a network namespace: whether its addresses may name a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserOwner {
    /// The agent's own user namespace: the initial one (the agent loads BPF programs, which
    /// needs capabilities there). Pods with the host's users, `ip netns add`.
    Initial,
    /// A user namespace root created: a CRI runtime's for a `hostUsers: false` pod
    /// (containerd and CRI-O make the pod's network namespace inside the pod's user
    /// namespace, so that the pod may mount sysfs; they run as root).
    Root,
    /// A user namespace another user created (`unshare -U`, a rootless container), or one
    /// made inside a pod's: that user's uid on the node (the kernel's `owner` of the user
    /// namespace, the creator's effective uid).
    User(u32),
}

impl UserOwner {
    /// Whether a network namespace so owned may be a pod's: never one another user's user
    /// namespace owns ([`UserOwner::User`]): any local user can make one (`unshare -Urn`)
    /// and give it any address, and a pod's is never such a namespace (the CRI runtime,
    /// root, makes it). The one rule for every part of the agent that looks for pods: whose
    /// an address is (`pod_addresses.rs`) and where `--pod-listen` listens
    /// (`http/pods/manager.rs`).
    pub fn may_be_a_pod(self) -> bool {
        !matches!(self, Self::User(_))
    }
}

/// [`user_owner`] of the network namespace `inode` at `path` ([`open_checked`]).
pub fn user_owner_of(inode: u32, path: &Path) -> Result<UserOwner> {
    user_owner(&open_checked(inode, path)?)
}

/// include/uapi/linux/nsfs.h: `_IO(0xb7, 0x1)`, a new descriptor of the owning user
/// namespace.
const NS_GET_USERNS: libc::c_ulong = 0xb701;
/// include/uapi/linux/nsfs.h: `_IO(0xb7, 0x4)`, the uid that created a user namespace.
const NS_GET_OWNER_UID: libc::c_ulong = 0xb704;

/// Who owns the network namespace open in `namespace` ([`UserOwner`]). Two ioctls and a
/// `stat`: cheap beside entering it.
pub fn user_owner(namespace: &File) -> Result<UserOwner> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let own = std::fs::metadata("/proc/self/ns/user")
        .context("cannot stat the agent's own user namespace")?
        .ino();
    // SAFETY: an ioctl without argument on a namespace file we hold open
    // (fs/nsfs.c ns_ioctl); it touches no memory of ours, and its answer (a new descriptor
    // or -1) is the return value.
    let owner = unsafe { libc::ioctl(namespace.as_raw_fd(), NS_GET_USERNS as _) };
    if owner < 0 {
        return Err(std::io::Error::last_os_error())
            .context("cannot read the user namespace owning a network namespace");
    }
    // SAFETY: `owner` is a descriptor the ioctl just opened for us and nobody else holds.
    let owner = File::from(unsafe { OwnedFd::from_raw_fd(owner) });
    if owner
        .metadata()
        .context("cannot stat a user namespace")?
        .ino()
        == own
    {
        return Ok(UserOwner::Initial);
    }
    let mut uid: libc::uid_t = 0;
    // SAFETY: NS_GET_OWNER_UID on a user namespace file we hold open writes one uid_t to
    // the pointer given, which points to `uid`, alive for the call.
    let done = unsafe { libc::ioctl(owner.as_raw_fd(), NS_GET_OWNER_UID as _, &raw mut uid) };
    if done < 0 {
        return Err(std::io::Error::last_os_error())
            .context("cannot read who created a user namespace");
    }
    Ok(if uid == 0 {
        UserOwner::Root
    } else {
        UserOwner::User(uid)
    })
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE` on a socket made
/// there, Linux 5.14+): a number the kernel gives each network namespace once and never to
/// another while it runs (`net_cookie`, a counter), unlike its inode, which
/// `proc_alloc_inum` hands out again (the lowest free one: a deleted pod's, to the next
/// pod's namespace). Tells a namespace from a later one on the same inode. `None` where the
/// kernel has no such option (`ENOPROTOOPT`: before Linux 5.14).
pub fn thread_cookie() -> Result<Option<u64>> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    // Any socket is made in the calling thread's network namespace; a unix datagram socket
    // needs nothing configured there (no interface up) and is never bound.
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(std::io::Error::from)
    .context("cannot open a socket to read the network namespace cookie")?;
    let mut cookie: u64 = 0;
    let size = std::mem::size_of::<u64>();
    let mut len = libc::socklen_t::try_from(size).context("socklen_t too small")?;
    // SAFETY: getsockopt(2) on a socket we hold open writes at most `len` (8) bytes to the
    // pointer given, which points to `cookie` (a u64, 8 bytes, alive for the call), and the
    // length written back to `len`, alive too.
    let done = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if done < 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ENOPROTOOPT) {
            return Ok(None);
        }
        return Err(error).context("cannot read the network namespace cookie (SO_NETNS_COOKIE)");
    }
    if usize::try_from(len).ok() != Some(size) {
        bail!("SO_NETNS_COOKIE answered {len} bytes, not {size}");
    }
    Ok(Some(cookie))
}

/// Opens the network namespace `inode` at `path` (a name found earlier, which may name
/// another one by now: refused then, see [`run_in`]).
pub fn open_checked(inode: u32, path: &Path) -> Result<File> {
    let namespace = File::open(path)
        .with_context(|| format!("cannot open network namespace {}", path.display()))?;
    let found = namespace
        .metadata()
        .with_context(|| format!("cannot stat network namespace {}", path.display()))?
        .ino();
    if found != u64::from(inode) {
        bail!(
            "{} is network namespace {found} now, not {inode} (its process or name was reused)",
            path.display()
        );
    }
    Ok(namespace)
}

/// Runs `work` on a new thread that has joined the network namespace `inode`, at `path`.
///
/// `setns` changes only the calling thread, so the agent's own threads stay where they are.
/// The path is a name found earlier ([`all_namespaces`]): by now its process may have exited
/// and its PID gone to a process in another namespace, or its name under `/run/netns` been
/// given to a new one. The file opened is checked to be `inode` before it is entered, so a
/// walk never takes another namespace's sockets for `inode`'s (it would un-count `inode`'s
/// live connections as closed), nor a confirmation another namespace's count.
pub fn run_in<T: Send + 'static>(
    inode: u32,
    path: &Path,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let namespace = open_checked(inode, path)?;
    run_in_file(namespace, path.display().to_string(), work)
}

/// [`run_in`] for a path named just now (not found earlier): whichever network namespace it
/// names.
pub fn run_in_path<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    run_in(inode_of(path)?, path, work)
}

/// [`run_in`] for a namespace file already open (`shown` names it in errors).
pub fn run_in_file<T: Send + 'static>(
    namespace: File,
    shown: String,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let entering = shown.clone();
    let thread = std::thread::Builder::new()
        .name("netns-enter".into())
        .spawn(move || -> Result<T> {
            // setns(2) with CLONE_NEWNET: refused unless the file is a network namespace;
            // it moves only the calling thread (this new one).
            move_into_link_name_space(namespace.as_fd(), Some(LinkNameSpaceType::Network))
                .map_err(std::io::Error::from)
                .with_context(|| format!("cannot enter network namespace {entering}"))?;
            work()
        })
        .context("cannot start a thread")?;
    match thread.join() {
        Ok(result) => result,
        Err(_) => bail!("thread in network namespace {shown} panicked"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by an audit: a walk entered the path it had found for a namespace without
    /// checking that the path still named it (its process gone, the PID reused by a process
    /// elsewhere), then un-counted the live connections of the namespace it meant as
    /// closed. A path that names another namespace now is refused before it is entered.
    #[test]
    fn a_path_that_names_another_namespace_now_is_not_entered() {
        let path = Path::new("/proc/self/ns/net");
        let own = inode_of(path).expect("own netns");
        let entered = run_in(own, path, || {
            inode_of(Path::new("/proc/thread-self/ns/net"))
        })
        .expect("own namespace");
        assert_eq!(entered, own);
        let other = own.wrapping_add(1);
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refused = {
            let ran = std::sync::Arc::clone(&ran);
            run_in(other, path, move || {
                ran.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            })
        };
        let problem = format!("{:#}", refused.expect_err("another namespace's path"));
        assert!(problem.contains(&format!("not {other}")), "{problem}");
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }

    /// A namespace's cookie is the same on every thread in it, and another namespace's is
    /// not (this kernel has `SO_NETNS_COOKIE`: Linux 5.14+).
    #[test]
    #[ignore = "kernel test: needs root (makes a namespace); run by cargo xtask test (or cargo test -- --include-ignored)"]
    fn a_namespace_cookie_tells_namespaces_apart() {
        let own = thread_cookie().expect("own cookie");
        let Some(own) = own else {
            panic!("this kernel has no SO_NETNS_COOKIE (before Linux 5.14)");
        };
        let path = Path::new("/proc/self/ns/net");
        let again = run_in_path(path, thread_cookie).expect("own namespace");
        assert_eq!(again, Some(own), "the same namespace on another thread");
        let mut child = std::process::Command::new("unshare")
            .args(["-n", "sleep", "600"])
            .spawn()
            .expect("unshare");
        let other = Path::new("/proc")
            .join(child.id().to_string())
            .join("ns/net");
        // The child is in its own namespace once unshare has run: wait for it.
        let mut entered = None;
        for _ in 0..200 {
            if inode_of(&other).ok() != inode_of(path).ok() {
                entered = Some(run_in_path(&other, thread_cookie));
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        let cookie = entered.expect("the child's namespace").expect("its cookie");
        assert!(
            cookie.is_some_and(|cookie| cookie != own),
            "{cookie:?} vs {own}"
        );
    }

    #[test]
    fn own_namespace_is_found() {
        let own = inode_of(Path::new("/proc/self/ns/net")).expect("own netns");
        assert!(all_namespaces().contains_key(&own));
    }

    #[test]
    fn client_paths_must_be_network_namespaces_in_the_allowed_places() {
        let own = inode_of(Path::new("/proc/self/ns/net")).expect("own netns");
        let pid = std::process::id();
        assert_eq!(
            inode_of_client_path(&format!("/proc/{pid}/ns/net")),
            Some(own)
        );
        for refused in [
            "/proc/self/ns/net".to_owned(),
            format!("/proc/{pid}/ns/mnt"),
            format!("/proc/{pid}/ns/pid"),
            format!("/proc/{pid}/ns/../ns/net"),
            "/proc/1/status".into(),
            "/root".into(),
            "/etc/passwd".into(),
            "/nonexistent".into(),
            "/run/netns/../../etc/passwd".into(),
            "/run/netns/".into(),
            "/run/netns/no-such-namespace".into(),
            "/var/run/netns/a/b".into(),
        ] {
            assert_eq!(inode_of_client_path(&refused), None, "{refused}");
        }
    }

    #[test]
    fn non_namespace_files_are_refused() {
        let error = inode_of(Path::new("/proc/self/status")).expect_err("not a netns");
        assert!(
            error.to_string().contains("is not a namespace file"),
            "{error}"
        );
        let error = inode_of(Path::new("/nonexistent/ns")).expect_err("missing");
        assert!(error.to_string().contains("/nonexistent/ns"), "{error}");
    }
}
