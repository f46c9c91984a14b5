//! Reused download buffers. A download hands its bytes to the response body (and, compressed,
//! to its encoder thread) in buffers of a fixed size. Allocated afresh for each chunk, every
//! buffer's pages were faulted in (zeroed by the kernel) and, with the server's allocator set to
//! return freed memory at once, given back right after: a tenth of a download's CPU. Buffers
//! come from here instead and come back once their bytes are sent.

use std::sync::Mutex;

use axum::body::Bytes;

/// Bytes per buffer: a download's chunk and an encoder's hand-off.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// Idle buffers kept at most: what stays resident once downloads end (4 MiB), enough for a few
/// downloads in flight; busier moments allocate more, freed as before.
const IDLE_BUFFERS: usize = 16;

/// The server's buffers.
pub static CHUNKS: ChunkPool = ChunkPool::new(CHUNK_BYTES, IDLE_BUFFERS);

/// A bounded stack of idle, empty buffers of one capacity.
pub struct ChunkPool {
    idle: Mutex<Vec<Vec<u8>>>,
    capacity: usize,
    keep: usize,
}

impl ChunkPool {
    pub const fn new(capacity: usize, keep: usize) -> ChunkPool {
        ChunkPool { idle: Mutex::new(Vec::new()), capacity, keep }
    }

    /// An empty buffer of the pool's capacity: an idle one when there is one.
    pub fn take(&self) -> Vec<u8> {
        let idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop();
        idle.unwrap_or_else(|| Vec::with_capacity(self.capacity))
    }

    /// Takes a buffer back, emptied, unless the pool already keeps enough or it was grown or
    /// shrunk away from the pool's capacity (then it is freed).
    pub fn give(&self, mut buffer: Vec<u8>) {
        if buffer.capacity() != self.capacity {
            return;
        }
        buffer.clear();
        let mut idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < self.keep {
            idle.push(buffer);
        }
    }

    /// The buffer's bytes as `Bytes` that give the buffer back to the pool once the last of
    /// them is dropped (once hyper has written them).
    pub fn bytes(&'static self, buffer: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled { buffer, pool: self })
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.idle.lock().unwrap().len()
    }
}

/// A buffer lent out as `Bytes`.
struct Pooled {
    buffer: Vec<u8>,
    pool: &'static ChunkPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buffer
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buffer));
    }
}

#[cfg(test)]
mod tests {
    use super::ChunkPool;

    #[test]
    fn a_sent_chunk_comes_back_for_the_next_one() {
        static POOL: ChunkPool = ChunkPool::new(64, 2);
        let mut buffer = POOL.take();
        let address = buffer.as_ptr();
        buffer.extend_from_slice(b"first chunk");
        let bytes = POOL.bytes(buffer);
        let copy = bytes.clone();
        assert_eq!(&copy[..], b"first chunk");
        drop(bytes);
        assert_eq!(POOL.idle(), 0, "still lent out while a `Bytes` of it lives");
        drop(copy);
        assert_eq!(POOL.idle(), 1);
        let again = POOL.take();
        assert_eq!(again.as_ptr(), address, "the same allocation is reused");
        assert!(again.is_empty() && again.capacity() == 64);
    }

    #[test]
    fn the_pool_keeps_a_bounded_number_of_buffers_of_its_capacity() {
        static POOL: ChunkPool = ChunkPool::new(64, 2);
        let buffers: Vec<Vec<u8>> = (0..5).map(|_| POOL.take()).collect();
        for buffer in buffers {
            POOL.give(buffer);
        }
        assert_eq!(POOL.idle(), 2);
        let mut grown = POOL.take();
        grown.extend_from_slice(&[0; 100]);
        POOL.give(grown);
        POOL.give(Vec::with_capacity(8));
        assert_eq!(POOL.idle(), 1, "buffers of another capacity are freed, not kept");
    }
}
