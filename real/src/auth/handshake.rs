//! The Noise `IK` handshake that opens every connection, over a blocking stream (checkpoint
//! links) or a tokio stream (witness exchanges).
//!
//! 1. `Hello` (dialler → listener): `IK`'s first message. It carries the dialler's static key,
//!    encrypted, and proves the dialler holds it — but it can be replayed, so it is not yet
//!    proof that the dialler is here now.
//! 2. `Welcome` (listener → dialler): the second message; its payload is the listener's frame
//!    key (the key that will authenticate the frames the listener sends). Only the holder of the
//!    listener's static key can produce it, and only the real dialler (holder of the hello's
//!    ephemeral key) can read it.
//! 3. `Sealed` (dialler → listener): the first transport message, carrying the dialler's frame
//!    key. It proves the dialler is live (it needed the welcome's keys), so the listener binds
//!    the connection to the dialler's node only now.
//!
//! The prologue binds the handshake to the protocol version, the purpose and the VM, so a
//! handshake made for one VM's witness cannot be replayed to another VM's agent.

use std::io::{Read, Write};
use std::sync::Arc;

use ftvm_model::{NodeId, VmId};
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::keys::{Identity, PublicKey, KEY_LEN, NOISE_PARAMS};
use super::msg_io::{self, Kind, MAX_MSG};
use super::protection::Protection;
use super::AuthError;

/// What a connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// An agent-to-agent checkpoint link, with its frames protected so.
    Link(Protection),
    /// An agent's exchange with the witness.
    Witness,
}

/// A finished handshake.
pub struct Accepted {
    /// The node the other side proved to be (`None`: it is the witness).
    pub peer: Option<NodeId>,
    /// The key that authenticates frames we send.
    pub send_key: [u8; KEY_LEN],
    /// The key that authenticates frames we receive.
    pub recv_key: [u8; KEY_LEN],
    /// Noise transport messages we send (encrypted and authenticated).
    pub tx: Channel,
    /// Noise transport messages we receive.
    pub rx: Channel,
}

/// One direction of a finished handshake's Noise transport, with its own message counter (the
/// nonce), so the two directions can live on two threads.
pub struct Channel {
    t: Arc<snow::StatelessTransportState>,
    nonce: u64,
}

impl Channel {
    fn pair(t: snow::StatelessTransportState, sent: u64, received: u64) -> (Channel, Channel) {
        let t = Arc::new(t);
        (
            Channel {
                t: t.clone(),
                nonce: sent,
            },
            Channel { t, nonce: received },
        )
    }

    /// Encrypts the next message into `out`; returns its length.
    pub fn seal(&mut self, plain: &[u8], out: &mut [u8]) -> Result<usize, snow::Error> {
        let n = self.t.write_message(self.nonce, plain, out)?;
        self.nonce += 1;
        Ok(n)
    }

    /// Decrypts the next message into `out`; returns the plaintext's length.
    pub fn open(&mut self, msg: &[u8], out: &mut [u8]) -> Result<usize, snow::Error> {
        let n = self.t.read_message(self.nonce, msg, out)?;
        self.nonce += 1;
        Ok(n)
    }
}

fn prologue(purpose: Purpose, vm: VmId) -> Vec<u8> {
    let what = match purpose {
        Purpose::Link(p) => format!("link/{}", p.name()),
        Purpose::Witness => "witness".into(),
    };
    format!("ftvm auth v2 {what} vm {}", vm.0).into_bytes()
}

fn fresh_key() -> [u8; KEY_LEN] {
    let mut k = [0; KEY_LEN];
    rand::rngs::OsRng.fill_bytes(&mut k);
    k
}

fn key_from(payload: &[u8]) -> Result<[u8; KEY_LEN], AuthError> {
    payload
        .try_into()
        .map_err(|_| AuthError::Malformed("frame key of the wrong length"))
}

/// The dialler's side, step by step (sans-IO; see [`dial`] and [`dial_async`]).
struct Dialler {
    hs: snow::HandshakeState,
    buf: Vec<u8>,
}

impl Dialler {
    fn new(me: &Identity, them: &PublicKey, purpose: Purpose, vm: VmId) -> Result<Self, AuthError> {
        let prologue = prologue(purpose, vm);
        let hs = snow::Builder::new(NOISE_PARAMS.parse()?)
            .local_private_key(&me.me.private)?
            .remote_public_key(&them.0)?
            .prologue(&prologue)?
            .build_initiator()?;
        Ok(Dialler {
            hs,
            buf: vec![0; MAX_MSG],
        })
    }

    fn hello(&mut self) -> Result<Vec<u8>, AuthError> {
        let n = self.hs.write_message(&[], &mut self.buf)?;
        Ok(self.buf[..n].to_vec())
    }

    /// Reads the welcome; returns the confirmation to send and the finished handshake.
    fn welcome(mut self, msg: &[u8]) -> Result<(Vec<u8>, Accepted), AuthError> {
        let n = self.hs.read_message(msg, &mut self.buf)?;
        let recv_key = key_from(&self.buf[..n])?;
        let transport = self.hs.into_stateless_transport_mode()?;
        let (mut tx, rx) = Channel::pair(transport, 0, 0);
        let send_key = fresh_key();
        let n = tx.seal(&send_key, &mut self.buf)?;
        Ok((
            self.buf[..n].to_vec(),
            Accepted {
                peer: None,
                send_key,
                recv_key,
                tx,
                rx,
            },
        ))
    }
}

/// The listener's side, step by step.
struct Listener {
    hs: snow::HandshakeState,
    buf: Vec<u8>,
    peer: NodeId,
    send_key: [u8; KEY_LEN],
}

impl Listener {
    /// Reads the hello: who claims to dial (one of the configured nodes, or refused).
    fn hello(me: &Identity, purpose: Purpose, vm: VmId, msg: &[u8]) -> Result<Self, AuthError> {
        let prologue = prologue(purpose, vm);
        let mut hs = snow::Builder::new(NOISE_PARAMS.parse()?)
            .local_private_key(&me.me.private)?
            .prologue(&prologue)?
            .build_responder()?;
        let mut buf = vec![0; MAX_MSG];
        hs.read_message(msg, &mut buf)?;
        let key = hs.get_remote_static().ok_or(AuthError::UnknownKey)?;
        let peer = me.trust.node_of(key).ok_or(AuthError::UnknownKey)?;
        Ok(Listener {
            hs,
            buf,
            peer,
            send_key: fresh_key(),
        })
    }

    fn welcome(&mut self) -> Result<Vec<u8>, AuthError> {
        let n = self.hs.write_message(&self.send_key, &mut self.buf)?;
        Ok(self.buf[..n].to_vec())
    }

    /// Reads the dialler's confirmation: the connection is now bound to `peer`.
    fn confirm(mut self, msg: &[u8]) -> Result<Accepted, AuthError> {
        let transport = self.hs.into_stateless_transport_mode()?;
        let (tx, mut rx) = Channel::pair(transport, 0, 0);
        let n = rx.open(msg, &mut self.buf)?;
        let recv_key = key_from(&self.buf[..n])?;
        Ok(Accepted {
            peer: Some(self.peer),
            send_key: self.send_key,
            recv_key,
            tx,
            rx,
        })
    }
}

/// Dials: authenticates to the party whose public key is `them` over `stream`.
pub fn dial(
    stream: &mut (impl Read + Write),
    me: &Identity,
    them: &PublicKey,
    purpose: Purpose,
    vm: VmId,
) -> Result<Accepted, AuthError> {
    let mut d = Dialler::new(me, them, purpose, vm)?;
    msg_io::write(stream, Kind::Hello, &d.hello()?)?;
    let welcome = msg_io::read(stream, Kind::Welcome)?;
    let (confirm, acc) = d.welcome(&welcome)?;
    msg_io::write(stream, Kind::Sealed, &confirm)?;
    Ok(acc)
}

/// Listens: authenticates the dialler of `stream` as one of the configured nodes.
pub fn listen(
    stream: &mut (impl Read + Write),
    me: &Identity,
    purpose: Purpose,
    vm: VmId,
) -> Result<Accepted, AuthError> {
    let hello = msg_io::read(stream, Kind::Hello)?;
    let mut l = Listener::hello(me, purpose, vm, &hello)?;
    msg_io::write(stream, Kind::Welcome, &l.welcome()?)?;
    let confirm = msg_io::read(stream, Kind::Sealed)?;
    l.confirm(&confirm)
}

/// [`dial`] on a tokio stream.
pub async fn dial_async(
    stream: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin),
    me: &Identity,
    them: &PublicKey,
    purpose: Purpose,
    vm: VmId,
) -> Result<Accepted, AuthError> {
    let mut d = Dialler::new(me, them, purpose, vm)?;
    msg_io::write_async(stream, Kind::Hello, &d.hello()?).await?;
    let welcome = msg_io::read_async(stream, Kind::Welcome).await?;
    let (confirm, acc) = d.welcome(&welcome)?;
    msg_io::write_async(stream, Kind::Sealed, &confirm).await?;
    Ok(acc)
}

/// [`listen`] on a tokio stream.
pub async fn listen_async(
    stream: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin),
    me: &Identity,
    purpose: Purpose,
    vm: VmId,
) -> Result<Accepted, AuthError> {
    let hello = msg_io::read_async(stream, Kind::Hello).await?;
    let mut l = Listener::hello(me, purpose, vm, &hello)?;
    msg_io::write_async(stream, Kind::Welcome, &l.welcome()?).await?;
    let confirm = msg_io::read_async(stream, Kind::Sealed).await?;
    l.confirm(&confirm)
}

/// Sends `body` encrypted and authenticated on a finished handshake's transport (async).
pub async fn send_sealed(
    stream: &mut (impl AsyncWriteExt + Unpin),
    t: &mut Channel,
    body: &[u8],
) -> Result<(), AuthError> {
    let mut buf = vec![0; MAX_MSG];
    let n = t.seal(body, &mut buf)?;
    msg_io::write_async(stream, Kind::Sealed, &buf[..n]).await
}

/// Receives one message sent by [`send_sealed`] (async).
pub async fn recv_sealed(
    stream: &mut (impl AsyncReadExt + Unpin),
    t: &mut Channel,
) -> Result<Vec<u8>, AuthError> {
    let msg = msg_io::read_async(stream, Kind::Sealed).await?;
    let mut buf = vec![0; MAX_MSG];
    let n = t.open(&msg, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    fn set() -> (Identity, Identity, Identity) {
        let (w, mut nodes) = Identity::generate_set(&[NodeId(1), NodeId(2)]).unwrap();
        let n1 = nodes.remove(&NodeId(1)).unwrap();
        let n2 = nodes.remove(&NodeId(2)).unwrap();
        (w, n1, n2)
    }

    fn run(
        dialler: Identity,
        them: PublicKey,
        listener: Identity,
        d_vm: VmId,
        l_vm: VmId,
    ) -> (Result<Accepted, AuthError>, Result<Accepted, AuthError>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let r = listen(&mut b, &listener, Purpose::Link(Protection::Mac), l_vm);
            drop(b);
            r
        });
        let d = dial(
            &mut a,
            &dialler,
            &them,
            Purpose::Link(Protection::Mac),
            d_vm,
        );
        drop(a);
        (d, t.join().unwrap())
    }

    #[test]
    fn both_sides_learn_who_the_other_is_and_matching_frame_keys() {
        let (_, n1, n2) = set();
        let them = n2.me.public;
        let (d, l) = run(n1, them, n2, VmId(1), VmId(1));
        let (d, l) = (d.unwrap(), l.unwrap());
        assert_eq!(l.peer, Some(NodeId(1)));
        assert_eq!(d.send_key, l.recv_key);
        assert_eq!(d.recv_key, l.send_key);
        assert_ne!(d.send_key, d.recv_key);
    }

    #[test]
    fn a_stranger_key_is_refused_by_the_listener() {
        let (_, _, n2) = set();
        let (_, mut others) = Identity::generate_set(&[NodeId(1)]).unwrap();
        let stranger = others.remove(&NodeId(1)).unwrap();
        let them = n2.me.public;
        let (_, l) = run(stranger, them, n2, VmId(1), VmId(1));
        assert!(matches!(l, Err(AuthError::UnknownKey)), "{:?}", l.err());
    }

    #[test]
    fn an_impostor_listener_is_refused_by_the_dialler() {
        let (_, n1, n2) = set();
        let (w, _, _) = set();
        // n1 expects n2's key, but the witness of another set answers.
        let them = n2.me.public;
        let (d, _) = run(n1, them, w, VmId(1), VmId(1));
        assert!(d.is_err());
    }

    #[test]
    fn a_handshake_for_another_vm_fails() {
        let (_, n1, n2) = set();
        let them = n2.me.public;
        let (d, l) = run(n1, them, n2, VmId(1), VmId(2));
        assert!(d.is_err() || l.is_err());
        assert!(l.is_err());
    }

    #[test]
    fn a_replayed_hello_does_not_authenticate_the_replayer() {
        // Record a genuine hello, then replay it on a fresh connection: the listener answers,
        // but the replayer cannot produce the confirmation, so the listener never binds it.
        let (_, n1, n2) = set();
        let mut d =
            Dialler::new(&n1, &n2.me.public, Purpose::Link(Protection::Mac), VmId(1)).unwrap();
        let hello = d.hello().unwrap();
        let mut l = Listener::hello(&n2, Purpose::Link(Protection::Mac), VmId(1), &hello).unwrap();
        let _welcome = l.welcome().unwrap();
        let forged = vec![0u8; 48];
        assert!(l.confirm(&forged).is_err());
    }
}
