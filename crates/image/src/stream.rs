//! The pieces that let a layer be applied while it downloads, on two cores.
//!
//! A blob is downloaded into a file (the cache's temporary file, or an unlinked scratch file) and
//! a [`Growing`] publishes how much of it is written; a [`FollowReader`] reads that file behind
//! the writer, waiting for more, so that the unpacking of a layer starts with its first megabyte
//! instead of after its last. Later layers keep downloading into their files meanwhile (layers
//! are applied in order, whiteouts need it).
//!
//! Applying one layer is then split across three threads joined by bounded channels
//! ([`chunks`]): the first reads the blob (hashing it when it is local) and decrypts it (with
//! its HMAC), the second inflates it, the third hashes the tar stream (the `diff_id`) and
//! unpacks it. Each stage reads straight into the chunk it sends and the inflater reads the
//! chunks in place. Memory stays bounded: the download's buffers, the channels' few chunks and
//! the decoders' windows.

use std::{
    fs::File,
    io::{self, Read, Write},
    os::unix::fs::FileExt,
    sync::{mpsc, Arc, Condvar, Mutex},
};

/// How much of a blob's file is written, and how the download ended.
#[derive(Default)]
pub(crate) struct Growing {
    state: Mutex<GrowState>,
    cond: Condvar,
}

#[derive(Default)]
struct GrowState {
    written: u64,
    end: Option<Result<(), String>>,
}

impl Growing {
    fn lock(&self) -> std::sync::MutexGuard<'_, GrowState> {
        // A writer that panicked leaves a consistent count; go on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `n` more bytes are in the file.
    pub(crate) fn advance(&self, n: u64) {
        self.lock().written += n;
        self.cond.notify_all();
    }

    /// The download ended: every byte is in the file (`Ok`), or it failed. Only the first end
    /// counts.
    pub(crate) fn end(&self, result: Result<(), String>) {
        let mut s = self.lock();
        if s.end.is_none() {
            s.end = Some(result);
        }
        drop(s);
        self.cond.notify_all();
    }

    /// Blocks until more than `pos` bytes are written (returns how many are) or the download
    /// ended (`Ok(None)`: no more bytes; `Err`: it failed).
    fn wait_past(&self, pos: u64) -> io::Result<Option<u64>> {
        let mut s = self.lock();
        loop {
            if s.written > pos {
                return Ok(Some(s.written));
            }
            match &s.end {
                Some(Ok(())) => return Ok(None),
                Some(Err(e)) => return Err(io::Error::other(format!("download failed: {e}"))),
                None => s = self.cond.wait(s).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

/// Ends a [`Growing`] as failed when dropped before [`EndGuard::ok`] or [`EndGuard::fail`]: an
/// aborted download task wakes its reader instead of leaving it waiting.
pub(crate) struct EndGuard(pub(crate) Arc<Growing>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.end(Err("the download was cancelled".into()));
    }
}

/// Reads a file that a download is still writing, up to what [`Growing`] says is there.
pub(crate) struct FollowReader {
    file: File,
    pos: u64,
    growing: Arc<Growing>,
}

impl FollowReader {
    /// Follows `file` (opened for reading at offset 0) as `growing` reports it.
    pub(crate) fn new(file: File, growing: Arc<Growing>) -> Self {
        Self {
            file,
            pos: 0,
            growing,
        }
    }
}

impl Read for FollowReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let Some(written) = self.growing.wait_past(self.pos)? else {
            return Ok(0);
        };
        let want = buf.len().min((written - self.pos) as usize);
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the blob file is shorter than what was written to it",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// The size of a chunk passed between a layer's stages (threads).
pub(crate) const CHUNK: usize = 256 << 10;

/// Room past [`CHUNK`] that [`ChunkWriter::fill_from`] offers a reader, so that one that needs a
/// little slack (AES-CTR wants a block more than it reads) still fills a chunk in one read.
const SLACK: usize = 64;

/// A bounded channel of chunks: the writing half is an [`io::Write`] that sends full chunks,
/// the reading half an [`io::Read`] and [`io::BufRead`]. `depth` chunks may wait in between.
pub(crate) fn chunks(depth: usize) -> (ChunkWriter, ChunkReader) {
    let (tx, rx) = mpsc::sync_channel(depth);
    let (back_tx, back_rx) = mpsc::channel();
    (
        ChunkWriter {
            tx,
            buf: vec![0; CHUNK + SLACK],
            filled: 0,
            spare: back_rx,
        },
        ChunkReader {
            rx,
            cur: Vec::new(),
            pos: 0,
            back: back_tx,
        },
    )
}

/// The sending half of [`chunks`].
pub(crate) struct ChunkWriter {
    tx: mpsc::SyncSender<Vec<u8>>,
    /// The chunk being filled: always `CHUNK + SLACK` long (initialized), `filled` of it used.
    buf: Vec<u8>,
    filled: usize,
    /// Buffers the reader is done with, reused instead of allocating one per chunk.
    spare: mpsc::Receiver<Vec<u8>>,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        let mut next = self.spare.try_recv().unwrap_or_default();
        // A returned buffer keeps what it held; only a new one is zeroed.
        next.resize(CHUNK + SLACK, 0);
        let mut full = std::mem::replace(&mut self.buf, next);
        full.truncate(self.filled);
        self.filled = 0;
        self.tx
            .send(full)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the unpacker stopped"))
    }

    /// Reads from `from` straight into the chunk being filled (sending it once full): the
    /// bytes read, 0 at the end of `from`.
    pub(crate) fn fill_from(&mut self, from: &mut impl Read) -> io::Result<usize> {
        let n = from.read(&mut self.buf[self.filled..])?;
        self.filled += n;
        if self.filled >= CHUNK {
            self.send()?;
        }
        Ok(n)
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.filled);
        self.buf[self.filled..self.filled + n].copy_from_slice(&data[..n]);
        self.filled += n;
        if self.filled == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    /// Sends a partly filled chunk.
    fn flush(&mut self) -> io::Result<()> {
        if self.filled == 0 {
            Ok(())
        } else {
            self.send()
        }
    }
}

/// The receiving half of [`chunks`]: reads the chunks in order, and ends when the writer is
/// dropped. As a [`BufRead`](io::BufRead) it lends each chunk without copying it.
pub(crate) struct ChunkReader {
    rx: mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    back: mpsc::Sender<Vec<u8>>,
}

impl io::BufRead for ChunkReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos == self.cur.len() {
            let Ok(next) = self.rx.recv() else {
                return Ok(&[]);
            };
            let done = std::mem::replace(&mut self.cur, next);
            let _ = self.back.send(done);
            self.pos = 0;
        }
        Ok(&self.cur[self.pos..])
    }

    fn consume(&mut self, amt: usize) {
        self.pos = (self.pos + amt).min(self.cur.len());
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let have = io::BufRead::fill_buf(self)?;
        let n = buf.len().min(have.len());
        buf[..n].copy_from_slice(&have[..n]);
        io::BufRead::consume(self, n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::{thread, time::Duration};

    use super::*;

    #[test]
    fn a_follower_reads_what_is_written_waits_for_more_and_sees_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let mut w = File::create(&path).unwrap();
        let growing = Arc::new(Growing::default());
        let mut r = FollowReader::new(File::open(&path).unwrap(), growing.clone());
        let g = growing.clone();
        let writer = thread::spawn(move || {
            for i in 0..50u8 {
                // Written to the file before it is published: the reader never sees less.
                w.write_all(&[i; 1000]).unwrap();
                g.advance(1000);
                thread::sleep(Duration::from_millis(1));
            }
            g.end(Ok(()));
        });
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        writer.join().unwrap();
        assert_eq!(all.len(), 50_000);
        assert!(all
            .chunks(1000)
            .enumerate()
            .all(|(i, c)| c.iter().all(|&b| b == i as u8)));
    }

    #[test]
    fn a_failed_or_cancelled_download_is_an_error_for_its_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"abc").unwrap();
        let growing = Arc::new(Growing::default());
        growing.advance(3);
        let mut r = FollowReader::new(File::open(&path).unwrap(), growing.clone());
        let g = growing.clone();
        let cancel = thread::spawn(move || {
            let guard = EndGuard(g);
            thread::sleep(Duration::from_millis(20));
            drop(guard);
        });
        let mut buf = Vec::new();
        let e = r.read_to_end(&mut buf).unwrap_err();
        cancel.join().unwrap();
        assert_eq!(buf, b"abc");
        assert!(e.to_string().contains("cancelled"), "{e}");
        // Only the first end counts.
        growing.end(Ok(()));
        assert!(FollowReader::new(File::open(&path).unwrap(), growing)
            .read_to_end(&mut Vec::new())
            .is_err());
    }

    #[test]
    fn chunks_arrive_whole_and_in_order_and_a_gone_reader_stops_the_writer() {
        let (mut w, mut r) = chunks(2);
        let data: Vec<u8> = (0..(3 * CHUNK + 123)).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let t = thread::spawn(move || {
            for piece in sent.chunks(10_000) {
                w.write_all(piece).unwrap();
            }
            w.flush().unwrap();
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        t.join().unwrap();
        assert_eq!(got, data);

        let (mut w, r) = chunks(1);
        drop(r);
        let e = w.write_all(&vec![0; 2 * CHUNK]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn filling_straight_from_a_reader_and_lending_chunks_keep_the_bytes_in_order() {
        let (mut w, mut r) = chunks(2);
        let data: Vec<u8> = (0..(3 * CHUNK + 777)).map(|i| (i % 253) as u8).collect();
        let sent = data.clone();
        let t = thread::spawn(move || {
            // Readers of odd-sized pieces, as a decoder's reads are.
            for mut piece in sent.chunks(70_001) {
                while !piece.is_empty() {
                    assert!(w.fill_from(&mut piece).unwrap() > 0);
                }
            }
            assert_eq!(w.fill_from(&mut &[][..]).unwrap(), 0);
            w.flush().unwrap();
        });
        let mut got = Vec::new();
        loop {
            let have = io::BufRead::fill_buf(&mut r).unwrap();
            if have.is_empty() {
                break;
            }
            let n = have.len().min(1000);
            got.extend_from_slice(&have[..n]);
            io::BufRead::consume(&mut r, n);
        }
        t.join().unwrap();
        assert_eq!(got, data);
    }
}
