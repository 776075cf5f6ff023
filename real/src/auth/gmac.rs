//! GMAC (NIST SP 800-38D: GCM with the whole message as associated data and no plaintext), fed
//! one piece at a time.
//!
//! Why written here: a checkpoint frame's tag runs over pieces handed to the transport in turn
//! (a record header, then a page straight from guest RAM, and so on), and `aes-gcm` takes its
//! associated data as one slice, while `ghash` takes whole 16-byte blocks. What is ours is only
//! the glue around those two crates: buffering a partial block, GCM's length block, and masking
//! the hash with the cipher's encryption of the nonce's first counter block. A test checks every
//! tag against `aes-gcm` itself.
//!
//! Nonces: the caller gives each message a number that it never reuses under the key (the
//! frame's sequence number in its direction, under that direction's own key).

use aes::cipher::{BlockCipherEncrypt, KeyInit};
use ghash::universal_hash::{array::Array, UniversalHash};
use ghash::GHash;
use subtle::ConstantTimeEq;

/// Bytes of a tag.
pub const GMAC_TAG_LEN: usize = 16;

/// Bytes of a GHASH block.
const BLOCK: usize = 16;

/// A key: the AES-256 key schedule and GHASH's key `H` (the encryption of the zero block), made
/// once per direction of a link.
#[derive(Clone)]
pub struct GmacKey {
    /// Boxed: an AES-256 key schedule is several hundred bytes, and sealers sit in enums.
    cipher: Box<aes::Aes256>,
    h: ghash::Key,
}

impl GmacKey {
    /// The key for 32 bytes of key material.
    pub fn new(key: &[u8; 32]) -> GmacKey {
        let cipher = Box::new(aes::Aes256::new(&(*key).into()));
        let mut h = ghash::Key::default();
        cipher.encrypt_block(&mut h);
        GmacKey { cipher, h }
    }

    /// Starts the tag of message `nonce`.
    pub fn begin(&self, nonce: u64) -> Gmac {
        // J0 = the 96-bit nonce (the number, then four zero bytes) || counter 1.
        let mut mask = ghash::Block::default();
        mask[..8].copy_from_slice(&nonce.to_be_bytes());
        mask[BLOCK - 1] = 1;
        self.cipher.encrypt_block(&mut mask);
        Gmac {
            hash: GHash::new(&self.h),
            pending: [0; BLOCK],
            filled: 0,
            total: 0,
            mask: mask.into(),
        }
    }
}

/// The tag of one message being fed.
#[derive(Clone)]
pub struct Gmac {
    hash: GHash,
    /// The start of a block not yet whole.
    pending: [u8; BLOCK],
    filled: usize,
    /// Bytes fed so far.
    total: u64,
    /// The encrypted counter block the hash is masked with.
    mask: [u8; BLOCK],
}

impl Gmac {
    /// Feeds the next bytes of the message.
    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.filled > 0 {
            let take = (BLOCK - self.filled).min(data.len());
            self.pending[self.filled..self.filled + take].copy_from_slice(&data[..take]);
            self.filled += take;
            data = &data[take..];
            if self.filled < BLOCK {
                return;
            }
            self.hash.update(&[self.pending.into()]);
            self.filled = 0;
        }
        let (blocks, tail) = Array::slice_as_chunks(data);
        self.hash.update(blocks);
        self.pending[..tail.len()].copy_from_slice(tail);
        self.filled = tail.len();
    }

    /// The message's tag.
    pub fn finish(mut self) -> [u8; GMAC_TAG_LEN] {
        // A last partial block is padded with zeros.
        self.hash.update_padded(&self.pending[..self.filled]);
        // GCM's length block: the associated data's length in bits, then the (empty)
        // ciphertext's.
        let mut lengths = ghash::Block::default();
        lengths[..8].copy_from_slice(&(self.total * 8).to_be_bytes());
        self.hash.update(&[lengths]);
        let mut tag: [u8; GMAC_TAG_LEN] = self.hash.finalize().into();
        for (t, m) in tag.iter_mut().zip(self.mask) {
            *t ^= m;
        }
        tag
    }

    /// Whether `tag` is the message's, compared in constant time.
    pub fn verify(self, tag: &[u8; GMAC_TAG_LEN]) -> bool {
        self.finish().ct_eq(tag).into()
    }
}

#[cfg(test)]
mod tests {
    use aes_gcm::aead::{AeadInOut, KeyInit as _};

    use super::*;

    /// GCM's tag of an empty plaintext with `aad` as associated data, by `aes-gcm`.
    fn reference(key: &[u8; 32], nonce: u64, aad: &[u8]) -> [u8; 16] {
        let gcm = aes_gcm::Aes256Gcm::new(&(*key).into());
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&nonce.to_be_bytes());
        let tag = gcm
            .encrypt_inout_detached(&n.into(), aad, (&mut [][..]).into())
            .unwrap();
        tag.into()
    }

    #[test]
    fn tags_equal_aes_gcm_whatever_the_pieces() {
        let key = [0x5au8; 32];
        let k = GmacKey::new(&key);
        let msg: Vec<u8> = (0..10_000u32)
            .map(|i| (i * 7 + i / 13).to_le_bytes()[0])
            .collect();
        for len in [0, 1, 15, 16, 17, 4104, 10_000] {
            let want = reference(&key, 42, &msg[..len]);
            for piece in [1, 8, 16, 33, 4096, len.max(1)] {
                let mut g = k.begin(42);
                for p in msg[..len].chunks(piece) {
                    g.update(p);
                }
                assert_eq!(g.finish(), want, "len {len} fed in pieces of {piece}");
            }
        }
    }

    #[test]
    fn another_nonce_key_or_byte_fails_verification() {
        let k = GmacKey::new(&[1; 32]);
        let mut g = k.begin(7);
        g.update(b"checkpoint frame");
        let tag = g.clone().finish();
        assert!(g.verify(&tag));
        let tag_of = |k: &GmacKey, nonce: u64, msg: &[u8]| {
            let mut g = k.begin(nonce);
            g.update(msg);
            g.finish()
        };
        assert_ne!(tag_of(&k, 8, b"checkpoint frame"), tag);
        assert_ne!(tag_of(&GmacKey::new(&[2; 32]), 7, b"checkpoint frame"), tag);
        assert_ne!(tag_of(&k, 7, b"checkpoint framf"), tag);
        // Same bytes, one more zero byte: the length block tells them apart.
        assert_ne!(tag_of(&k, 7, b"checkpoint frame\0"), tag);
    }
}
