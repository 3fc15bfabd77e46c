//! `--preallocate-sockets`: the per-socket map made preallocated, by clearing
//! `BPF_F_NO_PREALLOC` in its definition before the object is loaded (aya 0.14's loader can
//! change a map's size but not its flags).
//!
//! Why it is opt-in. Preallocated, `SOCKETS` charges all of its slots to the agent's cgroup at
//! start (136 bytes each: 34 MiB at the default 262,144, where the shipped map charges 4 MiB
//! of buckets and then what connections use), and in exchange a tracked open or close on
//! cold caches costs about 40 % less (bench/RESULTS.md) and an insert never fails for lack of
//! memory. Exactness is the same either way: since Linux 6.1 the default map also reuses a
//! deleted element at once (`htab_elem_free()` → `bpf_mem_cache_free()`), and the one
//! lockless remover is fenced off from the handler (`kernel::forget`).

use anyhow::{Context as _, Result, ensure};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

/// `struct bpf_map_def` of a legacy `maps`-section map (aya-ebpf's `#[map]`): `type`,
/// `key_size`, `value_size`, `max_entries`, `map_flags`, `id`, `pinning`, all `u32`.
const MAP_DEF_SIZE: usize = 28;
const MAP_TYPE_AT: usize = 0;
const MAP_FLAGS_AT: usize = 16;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_F_NO_PREALLOC: u32 = 1;

/// Clears `BPF_F_NO_PREALLOC` in the definition of the hash map `name` in `object`.
pub(super) fn preallocate(object: &mut [u8], name: &str) -> Result<()> {
    let at = map_definition(object, name)?;
    let def = object
        .get_mut(at..at + MAP_DEF_SIZE)
        .with_context(|| format!("the definition of map {name} lies outside the object"))?;
    let read = |def: &[u8], offset: usize| {
        u32::from_le_bytes([
            def[offset],
            def[offset + 1],
            def[offset + 2],
            def[offset + 3],
        ])
    };
    ensure!(
        read(def, MAP_TYPE_AT) == BPF_MAP_TYPE_HASH,
        "map {name} is not a hash map"
    );
    let flags = read(def, MAP_FLAGS_AT);
    ensure!(
        flags & BPF_F_NO_PREALLOC != 0,
        "map {name} is already preallocated"
    );
    def[MAP_FLAGS_AT..MAP_FLAGS_AT + 4]
        .copy_from_slice(&(flags & !BPF_F_NO_PREALLOC).to_le_bytes());
    Ok(())
}

/// The file offset of map `name`'s definition in the `maps` section.
fn map_definition(object: &[u8], name: &str) -> Result<usize> {
    let file = object::File::parse(object).context("cannot parse the eBPF object")?;
    let symbol = file
        .symbol_by_name(name)
        .with_context(|| format!("the eBPF object has no map {name}"))?;
    let section = symbol
        .section_index()
        .and_then(|index| file.section_by_index(index).ok())
        .with_context(|| format!("map {name} has no section"))?;
    ensure!(
        section.name() == Ok("maps"),
        "map {name} is not a legacy map definition"
    );
    ensure!(
        usize::try_from(symbol.size()).is_ok_and(|size| size >= MAP_DEF_SIZE),
        "map {name}'s definition is too small"
    );
    let (start, _) = section
        .file_range()
        .context("the maps section has no data")?;
    let at = start
        .checked_add(symbol.address().saturating_sub(section.address()))
        .context("map definition offset out of range")?;
    usize::try_from(at).context("map definition offset out of range")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::EBPF_OBJECT;

    fn flags_of(object: &[u8], name: &str) -> u32 {
        let at = map_definition(object, name).expect("definition") + MAP_FLAGS_AT;
        u32::from_le_bytes(object[at..at + 4].try_into().expect("four bytes"))
    }

    #[test]
    fn the_socket_map_loses_only_its_no_prealloc_flag() {
        let mut object = EBPF_OBJECT.to_vec();
        assert_eq!(flags_of(&object, "SOCKETS"), BPF_F_NO_PREALLOC);
        let durations = flags_of(&object, "DURATIONS");
        preallocate(&mut object, "SOCKETS").expect("patched");
        assert_eq!(flags_of(&object, "SOCKETS"), 0);
        assert_eq!(
            flags_of(&object, "DURATIONS"),
            durations,
            "other maps unchanged"
        );
        // Twice, or on a map that is not a hash map or does not exist: refused.
        assert!(preallocate(&mut object, "SOCKETS").is_err());
        assert!(preallocate(&mut object, "PORT_TOTALS").is_err());
        assert!(preallocate(&mut object, "NO_SUCH_MAP").is_err());
    }
}
