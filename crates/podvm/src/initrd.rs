//! A reproducible initramfs: an uncompressed `newc` cpio archive whose entries are sorted by
//! path, owned by root, dated 0 and numbered in order, so the same files give the same bytes.

use std::{collections::BTreeMap, io::Write};

/// One entry's content.
#[derive(Clone, Debug)]
pub enum Node {
    /// A directory.
    Dir,
    /// A regular file and its permission bits.
    File(Vec<u8>, u32),
    /// A symbolic link to the given target.
    Symlink(String),
}

/// The files of an initramfs, keyed by path (no leading `/`).
#[derive(Default)]
pub struct Initrd {
    entries: BTreeMap<String, Node>,
}

impl Initrd {
    /// Whether `path` is in it.
    pub fn has(&self, path: &str) -> bool {
        self.entries.contains_key(path.trim_start_matches('/'))
    }

    /// Adds `path` (and its parent directories).
    pub fn add(&mut self, path: &str, node: Node) {
        let path = path.trim_start_matches('/').to_string();
        let mut parent = String::new();
        for part in path.split('/').take(path.split('/').count() - 1) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.entries.entry(parent.clone()).or_insert(Node::Dir);
        }
        self.entries.insert(path, node);
    }

    /// Writes the archive.
    pub fn write<W: Write>(&self, out: W) -> std::io::Result<W> {
        let mut out = out;
        for (ino, (path, node)) in self.entries.iter().enumerate() {
            let b = cpio::NewcBuilder::new(path)
                .ino(ino as u32 + 1)
                .uid(0)
                .gid(0)
                .mtime(0);
            let (b, data): (_, &[u8]) = match node {
                Node::Dir => (b.mode(0o040755).nlink(2), &[]),
                Node::File(d, perm) => (b.mode(0o100000 | (perm & 0o7777)), d),
                Node::Symlink(t) => (b.mode(0o120777), t.as_bytes()),
            };
            let len = u32::try_from(data.len())
                .map_err(|_| std::io::Error::other(format!("{path}: too large for cpio")))?;
            let mut w = b.write(out, len);
            w.write_all(data)?;
            out = w.finish()?;
        }
        cpio::newc::trailer(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_sorted_reproducible_and_readable() {
        let build = |order: &[&str]| {
            let mut i = Initrd::default();
            for p in order {
                i.add(p, Node::File(p.as_bytes().to_vec(), 0o755));
            }
            i.add("lib64/ld.so", Node::Symlink("/lib/ld.so".into()));
            i.write(Vec::new()).unwrap()
        };
        let a = build(&["init", "lib/x/a.so", "lib/b.so"]);
        let b = build(&["lib/b.so", "lib/x/a.so", "init"]);
        assert_eq!(a, b);
        let mut names = Vec::new();
        let mut rest = &a[..];
        loop {
            let r = cpio::NewcReader::new(rest).unwrap();
            if r.entry().is_trailer() {
                break;
            }
            names.push((r.entry().name().to_string(), r.entry().mtime()));
            rest = r.finish().unwrap();
        }
        let got: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            got,
            [
                "init",
                "lib",
                "lib/b.so",
                "lib/x",
                "lib/x/a.so",
                "lib64",
                "lib64/ld.so"
            ]
        );
        assert!(names.iter().all(|(_, t)| *t == 0));
    }
}
