//! The loader trick: what aya's loader is given instead of the kernel's whole BTF. A
//! stand-in `aya::Btf` with only the types the loader looks up by id ([`Btf::loading_btf`]),
//! and an `EbpfLoader` made in a private mount namespace where the kernel's BTF reads empty
//! ([`loader_without_kernel_btf`]), so that the agent's start-up peak stays small.

use anyhow::{Context as _, Result};

use super::{BTF_MAGIC, Btf, KIND_FUNC, KIND_PTR, KIND_TYPEDEF, VMLINUX_BTF};

/// A kernel type the loader needs by id (see [`Btf::loading_btf`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wanted<'a> {
    /// `typedef … name`, e.g. `btf_trace_inet_sock_set_state` for a `tp_btf` program.
    Typedef(&'a str),
    /// A function, e.g. `bpf_iter_tcp` for an iterator or a kfunc.
    Func(&'a str),
}

impl Btf {
    /// A stand-in for the kernel's BTF that holds only the `wanted` types, each at its
    /// real id, for the loader: aya asks its BTF for nothing but ids here (a `tp_btf`
    /// program's `btf_trace_*` typedef, an iterator's `bpf_iter_*` function, a kfunc),
    /// and the programs need no CO-RE relocation (offsets come from [`Btf::kernel_offsets`]).
    /// aya's own parse of the whole kernel BTF peaked at about 40 MiB at start; this is a
    /// blob of one 12-byte placeholder (`void *`) per id up to the highest wanted one, which
    /// aya parses. A wanted type the kernel does not have is left out, and aya's lookup
    /// then fails with its name.
    pub fn loading_btf(&self, wanted: &[Wanted<'_>]) -> Result<LoadingBtf> {
        let mut strings = vec![0u8];
        let mut found: Vec<(u32, [u32; 3])> = Vec::new();
        for want in wanted {
            let (kind, name) = match want {
                Wanted::Typedef(name) => (KIND_TYPEDEF, name),
                Wanted::Func(name) => (KIND_FUNC, name),
            };
            let Some(id) = self.type_id(kind, name) else {
                continue;
            };
            let ty = self.types[id as usize];
            let name_at = u32::try_from(strings.len()).context("BTF names too long")?;
            strings.extend(name.bytes().chain([0]));
            // A function's linkage is its vlen (BTF_FUNC_GLOBAL, ...).
            found.push((
                id,
                [name_at, (kind << 24) | u32::from(ty.vlen), ty.referred],
            ));
        }
        Ok(LoadingBtf { strings, found })
    }
}

/// The kernel types the loader needs, found by [`Btf::loading_btf`]; small, so that the
/// parsed kernel BTF can be dropped before [`LoadingBtf::build`] allocates.
#[derive(Clone)]
pub struct LoadingBtf {
    /// The wanted names, as a BTF string section.
    strings: Vec<u8>,
    /// Each found type's id and its three words (name, info, type).
    found: Vec<(u32, [u32; 3])>,
}

impl LoadingBtf {
    /// The stand-in BTF described at [`Btf::loading_btf`].
    pub fn build(self) -> Result<aya::Btf> {
        let Self { strings, found } = self;
        let last = found.iter().map(|(id, _)| *id).max().unwrap_or(0);
        let placeholder = [0, KIND_PTR << 24, 0];
        let mut types = Vec::with_capacity(12 * last as usize);
        for id in 1..=last {
            let words = found
                .iter()
                .find(|(found_id, _)| *found_id == id)
                .map_or(placeholder, |(_, words)| *words);
            types.extend(words.iter().flat_map(|word| word.to_le_bytes()));
        }
        let type_len = u32::try_from(types.len()).context("BTF too large")?;
        let str_len = u32::try_from(strings.len()).context("BTF names too long")?;
        let mut blob = Vec::with_capacity(24 + types.len() + strings.len());
        blob.extend(BTF_MAGIC.to_le_bytes());
        // Version 1, no flags.
        blob.extend([1, 0]);
        for word in [24, 0, type_len, type_len, str_len] {
            blob.extend(word.to_le_bytes());
        }
        blob.extend(types);
        blob.extend(strings);
        aya::Btf::parse(&blob, object::Endianness::Little)
            .context("cannot build the loader's copy of the kernel types")
    }
}

/// An `EbpfLoader` without the kernel BTF it parses by default.
///
/// `aya::EbpfLoader::new()` reads and parses the whole of [`VMLINUX_BTF`] (about 30 MiB
/// at its peak, 5 MiB of it the file) as its default target BTF; the agent replaces that
/// at once ([`Btf::loading_btf`]), but the peak stays the agent's. So the loader is made
/// on a thread of its own in a private mount namespace where the file reads empty: the
/// default parse fails at once and leaves no BTF. Nothing leaves that thread: the
/// namespace is private (no mount propagates back to the host) and is gone when the
/// thread ends. Where namespaces cannot be made (no `CAP_SYS_ADMIN`, a seccomp filter),
/// the loader is made as usual, and only the peak is higher.
pub fn loader_without_kernel_btf() -> aya::EbpfLoader<'static> {
    let made = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Err(problem) = hide_kernel_btf_from_this_thread() {
                    log::debug!(
                        "the eBPF loader parses the kernel BTF as usual (more memory at start): {problem:#}"
                    );
                }
                aya::EbpfLoader::new()
            })
            .join()
    });
    made.unwrap_or_else(|_| aya::EbpfLoader::new())
}

/// Gives the calling thread its own mount namespace in which [`VMLINUX_BTF`] is empty.
fn hide_kernel_btf_from_this_thread() -> Result<()> {
    use rustix::{
        mount::{MountPropagationFlags, mount_bind, mount_change},
        thread::{UnshareFlags, unshare_unsafe},
    };
    // SAFETY: rustix marks unshare unsafe for `CLONE_FILES` only (a thread that stops
    // sharing the fd table); CLONE_NEWNS unshares this thread's filesystem context only
    // (kernel/fork.c, `ksys_unshare` adds CLONE_FS), never the process's.
    unsafe { unshare_unsafe(UnshareFlags::NEWNS) }
        .map_err(std::io::Error::from)
        .context("unshare(CLONE_NEWNS)")?;
    mount_change(
        "/",
        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
    )
    .map_err(std::io::Error::from)
    .context("making mounts private")?;
    mount_bind("/dev/null", VMLINUX_BTF)
        .map_err(std::io::Error::from)
        .context("bind-mounting over the BTF")?;
    Ok(())
}
