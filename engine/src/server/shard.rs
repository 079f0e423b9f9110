//! Per-shard state: its budget, its live connections, and the backends it
//! has attached. Everything here is touched by one executor thread only.

use super::budget::Budget;
use super::socket::NbdSocket;
use super::{Limits, TlsServer};
use crate::backend::{BackendError, BackendIo};
use crate::export::{Export, ExportTable};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

/// An export and this shard's open handle to it. Both weak: the handle
/// closes when the shard's last connection to it ends, and a deleted
/// export's storage is not kept alive here.
type Attached = (std::sync::Weak<Export>, std::rc::Weak<dyn BackendIo>);

pub struct ShardCtx {
    pub index: usize,
    pub table: Arc<ExportTable>,
    pub limits: Limits,
    pub tls: Option<TlsServer>,
    pub budget: Rc<Budget>,
    /// Lone replies to local peers lend them this shard's CPU
    /// ([`super::colocate`]).
    pub colocate: bool,
    closing: Cell<bool>,
    next_conn: Cell<u64>,
    conns: RefCell<HashMap<u64, Rc<NbdSocket>>>,
    waiters: RefCell<Vec<Waker>>,
    attached: RefCell<HashMap<String, Attached>>,
}

/// Keeps a connection listed on its shard while it lives.
pub struct ConnRegistration {
    shard: Rc<ShardCtx>,
    id: u64,
}

impl Drop for ConnRegistration {
    fn drop(&mut self) {
        self.shard.conns.borrow_mut().remove(&self.id);
        self.shard.wake_all();
    }
}

impl ShardCtx {
    pub fn new(
        index: usize,
        table: Arc<ExportTable>,
        limits: Limits,
        tls: Option<TlsServer>,
        colocate: bool,
    ) -> Rc<Self> {
        Rc::new(ShardCtx {
            index,
            colocate,
            table,
            tls,
            budget: Budget::new(limits.shard_requests, limits.shard_bytes),
            limits,
            closing: Cell::new(false),
            next_conn: Cell::new(0),
            conns: RefCell::new(HashMap::new()),
            waiters: RefCell::new(Vec::new()),
            attached: RefCell::new(HashMap::new()),
        })
    }

    pub fn register(self: &Rc<Self>, socket: Rc<NbdSocket>) -> ConnRegistration {
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        if self.closing.get() {
            socket.shut_read();
        }
        self.conns.borrow_mut().insert(id, socket);
        ConnRegistration {
            shard: self.clone(),
            id,
        }
    }

    pub fn is_closing(&self) -> bool {
        self.closing.get()
    }

    /// Starts a clean shutdown: readers stop, no request starts any more
    /// (those already received stay unanswered), started ones finish and
    /// reply; handshakes still running get NBD_REP_ERR_SHUTDOWN.
    pub fn begin_close(&self) {
        if self.closing.replace(true) {
            return;
        }
        for socket in self.conns.borrow().values() {
            socket.shut_read();
        }
        self.wake_all();
    }

    fn wake_all(&self) {
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Resolves once shutdown has begun.
    pub async fn closing(&self) {
        poll_fn(|cx| {
            if self.closing.get() {
                Poll::Ready(())
            } else {
                self.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Resolves once no connection is left.
    pub async fn idle(&self) {
        poll_fn(|cx| {
            if self.conns.borrow().is_empty() {
                Poll::Ready(())
            } else {
                self.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// This shard's IO handle for `export`, attached on first use and shared
    /// by the shard's connections to it.
    pub async fn backend_for(
        &self,
        export: &Arc<Export>,
    ) -> Result<Rc<dyn BackendIo>, BackendError> {
        if let Some((e, io)) = self.attached.borrow().get(&export.name) {
            if std::ptr::eq(e.as_ptr(), Arc::as_ptr(export)) {
                if let Some(io) = io.upgrade() {
                    return Ok(io);
                }
            }
        }
        let io = export.backend.attach().await?;
        let mut attached = self.attached.borrow_mut();
        attached.retain(|_, (e, io)| e.strong_count() > 0 && io.strong_count() > 0);
        attached.insert(
            export.name.clone(),
            (Arc::downgrade(export), Rc::downgrade(&io)),
        );
        Ok(io)
    }
}
