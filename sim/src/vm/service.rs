//! The counter service's messages: what clients send to the VM and what the VM answers.
//! This is guest traffic, not protocol traffic, so it has its own tiny fixed-size format.

/// "Increment counter `key`", request `req` of client `client`. A retry reuses `req`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    /// Client index.
    pub client: u32,
    /// Client-local request number.
    pub req: u64,
    /// Counter to increment.
    pub key: u32,
}

/// The VM's answer: counter `key` now holds `value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reply {
    /// Client index.
    pub client: u32,
    /// Request answered.
    pub req: u64,
    /// Counter.
    pub key: u32,
    /// Its value after the increment.
    pub value: u64,
}

pub(crate) const REQUEST_LEN: usize = 18;
pub(crate) const REPLY_LEN: usize = 26;

impl Request {
    pub(crate) fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..2].copy_from_slice(b"RQ");
        b[2..6].copy_from_slice(&self.client.to_le_bytes());
        b[6..14].copy_from_slice(&self.req.to_le_bytes());
        b[14..18].copy_from_slice(&self.key.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        (&b[..2] == b"RQ").then(|| Request {
            client: u32::from_le_bytes([b[2], b[3], b[4], b[5]]),
            req: u64::from_le_bytes([b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13]]),
            key: u32::from_le_bytes([b[14], b[15], b[16], b[17]]),
        })
    }
}

impl Reply {
    pub(crate) fn encode(&self) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        b[..2].copy_from_slice(b"RP");
        b[2..6].copy_from_slice(&self.client.to_le_bytes());
        b[6..14].copy_from_slice(&self.req.to_le_bytes());
        b[14..18].copy_from_slice(&self.key.to_le_bytes());
        b[18..26].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8; REPLY_LEN]) -> Option<Reply> {
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        (&b[..2] == b"RP").then(|| Reply {
            client: u32::from_le_bytes([b[2], b[3], b[4], b[5]]),
            req: u64_at(6),
            key: u32::from_le_bytes([b[14], b[15], b[16], b[17]]),
            value: u64_at(18),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_reject_garbage() {
        let r = Request {
            client: 3,
            req: 99,
            key: 5,
        };
        assert_eq!(Request::decode(&r.encode()), Some(r));
        let p = Reply {
            client: 3,
            req: 99,
            key: 5,
            value: 1 << 40,
        };
        assert_eq!(Reply::decode(&p.encode()), Some(p));
        assert_eq!(Request::decode(&[0; REQUEST_LEN]), None);
        assert_eq!(Reply::decode(&[0; REPLY_LEN]), None);
    }
}
