//! A newc cpio writer, so the host needs no cpio to make an initramfs.

use std::collections::BTreeSet;

/// A newc ("070701") cpio archive, the format the kernel unpacks as an initramfs.
#[derive(Default)]
pub(super) struct Cpio {
    pub(super) bytes: Vec<u8>,
    pub(super) inode: u32,
    pub(super) directories: BTreeSet<String>,
}

impl Cpio {
    pub(super) fn directory(&mut self, name: &str) {
        if self.directories.insert(name.to_owned()) {
            self.entry(name, 0o040_755, (0, 0), &[]);
        }
    }

    pub(super) fn file(&mut self, name: &str, permissions: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | permissions, (0, 0), data);
    }

    pub(super) fn device(&mut self, name: &str, permissions: u32, major: u32, minor: u32) {
        self.entry(name, 0o020_000 | permissions, (major, minor), &[]);
    }

    pub(super) fn entry(&mut self, name: &str, mode: u32, (major, minor): (u32, u32), data: &[u8]) {
        self.inode += 1;
        let size = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let name_size = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
        let fields = [
            self.inode, mode, 0, 0, 1, 0, size, 0, 0, major, minor, name_size, 0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    pub(super) fn finish(mut self) -> Vec<u8> {
        self.inode = 0;
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned() {
        let mut archive = Cpio::default();
        archive.file("init", 0o755, b"#!/bin/sh\n");
        let bytes = archive.finish();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.windows(10).any(|window| window == b"TRAILER!!!"));
    }
}
