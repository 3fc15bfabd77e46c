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
    match namespace_inode(path) {
        Ok(Some(inode)) => Ok(inode),
        Ok(None) => bail!("{} is not a namespace file", path.display()),
        Err(problem) => Err(problem)
            .with_context(|| format!("cannot open network namespace {}", path.display())),
    }
}

/// [`inode_of`] with the system's own error: `Ok(None)` for a file that is no namespace
/// file (not on nsfs).
fn namespace_inode(path: &Path) -> std::io::Result<Option<u32>> {
    // O_PATH: resolve without opening for I/O, so a FIFO or device named by a client
    // cannot block or trigger anything.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)?;
    let stat = rustix::fs::fstatfs(&file).map_err(std::io::Error::from)?;
    if stat.f_type as u64 != NSFS_MAGIC {
        return Ok(None);
    }
    let inode = file.metadata()?.ino();
    u32::try_from(inode)
        .map(Some)
        .map_err(|_| std::io::Error::other(format!("inode {inode} too big")))
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

/// Whose `/proc/PID/ns/net` a client may name (the named namespaces under `/run/netns` are
/// anyone's to name: `ip netns list` shows them to every user).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessPaths {
    /// Any process's: root of the node, who may open every one itself.
    Any,
    /// A process of this uid only (the owner of its `/proc/PID`: its effective uid while it
    /// is dumpable, root's otherwise, as `ps` shows it): a local user, who may open no other
    /// user's namespace file (`ptrace` read access) and under `hidepid=2` not even see the
    /// PID. Any other process is refused as a missing one is, so that the answer tells
    /// neither whether it runs nor in which namespace.
    OwnedBy(u32),
    /// None: a pod, whose PIDs are not the agent's (the PID is looked up in the agent's PID
    /// namespace, which a pod does not see), or a local user the tables could not name.
    None,
}

/// The inode of the *network* namespace at a client-given path, or `Ok(None)` for anything
/// else (missing, not a namespace, another kind of namespace, outside the allowed places, a
/// process `processes` does not let the client name): the caller answers [`REFUSED_PATH`]
/// for every `None`. An error when the agent could not look for want of resources
/// ([`is_want_of_resources`]): not an answer about the path, nor one that tells whether it
/// exists (asking again may help).
pub fn inode_of_client_path(text: &str, processes: ProcessPaths) -> Result<Option<u32>> {
    if !is_allowed_netns_path(text) {
        return Ok(None);
    }
    // A failure is the path's (refused: `None`) or the agent's (an error).
    let failed = |problem: std::io::Error, doing: &str| -> Result<Option<u32>> {
        if is_want_of_resources(&problem) {
            Err(problem).with_context(|| format!("cannot {doing} network namespace {text}"))
        } else {
            Ok(None)
        }
    };
    // Not O_PATH: the namespace-type ioctl needs a real descriptor. O_NONBLOCK so that a
    // FIFO left in /run/netns cannot block us. A named namespace is a bind-mounted file, so
    // a link there is refused.
    let opened = match text
        .strip_prefix("/proc/")
        .and_then(|rest| rest.strip_suffix("/ns/net"))
    {
        Some(pid) => open_process_netns(pid, processes),
        None => std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(text)
            .map(Some),
    };
    let file = match opened {
        Ok(Some(file)) => file,
        Ok(None) => return Ok(None),
        Err(problem) => return failed(problem, "open"),
    };
    let stat = match rustix::fs::fstatfs(&file) {
        Ok(stat) => stat,
        Err(problem) => return failed(std::io::Error::from(problem), "statfs"),
    };
    if stat.f_type as u64 != NSFS_MAGIC {
        return Ok(None);
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
        return Ok(None);
    }
    let metadata = match file.metadata() {
        Ok(metadata) => metadata,
        Err(problem) => return failed(problem, "stat"),
    };
    Ok(u32::try_from(metadata.ino()).ok())
}

/// The network namespace file of process `pid` (digits), if `processes` lets the client
/// name it. Opened inside the process's `/proc/PID`, held open: the owner checked is that
/// of the process whose namespace is read, not of another a reused PID names a moment later
/// (a lookup in a gone process's directory fails).
fn open_process_netns(pid: &str, processes: ProcessPaths) -> std::io::Result<Option<File>> {
    // `ns/net` is a link that must be followed.
    let uid = match processes {
        ProcessPaths::None => return Ok(None),
        // One open, as for any other path: a descriptor short, the same answer for each.
        ProcessPaths::Any => {
            return std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(format!("/proc/{pid}/ns/net"))
                .map(Some);
        }
        ProcessPaths::OwnedBy(uid) => uid,
    };
    let process = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(format!("/proc/{pid}"))?;
    if process.metadata()?.uid() != uid {
        return Ok(None);
    }
    let namespace = rustix::fs::openat(
        &process,
        "ns/net",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(std::io::Error::from)?;
    Ok(Some(File::from(namespace)))
}

/// Whether `problem` is the agent's want of resources, not an answer about the file asked
/// for: out of descriptors, its own (`EMFILE`) or the system's (`ENFILE`), or of kernel
/// memory (`ENOMEM`). Asking again may help. None tells whether the file exists: an open
/// takes a descriptor and a file before it looks the path up (fs/open.c `do_sys_openat2`,
/// fs/namei.c `path_openat`), so `EMFILE` and `ENFILE` come whatever the path, and `ENOMEM`
/// is the whole system's state. Not `EAGAIN`: an open fails so only while a lease is held on
/// that very file (which would tell that it exists); `EINTR` std's open retries itself.
fn is_want_of_resources(problem: &std::io::Error) -> bool {
    matches!(
        problem.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
    )
}

/// Every network namespace that has a process in it or a name under [`NAMED_NETNS_DIR`],
/// keyed by inode, with one path that opens it; an error when the scan could not look
/// everywhere ([`IncompleteScan`]).
///
/// A process that exits while we look, a name removed meanwhile, a file under
/// [`NAMED_NETNS_DIR`] with no namespace mounted on it (yet), and a process the agent may
/// not look into (without `CAP_SYS_PTRACE`, another user's; `deploy/README.md`) are
/// skipped. Anything else that cannot be read (the agent's own namespace, `/proc` itself,
/// an entry failing for want of descriptors or memory: `EMFILE`, `ENFILE`, `ENOMEM`) makes
/// the scan incomplete: under descriptor exhaustion every open fails, and a scan that
/// skipped them all would say that no namespace exists. Callers fail closed on it: a
/// confirmation errs (never "drained" from the maps), a walk vouches for nothing, a
/// namespace is gone only if a complete scan says so ([`is_gone`]), and the pod listeners
/// stay open.
pub fn all_namespaces() -> Result<BTreeMap<u32, PathBuf>> {
    let mut found = BTreeMap::new();
    let own = PathBuf::from("/proc/self/ns/net");
    let inode = inode_of(&own)
        .context("cannot read the agent's own network namespace")
        .context(IncompleteScan)?;
    found.insert(inode, own);
    let mut consider = |path: PathBuf| -> Result<()> {
        if let Some(inode) = scanned_inode(&path)? {
            found.entry(inode).or_insert(path);
        }
        Ok(())
    };
    let processes = std::fs::read_dir("/proc")
        .context("cannot list /proc")
        .context(IncompleteScan)?;
    for entry in processes {
        let entry = entry.context("cannot list /proc").context(IncompleteScan)?;
        let name = entry.file_name();
        if name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            consider(entry.path().join("ns/net"))?;
        }
    }
    for (_, path) in named_namespace_files()? {
        consider(path)?;
    }
    Ok(found)
}

/// The files under [`NAMED_NETNS_DIR`], by name (none when it does not exist); an
/// [`IncompleteScan`] when it cannot be listed.
pub fn named_namespace_files() -> Result<Vec<(String, PathBuf)>> {
    let entries = match std::fs::read_dir(NAMED_NETNS_DIR) {
        Ok(entries) => entries,
        Err(problem) if problem.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(problem) => {
            return Err(problem)
                .with_context(|| format!("cannot list {NAMED_NETNS_DIR}"))
                .context(IncompleteScan);
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry
            .with_context(|| format!("cannot list {NAMED_NETNS_DIR}"))
            .context(IncompleteScan)?;
        files.push((
            entry.file_name().to_string_lossy().into_owned(),
            entry.path(),
        ));
    }
    Ok(files)
}

/// The inode of one namespace file a scan found, `None` for one it skips (gone meanwhile,
/// no namespace, not ours to look into: [`all_namespaces`]), or an [`IncompleteScan`].
pub fn scanned_inode(path: &Path) -> Result<Option<u32>> {
    match namespace_inode(path) {
        Ok(Some(inode)) => Ok(Some(inode)),
        Ok(None) => {
            log::debug!("skipping {}: not a namespace file", path.display());
            Ok(None)
        }
        // ENOENT: the process exited (or is a zombie), the name was removed. ESRCH: the
        // process went. EACCES: it went between the lookup and the open (the kernel answers
        // EACCES then: fs/proc/namespaces.c), or the agent may not look into it (no
        // CAP_SYS_PTRACE, or an LSM): a documented limit, not a failure to look.
        Err(problem)
            if matches!(
                problem.raw_os_error(),
                Some(libc::ENOENT | libc::ESRCH | libc::EACCES | libc::EPERM)
            ) =>
        {
            log::debug!("skipping {}: {problem}", path.display());
            Ok(None)
        }
        Err(problem) => Err(problem)
            .with_context(|| format!("cannot open network namespace {}", path.display()))
            .context(IncompleteScan),
    }
}

/// Whether the network namespace `inode` is gone: a complete scan ([`all_namespaces`])
/// does not find it. An incomplete scan says nothing of it: not gone.
pub fn is_gone(inode: u32) -> bool {
    match all_namespaces() {
        Ok(found) => !found.contains_key(&inode),
        Err(problem) => {
            log::debug!("network namespace {inode} may still exist: {problem:#}");
            false
        }
    }
}

/// The error of a namespace scan that could not look everywhere ([`all_namespaces`]):
/// what it did not find may exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IncompleteScan;

impl std::fmt::Display for IncompleteScan {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("cannot find every network namespace")
    }
}

impl std::error::Error for IncompleteScan {}

/// The network namespaces pinned by a name under [`NAMED_NETNS_DIR`] (a bind mount of the
/// namespace on a file there: `ip netns add`, a CRI runtime's pod sandbox), by inode, with
/// the name, as listed when read. Only root of the node mounts there (a container may not
/// mount into the node's mount namespace, and the directory is root's), so a pin says that
/// the node's root made or keeps the namespace, which a container cannot say of one it made
/// itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pins(BTreeMap<u32, PathBuf>);

impl Pins {
    /// The pins under [`NAMED_NETNS_DIR`] now; an [`IncompleteScan`] when it cannot be
    /// listed. A name that cannot be opened (gone meanwhile, nothing mounted on it yet) or
    /// is no namespace file pins nothing; a symbolic link there pins nothing either (only
    /// a mount is root's word; a link could name any namespace).
    pub fn read() -> Result<Self> {
        let mut pins = BTreeMap::new();
        for (_, path) in named_namespace_files()? {
            match pinned_inode(&path) {
                Ok(Some(inode)) => {
                    pins.insert(inode, path);
                }
                Ok(None) => log::debug!("{} pins no namespace", path.display()),
                Err(problem) => log::debug!("{} pins no namespace: {problem}", path.display()),
            }
        }
        Ok(Self(pins))
    }

    /// Whether the namespace `inode` was pinned when these pins were read.
    pub fn contains(&self, inode: u32) -> bool {
        self.0.contains_key(&inode)
    }

    /// Whether the namespace `inode`, which the caller holds open, is pinned: its name, read
    /// earlier, names it still. An inode is given to one live namespace at a time, and the
    /// caller's is alive: the name is then a pin of that very namespace, not of an earlier
    /// one whose inode the kernel gave it (a deleted pod's).
    fn pin_holds(&self, inode: u32) -> bool {
        self.0
            .get(&inode)
            .is_some_and(|path| matches!(pinned_inode(path), Ok(Some(found)) if found == inode))
    }
}

/// The inode of the namespace mounted on `path`, `None` when it is no namespace file (a
/// file with nothing mounted on it, a symbolic link: not followed).
fn pinned_inode(path: &Path) -> std::io::Result<Option<u32>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let stat = rustix::fs::fstatfs(&file).map_err(std::io::Error::from)?;
    if stat.f_type as u64 != NSFS_MAGIC {
        return Ok(None);
    }
    Ok(u32::try_from(file.metadata()?.ino()).ok())
}

/// Whose user namespace owns a network namespace, and whether root of the node pinned it
/// ([`Pins`]): whether its addresses may name a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserOwner {
    /// The agent's own user namespace: the initial one (the agent loads BPF programs, which
    /// needs capabilities there). Pods with the host's users, `ip netns add`. Only root of
    /// the node makes one (`CAP_SYS_ADMIN` in the initial user namespace).
    Initial,
    /// A user namespace root created, and the network namespace is pinned under
    /// [`NAMED_NETNS_DIR`]: a CRI runtime's `hostUsers: false` pod (containerd and CRI-O make
    /// the pod's network namespace inside the pod's user namespace, so that the pod may
    /// mount sysfs, as root, and pin it there: containerd's `cni-…`, CRI-O's by UUID).
    RootPinned,
    /// A user namespace root created, the network namespace not pinned: one made inside a
    /// container that runs as root with the node's users (`unshare -Urn`: any pod that runs
    /// as root without `hostUsers: false` may, at the `baseline` Pod Security level, unless
    /// a seccomp profile forbids it; Kubernetes' default is `Unconfined`), a namespace made
    /// inside a `hostUsers: false` pod's user namespace without one of its own, or such a
    /// pod's own before its runtime pins it (looked at again once pinned).
    RootUnpinned,
    /// A user namespace another user created (`unshare -U`, a rootless container), or one
    /// made inside a `hostUsers: false` pod's: that user's uid on the node (the kernel's
    /// `owner` of the user namespace, the creator's effective uid).
    User(u32),
}

impl UserOwner {
    /// Whether a network namespace so owned may be a pod's: one the initial user namespace
    /// owns, or one pinned by root in a user namespace root made. Never one any process can
    /// make for itself: another user's user namespace ([`UserOwner::User`], `unshare -Urn`
    /// as a local user) or a root container's ([`UserOwner::RootUnpinned`]), which may give
    /// itself any address (it holds `CAP_NET_ADMIN` there), a pod's included. The one rule
    /// for every part of the agent that looks for pods: whose an address is
    /// (`pod_addresses.rs`) and where `--pod-listen` listens (`http/pods/manager.rs`).
    pub fn may_be_a_pod(self) -> bool {
        matches!(self, Self::Initial | Self::RootPinned)
    }
}

/// [`user_owner`] of the network namespace `inode` at `path` ([`open_checked`]).
pub fn user_owner_of(inode: u32, path: &Path, pins: &Pins) -> Result<UserOwner> {
    user_owner(&open_checked(inode, path)?, pins)
}

/// include/uapi/linux/nsfs.h: `_IO(0xb7, 0x1)`, a new descriptor of the owning user
/// namespace.
const NS_GET_USERNS: libc::c_ulong = 0xb701;
/// include/uapi/linux/nsfs.h: `_IO(0xb7, 0x4)`, the uid that created a user namespace.
const NS_GET_OWNER_UID: libc::c_ulong = 0xb704;

/// Who owns the network namespace open in `namespace` ([`UserOwner`]), `pins` read before
/// it was opened ([`Pins::read`]). Two ioctls and a `stat`, and for a namespace root's user
/// namespace owns, one open of its pin: cheap beside entering it.
pub fn user_owner(namespace: &File, pins: &Pins) -> Result<UserOwner> {
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
    if uid != 0 {
        return Ok(UserOwner::User(uid));
    }
    let inode = namespace
        .metadata()
        .context("cannot stat a network namespace")?
        .ino();
    let pinned = u32::try_from(inode).is_ok_and(|inode| pins.pin_holds(inode));
    Ok(if pinned {
        UserOwner::RootPinned
    } else {
        UserOwner::RootUnpinned
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
        assert!(all_namespaces().expect("scan").contains_key(&own));
        assert!(!is_gone(own));
    }

    /// Found by an audit: out of descriptors (EMFILE), every open of the scan failed and
    /// was skipped as a vanished process, so the scan returned `{}`, "no namespace exists"
    /// (with one descriptor free, only the agent's own): a confirmation then read no
    /// tables and answered drained from the maps' doubted count, a walk vouched for the
    /// counts, the pod manager closed every listener. The scan says it is incomplete, and
    /// no namespace is taken for gone.
    #[test]
    fn a_scan_without_descriptors_says_it_is_incomplete() {
        without_descriptors::run_child("sys::netns::tests::scan_without_descriptors_child");
    }

    /// The child of [`a_scan_without_descriptors_says_it_is_incomplete`]: nothing unless
    /// started by it.
    #[test]
    #[ignore = "run in a process of its own by a_scan_without_descriptors_says_it_is_incomplete"]
    fn scan_without_descriptors_child() {
        if !without_descriptors::is_child() {
            return;
        }
        let own = inode_of(Path::new("/proc/self/ns/net")).expect("own netns");
        assert!(all_namespaces().expect("scan").contains_key(&own));
        let held = without_descriptors::exhaust();
        let scanned = all_namespaces();
        let gone = is_gone(own);
        drop(held);
        let problem = scanned.expect_err("a scan without descriptors is incomplete");
        assert!(
            problem.downcast_ref::<IncompleteScan>().is_some(),
            "{problem:#}"
        );
        assert!(
            format!("{problem:#}").contains("Too many open files"),
            "{problem:#}"
        );
        assert!(
            !gone,
            "an incomplete scan took the agent's own namespace for gone"
        );
    }

    #[test]
    fn client_paths_must_be_network_namespaces_in_the_allowed_places() {
        let own = inode_of(Path::new("/proc/self/ns/net")).expect("own netns");
        let pid = std::process::id();
        assert_eq!(
            inode_of_client_path(&format!("/proc/{pid}/ns/net"), ProcessPaths::Any)
                .expect("readable"),
            Some(own)
        );
        // This process's owner may name it; another user and a pod may not.
        let me = std::fs::metadata(format!("/proc/{pid}"))
            .expect("stat")
            .uid();
        for (processes, inode) in [
            (ProcessPaths::OwnedBy(me), Some(own)),
            (ProcessPaths::OwnedBy(me.wrapping_add(1)), None),
            (ProcessPaths::None, None),
        ] {
            assert_eq!(
                inode_of_client_path(&format!("/proc/{pid}/ns/net"), processes)
                    .expect("an answer about the path"),
                inode,
                "{processes:?}"
            );
        }
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
            assert_eq!(
                inode_of_client_path(&refused, ProcessPaths::Any)
                    .expect("an answer about the path"),
                None,
                "{refused}"
            );
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

/// Test help: code run with the process's descriptors exhausted (EMFILE), in a child
/// process of the test binary (the open-file limit is the whole process's, and the tests
/// share theirs).
#[cfg(test)]
pub(crate) mod without_descriptors {
    use std::fs::File;

    /// Set in the child: how many descriptors it leaves free.
    const FREE: &str = "DRAIN_AGENT_TEST_FREE_DESCRIPTORS";

    /// Runs the test `child` (its path in the crate, an ignored test that returns at once
    /// unless [`is_child`], then calls [`exhaust`]) in a child process of this test binary,
    /// once with no descriptor free and once with one; panics with its output unless it
    /// passed both times.
    pub(crate) fn run_child(child: &str) {
        let exe = std::env::current_exe().expect("test binary");
        for free in ["0", "1"] {
            let output = std::process::Command::new(&exe)
                .args([
                    "--exact",
                    child,
                    "--include-ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(FREE, free)
                .output()
                .expect("run the child");
            let shown = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(output.status.success(), "{free} free: {shown}");
            assert!(shown.contains("1 passed"), "{free} free: {shown}");
        }
    }

    /// Whether this process is such a child.
    pub(crate) fn is_child() -> bool {
        std::env::var_os(FREE).is_some()
    }

    /// In the child: lowers the open-file limit and opens files until it is reached, then
    /// frees as many as the parent asked. Dropping what it returns frees the rest.
    pub(crate) fn exhaust() -> Vec<File> {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let free: usize = std::env::var(FREE)
            .expect("a child")
            .parse()
            .expect("a number");
        let limit = getrlimit(Resource::Nofile);
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(256),
                maximum: limit.maximum,
            },
        )
        .expect("lower the open-file limit");
        let mut held = Vec::new();
        let exhausted = loop {
            match File::open("/dev/null") {
                Ok(file) => held.push(file),
                Err(problem) => break problem,
            }
        };
        assert_eq!(exhausted.raw_os_error(), Some(libc::EMFILE), "{exhausted}");
        held.truncate(held.len().saturating_sub(free));
        held
    }
}
