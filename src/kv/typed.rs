//! [`TypedKv`]: the map for serde keys and values.

use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::changes::{Change, Keys};
use super::client::{ClientError, KvClient};
use super::command::Bytes;
use super::endpoint::KvEndpoint;

/// Why a typed operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TypedError {
    /// The request failed (see [`ClientError`] for whether a write may have been applied).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A key or value could not be encoded.
    #[error("cannot encode: {0}")]
    Encode(#[source] postcard::Error),
    /// Bytes stored under `key` are not a key or value of this type.
    #[error("the bytes stored under key {key:?} do not decode: {source}")]
    Decode {
        /// The raw key.
        key: Bytes,
        /// Why.
        #[source]
        source: postcard::Error,
    },
}

/// The replicated map for serde keys and values, encoded with postcard, under a
/// namespace (a key prefix), so a host stores its own types without byte handling.
///
/// ```
/// use std::time::Duration;
/// use serde::{Deserialize, Serialize};
/// use raftkv::kv::{ClientOptions, KvClient, KvResult, KvStateMachine, TypedKv};
/// use raftkv::storage::MemStorage;
/// use raftkv::transport::LocalNetwork;
/// use raftkv::{Node, NodeConfig};
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct Account {
///     owner: String,
///     balance: i64,
/// }
///
/// let net = LocalNetwork::new();
/// let mut config = NodeConfig::new(1, vec![1]);
/// config.tick_interval = Duration::from_millis(5);
/// let (node, driver) =
///     Node::start(config, MemStorage::new(), KvStateMachine::new(), net.transport(1)).unwrap();
/// std::thread::spawn(move || futures::executor::block_on(driver));
/// futures::executor::block_on(async {
///     let client = KvClient::connect(vec![node.clone()], ClientOptions::default()).await.unwrap();
///     let mut accounts: TypedKv<u64, Account, _> = TypedKv::new(client, "accounts/");
///     let ada = Account { owner: "Ada".into(), balance: 100 };
///     accounts.put(&7, &ada).await.unwrap();
///     assert_eq!(accounts.get(&7).await.unwrap(), Some(ada));
///     let richer = Account { owner: "Ada".into(), balance: 150 };
///     let stale = Account { owner: "Ada".into(), balance: 0 };
///     assert!(!accounts.cas(&7, Some(&stale), Some(&richer)).await.unwrap());
///     assert_eq!(accounts.entries(10).await.unwrap().len(), 1);
///     assert!(accounts.delete(&7).await.unwrap());
///     assert_eq!(accounts.get(&7).await.unwrap(), None);
///     node.shutdown().await;
/// });
/// ```
///
/// Namespaces should not be prefixes of one another. Keys and values are postcard-encoded, so:
/// - entries come back in the order of their encoded keys (for integers, postcard's varints
///   do not sort numerically);
/// - compare-and-swap compares encodings: use types whose encoding is canonical (not a
///   `HashMap`, whose order varies).
pub struct TypedKv<K, V, E> {
    client: KvClient<E>,
    namespace: Bytes,
    types: PhantomData<fn() -> (K, V)>,
}

impl<K, V, E> TypedKv<K, V, E>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
    E: KvEndpoint,
{
    /// The keys of `client`'s cluster under `namespace`.
    pub fn new(client: KvClient<E>, namespace: impl Into<Bytes>) -> Self {
        TypedKv {
            client,
            namespace: namespace.into(),
            types: PhantomData,
        }
    }

    /// The untyped client.
    pub fn client(&mut self) -> &mut KvClient<E> {
        &mut self.client
    }

    /// The untyped client, giving up the typed view.
    pub fn into_inner(self) -> KvClient<E> {
        self.client
    }

    /// The raw key of `key` (for transactions and watches on typed keys).
    pub fn raw_key(&self, key: &K) -> Result<Bytes, TypedError> {
        let mut raw = self.namespace.clone();
        raw.extend(postcard::to_allocvec(key).map_err(TypedError::Encode)?);
        Ok(raw)
    }

    /// The raw bytes of `value`.
    pub fn raw_value(&self, value: &V) -> Result<Bytes, TypedError> {
        postcard::to_allocvec(value).map_err(TypedError::Encode)
    }

    /// Every key of the namespace, for [`KvClient::watch`].
    pub fn keys(&self) -> Keys {
        Keys::Prefix(self.namespace.clone())
    }

    /// A watched change of this namespace, decoded (`None`: deleted).
    pub fn decode(&self, change: &Change) -> Result<(K, Option<V>), TypedError> {
        let key = self.decode_key(&change.key)?;
        let value = match &change.value {
            Some(v) => Some(self.decode_value(&change.key, v)?),
            None => None,
        };
        Ok((key, value))
    }

    fn decode_key(&self, raw: &[u8]) -> Result<K, TypedError> {
        let decode_error = |source| TypedError::Decode {
            key: raw.to_vec(),
            source,
        };
        let encoded = raw
            .strip_prefix(self.namespace.as_slice())
            .ok_or_else(|| decode_error(postcard::Error::DeserializeUnexpectedEnd))?;
        postcard::from_bytes(encoded).map_err(decode_error)
    }

    fn decode_value(&self, raw_key: &[u8], bytes: &[u8]) -> Result<V, TypedError> {
        postcard::from_bytes(bytes).map_err(|source| TypedError::Decode {
            key: raw_key.to_vec(),
            source,
        })
    }

    fn encode_option(&self, value: Option<&V>) -> Result<Option<Bytes>, TypedError> {
        value.map(|v| self.raw_value(v)).transpose()
    }

    /// The value of `key`.
    pub async fn get(&mut self, key: &K) -> Result<Option<V>, TypedError> {
        let raw = self.raw_key(key)?;
        match self.client.get(raw.clone()).await? {
            Some(bytes) => Ok(Some(self.decode_value(&raw, &bytes)?)),
            None => Ok(None),
        }
    }

    /// Sets `key` to `value`.
    pub async fn put(&mut self, key: &K, value: &V) -> Result<(), TypedError> {
        let (raw, bytes) = (self.raw_key(key)?, self.raw_value(value)?);
        Ok(self.client.put(raw, bytes).await?)
    }

    /// Removes `key`; returns whether it existed.
    pub async fn delete(&mut self, key: &K) -> Result<bool, TypedError> {
        let raw = self.raw_key(key)?;
        Ok(self.client.delete(raw).await?)
    }

    /// Sets `key` to `new` (`None` deletes) if its value is `expected` (`None`: absent);
    /// returns whether it did.
    pub async fn cas(
        &mut self,
        key: &K,
        expected: Option<&V>,
        new: Option<&V>,
    ) -> Result<bool, TypedError> {
        let raw = self.raw_key(key)?;
        let (expected, new) = (self.encode_option(expected)?, self.encode_option(new)?);
        Ok(self.client.cas(raw, expected, new).await?)
    }

    /// Up to `limit` entries of the namespace, in the order of their encoded keys.
    pub async fn entries(&mut self, limit: u32) -> Result<Vec<(K, V)>, TypedError> {
        let end = prefix_end(&self.namespace);
        let raw = self.client.scan(self.namespace.clone(), end, limit).await?;
        raw.into_iter()
            .map(|(k, v)| Ok((self.decode_key(&k)?, self.decode_value(&k, &v)?)))
            .collect()
    }
}

/// The first key after every key that starts with `prefix` (`None`: there is none).
pub fn prefix_end(prefix: &[u8]) -> Option<Bytes> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }
}
