//! [`RawChunk`]'s two handles: [`lend`] (bytes this side made, moved across) and [`Chunk`] (bytes
//! the other side lent, owned here until dropped). The ownership rule is the one in
//! [`ffi`](super): a chunk is freed by the side that made it, through the `free` it carries.

use std::ffi::c_void;
use std::panic::catch_unwind;

use bytes::Bytes;

use super::{RawChunk, RawStr};

/// Moves `bytes` across the ABI as a chunk: the receiver reads `data` and gives the chunk back
/// exactly once through its `free` (a [`Chunk`] does both), which drops the bytes here, with this
/// side's allocator.
pub fn lend(bytes: Bytes) -> RawChunk {
    let owner = Box::new(bytes);
    RawChunk {
        data: RawStr::new(&owner),
        owner: Box::into_raw(owner).cast(),
        free: Some(free_bytes),
    }
}

/// A message (an error's) as a chunk; no copy.
pub fn lend_message(message: String) -> RawChunk {
    lend(Bytes::from(message))
}

unsafe extern "C" fn free_bytes(owner: *mut c_void) {
    // SAFETY: `owner` is the `Box<Bytes>` that `lend` made, freed once by the receiver. Dropping
    // `Bytes` does not panic; the catch keeps a future change from unwinding across the ABI.
    let _ = catch_unwind(|| drop(unsafe { Box::from_raw(owner.cast::<Bytes>()) }));
}

/// A chunk the other side lent, owned here: its bytes stay valid until it drops, which gives it
/// back through its own `free`.
pub struct Chunk(RawChunk);

// SAFETY: chunk memory is plain heap memory, and `free` may be called from any thread (the ABI's
// rules); the chunk is only read through `&self`.
unsafe impl Send for Chunk {}
// SAFETY: as above: shared access only reads the bytes.
unsafe impl Sync for Chunk {}

impl Chunk {
    /// # Safety
    /// `raw` must be a chunk the other side wrote (`READY` or `ERROR`, or [`RawChunk::EMPTY`]),
    /// owned by the caller and not freed yet.
    pub unsafe fn from_raw(raw: RawChunk) -> Chunk {
        Chunk(raw)
    }

    /// The bytes, without a copy: the chunk goes back when the last `Bytes` clone drops.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }

    /// The bytes as text (an `ERROR` chunk's message), copied; the chunk goes back at once.
    pub fn into_message(self) -> String {
        String::from_utf8_lossy(self.as_ref()).into_owned()
    }
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: valid until `free(owner)`, which only `drop` calls (`from_raw`'s contract).
        unsafe { self.0.data.as_bytes() }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        if let Some(free) = self.0.free {
            // SAFETY: the chunk's own `free`, with its own `owner`, called exactly once, here.
            unsafe { free(self.0.owner) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lent_chunk_reads_back_and_is_freed_once_its_last_bytes_drop() {
        let shared = Bytes::from(vec![7u8; 64]);
        let raw = lend(shared.clone());
        // SAFETY: made by `lend` just above, owned here.
        let bytes = unsafe { Chunk::from_raw(raw) }.into_bytes();
        assert_eq!(&bytes[..], &shared[..]);
        assert!(!shared.is_unique(), "the chunk still holds the bytes");
        drop(bytes);
        assert!(shared.is_unique(), "dropping the chunk gave the bytes back");
        // SAFETY: an empty chunk owns nothing.
        let empty = unsafe { Chunk::from_raw(RawChunk::EMPTY) };
        assert!(empty.as_ref().is_empty());
        // SAFETY: as above.
        let message = unsafe { Chunk::from_raw(lend_message("stalled".into())) };
        assert_eq!(message.into_message(), "stalled");
    }
}
