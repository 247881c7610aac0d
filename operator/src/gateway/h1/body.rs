//! Message bodies of HTTP/1.1: how they are delimited, decoding them to
//! their data as bytes arrive, and encoding data for the other side.
//!
//! Nothing of a chunked body but its data crosses the gateway: chunk sizes
//! are parsed strictly, extensions and trailers are validated and dropped,
//! and the data is framed anew for the receiver ([`Encoder`]). So a backend
//! never sees a chunk line or a trailer the gateway did not write itself,
//! whatever another parser would have made of the original.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Duration;

/// Bytes asked of the kernel per read, at least.
const READ_SIZE: usize = 16 * 1024;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 4 * 1024;
/// Most bytes of a trailer section.
const MAX_TRAILERS: usize = 16 * 1024;

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
    /// Broken framing.
    Malformed(&'static str),
    /// The sending side closed before the end, or failed.
    Source(std::io::Error),
    /// The receiving side failed.
    Sink(std::io::Error),
    /// The sending side sent nothing for the idle timeout.
    SourceStalled,
    /// The receiving side took nothing for the idle timeout.
    SinkStalled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    UntilClose,
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    Done,
}

/// Walks one body through the bytes that arrive and finds its data.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    data: u64,
    limit: u64,
    trailers: usize,
}

impl Decoder {
    /// A decoder for a body framed by `framing`, failing past `limit` data bytes.
    pub fn new(framing: Framing, limit: u64) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::UntilClose => State::UntilClose,
        };
        Self {
            state,
            data: 0,
            limit,
            trailers: 0,
        }
    }

    /// Whether the whole body has been seen.
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Data bytes seen so far.
    pub fn data_len(&self) -> u64 {
        self.data
    }

    /// Consumes framing at the start of `buf` and returns how many data
    /// bytes now start it (the caller uses them and advances `buf` by that
    /// many). `Ok(None)`: more bytes are needed, or the body is done.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<usize>, BodyError> {
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::Length(rest) | State::ChunkData(rest) => {
                    let n = rest.min(buf.len() as u64) as usize;
                    if n == 0 {
                        return Ok(None);
                    }
                    self.data += n as u64;
                    if self.data > self.limit {
                        return Err(BodyError::TooLarge);
                    }
                    let rest = rest - n as u64;
                    self.state = match (self.state, rest) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), rest) => State::Length(rest),
                        (_, 0) => State::ChunkEnd,
                        (_, rest) => State::ChunkData(rest),
                    };
                    return Ok(Some(n));
                }
                State::UntilClose => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    self.data += buf.len() as u64;
                    if self.data > self.limit {
                        return Err(BodyError::TooLarge);
                    }
                    return Ok(Some(buf.len()));
                }
                State::ChunkSize => {
                    let Some(end) = line(buf)? else {
                        return Ok(None);
                    };
                    let size = chunk_size(&buf[..end - 2])?;
                    buf.advance(end);
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(BodyError::Malformed("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    let Some(end) = line(buf)? else {
                        return Ok(None);
                    };
                    self.trailers += end;
                    if self.trailers > MAX_TRAILERS {
                        return Err(BodyError::Malformed("trailer section too large"));
                    }
                    if end == 2 {
                        self.state = State::Done;
                    } else if !is_field_line(&buf[..end - 2]) {
                        return Err(BodyError::Malformed("invalid trailer field"));
                    }
                    buf.advance(end);
                }
            }
        }
    }

    /// The sender closed: the end of an until-close body, an error otherwise.
    pub fn closed(&mut self) -> Result<(), BodyError> {
        match self.state {
            State::UntilClose | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(BodyError::Source(std::io::ErrorKind::UnexpectedEof.into())),
        }
    }
}

/// Length of the CRLF-terminated line at the start of `buf` (CRLF included),
/// if it is complete. A bare CR or LF anywhere in it is an error.
fn line(buf: &[u8]) -> Result<Option<usize>, BodyError> {
    let Some(lf) = buf.iter().take(MAX_LINE).position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_LINE {
            Err(BodyError::Malformed("line too long"))
        } else {
            Ok(None)
        };
    };
    if lf == 0 || buf[lf - 1] != b'\r' || buf[..lf - 1].contains(&b'\r') {
        return Err(BodyError::Malformed("line not terminated by CRLF"));
    }
    Ok(Some(lf + 1))
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn skip_whitespace(line: &[u8], mut i: usize) -> usize {
    while i < line.len() && (line[i] == b' ' || line[i] == b'\t') {
        i += 1;
    }
    i
}

fn skip_token(line: &[u8], mut i: usize) -> usize {
    while i < line.len() && is_tchar(line[i]) {
        i += 1;
    }
    i
}

/// The size in a chunk-size line without its CRLF: hex digits, then
/// nothing or extensions `*( BWS ";" BWS name [ BWS "=" BWS value ] )`
/// (RFC 9112, section 7.1.1), each name a token and each value a token or
/// a quoted string. Anything else (a space before the end, a bare CR, a
/// NUL, a size that does not fit 60 bits) is an error.
pub fn chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    const INVALID: &str = "invalid chunk size line";
    let invalid = || BodyError::Malformed(INVALID);
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(invalid());
    }
    let mut i = digits;
    while i < line.len() {
        i = skip_whitespace(line, i);
        if line.get(i) != Some(&b';') {
            return Err(invalid());
        }
        i = skip_whitespace(line, i + 1);
        let name_end = skip_token(line, i);
        if name_end == i {
            return Err(invalid());
        }
        i = name_end;
        let after_name = skip_whitespace(line, i);
        if line.get(after_name) == Some(&b'=') {
            i = skip_whitespace(line, after_name + 1);
            if line.get(i) == Some(&b'"') {
                i = quoted_string_end(line, i).ok_or_else(invalid)?;
            } else {
                let value_end = skip_token(line, i);
                if value_end == i {
                    return Err(invalid());
                }
                i = value_end;
            }
        } else if after_name < line.len() && line[after_name] != b';' {
            return Err(invalid());
        }
    }
    let hex = std::str::from_utf8(&line[..digits]).expect("hex digits are ASCII");
    Ok(u64::from_str_radix(hex, 16).expect("at most 15 hex digits fit in u64"))
}

/// The index after a quoted string that starts at `start`.
fn quoted_string_end(line: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    while i < line.len() {
        match line[i] {
            b'"' => return Some(i + 1),
            b'\\' => {
                let next = *line.get(i + 1)?;
                if !(next == b'\t' || next >= 0x20) || next == 0x7f {
                    return None;
                }
                i += 2;
            }
            b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff => i += 1,
            _ => return None,
        }
    }
    None
}

/// Whether `line` (without CRLF) is a header field: a token, a colon, and
/// a value of visible characters, spaces and tabs (no folding).
pub fn is_field_line(line: &[u8]) -> bool {
    let name = skip_token(line, 0);
    name > 0
        && line.get(name) == Some(&b':')
        && line[name + 1..]
            .iter()
            .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// Frames data for the receiving side of a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoder {
    /// As it is: a length was announced, or the end is the connection's.
    Raw,
    /// In chunks, one per piece of data, ending with an empty chunk and no
    /// trailers.
    Chunked,
}

impl Encoder {
    /// Appends `data`, framed, to `out`.
    pub fn push(self, data: &[u8], out: &mut Vec<u8>) {
        if data.is_empty() {
            return;
        }
        if self == Encoder::Chunked {
            push_hex(data.len(), out);
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        } else {
            out.extend_from_slice(data);
        }
    }

    /// Appends the end of the body to `out`.
    pub fn finish(self, out: &mut Vec<u8>) {
        if self == Encoder::Chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
    }
}

fn push_hex(mut n: usize, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Reads more bytes from `stream` into `buf`; 0 means the peer closed.
pub async fn fill<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    buf.reserve(READ_SIZE);
    stream.read_buf(buf).await
}

/// [`fill`], failing with `TimedOut` when nothing arrives for `idle`.
pub async fn fill_within<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    idle: Duration,
) -> std::io::Result<usize> {
    match tokio::time::timeout(idle, fill(stream, buf)).await {
        Ok(read) => read,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Writes all of `bytes`, failing with `TimedOut` when the peer takes
/// nothing for `idle` (progress resets the clock, so a large write to a
/// reader that keeps up is never cut). What the socket takes at once is
/// written without setting up a timer.
pub async fn write_within(
    stream: &mut TcpStream,
    mut bytes: &[u8],
    idle: Duration,
) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match stream.try_write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                match tokio::time::timeout(idle, stream.writable()).await {
                    Ok(ready) => ready?,
                    Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
                }
            }
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Writes all of `first` then all of `second` (one vectored write when the
/// socket takes both at once, so neither is copied), with the idle timeout
/// of [`write_within`].
pub async fn write_two_within(
    stream: &mut TcpStream,
    mut first: &[u8],
    mut second: &[u8],
    idle: Duration,
) -> std::io::Result<()> {
    while !first.is_empty() {
        let slices = [std::io::IoSlice::new(first), std::io::IoSlice::new(second)];
        match stream.try_write_vectored(&slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) if n >= first.len() => {
                second = &second[n - first.len()..];
                first = &[];
            }
            Ok(n) => first = &first[n..],
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                match tokio::time::timeout(idle, stream.writable()).await {
                    Ok(ready) => ready?,
                    Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
                }
            }
            Err(error) => return Err(error),
        }
    }
    write_within(stream, second, idle).await
}

/// A client connection the HTTP/1 adapter serves: plain TCP, written with
/// the non-blocking fast path of [`write_within`], or TLS.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// The scheme requests arrive with (`http`, `https`).
    const SCHEME: &'static str;

    /// [`write_within`] for this stream: all of `bytes` on the wire.
    fn write_all_within(
        &mut self,
        bytes: &[u8],
        idle: Duration,
    ) -> impl Future<Output = std::io::Result<()>> + Send;

    /// [`write_two_within`] for this stream.
    fn write_two_within(
        &mut self,
        first: &[u8],
        second: &[u8],
        idle: Duration,
    ) -> impl Future<Output = std::io::Result<()>> + Send;
}

impl ClientStream for TcpStream {
    const SCHEME: &'static str = "http";

    fn write_all_within(
        &mut self,
        bytes: &[u8],
        idle: Duration,
    ) -> impl Future<Output = std::io::Result<()>> + Send {
        write_within(self, bytes, idle)
    }

    fn write_two_within(
        &mut self,
        first: &[u8],
        second: &[u8],
        idle: Duration,
    ) -> impl Future<Output = std::io::Result<()>> + Send {
        write_two_within(self, first, second, idle)
    }
}

impl<S> ClientStream for tokio_rustls::server::TlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    const SCHEME: &'static str = "https";

    async fn write_all_within(&mut self, bytes: &[u8], idle: Duration) -> std::io::Result<()> {
        write_then_flush(self, &[bytes], idle).await
    }

    async fn write_two_within(
        &mut self,
        first: &[u8],
        second: &[u8],
        idle: Duration,
    ) -> std::io::Result<()> {
        write_then_flush(self, &[first, second], idle).await
    }
}

/// Writes `pieces` and flushes (a TLS stream holds records until then),
/// failing with `TimedOut` when the peer takes nothing for `idle`.
async fn write_then_flush<S: AsyncWrite + Unpin>(
    stream: &mut S,
    pieces: &[&[u8]],
    idle: Duration,
) -> std::io::Result<()> {
    let stalled = |_| std::io::Error::from(std::io::ErrorKind::TimedOut);
    for piece in pieces {
        let mut bytes = *piece;
        while !bytes.is_empty() {
            let n = tokio::time::timeout(idle, stream.write(bytes))
                .await
                .map_err(stalled)??;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            bytes = &bytes[n..];
        }
    }
    tokio::time::timeout(idle, stream.flush())
        .await
        .map_err(stalled)?
}

/// Whether an I/O error is an idle timeout of [`fill_within`] or
/// [`write_within`].
pub fn is_stall(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::TimedOut
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Decodes `input` fed in pieces of `split` bytes: the data, whether the
    /// body ended, and what followed it.
    fn decode(
        framing: Framing,
        input: &[u8],
        split: usize,
    ) -> Result<(Vec<u8>, bool, BytesMut), BodyError> {
        let mut decoder = Decoder::new(framing, u64::MAX);
        let mut data = Vec::new();
        let mut buf = BytesMut::new();
        for piece in input.chunks(split.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(n) = decoder.next(&mut buf)? {
                data.extend_from_slice(&buf[..n]);
                buf.advance(n);
            }
        }
        Ok((data, decoder.done(), buf))
    }

    #[test]
    fn a_chunked_body_decodes_to_its_data_and_leaves_what_follows() {
        let wire = b"5\r\nhello\r\n7;ext=1;q=\"a b\"\r\n, world\r\n0\r\nx-sum: 1\r\n\r\nGET / HTTP/1.1\r\n";
        for split in [1, 3, 7, wire.len()] {
            let (data, done, rest) = decode(Framing::Chunked, wire, split).unwrap();
            assert!(done);
            assert_eq!(data, b"hello, world");
            assert_eq!(&rest[..], b"GET / HTTP/1.1\r\n");
        }
    }

    #[test]
    fn chunk_lines_that_are_not_plain_hex_or_valid_extensions_are_errors() {
        for line in [
            &b"5;a\rb"[..],
            b"5 xyz",
            b"5;\0",
            b"5 ",
            b"5\t",
            b"",
            b"x",
            b"+5",
            b"0x5",
            b"5;",
            b"5;=1",
            b"5;a=",
            b"5;a=\"open",
            b"5;a b",
            b"1234567890abcdef0",
        ] {
            assert!(
                chunk_size(line).is_err(),
                "{:?} was accepted",
                String::from_utf8_lossy(line)
            );
        }
        for (line, size) in [
            (&b"5"[..], 5),
            (b"A", 10),
            (b"ff;name", 255),
            (b"1 ; a = b ; c", 1),
            (b"2;a=\"q\\\"x\"", 2),
        ] {
            assert_eq!(
                chunk_size(line).unwrap(),
                size,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn broken_chunked_framing_bad_trailers_and_oversized_bodies_are_errors() {
        for wire in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"5\nhello\r\n",
            b"5\r\nhello\r\n0\r\nGET / HTTP/1.1\r\n\r\n",
            b"5\r\nhello\r\n0\r\n folded: x\r\n\r\n",
            b"5\r\nhello\r\n0\r\nbad header\r\n\r\n",
        ] {
            let outcome = decode(Framing::Chunked, wire, wire.len());
            assert!(
                matches!(outcome, Err(BodyError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let mut decoder = Decoder::new(Framing::Length(10), 5);
        let mut buf = BytesMut::from(&b"0123456789"[..]);
        assert!(matches!(decoder.next(&mut buf), Err(BodyError::TooLarge)));
        let mut decoder = Decoder::new(Framing::Chunked, 5);
        let mut buf = BytesMut::from(&b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"[..]);
        let first = decoder.next(&mut buf).unwrap().unwrap();
        buf.advance(first);
        assert!(matches!(decoder.next(&mut buf), Err(BodyError::TooLarge)));
    }

    #[test]
    fn chunked_encoding_frames_each_piece_and_ends_without_trailers() {
        let mut out = Vec::new();
        Encoder::Chunked.push(b"hello", &mut out);
        Encoder::Chunked.push(b"", &mut out);
        Encoder::Chunked.push(&[b'x'; 300], &mut out);
        Encoder::Chunked.finish(&mut out);
        let mut expected = b"5\r\nhello\r\n12c\r\n".to_vec();
        expected.extend_from_slice(&[b'x'; 300]);
        expected.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(out, expected);
    }

    proptest! {
        #[test]
        fn any_chunking_of_any_data_decodes_back_to_it_and_reencodes_to_the_same_data(
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
            let (decoded, done, left) = decode(Framing::Chunked, &wire, split).unwrap();
            prop_assert!(done);
            prop_assert!(left.is_empty());
            prop_assert_eq!(&decoded, &data);
            let mut encoded = Vec::new();
            for piece in data.chunks(sizes[0]) {
                Encoder::Chunked.push(piece, &mut encoded);
            }
            Encoder::Chunked.finish(&mut encoded);
            let (again, done, _) = decode(Framing::Chunked, &encoded, split).unwrap();
            prop_assert!(done);
            prop_assert_eq!(again, data);
        }

        #[test]
        fn a_length_body_takes_exactly_its_length(len in 0u64..500, extra in 0usize..50, split in 1usize..64) {
            let wire: Vec<u8> = (0..len as usize + extra).map(|i| i as u8).collect();
            let (out, done, left) = decode(Framing::Length(len), &wire, split).unwrap();
            prop_assert!(done);
            prop_assert_eq!(&out[..], &wire[..len as usize]);
            prop_assert_eq!(left.len(), extra);
        }
    }
}
