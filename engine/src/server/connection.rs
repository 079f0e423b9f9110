//! One client connection: handshake, then the transmission loop.
//!
//! The reader parses requests and starts them at once; each one replies
//! through the [`Outbox`] when it completes, in any order. Backends that
//! complete inline (RAM) never spawn a task.

use super::budget::{Budget, Permit};
use super::outbox::{Body, Outbox, Reply};
use super::recvbuf::Reader;
use super::shard::ShardCtx;
use super::socket::NbdSocket;
use super::tls::TlsSession;
use crate::backend::{BackendError, BackendIo, ReadBuf, ZeroFlags};
use crate::export::Export;
use crate::protocol::transmission::{self, Next, Outcome};
use crate::protocol::{
    Command, Extent, Handshake, Negotiated, ReplyHeader, RequestHeader, TlsPolicy, Transmission,
};
use crate::stats::Op;
use futures_lite::future::{or, poll_once};
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// Receive buffer: room for a batch of pipelined 4 KiB writes.
const RECV_BUF: usize = 256 * 1024;
/// Before negotiation: enough for every option but the rare long one
/// (the buffer grows to what an option needs, at most 64 KiB).
const HANDSHAKE_BUF: usize = 4096;

/// Serves one accepted connection to completion.
pub async fn serve(stream: TcpStream, shard: Rc<ShardCtx>, peer: super::Peer) {
    let super::Peer {
        route,
        name: peer,
        seq,
    } = peer;
    let _ = stream.set_nodelay(true);
    let socket = match NbdSocket::dup_of(&stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot set up connection");
            return;
        }
    };
    let mut reader = Reader::new(socket.clone(), HANDSHAKE_BUF);
    reader.set_timeout(Some(shard.limits.handshake_timeout));
    let _registration = shard.register(socket.clone());
    let mut stream = stream;
    // The whole handshake, writes and TLS included, within the timeout: a
    // peer that stops reading our replies cannot hold it open either.
    let limit = shard.limits.handshake_timeout;
    let negotiation = or(
        negotiate(&shard, &socket, &mut stream, &mut reader, &peer, route),
        async {
            glommio::timer::sleep(limit).await;
            Err(io::ErrorKind::TimedOut.into())
        },
    );
    let (negotiated, tls) = match negotiation.await {
        Ok(Some(n)) => n,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "handshake ended");
            return;
        }
    };
    reader.set_timeout(None);
    reader.grow(RECV_BUF);
    let Some(export) = shard.table.get(&negotiated.export.name) else {
        return; // removed while we negotiated
    };
    // Counted before the check, so a delete that took the export out of the
    // table either sees this connection or is seen by it.
    let _attached = Attached::new(export.clone(), shard.index, &peer, seq);
    if !shard.table.serves(&export) {
        return;
    }
    let io = match shard.backend_for(&export).await {
        Ok(io) => io,
        Err(e) => {
            tracing::warn!(%peer, export = %export.name, error = %e, "cannot open backstore");
            return;
        }
    };
    tracing::debug!(%peer, export = %export.name, shard = shard.index, "client attached");
    let local = shard.colocate && runs_here(&stream, route);
    let outbox = Rc::new(Outbox::new(tls, shard.limits.write_timeout, local));
    let writer = glommio::spawn_local({
        let (outbox, socket) = (outbox.clone(), socket.clone());
        async move { outbox.run(&socket, stream).await }
    });
    let conn = Rc::new(Conn {
        protocol: RefCell::new(Transmission::new(&negotiated)),
        budget: Budget::new(shard.limits.conn_requests, shard.limits.conn_bytes),
        shard: shard.clone(),
        export: export.clone(),
        io,
        outbox: outbox.clone(),
        wrote: Cell::new(false),
    });
    if let Err(e) = conn.transmit(&mut reader).await {
        tracing::debug!(%peer, error = %e, "connection ended");
    }
    // In-flight requests finish and their replies go out before we close.
    conn.budget.drained().await;
    let stopping = shard.is_closing();
    if stopping && conn.wrote.get() {
        // What this connection wrote is durable before the process exits
        // (backend caches such as librbd's die with it).
        if let Err(e) = conn.io.flush().await {
            tracing::warn!(%peer, export = %export.name, error = %e, "flush at shutdown failed");
        }
    }
    outbox.close();
    writer.await;
    if stopping && !outbox.failed() {
        // Requests read but never started stay unanswered: the kernel
        // requeues those on its next connection, where an error reply would
        // have failed them.
        socket.finish(shard.limits.write_timeout).await;
    }
    tracing::debug!(%peer, "client detached");
}

/// Whether the peer runs on this host: the unix route, loopback, or a TCP
/// peer on one of our own addresses (both ends then share the address).
fn runs_here(stream: &TcpStream, route: super::Route) -> bool {
    if route == super::Route::Unix {
        return true;
    }
    match (stream.peer_addr(), stream.local_addr()) {
        (Ok(peer), Ok(local)) => peer.ip().is_loopback() || peer.ip() == local.ip(),
        _ => false,
    }
}

/// Counts a connection on its export for as long as it lives.
struct Attached {
    export: Arc<Export>,
    shard: usize,
    id: u64,
}

impl Attached {
    fn new(export: Arc<Export>, shard: usize, peer: &str, id: u64) -> Self {
        export.stats.connection_opened(shard, peer, id);
        Attached { export, shard, id }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.export.stats.connection_closed(self.shard, self.id);
    }
}

/// Runs the handshake (and TLS, when the client starts it); None when the
/// client left or was refused.
async fn negotiate(
    shard: &ShardCtx,
    socket: &NbdSocket,
    stream: &mut TcpStream,
    reader: &mut Reader,
    peer: &str,
    route: super::Route,
) -> io::Result<Option<(Negotiated, Option<Rc<TlsSession>>)>> {
    let policy = match route {
        super::Route::Tcp => shard.tls.as_ref().map_or(TlsPolicy::Off, |t| t.policy),
        super::Route::Unix => TlsPolicy::Off,
    };
    let mut hs = Handshake::new()
        .list_exports(shard.limits.list_exports)
        .tls(policy);
    let mut tls: Option<Rc<TlsSession>> = None;
    let result = loop {
        if hs.has_output() {
            send(stream, tls.as_deref(), &hs.take_output()).await?;
        }
        if hs.take_starttls() {
            tls = Some(Rc::new(
                start_tls(shard, socket, stream, reader, peer).await?,
            ));
            reader.set_tls(tls.clone().expect("just set"));
            continue;
        }
        if hs.is_closed() {
            break None;
        }
        if let Some(n) = hs.negotiated() {
            break Some((n.clone(), tls));
        }
        let want = hs.want();
        if !reader.ensure(want).await? {
            break None;
        }
        if shard.is_closing() {
            hs.begin_shutdown();
        }
        let result = hs.receive(&reader.data()[..want], &*shard.table);
        reader.consume(want);
        if let Err(e) = result {
            let _ = send(stream, tls.as_deref(), &hs.take_output()).await;
            tracing::debug!(%peer, error = %e, "handshake refused");
            break None;
        }
    };
    if result.is_none() && policy == TlsPolicy::Require && !hs.tls_active() {
        tracing::info!(%peer, "refused a client that did not start TLS (--tls require)");
    }
    Ok(result)
}

/// Sends handshake bytes, through TLS once it is up.
async fn send(stream: &mut TcpStream, tls: Option<&TlsSession>, out: &[u8]) -> io::Result<()> {
    match tls {
        Some(t) => t.send(stream, &[out], None).await,
        None => stream.write_all(out).await,
    }
}

/// Upgrades the connection after the ACK to STARTTLS has gone out.
async fn start_tls(
    shard: &ShardCtx,
    socket: &NbdSocket,
    stream: &mut TcpStream,
    reader: &Reader,
    peer: &str,
) -> io::Result<TlsSession> {
    // The handshake accepts STARTTLS only when the shard has TLS.
    let config = shard
        .tls
        .as_ref()
        .map(|t| t.config.clone())
        .ok_or(io::ErrorKind::Unsupported)?;
    if reader.len() > 0 {
        // The client spoke before TLS was up: those bytes were never
        // protected and must not be taken as options (CVE-2021-3716).
        tracing::warn!(%peer, bytes = reader.len(), "refused: data after STARTTLS before the TLS handshake");
        return Err(io::ErrorKind::InvalidData.into());
    }
    match TlsSession::accept(config, socket, stream, reader.deadline()).await {
        Ok(t) => {
            tracing::debug!(%peer, session = %t.describe(), "TLS established");
            Ok(t)
        }
        Err(e) => {
            tracing::warn!(%peer, error = %e, "refused: TLS handshake failed");
            Err(e)
        }
    }
}

struct Conn {
    protocol: RefCell<Transmission>,
    budget: Rc<Budget>,
    shard: Rc<ShardCtx>,
    export: Arc<Export>,
    io: Rc<dyn BackendIo>,
    outbox: Rc<Outbox>,
    /// Changed the backstore: flushed when the runner stops.
    wrote: Cell<bool>,
}

/// What a finished command hands back.
enum Done {
    Data(ReadBuf),
    Extents(Vec<Extent>),
    Empty,
    /// A write done; the backend may hand its payload buffer back for reuse.
    Written(Option<Vec<u8>>),
}

impl Conn {
    /// Reads requests and acts on what the protocol decides, until the
    /// client leaves or the protocol hangs up.
    async fn transmit(self: &Rc<Self>, inbuf: &mut Reader) -> io::Result<()> {
        let header_len = self.protocol.borrow().header_len();
        let idle = self.shard.limits.idle_timeout;
        loop {
            // Idle means nothing in flight and nothing sent: then the wait
            // for the next request is bounded, if the operator asked.
            let waiting_idle = idle.filter(|_| self.budget.in_flight() == 0 && inbuf.len() == 0);
            inbuf.set_timeout(waiting_idle);
            // Once the runner is stopping, no new request starts, even one
            // already buffered (see `serve`).
            if self.outbox.failed() || !inbuf.ensure(header_len).await? || self.stopping() {
                return Ok(());
            }
            let parsed = self
                .protocol
                .borrow()
                .parse_header(&inbuf.data()[..header_len]);
            inbuf.consume(header_len);
            let hdr = match parsed {
                Ok(h) => h,
                Err(why) => {
                    tracing::info!(%why, "closing connection");
                    return Ok(());
                }
            };
            let started = Instant::now();
            let reserve = self.protocol.borrow().reserve(&hdr);
            let permit = Permit::acquire(&self.budget, &self.shard.budget, reserve).await;
            if self.stopping() {
                return Ok(());
            }
            let size = self.export.backend.size();
            let mut next = self.protocol.borrow().handle_header(&hdr, size);
            if let Next::Payload { len, cmd } = next {
                let data = self.receive_payload(inbuf, cmd, len as usize).await?;
                if self.stopping() {
                    return Ok(());
                }
                let v = match data {
                    Payload::One(v) if !matches!(cmd, Command::Write { .. }) => v,
                    data => {
                        self.start(hdr, cmd, Some(data), permit, started).await;
                        continue;
                    }
                };
                next = self.protocol.borrow().handle_payload(&hdr, cmd, &v, size);
            }
            match next {
                Next::Start(cmd) => self.start(hdr, cmd, None, permit, started).await,
                Next::Payload { .. } => unreachable!("payloads are read above"),
                Next::Refuse { reply, error, skip } => {
                    self.export.stats.refused(self.shard.index, error);
                    self.send(reply, Body::None, permit);
                    inbuf.skip(skip as usize).await?;
                }
                Next::RefuseAndClose { reply, error, why } => {
                    self.export.stats.refused(self.shard.index, error);
                    self.send(reply, Body::None, permit);
                    tracing::info!(%why, "closing connection");
                    return Ok(());
                }
                Next::Disconnect => return Ok(()),
            }
        }
    }

    /// Receives a request's payload: into one pooled buffer, or, for a
    /// write the backend keeps as received, into pieces cut where it wants.
    async fn receive_payload(
        &self,
        inbuf: &mut Reader,
        cmd: Command,
        len: usize,
    ) -> std::io::Result<Payload> {
        let piece = self.io.write_piece_size().filter(|&p| len >= 2 * p);
        if let (Command::Write { offset, .. }, Some(piece)) = (cmd, piece) {
            let mut pieces = Vec::with_capacity(len.div_ceil(piece) + 1);
            for n in piece_lens(offset, len, piece) {
                let mut v = Vec::with_capacity(n);
                inbuf.read_payload(&mut v, n).await?;
                pieces.push(v);
            }
            return Ok(Payload::Pieces(pieces));
        }
        let mut v = self.outbox.pool.get(len);
        inbuf.read_payload(&mut v, len).await?;
        Ok(Payload::One(v))
    }

    fn stopping(&self) -> bool {
        self.shard.is_closing()
    }

    /// Runs a command; inline if the backend completes at once, else as a task.
    async fn start(
        self: &Rc<Self>,
        hdr: RequestHeader,
        cmd: Command,
        data: Option<Payload>,
        permit: Permit,
        started: Instant,
    ) {
        let (op, len) = op_of(&cmd);
        self.export.stats.started(self.shard.index, op, len);
        if matches!(
            cmd,
            Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. }
        ) {
            self.wrote.set(true);
        }
        let lend = match cmd {
            Command::Read { len, .. } => self.outbox.pool.get(len as usize),
            _ => Vec::new(),
        };
        let mut fut = Box::pin(execute(self.io.clone(), cmd, data, lend));
        match poll_once(&mut fut).await {
            Some(result) => self.complete(hdr, cmd, result, permit, started),
            None => {
                let conn = self.clone();
                glommio::spawn_local(async move {
                    let result = fut.await;
                    conn.complete(hdr, cmd, result, permit, started);
                })
                .detach();
            }
        }
    }

    fn complete(
        &self,
        hdr: RequestHeader,
        cmd: Command,
        result: Result<Done, BackendError>,
        permit: Permit,
        started: Instant,
    ) {
        let (op, len) = op_of(&cmd);
        let mut descriptors = Vec::new();
        let outcome = match &result {
            Ok(Done::Data(buf)) => Outcome::Read { got: buf.len() },
            Ok(Done::Extents(extents)) => {
                descriptors = self.outbox.pool.get(64);
                Outcome::Extents(extents)
            }
            Ok(Done::Empty | Done::Written(_)) => Outcome::Done,
            Err(e) => {
                tracing::warn!(export = %self.export.name, op = op.name(), error = %e, "backend error");
                Outcome::Failed(e.errno())
            }
        };
        let (done, anomaly) =
            self.protocol
                .borrow()
                .complete(&hdr, &cmd, outcome, &mut descriptors);
        if let Some(a) = anomaly {
            tracing::error!(export = %self.export.name, op = op.name(), anomaly = ?a, "backend bug");
        }
        let body = match (done.body, result) {
            (transmission::Body::Data, Ok(Done::Data(buf))) => Body::Read(buf),
            (transmission::Body::Descriptors, _) => Body::Bytes(descriptors),
            (_, Ok(Done::Written(Some(spare)))) => {
                self.outbox.pool.put(spare);
                Body::None
            }
            _ => Body::None,
        };
        self.export
            .stats
            .record(self.shard.index, op, started.elapsed(), len, done.error);
        self.send(done.reply, body, permit);
    }

    fn send(&self, header: ReplyHeader, body: Body, permit: Permit) {
        self.outbox.push(Reply {
            header,
            body,
            _permit: Some(permit),
        });
    }
}

fn op_of(cmd: &Command) -> (Op, u64) {
    match *cmd {
        Command::Read { len, .. } => (Op::Read, len as u64),
        Command::Write { len, .. } => (Op::Write, len as u64),
        Command::Flush | Command::Disconnect => (Op::Flush, 0),
        Command::Trim { len, .. } => (Op::Trim, len),
        Command::WriteZeroes { len, .. } => (Op::WriteZeroes, len),
        Command::Cache { len, .. } => (Op::Cache, len),
        Command::BlockStatus { len, .. } => (Op::BlockStatus, len),
    }
}

/// A write's payload: one buffer, or pieces the backend keeps as they are.
enum Payload {
    One(Vec<u8>),
    Pieces(Vec<Vec<u8>>),
}

/// Lengths of `len` bytes at `offset` cut at multiples of `piece`.
fn piece_lens(offset: u64, len: usize, piece: usize) -> impl Iterator<Item = usize> {
    let first = (piece - (offset % piece as u64) as usize).min(len);
    let mut left = len - first;
    std::iter::once(first)
        .filter(|&n| n > 0)
        .chain(std::iter::from_fn(move || {
            let n = left.min(piece);
            left -= n;
            (n > 0).then_some(n)
        }))
}

async fn execute(
    io: Rc<dyn BackendIo>,
    cmd: Command,
    data: Option<Payload>,
    lend: Vec<u8>,
) -> Result<Done, BackendError> {
    Ok(match cmd {
        Command::Read { offset, len } => Done::Data(io.read(offset, len as usize, lend).await?),
        Command::Write { offset, fua, .. } => match data.unwrap_or(Payload::One(Vec::new())) {
            Payload::Pieces(pieces) => {
                io.write_pieces(offset, pieces, fua).await?;
                Done::Empty
            }
            Payload::One(v) => Done::Written(io.write(offset, v, fua).await?),
        },
        Command::Flush => {
            io.flush().await?;
            Done::Empty
        }
        Command::Trim { offset, len, fua } => {
            io.trim(offset, len, fua).await?;
            Done::Empty
        }
        Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
            fast,
        } => {
            io.write_zeroes(offset, len, ZeroFlags { fua, no_hole, fast })
                .await?;
            Done::Empty
        }
        Command::Cache { offset, len } => {
            io.cache(offset, len).await?;
            Done::Empty
        }
        Command::BlockStatus { offset, len, .. } => Done::Extents(io.extents(offset, len).await?),
        Command::Disconnect => Done::Empty,
    })
}

#[cfg(test)]
mod tests {
    use super::piece_lens;

    #[test]
    fn pieces_end_at_multiples_of_the_piece_size() {
        let cut = |o, l| piece_lens(o, l, 100).collect::<Vec<_>>();
        assert_eq!(cut(0, 300), [100, 100, 100]);
        assert_eq!(cut(50, 300), [50, 100, 100, 50]);
        assert_eq!(cut(150, 30), [30]);
        assert_eq!(cut(199, 2), [1, 1]);
        assert_eq!(cut(7, 0), Vec::<usize>::new());
        for (o, l) in [(0u64, 1000usize), (1, 999), (12345, 4321)] {
            let v = cut(o, l);
            assert_eq!(v.iter().sum::<usize>(), l);
            let mut at = o;
            for (i, n) in v.iter().enumerate() {
                at += *n as u64;
                assert!(i + 1 == v.len() || at % 100 == 0);
            }
        }
    }
}
