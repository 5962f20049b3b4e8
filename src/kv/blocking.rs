//! [`BlockingKvClient`]: [`KvClient`] for synchronous code.

use super::client::{ClientError, ClientOptions, KvClient, PendingWrite, Response};
use super::command::{Bytes, KvOp};
use super::endpoint::KvEndpoint;
use super::txn::{Txn, TxnResponse};
use crate::raft::Index;

/// [`KvClient`] for synchronous code: each call blocks the calling thread on the async one.
pub struct BlockingKvClient<E> {
    inner: KvClient<E>,
}

impl<E: KvEndpoint> BlockingKvClient<E> {
    pub(crate) fn new(inner: KvClient<E>) -> Self {
        BlockingKvClient { inner }
    }
    /// See [`KvClient::connect`].
    pub fn connect(endpoint: E, options: ClientOptions) -> Result<Self, ClientError> {
        futures::executor::block_on(KvClient::connect(endpoint, options)).map(KvClient::blocking)
    }
    /// The async client.
    pub fn into_inner(self) -> KvClient<E> {
        self.inner
    }
    /// See [`KvClient::session`].
    pub fn session(&self) -> u64 {
        self.inner.session()
    }
    /// See [`KvClient::get`].
    pub fn get(&mut self, key: impl Into<Bytes>) -> Result<Option<Bytes>, ClientError> {
        futures::executor::block_on(self.inner.get(key))
    }
    /// See [`KvClient::put`].
    pub fn put(
        &mut self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        futures::executor::block_on(self.inner.put(key, value))
    }
    /// See [`KvClient::append`].
    pub fn append(
        &mut self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        futures::executor::block_on(self.inner.append(key, value))
    }
    /// See [`KvClient::delete`].
    pub fn delete(&mut self, key: impl Into<Bytes>) -> Result<bool, ClientError> {
        futures::executor::block_on(self.inner.delete(key))
    }
    /// See [`KvClient::cas`].
    pub fn cas(
        &mut self,
        key: impl Into<Bytes>,
        expected: Option<Bytes>,
        new: Option<Bytes>,
    ) -> Result<bool, ClientError> {
        futures::executor::block_on(self.inner.cas(key, expected, new))
    }
    /// See [`KvClient::scan`].
    pub fn scan(
        &mut self,
        start: impl Into<Bytes>,
        end: Option<Bytes>,
        limit: u32,
    ) -> Result<Vec<(Bytes, Bytes)>, ClientError> {
        futures::executor::block_on(self.inner.scan(start, end, limit))
    }
    /// See [`KvClient::txn`].
    pub fn txn(&mut self, txn: Txn) -> Result<(Index, TxnResponse), ClientError> {
        futures::executor::block_on(self.inner.txn(txn))
    }
    /// See [`KvClient::query`].
    pub fn query(&mut self, op: KvOp) -> Result<Response, ClientError> {
        futures::executor::block_on(self.inner.query(op))
    }
    /// See [`KvClient::write`].
    pub fn write(&mut self, op: KvOp) -> Result<Response, ClientError> {
        futures::executor::block_on(self.inner.write(op))
    }
    /// See [`KvClient::retry`].
    pub fn retry(&mut self, request: &PendingWrite) -> Result<Response, ClientError> {
        futures::executor::block_on(self.inner.retry(request))
    }
}
