//! The kernel's configfs-tsm report interface, emulated for tests: a directory tree where each
//! entry made under the root gets its attributes, and reading `outblob` (a FIFO) yields a
//! real-format SEV-SNP report over what `inblob` holds, signed by an emulated PSP, with the
//! VCEK in `auxblob`'s certificate table.

use std::{
    io::{Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use coffer_psp::EmulatedPsp;

/// The kernel's side of configfs-tsm, emulated: each entry made under the root gets its
/// attributes; reading `outblob` (a FIFO) yields a report over what `inblob` holds, and bumps
/// `generation` (twice when `interleave`: another writer came between).
pub struct FakeTsm {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl FakeTsm {
    /// Serves entries under `root` (created) with reports from `psp` as `provider`;
    /// `interleave` makes every request look raced (`generation` moves by two).
    pub fn start(root: &Path, psp: EmulatedPsp, provider: &'static str, interleave: bool) -> Self {
        let psp = Mutex::new(psp);
        Self::serving(
            root,
            provider,
            interleave,
            Arc::new(move |rd: &[u8; 64]| {
                let psp = psp.lock().unwrap();
                (psp.report(rd).unwrap(), cert_table(psp.vcek_der()))
            }),
        )
    }

    /// Serves entries under `root` (created) as `provider`: `respond` gives `outblob` and
    /// `auxblob` for what `inblob` holds.
    pub fn serving(
        root: &Path,
        provider: &'static str,
        interleave: bool,
        respond: Responder,
    ) -> Self {
        std::fs::create_dir_all(root).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let psp = respond;
        let (root, flag) = (root.to_path_buf(), stop.clone());
        let watcher = std::thread::spawn(move || {
            let mut seen = std::collections::HashSet::new();
            let mut servers = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                for e in std::fs::read_dir(&root).unwrap().flatten() {
                    let dir = e.path();
                    if !dir.is_dir() || !seen.insert(dir.clone()) {
                        continue;
                    }
                    put(&dir, "provider", &format!("{provider}\n"));
                    put(&dir, "generation", "0\n");
                    put(&dir, "inblob", "");
                    for blob in ["outblob", "auxblob"] {
                        let path = dir.join(blob);
                        assert!(std::process::Command::new("mkfifo")
                            .arg(&path)
                            .status()
                            .unwrap()
                            .success());
                    }
                    let (psp, flag) = (psp.clone(), flag.clone());
                    servers.push(std::thread::spawn(move || {
                        serve(&dir, &psp, &flag, interleave)
                    }));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            for s in servers {
                s.join().unwrap();
            }
        });
        Self {
            stop,
            threads: vec![watcher],
        }
    }
}

impl Drop for FakeTsm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Opens FIFO `path` for writing once a reader has it open (or returns `None` when stopped).
fn writer(path: &Path, stop: &AtomicBool) -> Option<std::fs::File> {
    while !stop.load(Ordering::Relaxed) {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(path)
        {
            Ok(f) => return Some(f),
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    None
}

/// Writes attribute `name` of entry `dir` whole: a reader sees the old content or the new, never
/// a file just created and not yet written (the kernel makes its attributes with the entry).
fn put(dir: &Path, name: &str, content: &str) {
    let tmp = dir.with_extension(format!("{name}.tmp"));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// What a fake provider answers for the report data `inblob` holds: `outblob`, `auxblob`.
pub type Responder = Arc<dyn Fn(&[u8; 64]) -> (Vec<u8>, Vec<u8>) + Send + Sync>;

fn serve(dir: &Path, respond: &Responder, stop: &AtomicBool, interleave: bool) {
    let Some(mut out) = writer(&dir.join("outblob"), stop) else {
        return;
    };
    let mut rd = [0u8; 64];
    let mut inblob = Vec::new();
    std::fs::File::open(dir.join("inblob"))
        .unwrap()
        .read_to_end(&mut inblob)
        .unwrap();
    rd[..inblob.len().min(64)].copy_from_slice(&inblob[..inblob.len().min(64)]);
    let (report, table) = respond(&rd);
    let generation = if interleave { 2 } else { 1 };
    put(dir, "generation", &format!("{generation}\n"));
    out.write_all(&report).unwrap();
    drop(out);
    if let Some(mut aux) = writer(&dir.join("auxblob"), stop) {
        aux.write_all(&table).unwrap();
    }
}

/// A host certificate table holding only `vcek` (GUID, offset, length; a terminating entry).
fn cert_table(vcek: &[u8]) -> Vec<u8> {
    // 63da758d-e664-4564-adc5-f4b93be8accd, the VCEK's GUID, in its byte order.
    const VCEK: [u8; 16] = [
        0x63, 0xda, 0x75, 0x8d, 0xe6, 0x64, 0x45, 0x64, 0xad, 0xc5, 0xf4, 0xb9, 0x3b, 0xe8, 0xac,
        0xcd,
    ];
    let mut t = VCEK.to_vec();
    t.extend_from_slice(&48u32.to_le_bytes());
    t.extend_from_slice(&(vcek.len() as u32).to_le_bytes());
    t.extend_from_slice(&[0u8; 24]);
    t.extend_from_slice(vcek);
    t
}
