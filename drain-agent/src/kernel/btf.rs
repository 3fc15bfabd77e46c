//! Field offsets of kernel structs, read from the running kernel's BTF.
//!
//! aya 0.14 has no CO-RE relocations for Rust programs, so the agent finds the offsets the
//! programs need in `/sys/kernel/btf/vmlinux` and hands them over as a read-only global
//! ([`KernelOffsets`]). aya-obj parses BTF too, but keeps struct members private; this is
//! the small part of the format (Documentation/bpf/btf.rst) that offsets need.

use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, Result, bail, ensure};
use drain_agent_common::{KernelOffsets, OFFSET_UNKNOWN};

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

#[derive(Clone, Debug)]
struct Member {
    name: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

#[derive(Clone, Debug)]
struct Type {
    kind: u32,
    name: u32,
    /// For modifiers, typedefs and pointers: the type referred to.
    referred: u32,
    members: Vec<Member>,
}

/// A parsed BTF blob: enough to walk struct and union members by name.
pub struct Btf {
    strings: Vec<u8>,
    /// Index 0 is the `void` type.
    types: Vec<Type>,
    structs_by_name: HashMap<String, u32>,
}

/// Where a field lies inside its outermost struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldLocation {
    pub byte_offset: u32,
    /// Whether the field is a bitfield (its offset is then not byte-addressable).
    pub is_bitfield: bool,
}

fn read_u32(data: &[u8], at: usize) -> Result<u32> {
    let bytes = data
        .get(at..at + 4)
        .with_context(|| format!("BTF is truncated at byte {at}"))?;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

impl Btf {
    /// Reads and parses a BTF file such as [`VMLINUX_BTF`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let data = std::fs::read(path)
            .with_context(|| format!("cannot read BTF from {}", path.display()))?;
        Self::parse(&data).with_context(|| format!("cannot parse BTF from {}", path.display()))
    }

    /// Parses a little-endian BTF blob.
    pub fn parse(data: &[u8]) -> Result<Self> {
        ensure!(data.len() >= 24, "BTF header is truncated");
        let magic = u16::from_le_bytes([data[0], data[1]]);
        ensure!(
            magic == BTF_MAGIC,
            "not little-endian BTF (magic {magic:#x})"
        );
        let header_len = read_u32(data, 4)? as usize;
        let type_off = read_u32(data, 8)? as usize;
        let type_len = read_u32(data, 12)? as usize;
        let str_off = read_u32(data, 16)? as usize;
        let str_len = read_u32(data, 20)? as usize;
        let type_section = data
            .get(header_len + type_off..header_len + type_off + type_len)
            .context("BTF type section out of bounds")?;
        let strings = data
            .get(header_len + str_off..header_len + str_off + str_len)
            .context("BTF string section out of bounds")?
            .to_vec();

        let mut types = vec![Type {
            kind: 0,
            name: 0,
            referred: 0,
            members: Vec::new(),
        }];
        let mut at = 0;
        while at < type_section.len() {
            let name = read_u32(type_section, at)?;
            let info = read_u32(type_section, at + 4)?;
            let size_or_type = read_u32(type_section, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => at += 4,
                KIND_ARRAY => at += 12,
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        let offset = read_u32(type_section, at + 8)?;
                        let (bit_offset, bitfield_size) = if kind_flag {
                            (offset & 0x00ff_ffff, offset >> 24)
                        } else {
                            (offset, 0)
                        };
                        members.push(Member {
                            name: read_u32(type_section, at)?,
                            type_id: read_u32(type_section, at + 4)?,
                            bit_offset,
                            bitfield_size,
                        });
                        at += 12;
                    }
                }
                KIND_ENUM | KIND_FUNC_PROTO => at += 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => at += 12 * vlen,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => {}
                other => bail!("unknown BTF kind {other} at type {}", types.len()),
            }
            types.push(Type {
                kind,
                name,
                referred: size_or_type,
                members,
            });
        }

        let mut btf = Self {
            strings,
            types,
            structs_by_name: HashMap::new(),
        };
        let mut structs_by_name = HashMap::new();
        for (id, ty) in btf.types.iter().enumerate() {
            if ty.kind == KIND_STRUCT && ty.name != 0 {
                let id = u32::try_from(id).context("too many BTF types")?;
                // The first definition wins; vmlinux has one per name.
                structs_by_name
                    .entry(btf.name(ty.name).to_owned())
                    .or_insert(id);
            }
        }
        btf.structs_by_name = structs_by_name;
        Ok(btf)
    }

    fn name(&self, offset: u32) -> &str {
        let start = offset as usize;
        let Some(rest) = self.strings.get(start..) else {
            return "";
        };
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let ty = self.types.get(id as usize)?;
            match ty.kind {
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
    fn find_member<'a>(&'a self, ty: &'a Type, name: &str) -> Option<(u32, &'a Member)> {
        for member in &ty.members {
            if member.name != 0 {
                if self.name(member.name) == name {
                    return Some((member.bit_offset, member));
                }
                continue;
            }
            let inner = self.resolve(member.type_id)?;
            if matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                && let Some((offset, found)) = self.find_member(inner, name)
            {
                return Some((member.bit_offset + offset, found));
            }
        }
        None
    }

    /// The location of `path` (e.g. `["ns", "inum"]`) inside `struct struct_name`.
    pub fn field(&self, struct_name: &str, path: &[&str]) -> Result<FieldLocation> {
        let id = *self
            .structs_by_name
            .get(struct_name)
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
                    .filter(|t| matches!(t.kind, KIND_STRUCT | KIND_UNION))
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let btf = Btf::parse(&sample_btf()).expect("parse");
        assert_eq!(btf.field("outer", &["a"]).expect("a").byte_offset, 0);
        assert_eq!(btf.field("outer", &["b"]).expect("b").byte_offset, 8);
        assert_eq!(btf.field("outer", &["c"]).expect("c").byte_offset, 12);
    }

    #[test]
    fn missing_fields_are_named_in_the_error() {
        let btf = Btf::parse(&sample_btf()).expect("parse");
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
        assert!(Btf::parse(b"not btf at all, not at all").is_err());
        assert!(Btf::parse(&[]).is_err());
    }

    #[test]
    fn running_kernel_offsets_are_sane() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("SKIP: {VMLINUX_BTF} is missing (kernel without BTF)");
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
