//! Just enough of the kernel's BTF to find struct field offsets.
//!
//! The kernel programs walk task → mm → exe_file → inode to recognise an owner
//! executable. Those field offsets vary between kernel builds; the running
//! kernel describes itself in `/sys/kernel/btf/vmlinux`, so the agent reads them
//! there and hands them to the programs.

use guard_common::{CgroupOffsets, ExeOffsets};

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF data (bad magic or header)")]
    BadHeader,
    #[error("BTF data is truncated")]
    Truncated,
    #[error("unknown BTF kind {0}")]
    UnknownKind(u32),
    #[error("struct {0} not found in BTF")]
    NoStruct(String),
    #[error("field {0}.{1} not found in BTF")]
    NoField(String, String),
    #[error("field {0}.{1} is a bitfield")]
    Bitfield(String, String),
}

#[derive(Clone, Copy, Debug)]
struct Member {
    name: u32,
    type_id: u32,
    /// Bit offset from the start of the containing struct.
    bit_offset: u32,
    bitfield: bool,
}

/// One type's header, read from the raw type section when asked for.
#[derive(Clone, Copy, Debug)]
struct Type<'a> {
    name: u32,
    kind: u32,
    kind_flag: bool,
    /// For modifiers and typedefs: the referenced type.
    target: u32,
    /// For structs and unions: the member records (12 bytes each), bounds
    /// checked by [`Btf::parse`].
    members_raw: &'a [u8],
}

impl Type<'_> {
    fn members(&self) -> impl Iterator<Item = Member> + '_ {
        self.members_raw.chunks_exact(MEMBER_LEN).map(|m| {
            let word = |i: usize| u32::from_le_bytes(m[i..i + 4].try_into().unwrap());
            let offset = word(8);
            let (bit_offset, bitfield) = if self.kind_flag {
                (offset & 0xff_ffff, offset >> 24 != 0)
            } else {
                (offset, false)
            };
            Member {
                name: word(0),
                type_id: word(4),
                bit_offset,
                bitfield,
            }
        })
    }
}

/// Size of a type's header (name, info, size or type).
const HEADER_LEN: usize = 12;
/// Size of one struct or union member record.
const MEMBER_LEN: usize = 12;

/// The type section with its string table, read in place: only where each
/// type starts is kept (4 bytes a type), not a decoded copy; the kernel's
/// BTF has some 150,000 types, and decoding them all was most of the agent's
/// peak memory at start.
pub struct Btf<'a> {
    types_raw: &'a [u8],
    strings: &'a [u8],
    /// Byte offset of each type's header in `types_raw`; index = type id - 1.
    starts: Vec<u32>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
        .ok_or(BtfError::Truncated)
}

impl<'a> Btf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, BtfError> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != BTF_MAGIC {
            return Err(BtfError::BadHeader);
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let section = |off: usize, len: usize| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or(BtfError::Truncated)
        };
        let (types_raw, strings) = (section(type_off, type_len)?, section(str_off, str_len)?);
        // Offsets are kept as u32: a type section of 4 GiB is not BTF.
        if u32::try_from(types_raw.len()).is_err() {
            return Err(BtfError::Truncated);
        }
        let mut starts = Vec::new();
        let mut at = 0;
        while at < types_raw.len() {
            let info = u32_at(types_raw, at + 4)?;
            // The header's third word must be there too.
            u32_at(types_raw, at + 8)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let extra = match kind {
                KIND_STRUCT | KIND_UNION => vlen * MEMBER_LEN,
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                2 | 7 | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | 12 | 16
                | KIND_TYPE_TAG => 0,
                other => return Err(BtfError::UnknownKind(other)),
            };
            let end = at + HEADER_LEN + extra;
            if end > types_raw.len() {
                return Err(BtfError::Truncated);
            }
            starts.push(at as u32);
            at = end;
        }
        Ok(Self {
            types_raw,
            strings,
            starts,
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|b| *b == 0).unwrap_or(rest.len())]
    }

    /// The type at a start [`Btf::parse`] recorded (so its bytes are there).
    fn type_at(&self, start: u32) -> Type<'a> {
        let at = start as usize;
        let raw = self.types_raw;
        let word = |i: usize| u32::from_le_bytes(raw[at + i..at + i + 4].try_into().unwrap());
        let info = word(4);
        let kind = (info >> 24) & 0x1f;
        let members_raw = if matches!(kind, KIND_STRUCT | KIND_UNION) {
            let from = at + HEADER_LEN;
            &raw[from..from + (info & 0xffff) as usize * MEMBER_LEN]
        } else {
            &[]
        };
        Type {
            name: word(0),
            kind,
            kind_flag: info >> 31 == 1,
            target: word(8),
            members_raw,
        }
    }

    fn get(&self, id: u32) -> Option<Type<'a>> {
        let start = *self.starts.get(id.checked_sub(1)? as usize)?;
        Some(self.type_at(start))
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<Type<'a>> {
        for _ in 0..32 {
            let t = self.get(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.target
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Byte offset of `field` in `struct name`, looking through anonymous
    /// structs and unions (the kernel nests fields in them, e.g. mm_struct).
    pub fn field_offset(&self, name: &str, field: &str) -> Result<u32, BtfError> {
        let st = self
            .starts
            .iter()
            .map(|start| self.type_at(*start))
            .find(|t| {
                t.kind == KIND_STRUCT
                    && !t.members_raw.is_empty()
                    && self.name(t.name) == name.as_bytes()
            })
            .ok_or_else(|| BtfError::NoStruct(name.into()))?;
        match self.find_member(&st, field.as_bytes(), 0) {
            Some((_, true)) => Err(BtfError::Bitfield(name.into(), field.into())),
            Some((bits, false)) => Ok(bits / 8),
            None => Err(BtfError::NoField(name.into(), field.into())),
        }
    }

    fn find_member(&self, st: &Type<'a>, field: &[u8], base: u32) -> Option<(u32, bool)> {
        for m in st.members() {
            let name = self.name(m.name);
            if name == field {
                return Some((base + m.bit_offset, m.bitfield));
            }
            if name.is_empty()
                && let Some(inner) = self.resolve(m.type_id)
                && matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                && let Some(found) = self.find_member(&inner, field, base + m.bit_offset)
            {
                return Some(found);
            }
        }
        None
    }

    /// The offsets the kernel programs need to find the current executable.
    pub fn exe_offsets(&self) -> Result<ExeOffsets, BtfError> {
        Ok(ExeOffsets {
            task_mm: self.field_offset("task_struct", "mm")?,
            mm_exe_file: self.field_offset("mm_struct", "exe_file")?,
            file_inode: self.field_offset("file", "f_inode")?,
            inode_ino: self.field_offset("inode", "i_ino")?,
            inode_sb: self.field_offset("inode", "i_sb")?,
            sb_dev: self.field_offset("super_block", "s_dev")?,
        })
    }

    /// The offsets that lead from the current task to its cgroup's kernfs
    /// node (name, parent, id). The parent field is `__parent` since Linux
    /// 6.15, `parent` before.
    pub fn cgroup_offsets(&self) -> Result<CgroupOffsets, BtfError> {
        let kn_parent = self
            .field_offset("kernfs_node", "__parent")
            .or_else(|_| self.field_offset("kernfs_node", "parent"))?;
        Ok(CgroupOffsets {
            task_cgroups: self.field_offset("task_struct", "cgroups")?,
            css_set_dfl_cgrp: self.field_offset("css_set", "dfl_cgrp")?,
            cgroup_kn: self.field_offset("cgroup", "kn")?,
            kn_name: self.field_offset("kernfs_node", "name")?,
            kn_parent,
            kn_id: self.field_offset("kernfs_node", "id")?,
        })
    }
}

/// Every offset the kernel programs are given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub exe: ExeOffsets,
    pub cgroup: CgroupOffsets,
}

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Why the running kernel's offsets are unknown.
#[derive(Debug, thiserror::Error)]
pub enum KernelBtfError {
    #[error("reading {VMLINUX_BTF}")]
    Read(#[source] std::io::Error),
    #[error("{VMLINUX_BTF}")]
    Parse(#[source] BtfError),
}

/// Reads the running kernel's offsets from [`VMLINUX_BTF`]. Either set may be
/// missing on its own (then all zero, and that kind of owner is matched
/// only by cgroup id); the error says why.
pub fn running_kernel_offsets() -> (KernelOffsets, Vec<KernelBtfError>) {
    let data = match std::fs::read(VMLINUX_BTF) {
        Ok(data) => data,
        Err(e) => return (KernelOffsets::default(), vec![KernelBtfError::Read(e)]),
    };
    let btf = match Btf::parse(&data) {
        Ok(btf) => btf,
        Err(e) => return (KernelOffsets::default(), vec![KernelBtfError::Parse(e)]),
    };
    let mut out = KernelOffsets::default();
    let mut errors = Vec::new();
    match btf.exe_offsets() {
        Ok(exe) => out.exe = exe,
        Err(e) => errors.push(KernelBtfError::Parse(e)),
    }
    match btf.cgroup_offsets() {
        Ok(cgroup) => out.cgroup = cgroup,
        Err(e) => errors.push(KernelBtfError::Parse(e)),
    }
    (out, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built BTF blob: struct outer { int a; union { int b; long c; }; }.
    fn tiny() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0c\0b\0long\0";
        let name = |s: &str| {
            let needle = format!("\0{s}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut t = Vec::new();
        let mut ty = |name_off: u32, kind: u32, vlen: u32, size: u32, extra: &[u32]| {
            for v in [name_off, (kind << 24) | vlen, size].iter().chain(extra) {
                t.extend_from_slice(&v.to_le_bytes());
            }
        };
        ty(name("int"), KIND_INT, 0, 4, &[32]); // id 1
        ty(name("long"), KIND_INT, 0, 8, &[64]); // id 2
        ty(0, KIND_UNION, 2, 8, &[name("b"), 1, 0, name("c"), 2, 0]); // id 3
        ty(
            name("outer"),
            KIND_STRUCT,
            2,
            16,
            &[name("a"), 1, 0, 0, 3, 64],
        ); // id 4
        let mut out = Vec::new();
        out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            t.len() as u32,
            t.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&t);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn finds_fields_through_anonymous_unions() {
        let data = tiny();
        let btf = Btf::parse(&data).unwrap();
        assert_eq!(btf.field_offset("outer", "a"), Ok(0));
        assert_eq!(btf.field_offset("outer", "c"), Ok(8));
        assert_eq!(
            btf.field_offset("outer", "zz"),
            Err(BtfError::NoField("outer".into(), "zz".into()))
        );
        assert_eq!(
            btf.field_offset("inner", "a"),
            Err(BtfError::NoStruct("inner".into()))
        );
    }

    #[test]
    fn bad_data_is_an_error_not_a_panic() {
        assert_eq!(Btf::parse(b"nope").err(), Some(BtfError::BadHeader));
        let data = tiny();
        for cut in [10, 30, data.len() - 5] {
            let _ = Btf::parse(&data[..cut]);
        }
    }

    #[test]
    fn running_kernel_has_the_offsets() {
        let (off, errors) = running_kernel_offsets();
        assert!(errors.is_empty(), "{errors:?}");
        assert!(off.exe.known(), "{off:?}");
        assert_ne!(off.exe.task_mm, off.exe.mm_exe_file);
        assert!(off.cgroup.known(), "{off:?}");
        assert_ne!(off.cgroup.kn_name, off.cgroup.kn_parent);
    }
}
