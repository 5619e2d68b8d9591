//! dm-verity hash trees (format version 1, SHA-256, 4 KiB data and hash blocks), written after the
//! data in the same image, without a superblock: everything the kernel needs is in the table,
//! which the guest builds from [`VerityParams`] found on the measured kernel command line.
//!
//! Layout (the kernel's, `drivers/md/dm-verity-target.c`): the hash area starts right after the
//! last data block; its levels are stored top (one block, whose digest is the root hash) first.
//! Every digest is SHA-256(salt ‖ block); a hash block holds 128 digests, zero-padded.

use std::{
    fmt,
    io::{Read, Seek, SeekFrom, Write},
};

use sha2::{Digest, Sha256};

/// Data and hash block size.
pub const BLOCK: u64 = 4096;
const DIGEST: usize = 32;
const PER_BLOCK: u64 = BLOCK / DIGEST as u64;

/// What the guest needs to open a verity device: the data size, the salt and the root hash.
/// The hash tree starts at block `data_blocks` of the same device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerityParams {
    /// Number of 4 KiB data blocks.
    pub data_blocks: u64,
    /// The salt (prepended to every hashed block).
    pub salt: [u8; 32],
    /// The root hash.
    pub root_hash: [u8; 32],
}

/// A malformed `coffer.verity=` value.
#[derive(Debug, thiserror::Error)]
#[error("malformed verity parameters {0:?}: expected DATA_BLOCKS,ROOT_HASH,SALT (hex)")]
pub struct ParseError(String);

impl VerityParams {
    /// Parses the `DATA_BLOCKS,ROOT_HASH,SALT` form of [`fmt::Display`].
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let err = || ParseError(s.to_string());
        let mut it = s.split(',');
        let data_blocks = it.next().and_then(|n| n.parse().ok()).ok_or_else(err)?;
        let mut hex32 = || -> Result<[u8; 32], ParseError> {
            it.next()
                .and_then(|h| hex::decode(h).ok())
                .and_then(|b| b.try_into().ok())
                .ok_or_else(err)
        };
        let root_hash = hex32()?;
        let salt = hex32()?;
        if it.next().is_some() || data_blocks == 0 {
            return Err(err());
        }
        Ok(Self {
            data_blocks,
            salt,
            root_hash,
        })
    }

    /// The dm-verity table parameters for `device` holding data and hash tree.
    pub fn table(&self, device: &str) -> String {
        format!(
            "1 {device} {device} {BLOCK} {BLOCK} {} {} sha256 {} {}",
            self.data_blocks,
            self.data_blocks,
            hex::encode(self.root_hash),
            hex::encode(self.salt)
        )
    }

    /// The device's size in 512-byte sectors (the data part).
    pub fn sectors(&self) -> u64 {
        self.data_blocks * (BLOCK / 512)
    }
}

impl fmt::Display for VerityParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{},{},{}",
            self.data_blocks,
            hex::encode(self.root_hash),
            hex::encode(self.salt)
        )
    }
}

fn hash_block(salt: &[u8; 32], block: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// Pads `image` with zeros to a whole number of blocks, appends its hash tree and returns the
/// parameters. The salt is derived from the content, so the same content gives the same image.
pub fn append_hash_tree<F: Read + Write + Seek>(image: &mut F) -> std::io::Result<VerityParams> {
    let len = image.seek(SeekFrom::End(0))?;
    let data_blocks = len.div_ceil(BLOCK).max(2);
    let padded = data_blocks * BLOCK;
    if padded > len {
        image.write_all(&vec![0u8; (padded - len) as usize])?;
    }
    // Salt: a digest of the content (reproducible, and different for every image).
    image.seek(SeekFrom::Start(0))?;
    let mut salt_hasher = Sha256::new();
    let mut block = vec![0u8; BLOCK as usize];
    let mut level: Vec<[u8; 32]> = Vec::with_capacity(data_blocks as usize);
    let mut all = Sha256::new();
    for _ in 0..data_blocks {
        image.read_exact(&mut block)?;
        all.update(&block);
        level.push([0u8; 32]);
    }
    salt_hasher.update(b"coffer-podvm verity salt\0");
    salt_hasher.update(all.finalize());
    let salt: [u8; 32] = salt_hasher.finalize().into();
    // Bottom level: digests of the data blocks.
    image.seek(SeekFrom::Start(0))?;
    for d in level.iter_mut() {
        image.read_exact(&mut block)?;
        *d = hash_block(&salt, &block);
    }
    // Build levels upwards until one block remains; keep each level's blocks.
    let mut levels: Vec<Vec<u8>> = Vec::new();
    loop {
        let blocks = (level.len() as u64).div_ceil(PER_BLOCK);
        let mut bytes = vec![0u8; (blocks * BLOCK) as usize];
        for (i, d) in level.iter().enumerate() {
            bytes[i * DIGEST..(i + 1) * DIGEST].copy_from_slice(d);
        }
        level = bytes
            .chunks(BLOCK as usize)
            .map(|b| hash_block(&salt, b))
            .collect();
        levels.push(bytes);
        if blocks == 1 {
            break;
        }
    }
    let root_hash = level[0];
    image.seek(SeekFrom::Start(padded))?;
    for l in levels.iter().rev() {
        image.write_all(l)?;
    }
    image.flush()?;
    Ok(VerityParams {
        data_blocks,
        salt,
        root_hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn tree_layout_matches_the_kernels_formula() {
        // 300 data blocks: 3 bottom hash blocks, 1 top block; top stored first.
        let data: Vec<u8> = (0..300 * BLOCK).map(|i| (i % 251) as u8).collect();
        let mut img = Cursor::new(data.clone());
        let p = append_hash_tree(&mut img).unwrap();
        let img = img.into_inner();
        assert_eq!(p.data_blocks, 300);
        assert_eq!(img.len() as u64, (300 + 1 + 3) * BLOCK);
        let hash_area = &img[(300 * BLOCK) as usize..];
        let top = &hash_area[..BLOCK as usize];
        assert_eq!(hash_block(&p.salt, top), p.root_hash);
        // The top block lists the three bottom blocks' digests, then zeros.
        for i in 0..3 {
            let bottom = &hash_area[((1 + i) * BLOCK) as usize..((2 + i) * BLOCK) as usize];
            assert_eq!(
                &top[i as usize * 32..(i as usize + 1) * 32],
                &hash_block(&p.salt, bottom)
            );
        }
        assert!(top[96..].iter().all(|&b| b == 0));
        // Block 129 of the data is the second bottom block's second digest.
        let b129 = &data[(129 * BLOCK) as usize..(130 * BLOCK) as usize];
        let bottom1 = &hash_area[(2 * BLOCK) as usize..(3 * BLOCK) as usize];
        assert_eq!(&bottom1[32..64], &hash_block(&p.salt, b129));
    }

    #[test]
    fn same_content_same_tree_and_params_round_trip() {
        let mk = |b: u8| {
            let mut c = Cursor::new(vec![b; 5000]);
            let p = append_hash_tree(&mut c).unwrap();
            (p, c.into_inner())
        };
        let (p1, i1) = mk(7);
        let (p2, i2) = mk(7);
        let (p3, _) = mk(8);
        assert_eq!(p1, p2);
        assert_eq!(i1, i2);
        assert_ne!(p1.root_hash, p3.root_hash);
        assert_eq!(VerityParams::parse(&p1.to_string()).unwrap(), p1);
        assert!(VerityParams::parse("12,zz,00").is_err());
        assert!(p1
            .table("/dev/vda")
            .starts_with("1 /dev/vda /dev/vda 4096 4096 2 2 sha256 "));
    }
}
