//! Field offsets of kernel structs, read from the running kernel's BTF.
//!
//! aya 0.14 has no CO-RE relocations for Rust programs, so the agent finds the offsets the
//! programs need in `/sys/kernel/btf/vmlinux` and hands them over as a read-only global
//! ([`KernelOffsets`]). aya-obj parses BTF too, but keeps struct members private; this is
//! the small part of the format (Documentation/bpf/btf.rst) that offsets need.
//!
//! What the loader gets instead of the whole kernel BTF is in `loader.rs`.

mod loader;

use std::{
    fs::File,
    io::{BufReader, Read as _, Seek as _, SeekFrom},
    os::unix::fs::FileExt as _,
    path::Path,
};

use anyhow::{Context as _, Result, bail, ensure};
use drain_agent_common::{KernelOffsets, OFFSET_UNKNOWN};

pub use self::loader::{LoadingBtf, Wanted, loader_without_kernel_btf};

/// Where the running kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const BTF_MAGIC: u16 = 0xeb9f;

// BTF kinds (include/uapi/linux/btf.h).
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Copy, Debug)]
struct Member {
    name: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

/// One type, as small as the walk needs: the members of a struct or union stay in the file
/// and are read when asked for (vmlinux has about 150,000 types and 5 MiB; the agent's
/// memory at start is kept low by holding only this and the names, see
/// [`Btf::loading_btf`]).
#[derive(Clone, Copy, Debug)]
struct Type {
    kind: u8,
    kind_flag: bool,
    vlen: u16,
    name: u32,
    /// For modifiers, typedefs and pointers: the type referred to; for functions, their
    /// prototype.
    referred: u32,
    /// Where the members begin in the type section.
    members_at: u32,
}

/// A parsed BTF file: enough to walk struct and union members by name, and to find the
/// ids of the kernel types the loader attaches to.
pub struct Btf {
    /// The file, for members (read when asked for).
    file: File,
    /// Where the type section begins in the file.
    types_at: u64,
    /// The string section.
    strings: Vec<u8>,
    /// Index 0 is the `void` type.
    types: Vec<Type>,
}

/// Where a field lies inside its outermost struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldLocation {
    pub byte_offset: u32,
    /// Whether the field is a bitfield (its offset is then not byte-addressable).
    pub is_bitfield: bool,
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    if let Some(slice) = bytes.get(at..at + 4) {
        word.copy_from_slice(slice);
    }
    u32::from_le_bytes(word)
}

impl Btf {
    /// Reads a little-endian BTF file such as [`VMLINUX_BTF`]: its names and one small
    /// record per type; members are read from the file when asked for.
    pub fn from_file(path: &Path) -> Result<Self> {
        let file =
            File::open(path).with_context(|| format!("cannot read BTF from {}", path.display()))?;
        Self::read(file).with_context(|| format!("cannot parse BTF from {}", path.display()))
    }

    fn read(file: File) -> Result<Self> {
        let mut header = [0; 24];
        file.read_exact_at(&mut header, 0)
            .context("BTF header is truncated")?;
        let magic = u16::from_le_bytes([header[0], header[1]]);
        ensure!(
            magic == BTF_MAGIC,
            "not little-endian BTF (magic {magic:#x})"
        );
        let header_len = u64::from(le_u32(&header, 4));
        let types_at = header_len + u64::from(le_u32(&header, 8));
        let type_len = u64::from(le_u32(&header, 12));
        let strings_at = header_len + u64::from(le_u32(&header, 16));
        let mut strings = vec![0; le_u32(&header, 20) as usize];
        file.read_exact_at(&mut strings, strings_at)
            .context("BTF string section out of bounds")?;

        let mut section = BufReader::with_capacity(64 * 1024, &file);
        section
            .seek(SeekFrom::Start(types_at))
            .context("BTF type section out of bounds")?;
        let mut section = section.take(type_len);
        let mut types = vec![Type {
            kind: 0,
            kind_flag: false,
            vlen: 0,
            name: 0,
            referred: 0,
            members_at: 0,
        }];
        let mut at: u64 = 0;
        while at < type_len {
            let mut head = [0; 12];
            section
                .read_exact(&mut head)
                .with_context(|| format!("BTF type {} is truncated", types.len()))?;
            let name = le_u32(&head, 0);
            let info = le_u32(&head, 4);
            let size_or_type = le_u32(&head, 8);
            at += 12;
            let vlen = u64::from(info & 0xffff);
            let kind = (info >> 24) & 0x1f;
            let members_at = u32::try_from(at).context("BTF type section too large")?;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                other => bail!("unknown BTF kind {other} at type {}", types.len()),
            };
            let skipped = std::io::copy(&mut (&mut section).take(extra), &mut std::io::sink())
                .context("cannot read the BTF type section")?;
            ensure!(
                skipped == extra,
                "BTF type {} runs past the type section",
                types.len()
            );
            at += extra;
            types.push(Type {
                // Masked to 5 bits above.
                kind: kind as u8,
                kind_flag: info >> 31 == 1,
                // Masked to 16 bits above.
                vlen: vlen as u16,
                name,
                referred: size_or_type,
                members_at,
            });
        }
        Ok(Self {
            file,
            types_at,
            strings,
            types,
        })
    }

    /// The id of the first type of `kind` named `name`.
    fn type_id(&self, kind: u32, name: &str) -> Option<u32> {
        let id = self.types.iter().position(|ty| {
            u32::from(ty.kind) == kind && ty.name != 0 && self.name(ty.name) == name
        })?;
        u32::try_from(id).ok()
    }

    /// The members of a struct or union (none for other kinds), read from the file.
    fn members(&self, ty: &Type) -> Result<Vec<Member>> {
        if !matches!(u32::from(ty.kind), KIND_STRUCT | KIND_UNION) {
            return Ok(Vec::new());
        }
        let mut raw = vec![0; 12 * usize::from(ty.vlen)];
        self.file
            .read_exact_at(&mut raw, self.types_at + u64::from(ty.members_at))
            .context("cannot read BTF members")?;
        Ok(raw
            .chunks_exact(12)
            .map(|member| {
                let offset = le_u32(member, 8);
                let (bit_offset, bitfield_size) = if ty.kind_flag {
                    (offset & 0x00ff_ffff, offset >> 24)
                } else {
                    (offset, 0)
                };
                Member {
                    name: le_u32(member, 0),
                    type_id: le_u32(member, 4),
                    bit_offset,
                    bitfield_size,
                }
            })
            .collect())
    }

    fn name(&self, offset: u32) -> &str {
        let Some(rest) = self.strings.get(offset as usize..) else {
            return "";
        };
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let ty = self.types.get(id as usize)?;
            match u32::from(ty.kind) {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.referred;
                }
                _ => return Some(ty),
            }
        }
        None
    }

    /// Finds `name` among the members of `ty`, looking inside anonymous structs and unions
    /// (the kernel's `sock_common` keeps most fields in them). Returns the bit offset.
    fn find_member(&self, ty: &Type, name: &str) -> Option<(u32, Member)> {
        for member in self.members(ty).ok()? {
            if member.name != 0 {
                if self.name(member.name) == name {
                    return Some((member.bit_offset, member));
                }
                continue;
            }
            let inner = self.resolve(member.type_id)?;
            if matches!(u32::from(inner.kind), KIND_STRUCT | KIND_UNION)
                && let Some((offset, found)) = self.find_member(inner, name)
            {
                return Some((member.bit_offset + offset, found));
            }
        }
        None
    }

    /// The location of `path` (e.g. `["ns", "inum"]`) inside `struct struct_name`.
    pub fn field(&self, struct_name: &str, path: &[&str]) -> Result<FieldLocation> {
        // The first definition wins; vmlinux has one per name.
        let id = self
            .type_id(KIND_STRUCT, struct_name)
            .with_context(|| format!("kernel BTF has no struct {struct_name}"))?;
        let mut ty = self
            .resolve(id)
            .with_context(|| format!("broken BTF type for struct {struct_name}"))?;
        let mut bit_offset = 0;
        let mut is_bitfield = false;
        for (depth, part) in path.iter().enumerate() {
            let (offset, member) = self.find_member(ty, part).with_context(|| {
                format!(
                    "kernel BTF: struct {struct_name} has no field {}",
                    path[..=depth].join(".")
                )
            })?;
            bit_offset += offset;
            is_bitfield = member.bitfield_size != 0 || offset % 8 != 0;
            if depth + 1 < path.len() {
                ty = self
                    .resolve(member.type_id)
                    .filter(|t| matches!(u32::from(t.kind), KIND_STRUCT | KIND_UNION))
                    .with_context(|| {
                        format!(
                            "kernel BTF: {struct_name}.{} is not a struct",
                            path[..=depth].join(".")
                        )
                    })?;
            }
        }
        Ok(FieldLocation {
            byte_offset: bit_offset / 8,
            is_bitfield,
        })
    }

    fn byte_offset(&self, struct_name: &str, path: &[&str]) -> Result<u32> {
        let location = self.field(struct_name, path)?;
        ensure!(
            !location.is_bitfield,
            "kernel BTF: {struct_name}.{} is a bitfield",
            path.join(".")
        );
        Ok(location.byte_offset)
    }

    /// The offsets the eBPF programs need, for this kernel.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets> {
        let sock_common = |field: &str| self.byte_offset("sock_common", &[field]);
        // `struct sock` begins with `struct sock_common __sk_common` (include/net/sock.h), so
        // sock_common offsets are sock offsets too; checked rather than assumed.
        let sk_common = self.byte_offset("sock", &["__sk_common"])?;
        ensure!(
            sk_common == 0,
            "struct sock does not start with __sk_common"
        );
        // `possible_net_t skc_net` holds `struct net *net` (include/net/net_namespace.h).
        let skc_net = self.byte_offset("sock_common", &["skc_net", "net"])?;
        // Since 5.6 sk_protocol is a plain u16; before, a bitfield we cannot read this way.
        let sk_protocol = match self.field("sock", &["sk_protocol"]) {
            Ok(location) if !location.is_bitfield => location.byte_offset,
            _ => OFFSET_UNKNOWN,
        };
        Ok(KernelOffsets {
            skc_family: sock_common("skc_family")?,
            skc_state: sock_common("skc_state")?,
            skc_num: sock_common("skc_num")?,
            skc_rcv_saddr: sock_common("skc_rcv_saddr")?,
            skc_v6_rcv_saddr: sock_common("skc_v6_rcv_saddr")?,
            skc_net,
            net_ns_inum: self.byte_offset("net", &["ns", "inum"])?,
            sk_protocol,
            skc_daddr: sock_common("skc_daddr")?,
            skc_v6_daddr: sock_common("skc_v6_daddr")?,
            skc_dport: sock_common("skc_dport")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `blob` as a BTF file.
    fn parse(blob: Vec<u8>) -> Result<Btf> {
        let mut file = tempfile::tempfile().expect("temporary file");
        std::io::Write::write_all(&mut file, &blob).expect("write");
        Btf::read(file)
    }

    /// Builds a BTF blob by hand: `struct outer { int a; union { struct { int b; int c; }; }; }`.
    fn sample_btf() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0c\0b\0".to_vec();
        let int_name = 1;
        let outer_name = 5;
        let a = 11;
        let c = 13;
        let b = 15;
        let mut types: Vec<u32> = Vec::new();
        // 1: int (size 4)
        types.extend([int_name, KIND_INT << 24, 4, 32]);
        // 2: anonymous struct { int b @0; int c @32 }
        types.extend([0, (KIND_STRUCT << 24) | 2, 8, b, 1, 0, c, 1, 32]);
        // 3: anonymous union { struct 2 }
        types.extend([0, (KIND_UNION << 24) | 1, 8, 0, 2, 0]);
        // 4: struct outer { int a @0; union 3 @64 }
        types.extend([outer_name, (KIND_STRUCT << 24) | 2, 16, a, 1, 0, 0, 3, 64]);
        let type_bytes: Vec<u8> = types.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut blob = Vec::new();
        blob.extend(BTF_MAGIC.to_le_bytes());
        blob.extend([1u8, 0]);
        for v in [
            24u32,
            0,
            type_bytes.len() as u32,
            type_bytes.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend(v.to_le_bytes());
        }
        blob.extend(type_bytes);
        blob.extend(strings);
        blob
    }

    #[test]
    fn finds_fields_inside_anonymous_members() {
        let btf = parse(sample_btf()).expect("parse");
        assert_eq!(btf.field("outer", &["a"]).expect("a").byte_offset, 0);
        assert_eq!(btf.field("outer", &["b"]).expect("b").byte_offset, 8);
        assert_eq!(btf.field("outer", &["c"]).expect("c").byte_offset, 12);
    }

    #[test]
    fn missing_fields_are_named_in_the_error() {
        let btf = parse(sample_btf()).expect("parse");
        let error = btf.field("outer", &["nope"]).expect_err("no such field");
        assert!(
            error.to_string().contains("outer has no field nope"),
            "{error}"
        );
        let error = btf.field("inner", &["a"]).expect_err("no such struct");
        assert!(error.to_string().contains("no struct inner"), "{error}");
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse(b"not btf at all, not at all".to_vec()).is_err());
        assert!(parse(Vec::new()).is_err());
    }

    #[test]
    #[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
    fn running_kernel_offsets_are_sane() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            crate::test_skip::skip(
                "running_kernel_offsets_are_sane",
                &format!("{VMLINUX_BTF} is missing (kernel without BTF)"),
            );
            return;
        }
        let offsets = Btf::from_file(path)
            .and_then(|btf| btf.kernel_offsets())
            .expect("offsets");
        // The first fields of sock_common are the addresses and ports, then the family.
        assert!(offsets.skc_rcv_saddr < offsets.skc_family, "{offsets:?}");
        assert!(offsets.skc_num < offsets.skc_family, "{offsets:?}");
        assert_ne!(offsets.skc_v6_rcv_saddr, 0, "{offsets:?}");
        assert_ne!(offsets.net_ns_inum, 0, "{offsets:?}");
    }
}
