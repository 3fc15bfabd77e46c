//! The netlink wire format (include/uapi/linux/netlink.h): message headers, attributes and
//! the integers in them, built and read byte by byte from slices, every length checked
//! before it is read. Netlink integers are in host byte order.

use anyhow::{Context as _, Result, anyhow, bail};

/// Message types netlink itself defines.
pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;
/// Header flags.
pub const NLM_F_REQUEST: u16 = 0x01;
pub const NLM_F_ACK: u16 = 0x04;
pub const NLM_F_DUMP_INTR: u16 = 0x10;
pub const NLM_F_DUMP: u16 = 0x100 | 0x200; // NLM_F_ROOT | NLM_F_MATCH
const NLA_TYPE_MASK: u16 = !((1 << 15) | (1 << 14)); // ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)
/// `sizeof(struct nlmsghdr)`, `sizeof(struct nlattr)`.
pub const NLMSG_HDRLEN: usize = 16;
pub const NLA_HDRLEN: usize = 4;

/// A request being built: `struct nlmsghdr` (its length filled in by [`Request::finish`]),
/// then the body and attributes the caller appends.
pub struct Request {
    out: Vec<u8>,
}

impl Request {
    /// A header of type `kind` with `flags` and sequence number `seq`; `capacity` hints at
    /// the whole message's size.
    pub fn new(kind: u16, flags: u16, seq: u32, capacity: usize) -> Self {
        let mut out = Vec::with_capacity(capacity);
        out.extend_from_slice(&[0; 4]); // nlmsg_len, filled in by finish
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel fills it in
        Request { out }
    }

    /// Appends raw bytes of the body.
    pub fn push(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Appends one attribute (`struct nlattr` and its payload, padded to 4 bytes).
    pub fn attribute(&mut self, kind: u16, payload: &[u8]) -> Result<()> {
        let len = u16::try_from(NLA_HDRLEN + payload.len()).context("attribute too long")?;
        self.out.extend_from_slice(&len.to_ne_bytes());
        self.out.extend_from_slice(&kind.to_ne_bytes());
        self.out.extend_from_slice(payload);
        self.out.resize(align4(self.out.len()), 0);
        Ok(())
    }

    /// The finished message, its length in its header.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        let total = u32::try_from(self.out.len()).context("request too long")?;
        self.out[..4].copy_from_slice(&total.to_ne_bytes());
        Ok(self.out)
    }
}

/// One netlink message of an answer.
pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// The netlink messages in one datagram, each length checked.
pub struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Messages<'a> {
    pub fn new(datagram: &'a [u8]) -> Self {
        Messages { rest: datagram }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let parsed = (|| -> Result<(Message<'a>, usize)> {
            let len = usize::try_from(read_u32(self.rest, 0)?)?;
            if len < NLMSG_HDRLEN || len > self.rest.len() {
                bail!(
                    "netlink message length {len} outside 16..={} bytes",
                    self.rest.len()
                );
            }
            let message = Message {
                kind: u16::from_ne_bytes(read_array(self.rest, 4)?),
                flags: u16::from_ne_bytes(read_array(self.rest, 6)?),
                seq: read_u32(self.rest, 8)?,
                payload: self
                    .rest
                    .get(NLMSG_HDRLEN..len)
                    .context("netlink payload")?,
            };
            Ok((message, align4(len).min(self.rest.len())))
        })();
        match parsed {
            Ok((message, advance)) => {
                self.rest = self.rest.get(advance..).unwrap_or_default();
                Some(Ok(message))
            }
            Err(error) => {
                self.rest = &[];
                Some(Err(error.context("malformed netlink answer")))
            }
        }
    }
}

/// The attributes (`struct nlattr`: length, type, payload) that follow a message's fixed
/// part: `(type, payload)`, the type without its NESTED and NET_BYTEORDER flags. A length
/// past the end is an error, and ends the walk.
pub struct Attributes<'a> {
    rest: &'a [u8],
}

impl<'a> Attributes<'a> {
    pub fn new(attributes: &'a [u8]) -> Self {
        Attributes { rest: attributes }
    }
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Result<(u16, &'a [u8])>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let parsed = (|| -> Result<(u16, &'a [u8], usize)> {
            let len = usize::from(u16::from_ne_bytes(read_array(self.rest, 0)?));
            let kind = u16::from_ne_bytes(read_array(self.rest, 2)?) & NLA_TYPE_MASK;
            if len < NLA_HDRLEN || len > self.rest.len() {
                bail!(
                    "attribute length {len} outside 4..={} bytes",
                    self.rest.len()
                );
            }
            let payload = self
                .rest
                .get(NLA_HDRLEN..len)
                .context("attribute payload")?;
            Ok((kind, payload, align4(len)))
        })();
        match parsed {
            Ok((kind, payload, advance)) => {
                self.rest = self.rest.get(advance..).unwrap_or_default();
                Some(Ok((kind, payload)))
            }
            Err(error) => {
                self.rest = &[];
                Some(Err(error))
            }
        }
    }
}

/// `struct nlmsgerr`'s errno, as a positive number (0: ack).
pub fn error_payload(payload: &[u8]) -> Result<i32> {
    let error = read_i32(payload, 0).context("NLMSG_ERROR without an error code")?;
    error
        .checked_neg()
        .filter(|errno| *errno >= 0)
        .ok_or_else(|| anyhow!("NLMSG_ERROR with a positive error code {error}"))
}

/// `N` bytes at offset `at`, or an error naming where they were missing.
pub fn read_array<const N: usize>(raw: &[u8], at: usize) -> Result<[u8; N]> {
    at.checked_add(N)
        .and_then(|end| raw.get(at..end))
        .and_then(|bytes| bytes.try_into().ok())
        .with_context(|| {
            format!(
                "{N} bytes at offset {at} past the end ({} bytes)",
                raw.len()
            )
        })
}

pub fn read_u32(raw: &[u8], at: usize) -> Result<u32> {
    read_array(raw, at).map(u32::from_ne_bytes)
}

pub fn read_i32(raw: &[u8], at: usize) -> Result<i32> {
    read_array(raw, at).map(i32::from_ne_bytes)
}

/// NLMSG_ALIGN / NLA_ALIGN.
pub const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_lengths_are_errors_not_panics() {
        // Netlink headers with impossible lengths.
        for datagram in [
            &[1u8, 2, 3][..],
            &[8, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ] {
            let first = Messages::new(datagram).next().expect("one item");
            assert!(first.is_err());
        }
        // An attribute claiming more bytes than there are; one cut inside its header.
        for attributes in [&[200u8, 0, 2, 0][..], &[8, 0, 2]] {
            let mut walk = Attributes::new(attributes);
            assert!(walk.next().expect("one item").is_err());
            assert!(walk.next().is_none(), "the walk ends at the error");
        }
    }

    #[test]
    fn a_request_round_trips() {
        let mut request = Request::new(20, NLM_F_REQUEST | NLM_F_DUMP, 7, 64);
        request.push(&[1, 2, 3, 4]);
        request.attribute(1, &[9, 9, 9]).expect("attribute");
        request.attribute(2 | 1 << 15, &[]).expect("attribute");
        let bytes = request.finish().expect("request");
        assert_eq!(bytes.len(), 16 + 4 + 8 + 4);
        let messages: Vec<_> = Messages::new(&bytes).collect::<Result<_>>().expect("parse");
        let [message] = &messages[..] else {
            panic!("one message");
        };
        assert_eq!(
            (message.kind, message.flags, message.seq),
            (20, NLM_F_REQUEST | NLM_F_DUMP, 7)
        );
        assert_eq!(&message.payload[..4], &[1, 2, 3, 4]);
        let attributes: Vec<_> = Attributes::new(&message.payload[4..])
            .collect::<Result<_>>()
            .expect("attributes");
        assert_eq!(attributes, [(1, &[9u8, 9, 9][..]), (2, &[][..])]);
    }
}
