//! The integrity (MAC) and confidentiality (AEAD) candidates `ftvm bench mac` measures, each
//! run over one checkpoint-like message the way a sender walks it: the frame prefix, then for
//! every dirty page its 8-byte record header and the page itself, straight from guest RAM.
//!
//! A MAC candidate keeps one incremental state per message and feeds it every piece in turn
//! (nothing is copied). An AEAD candidate encrypts each page into its slot of an output buffer,
//! as a sender that encrypts must (guest RAM is never encrypted in place), one AEAD message per
//! page with the record header as associated data; the crates' AEAD APIs take one contiguous
//! plaintext, and a per-page tag (16 bytes, 0.4% of a 4 KiB page) lets the receiver check each
//! page as it lands.

use aes::cipher::KeyInit as _;
use aes_gcm::aead::inout::InOutBuf;
use aes_gcm::aead::AeadInOut;
use hmac::Mac as _;
use poly1305::universal_hash::array::Array;
use poly1305::universal_hash::UniversalHash;

use ftvm_real::auth::gmac::GmacKey;

/// Bytes of every key (256-bit keys throughout).
pub const KEY_LEN: usize = 32;
/// Bytes of a page record header (the page index), as on the wire.
pub const RECORD_HEADER_LEN: usize = 8;
/// BLAKE3's chunk: the unit it hashes in parallel lanes.
const BLAKE3_CHUNK: usize = 1024;

/// What is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Candidate {
    /// Plain copy of the pages into the output buffer: the floor an encrypting sender pays.
    Copy,
    /// The unkeyed CRC-32C the frames carry today (`crc32fast`, CLMUL): the reference.
    Crc32,
    /// Unkeyed XXH3-64 (`xxhash-rust`), the replica's page digest.
    Xxh3,
    /// Keyed BLAKE3, one incremental hasher, one `update` per record header and per page.
    Blake3,
    /// Keyed BLAKE3 fed the record headers first (as an index table in front of the pages,
    /// padded to BLAKE3's 1 KiB chunk) and then the pages, so every page update starts on a
    /// chunk boundary and its four chunks are hashed side by side. The frame would have to
    /// carry its page indices up front for this.
    Blake3Aligned,
    /// Keyed BLAKE3 over the same number of bytes as one contiguous `update`: BLAKE3 at its
    /// widest SIMD, the bound for the per-page variant.
    Blake3Contiguous,
    /// HMAC-SHA256 (`hmac` + `sha2`; `sha2` uses the SHA extensions when the CPU has them).
    HmacSha256,
    /// Poly1305 with a one-time key derived per message from the long-term key and a nonce.
    Poly1305,
    /// GMAC: GHASH over the message as associated data, masked with AES-256 of the nonce
    /// (AES-GCM with no plaintext): the agents' frame tag, `ftvm_real::auth::gmac`.
    Gmac,
    /// ChaCha20-Poly1305 per page into the output buffer.
    ChaCha20Poly1305,
    /// AES-256-GCM per page into the output buffer.
    Aes256Gcm,
}

impl Candidate {
    /// Every candidate, references first.
    pub const ALL: [Candidate; 11] = [
        Candidate::Copy,
        Candidate::Crc32,
        Candidate::Xxh3,
        Candidate::Blake3,
        Candidate::Blake3Aligned,
        Candidate::Blake3Contiguous,
        Candidate::HmacSha256,
        Candidate::Poly1305,
        Candidate::Gmac,
        Candidate::ChaCha20Poly1305,
        Candidate::Aes256Gcm,
    ];

    /// The name in arguments, tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Candidate::Copy => "copy",
            Candidate::Crc32 => "crc32",
            Candidate::Xxh3 => "xxh3",
            Candidate::Blake3 => "blake3-keyed",
            Candidate::Blake3Aligned => "blake3-keyed-aligned",
            Candidate::Blake3Contiguous => "blake3-keyed-contiguous",
            Candidate::HmacSha256 => "hmac-sha256",
            Candidate::Poly1305 => "poly1305",
            Candidate::Gmac => "gmac",
            Candidate::ChaCha20Poly1305 => "chacha20-poly1305",
            Candidate::Aes256Gcm => "aes-256-gcm",
        }
    }

    /// What kind of candidate it is (`reference`, `mac`, `aead`).
    pub fn role(self) -> &'static str {
        match self {
            Candidate::Copy | Candidate::Crc32 | Candidate::Xxh3 | Candidate::Blake3Contiguous => {
                "reference"
            }
            Candidate::Blake3
            | Candidate::Blake3Aligned
            | Candidate::HmacSha256
            | Candidate::Poly1305
            | Candidate::Gmac => "mac",
            Candidate::ChaCha20Poly1305 | Candidate::Aes256Gcm => "aead",
        }
    }
}

impl std::str::FromStr for Candidate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Candidate::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Candidate::ALL.iter().map(|c| c.name()).collect();
                format!("unknown candidate {s:?} (one of {})", names.join(", "))
            })
    }
}

/// One message: a prefix (frame header and checkpoint meta), then `pages` of `region`, each
/// after its record header.
pub struct Message<'a> {
    /// Header and meta bytes sent ahead of the pages.
    pub prefix: &'a [u8],
    /// Guest RAM.
    pub region: &'a [u8],
    /// Bytes per page.
    pub page_size: usize,
    /// Page indices in send order (each inside `region`).
    pub pages: &'a [u64],
    /// Per-message nonce: a sender numbers its frames and never reuses a number under a key.
    pub nonce: u64,
}

impl Message<'_> {
    fn page(&self, index: u64) -> &[u8] {
        let at = index as usize * self.page_size;
        &self.region[at..at + self.page_size]
    }

    /// Every piece in send order: prefix, then record header and page per page.
    fn for_each_piece(&self, mut f: impl FnMut(&[u8])) {
        f(self.prefix);
        for &index in self.pages {
            f(&index.to_le_bytes());
            f(self.page(index));
        }
    }

    /// Bytes of pages the message carries (what throughput is counted in).
    pub fn page_bytes(&self) -> u64 {
        (self.pages.len() * self.page_size) as u64
    }
}

/// Keys of one run (one for each primitive, as a real key schedule would derive them).
pub struct Keys {
    mac: [u8; KEY_LEN],
    hmac: hmac::Hmac<sha2::Sha256>,
    /// The frame tag the agents ship (`ftvm_real::auth::gmac`), so this measures that code.
    gmac: GmacKey,
    chacha: chacha20poly1305::ChaCha20Poly1305,
    aes_gcm: aes_gcm::Aes256Gcm,
}

impl Keys {
    /// Every primitive keyed from `key` (derived with BLAKE3, one context per primitive).
    pub fn new(key: &[u8; KEY_LEN]) -> Keys {
        let derive = |context: &str| blake3::derive_key(context, key);
        let gmac = GmacKey::new(&derive("ftvm bench mac 2026 gmac"));
        Keys {
            mac: derive("ftvm bench mac 2026 keyed mac"),
            hmac: hmac::Hmac::new_from_slice(&derive("ftvm bench mac 2026 hmac"))
                .expect("HMAC takes keys of any length"),
            gmac,
            chacha: chacha20poly1305::ChaCha20Poly1305::new(
                &derive("ftvm bench mac 2026 chacha20-poly1305").into(),
            ),
            aes_gcm: aes_gcm::Aes256Gcm::new(&derive("ftvm bench mac 2026 aes-256-gcm").into()),
        }
    }
}

/// A tag (or, for AEADs, the XOR of the per-page tags), zero-padded to 32 bytes.
pub type Tag = [u8; 32];

fn tag_from(bytes: &[u8]) -> Tag {
    let mut t = [0u8; 32];
    t[..bytes.len()].copy_from_slice(bytes);
    t
}

/// Runs `c` over `msg`; AEADs and `copy` write `out` (one [`slot_len`] slot per page, in send
/// order), the others leave it alone.
pub fn run(c: Candidate, keys: &Keys, msg: &Message<'_>, out: &mut [u8]) -> Tag {
    match c {
        Candidate::Copy => {
            for (slot, &index) in out.chunks_exact_mut(msg.page_size).zip(msg.pages) {
                slot.copy_from_slice(msg.page(index));
            }
            tag_from(&[])
        }
        Candidate::Crc32 => {
            let mut h = crc32fast::Hasher::new();
            msg.for_each_piece(|p| h.update(p));
            tag_from(&h.finalize().to_le_bytes())
        }
        Candidate::Xxh3 => {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            msg.for_each_piece(|p| h.update(p));
            tag_from(&h.digest().to_le_bytes())
        }
        Candidate::Blake3 => {
            let mut h = blake3::Hasher::new_keyed(&keys.mac);
            h.update(&msg.nonce.to_le_bytes());
            msg.for_each_piece(|p| {
                h.update(p);
            });
            *h.finalize().as_bytes()
        }
        Candidate::Blake3Aligned => {
            let mut h = blake3::Hasher::new_keyed(&keys.mac);
            h.update(&msg.nonce.to_le_bytes());
            h.update(msg.prefix);
            for &index in msg.pages {
                h.update(&index.to_le_bytes());
            }
            let fed = 8 + msg.prefix.len() + msg.pages.len() * RECORD_HEADER_LEN;
            let pad = (BLAKE3_CHUNK - fed % BLAKE3_CHUNK) % BLAKE3_CHUNK;
            h.update(&[0u8; BLAKE3_CHUNK][..pad]);
            for &index in msg.pages {
                h.update(msg.page(index));
            }
            *h.finalize().as_bytes()
        }
        Candidate::Blake3Contiguous => {
            let len = msg.prefix.len() + msg.pages.len() * (RECORD_HEADER_LEN + msg.page_size);
            let mut h = blake3::Hasher::new_keyed(&keys.mac);
            h.update(&msg.nonce.to_le_bytes());
            h.update(&msg.region[..len.min(msg.region.len())]);
            *h.finalize().as_bytes()
        }
        Candidate::HmacSha256 => {
            let mut h = keys.hmac.clone();
            h.update(&msg.nonce.to_le_bytes());
            msg.for_each_piece(|p| h.update(p));
            tag_from(&h.finalize().into_bytes())
        }
        Candidate::Poly1305 => {
            // Poly1305's key must never authenticate two messages: a fresh one per message.
            let mut material = [0u8; 16];
            material[..8].copy_from_slice(b"poly1305");
            material[8..].copy_from_slice(&msg.nonce.to_le_bytes());
            let one_time = blake3::keyed_hash(&keys.mac, &material);
            let mut feed = Blocks::new(poly1305::Poly1305::new(&(*one_time.as_bytes()).into()));
            msg.for_each_piece(|p| feed.update(p));
            // The spec's padding of a last partial block (a 1 byte, then zeros).
            let (uhf, tail) = feed.into_parts();
            tag_from(&uhf.compute_unpadded(&tail))
        }
        Candidate::Gmac => {
            let mut g = keys.gmac.begin(msg.nonce);
            msg.for_each_piece(|p| g.update(p));
            tag_from(&g.finish())
        }
        Candidate::ChaCha20Poly1305 => seal_pages(&keys.chacha, msg, out),
        Candidate::Aes256Gcm => seal_pages(&keys.aes_gcm, msg, out),
    }
}

/// The 96-bit nonce of page `n` of message `nonce`.
fn page_nonce(nonce: u64, n: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&nonce.to_le_bytes());
    b[8..].copy_from_slice(&n.to_le_bytes());
    b
}

/// Bytes of an AEAD tag.
pub const TAG_LEN: usize = 16;

/// Bytes of one page's slot in the output buffer: the page, then for an AEAD its tag.
pub fn slot_len(c: Candidate, page_size: usize) -> usize {
    match c {
        Candidate::ChaCha20Poly1305 | Candidate::Aes256Gcm => page_size + TAG_LEN,
        _ => page_size,
    }
}

/// Encrypts every page into its output slot (ciphertext, then tag), the record header as
/// associated data; returns the XOR of the page tags. (The 65-byte prefix is left out.)
fn seal_pages<A>(aead: &A, msg: &Message<'_>, out: &mut [u8]) -> Tag
where
    A: AeadInOut<NonceSize = aes_gcm::aead::consts::U12, TagSize = aes_gcm::aead::consts::U16>,
{
    let mut acc = [0u8; TAG_LEN];
    let slots = out.chunks_exact_mut(msg.page_size + TAG_LEN);
    for (n, (slot, &index)) in slots.zip(msg.pages).enumerate() {
        let nonce = page_nonce(msg.nonce, n as u32);
        let (sealed, tag_out) = slot.split_at_mut(msg.page_size);
        let buf = InOutBuf::new(msg.page(index), sealed).expect("slot and page are one page long");
        let tag = aead
            .encrypt_inout_detached(&nonce.into(), &index.to_le_bytes(), buf)
            .expect("a page is far below the AEAD's message limit");
        tag_out.copy_from_slice(&tag);
        for (a, b) in acc.iter_mut().zip(tag.iter()) {
            *a ^= b;
        }
    }
    tag_from(&acc)
}

/// Feeds arbitrary-length pieces to a universal hash, which takes whole 16-byte blocks: a
/// partial block waits here for the next piece.
struct Blocks<U: UniversalHash> {
    uhf: U,
    pending: [u8; 16],
    filled: usize,
    total: u64,
}

impl<U: UniversalHash<BlockSize = poly1305::universal_hash::consts::U16>> Blocks<U> {
    fn new(uhf: U) -> Self {
        Blocks {
            uhf,
            pending: [0; 16],
            filled: 0,
            total: 0,
        }
    }

    fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.filled > 0 {
            let take = (16 - self.filled).min(data.len());
            self.pending[self.filled..self.filled + take].copy_from_slice(&data[..take]);
            self.filled += take;
            data = &data[take..];
            if self.filled < 16 {
                return;
            }
            self.uhf.update(&[self.pending.into()]);
            self.filled = 0;
        }
        let (blocks, tail) = Array::slice_as_chunks(data);
        self.uhf.update(blocks);
        self.pending[..tail.len()].copy_from_slice(tail);
        self.filled = tail.len();
    }

    /// The hash and the bytes of the last partial block (maybe none).
    fn into_parts(self) -> (U, Vec<u8>) {
        (self.uhf, self.pending[..self.filled].to_vec())
    }
}

/// Decrypts what `seal_pages`'s AEAD wrote (tests: the AEAD candidates really encrypt).
#[cfg(test)]
pub fn open_page(
    c: Candidate,
    keys: &Keys,
    nonce: u64,
    n: u32,
    index: u64,
    slot: &[u8],
) -> Option<Vec<u8>> {
    let (sealed, tag) = slot.split_at(slot.len().checked_sub(TAG_LEN)?);
    let tag: [u8; TAG_LEN] = tag.try_into().ok()?;
    let mut plain = vec![0u8; sealed.len()];
    let buf = InOutBuf::new(sealed, &mut plain).ok()?;
    let nonce = page_nonce(nonce, n).into();
    let aad = index.to_le_bytes();
    let ok = match c {
        Candidate::ChaCha20Poly1305 => {
            keys.chacha
                .decrypt_inout_detached(&nonce, &aad, buf, &tag.into())
        }
        Candidate::Aes256Gcm => keys
            .aes_gcm
            .decrypt_inout_detached(&nonce, &aad, buf, &tag.into()),
        _ => return None,
    };
    ok.ok().map(|()| plain)
}
