//! Message bodies of HTTP/1.1: how long they are, and moving them from one
//! connection to another as they arrive, with a size limit.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bytes asked of the kernel per read.
const READ_SIZE: usize = 16 * 1024;
/// Bytes gathered before they are written on, at most.
const WRITE_AT: usize = 64 * 1024;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 4 * 1024;
/// Most bytes of trailers.
const MAX_TRAILERS: usize = 64 * 1024;

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the sender closes (responses only).
    UntilClose,
}

impl Framing {
    /// Whether no body bytes follow the head.
    pub fn is_empty(self) -> bool {
        matches!(self, Framing::Empty | Framing::Length(0))
    }
}

/// Why a body could not be moved.
#[derive(Debug)]
pub enum BodyError {
    /// More data than the limit.
    TooLarge,
    /// Broken chunked framing.
    Malformed(&'static str),
    /// The sending side failed or closed early.
    Source(std::io::Error),
    /// The receiving side failed.
    Sink(std::io::Error),
}

#[derive(Debug, Clone, Copy)]
enum State {
    Length(u64),
    UntilClose,
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    Done,
}

/// Walks one body through the bytes that arrive: passes them on as they are,
/// or (`decode`) only the data of a chunked body.
#[derive(Debug)]
pub struct BodyReader {
    state: State,
    decode: bool,
    data: u64,
    limit: u64,
    trailers: usize,
}

impl BodyReader {
    /// A reader for a body framed by `framing`, failing past `limit` data bytes.
    pub fn new(framing: Framing, decode: bool, limit: u64) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::UntilClose => State::UntilClose,
        };
        Self {
            state,
            decode,
            data: 0,
            limit,
            trailers: 0,
        }
    }

    /// Whether the whole body has been seen.
    pub fn done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Moves as much of the body as `buf` holds into `out`; what follows the
    /// body stays in `buf`.
    pub fn step(&mut self, buf: &mut BytesMut, out: &mut Vec<u8>) -> Result<(), BodyError> {
        loop {
            match self.state {
                State::Done => return Ok(()),
                State::Length(rest) | State::ChunkData(rest) => {
                    let n = rest.min(buf.len() as u64) as usize;
                    if n == 0 {
                        return Ok(());
                    }
                    self.data += n as u64;
                    if self.data > self.limit {
                        return Err(BodyError::TooLarge);
                    }
                    out.extend_from_slice(&buf[..n]);
                    buf.advance(n);
                    let rest = rest - n as u64;
                    self.state = match (self.state, rest) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), rest) => State::Length(rest),
                        (_, 0) => State::ChunkEnd,
                        (_, rest) => State::ChunkData(rest),
                    };
                }
                State::UntilClose => {
                    if buf.is_empty() {
                        return Ok(());
                    }
                    self.data += buf.len() as u64;
                    if self.data > self.limit {
                        return Err(BodyError::TooLarge);
                    }
                    out.extend_from_slice(buf);
                    buf.clear();
                    return Ok(());
                }
                State::ChunkSize => {
                    let Some(end) = line(buf)? else {
                        return Ok(());
                    };
                    let size = chunk_size(&buf[..end])?;
                    if !self.decode {
                        out.extend_from_slice(&buf[..end]);
                    }
                    buf.advance(end);
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(());
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(BodyError::Malformed("chunk data not followed by CRLF"));
                    }
                    if !self.decode {
                        out.extend_from_slice(b"\r\n");
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    let Some(end) = line(buf)? else {
                        return Ok(());
                    };
                    self.trailers += end;
                    if self.trailers > MAX_TRAILERS {
                        return Err(BodyError::Malformed("trailers too large"));
                    }
                    if !self.decode {
                        out.extend_from_slice(&buf[..end]);
                    }
                    let last = end == 2;
                    buf.advance(end);
                    if last {
                        self.state = State::Done;
                    }
                }
            }
        }
    }

    /// The sender closed: the end of an until-close body, an error otherwise.
    fn closed(&mut self) -> Result<(), BodyError> {
        match self.state {
            State::UntilClose | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(BodyError::Source(std::io::ErrorKind::UnexpectedEof.into())),
        }
    }
}

/// Length of the CRLF-terminated line at the start of `buf`, if complete.
fn line(buf: &[u8]) -> Result<Option<usize>, BodyError> {
    match buf.iter().take(MAX_LINE).position(|&b| b == b'\n') {
        Some(lf) if lf >= 1 && buf[lf - 1] == b'\r' => Ok(Some(lf + 1)),
        Some(_) => Err(BodyError::Malformed("line not terminated by CRLF")),
        None if buf.len() >= MAX_LINE => Err(BodyError::Malformed("line too long")),
        None => Ok(None),
    }
}

/// The size in a chunk-size line (`1a;ext=1\r\n`).
fn chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let line = &line[..line.len() - 2];
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let rest = &line[digits..];
    if digits == 0
        || digits > 15
        || !(rest.is_empty() || rest[0] == b';' || rest[0] == b' ' || rest[0] == b'\t')
    {
        return Err(BodyError::Malformed("invalid chunk size"));
    }
    let hex = std::str::from_utf8(&line[..digits]).expect("hex digits are ASCII");
    Ok(u64::from_str_radix(hex, 16).expect("at most 15 hex digits fit in u64"))
}

/// Reads more bytes from `stream` into `buf`; 0 means the peer closed.
pub async fn fill(stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    buf.reserve(READ_SIZE);
    stream.read_buf(buf).await
}

/// Moves a body from `src` (starting with what `buf` already holds) to
/// `dst`, after whatever `out` holds already (a head, written with the first
/// body bytes). Returns once the whole body is written.
pub async fn relay(
    reader: &mut BodyReader,
    src: &mut TcpStream,
    buf: &mut BytesMut,
    dst: &mut TcpStream,
    out: &mut Vec<u8>,
) -> Result<(), BodyError> {
    loop {
        reader.step(buf, out)?;
        if reader.done() || !out.is_empty() {
            dst.write_all(out).await.map_err(BodyError::Sink)?;
            out.clear();
            if out.capacity() > WRITE_AT {
                out.shrink_to(WRITE_AT);
            }
        }
        if reader.done() {
            return Ok(());
        }
        if fill(src, buf).await.map_err(BodyError::Source)? == 0 {
            reader.closed()?;
        }
    }
}

/// Reads a whole body from `src` into memory (data only).
pub async fn collect(
    reader: &mut BodyReader,
    src: &mut TcpStream,
    buf: &mut BytesMut,
) -> Result<Vec<u8>, BodyError> {
    let mut out = Vec::new();
    loop {
        reader.step(buf, &mut out)?;
        if reader.done() {
            return Ok(out);
        }
        if fill(src, buf).await.map_err(BodyError::Source)? == 0 {
            reader.closed()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(
        framing: Framing,
        decode: bool,
        input: &[u8],
        split: usize,
    ) -> (Vec<u8>, bool, BytesMut) {
        let mut reader = BodyReader::new(framing, decode, u64::MAX);
        let mut out = Vec::new();
        let mut buf = BytesMut::new();
        for piece in input.chunks(split.max(1)) {
            buf.extend_from_slice(piece);
            reader.step(&mut buf, &mut out).unwrap();
        }
        (out, reader.done(), buf)
    }

    #[test]
    fn a_chunked_body_passes_whole_or_decodes_to_its_data_and_leaves_what_follows() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-sum: 1\r\n\r\nGET / HTTP/1.1\r\n";
        let body_len = wire.len() - b"GET / HTTP/1.1\r\n".len();
        for split in [1, 3, 7, wire.len()] {
            let (out, done, rest) = run(Framing::Chunked, false, wire, split);
            assert!(done);
            assert_eq!(out, &wire[..body_len]);
            assert_eq!(&rest[..], b"GET / HTTP/1.1\r\n");
            let (out, done, _) = run(Framing::Chunked, true, wire, split);
            assert!(done);
            assert_eq!(out, b"hello, world");
        }
    }

    #[test]
    fn broken_chunked_framing_and_oversized_bodies_are_errors() {
        for wire in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"5\nhello\r\n",
            b"1234567890abcdef0\r\n",
        ] {
            let mut reader = BodyReader::new(Framing::Chunked, false, u64::MAX);
            let mut buf = BytesMut::from(wire);
            assert!(
                matches!(
                    reader.step(&mut buf, &mut Vec::new()),
                    Err(BodyError::Malformed(_))
                ),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let mut reader = BodyReader::new(Framing::Length(10), false, 5);
        let mut buf = BytesMut::from(&b"0123456789"[..]);
        assert!(matches!(
            reader.step(&mut buf, &mut Vec::new()),
            Err(BodyError::TooLarge)
        ));
        let mut reader = BodyReader::new(Framing::Chunked, true, 5);
        let mut buf = BytesMut::from(&b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"[..]);
        assert!(matches!(
            reader.step(&mut buf, &mut Vec::new()),
            Err(BodyError::TooLarge)
        ));
    }

    proptest! {
        #[test]
        fn any_chunking_of_any_data_decodes_back_to_it(
            data in prop::collection::vec(any::<u8>(), 0..2000),
            sizes in prop::collection::vec(1usize..300, 1..20),
            split in 1usize..64,
        ) {
            let mut wire = Vec::new();
            let mut rest = &data[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = sizes[i % sizes.len()].min(rest.len());
                wire.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                wire.extend_from_slice(&rest[..n]);
                wire.extend_from_slice(b"\r\n");
                rest = &rest[n..];
                i += 1;
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            let (decoded, done, left) = run(Framing::Chunked, true, &wire, split);
            prop_assert!(done);
            prop_assert!(left.is_empty());
            prop_assert_eq!(decoded, data);
            let (passed, _, _) = run(Framing::Chunked, false, &wire, split);
            prop_assert_eq!(passed, wire);
        }

        #[test]
        fn a_length_body_takes_exactly_its_length(len in 0u64..500, extra in 0usize..50, split in 1usize..64) {
            let wire: Vec<u8> = (0..len as usize + extra).map(|i| i as u8).collect();
            let (out, done, left) = run(Framing::Length(len), false, &wire, split);
            prop_assert!(done);
            prop_assert_eq!(&out[..], &wire[..len as usize]);
            prop_assert_eq!(left.len(), extra);
        }
    }
}
