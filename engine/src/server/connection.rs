//! One client connection: handshake, then the transmission loop.
//!
//! The reader parses requests and starts them at once; each one replies
//! through the [`Outbox`] when it completes, in any order. Backends that
//! complete inline (RAM) never spawn a task.

use super::budget::{Budget, Permit};
use super::outbox::{Body, Outbox, Reply};
use super::recvbuf::Reader;
use super::shard::ShardCtx;
use crate::backend::{BackendError, BackendIo, ReadBuf, ZeroFlags};
use crate::export::Export;
use crate::protocol::consts::{CMD_READ, CMD_WRITE, REQUEST_LEN};
use crate::protocol::{
    encode_extents, validate, Command, Errno, Extent, Handshake, Negotiated, ReplyHeader,
    RequestHeader, Session, MAX_PAYLOAD,
};
use crate::stats::Op;
use futures_lite::future::poll_once;
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;
use std::io;
use std::os::unix::io::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// Receive buffer: room for a batch of pipelined 4 KiB writes.
const RECV_BUF: usize = 256 * 1024;

/// Serves one accepted connection to completion.
pub async fn serve(stream: TcpStream, shard: Rc<ShardCtx>) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let _ = stream.set_nodelay(true);
    let mut reader = match Reader::new(stream.as_raw_fd(), RECV_BUF) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot set up connection");
            return;
        }
    };
    reader.set_timeout(Some(shard.limits.handshake_timeout));
    // The reader's descriptor lives until the end of this function, so a
    // shutdown through the registration never hits a closed, reused fd.
    let _registration = shard.register(reader.fd());
    let mut stream = stream;
    let negotiated = match negotiate(&shard, &mut stream, &mut reader).await {
        Ok(Some(n)) => n,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "handshake ended");
            return;
        }
    };
    reader.set_timeout(None);
    let Some(export) = shard.table.get(&negotiated.export.name) else {
        return; // removed while we negotiated
    };
    let io = match shard.backend_for(&export).await {
        Ok(io) => io,
        Err(e) => {
            tracing::warn!(%peer, export = %export.name, error = %e, "cannot open backstore");
            return;
        }
    };
    tracing::debug!(%peer, export = %export.name, shard = shard.index, "client attached");
    export.stats.connection_opened(shard.index);
    let outbox = Rc::new(Outbox::default());
    let writer = glommio::spawn_local({
        let outbox = outbox.clone();
        let fd = stream.as_raw_fd();
        async move { outbox.run(fd, stream).await }
    });
    let conn = Rc::new(Conn {
        session: Session {
            size: negotiated.export.size,
            flags: negotiated.export.flags,
            structured: negotiated.structured_replies,
            base_allocation: negotiated.base_allocation.is_some(),
        },
        context_id: negotiated.base_allocation.unwrap_or(0),
        budget: Budget::new(shard.limits.conn_requests, shard.limits.conn_bytes),
        shard: shard.clone(),
        export: export.clone(),
        io,
        outbox: outbox.clone(),
    });
    if let Err(e) = conn.transmit(&mut reader).await {
        tracing::debug!(%peer, error = %e, "connection ended");
    }
    // In-flight requests finish and their replies go out before we close.
    conn.budget.drained().await;
    outbox.close();
    writer.await;
    export.stats.connection_closed(shard.index);
    tracing::debug!(%peer, "client detached");
}

/// Runs the handshake; None when the client left or was refused.
async fn negotiate(
    shard: &ShardCtx,
    stream: &mut TcpStream,
    reader: &mut Reader,
) -> io::Result<Option<Negotiated>> {
    let mut hs = Handshake::new();
    loop {
        if hs.has_output() {
            let out = hs.take_output();
            stream.write_all(&out).await?;
        }
        if hs.is_closed() {
            return Ok(None);
        }
        if let Some(n) = hs.negotiated() {
            return Ok(Some(n.clone()));
        }
        let want = hs.want();
        if !reader.ensure(want).await? {
            return Ok(None);
        }
        if shard.is_closing() {
            hs.begin_shutdown();
        }
        let result = hs.receive(&reader.data()[..want], &*shard.table);
        reader.consume(want);
        if let Err(e) = result {
            let out = hs.take_output();
            let _ = stream.write_all(&out).await;
            tracing::debug!(error = %e, "handshake refused");
            return Ok(None);
        }
    }
}

struct Conn {
    session: Session,
    context_id: u32,
    budget: Rc<Budget>,
    shard: Rc<ShardCtx>,
    export: Arc<Export>,
    io: Rc<dyn BackendIo>,
    outbox: Rc<Outbox>,
}

/// What a finished command hands back.
enum Done {
    Data(ReadBuf),
    Extents(Vec<Extent>),
    Empty,
}

impl Conn {
    async fn transmit(self: &Rc<Self>, inbuf: &mut Reader) -> io::Result<()> {
        loop {
            if self.outbox.failed() || !inbuf.ensure(REQUEST_LEN).await? {
                return Ok(());
            }
            let raw: [u8; REQUEST_LEN] = inbuf.data()[..REQUEST_LEN].try_into().unwrap();
            inbuf.consume(REQUEST_LEN);
            let hdr = match RequestHeader::parse(&raw) {
                Ok(h) => h,
                Err(bad) => {
                    tracing::info!(magic = bad.0, "bad request magic; closing connection");
                    return Ok(());
                }
            };
            let started = Instant::now();
            let payload = hdr.payload_len() as usize;
            let reserve = match hdr.kind {
                CMD_READ | CMD_WRITE => hdr.length.min(MAX_PAYLOAD) as u64,
                _ => 0,
            };
            let permit = Permit::acquire(&self.budget, &self.shard.budget, reserve).await;
            // The backend's size now, not the handshake's: after a resize the
            // connected clients (the kernel after RECONFIGURE) reach the new range.
            let session = Session {
                size: self.export.backend.size(),
                ..self.session
            };
            let cmd = match validate(&hdr, &session) {
                Ok(Command::Disconnect) => return Ok(()),
                Ok(_) if self.shard.is_closing() => Err(Errno::Shutdown),
                other => other,
            };
            let cmd = match cmd {
                Ok(cmd) => cmd,
                Err(errno) => {
                    let oversized = payload > MAX_PAYLOAD as usize;
                    self.reply_error(hdr.cookie, errno, permit);
                    if oversized {
                        // Never buffer it, and skipping gigabytes only helps an attacker.
                        tracing::info!(len = payload, "oversized write; closing connection");
                        return Ok(());
                    }
                    inbuf.skip(payload).await?;
                    continue;
                }
            };
            let data = if let Command::Write { len, .. } = cmd {
                let mut v = self.outbox.pool.get(len as usize);
                inbuf.read_payload(&mut v, len as usize).await?;
                Some(v)
            } else {
                None
            };
            self.start(hdr, cmd, data, permit, started).await;
        }
    }

    /// Runs a command; inline if the backend completes at once, else as a task.
    async fn start(
        self: &Rc<Self>,
        hdr: RequestHeader,
        cmd: Command,
        data: Option<Vec<u8>>,
        permit: Permit,
        started: Instant,
    ) {
        let lend = match cmd {
            Command::Read { len, .. } => self.outbox.pool.get(len as usize),
            _ => Vec::new(),
        };
        let mut fut = Box::pin(execute(self.io.clone(), cmd, data, lend));
        match poll_once(&mut fut).await {
            Some(result) => self.complete(hdr.cookie, cmd, result, permit, started),
            None => {
                let conn = self.clone();
                glommio::spawn_local(async move {
                    let result = fut.await;
                    conn.complete(hdr.cookie, cmd, result, permit, started);
                })
                .detach();
            }
        }
    }

    fn complete(
        &self,
        cookie: u64,
        cmd: Command,
        result: Result<Done, BackendError>,
        permit: Permit,
        started: Instant,
    ) {
        let structured = self.session.structured;
        let (op, len) = op_of(&cmd);
        let (header, body, ok) = match result {
            Ok(Done::Data(buf)) if buf.len() == len as usize => {
                let Command::Read { offset, .. } = cmd else {
                    unreachable!()
                };
                (
                    ReplyHeader::read_data(cookie, offset, len, structured),
                    Body::Read(buf),
                    true,
                )
            }
            Ok(Done::Extents(extents)) => {
                let Command::BlockStatus { req_one, .. } = cmd else {
                    unreachable!()
                };
                let mut v = self.outbox.pool.get(64);
                match encode_extents(&extents, len, req_one, &mut v) {
                    0 => (
                        ReplyHeader::error(cookie, Errno::Io, structured),
                        Body::None,
                        false,
                    ),
                    n => (
                        ReplyHeader::block_status(cookie, self.context_id, n),
                        Body::Bytes(v),
                        true,
                    ),
                }
            }
            Ok(Done::Empty) => (ReplyHeader::done(cookie), Body::None, true),
            Ok(Done::Data(_)) => {
                tracing::error!(export = %self.export.name, "backend returned a short read");
                (
                    ReplyHeader::error(cookie, Errno::Io, structured),
                    Body::None,
                    false,
                )
            }
            Err(e) => {
                tracing::warn!(export = %self.export.name, op = op.name(), error = %e, "backend error");
                (
                    ReplyHeader::error(cookie, e.errno(), structured),
                    Body::None,
                    false,
                )
            }
        };
        self.export
            .stats
            .record(self.shard.index, op, started.elapsed(), len as u64, ok);
        self.outbox.push(Reply {
            header,
            body,
            _permit: Some(permit),
        });
    }

    fn reply_error(&self, cookie: u64, errno: Errno, permit: Permit) {
        self.outbox.push(Reply {
            header: ReplyHeader::error(cookie, errno, self.session.structured),
            body: Body::None,
            _permit: Some(permit),
        });
    }
}

fn op_of(cmd: &Command) -> (Op, u32) {
    match *cmd {
        Command::Read { len, .. } => (Op::Read, len),
        Command::Write { len, .. } => (Op::Write, len),
        Command::Flush | Command::Disconnect => (Op::Flush, 0),
        Command::Trim { len, .. } => (Op::Trim, len),
        Command::WriteZeroes { len, .. } => (Op::WriteZeroes, len),
        Command::Cache { len, .. } => (Op::Cache, len),
        Command::BlockStatus { len, .. } => (Op::BlockStatus, len),
    }
}

async fn execute(
    io: Rc<dyn BackendIo>,
    cmd: Command,
    data: Option<Vec<u8>>,
    lend: Vec<u8>,
) -> Result<Done, BackendError> {
    Ok(match cmd {
        Command::Read { offset, len } => Done::Data(io.read(offset, len as usize, lend).await?),
        Command::Write { offset, fua, .. } => {
            io.write(offset, data.unwrap_or_default(), fua).await?;
            Done::Empty
        }
        Command::Flush => {
            io.flush().await?;
            Done::Empty
        }
        Command::Trim { offset, len, fua } => {
            io.trim(offset, len as u64, fua).await?;
            Done::Empty
        }
        Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
            fast,
        } => {
            io.write_zeroes(offset, len as u64, ZeroFlags { fua, no_hole, fast })
                .await?;
            Done::Empty
        }
        Command::Cache { offset, len } => {
            io.cache(offset, len as u64).await?;
            Done::Empty
        }
        Command::BlockStatus { offset, len, .. } => {
            Done::Extents(io.extents(offset, len as u64).await?)
        }
        Command::Disconnect => Done::Empty,
    })
}
