//! A content-addressed blob cache: `<dir>/blobs/sha256/<hex>`, each written to `<dir>/tmp` first,
//! synced and renamed into place, so that a crash leaves either the whole verified blob or
//! nothing. Blobs are re-verified by whoever reads them; a corrupt one is removed.

use std::{
    fs,
    path::{Path, PathBuf},
};

use crate::{digest, Error};

/// The cache directory.
#[derive(Clone, Debug)]
pub struct BlobCache {
    dir: PathBuf,
}

impl BlobCache {
    /// Opens (creating) a cache at `dir`.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        for sub in ["blobs/sha256", "tmp"] {
            fs::create_dir_all(dir.join(sub))
                .map_err(Error::io(format!("cannot create cache {}", dir.display())))?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Where the blob with `digest` lives (whether or not it is there).
    pub fn path(&self, digest_str: &str) -> Result<PathBuf, Error> {
        Ok(self
            .dir
            .join("blobs/sha256")
            .join(digest::sha256_hex(digest_str)?))
    }

    /// True when the blob is cached.
    pub fn has(&self, digest_str: &str) -> bool {
        self.path(digest_str).is_ok_and(|p| p.is_file())
    }

    /// A new temporary file inside the cache (same filesystem as the blobs).
    pub fn temp_file(&self) -> Result<tempfile::TempPath, Error> {
        Ok(tempfile::NamedTempFile::new_in(self.dir.join("tmp"))
            .map_err(Error::io("cannot create a file in the cache"))?
            .into_temp_path())
    }

    /// Moves a verified temporary file into place as the blob `digest`.
    pub fn commit(&self, tmp: tempfile::TempPath, digest_str: &str) -> Result<PathBuf, Error> {
        let dest = self.path(digest_str)?;
        tmp.persist(&dest)
            .map_err(|e| Error::io(format!("cannot store {digest_str} in the cache"))(e.error))?;
        if let Some(parent) = dest.parent() {
            if let Ok(d) = fs::File::open(parent) {
                let _ = d.sync_all();
            }
        }
        Ok(dest)
    }

    /// Drops a blob (found corrupt).
    pub fn remove(&self, digest_str: &str) {
        if let Ok(p) = self.path(digest_str) {
            let _ = fs::remove_file(p);
        }
    }
}
