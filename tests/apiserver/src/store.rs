//! The object store: every object as JSON, one cluster-wide resourceVersion counter (like etcd's
//! revision), and a bounded history of changes so watches can resume from a resourceVersion —
//! or learn with 410 Gone that it is too old.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;
use tokio::sync::broadcast;

use crate::resources::Resource;

/// How many changes the store remembers for resuming watches.
pub const HISTORY: usize = 20_000;

/// How long a change stays resumable (etcd compacts every 5 minutes under kube-apiserver).
pub const RETENTION: std::time::Duration = std::time::Duration::from_secs(300);

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Removed from the store.
    Deleted,
}

impl EventType {
    /// The watch event `type` on the wire.
    pub fn wire(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as watchers see it.
#[derive(Debug)]
pub struct Change {
    /// The resourceVersion the change was written at.
    pub rv: u64,
    /// The kind of object.
    pub resource: Resource,
    /// What happened.
    pub kind: EventType,
    /// The object after the change (for deletions: its last state, at the deletion's version).
    pub object: Value,
    /// The object before a modification, so selector watches can see it leave or enter.
    pub previous: Option<Value>,
    /// When the change was made, for compaction.
    pub at: std::time::Instant,
}

/// Why a store operation failed; each maps to one Kubernetes status reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No such object (404 NotFound).
    #[error("not found")]
    NotFound,
    /// The name is taken (409 AlreadyExists).
    #[error("already exists")]
    AlreadyExists,
    /// The caller's resourceVersion is stale (409 Conflict); retry after a fresh read.
    #[error(
        "the object has been modified; please apply your changes to the latest version and try again"
    )]
    Conflict,
    /// The resourceVersion is older than the history kept (410 Gone / Expired); relist.
    #[error("too old resource version: {requested} ({oldest})")]
    TooOld {
        /// What the caller asked for.
        requested: u64,
        /// The oldest version the store can still resume from.
        oldest: u64,
    },
}

/// Why a read-modify-write failed: the store's reason, or the caller's own rejection.
#[derive(Debug, Clone, PartialEq)]
pub enum UpdateError<E> {
    /// Not found, or a stale resourceVersion.
    Store(StoreError),
    /// The change function refused.
    Rejected(E),
}

/// Where a watch starts: the remembered changes to replay, and the live feed after them.
pub type WatchStart = (Vec<Arc<Change>>, broadcast::Receiver<Arc<Change>>);

/// Key of an object within its resource: (namespace, name); namespace is "" for cluster objects.
pub type Key = (String, String);

#[derive(Debug, Default)]
struct State {
    rv: u64,
    compacted: u64,
    objects: BTreeMap<Resource, BTreeMap<Key, Value>>,
    history: VecDeque<Arc<Change>>,
}

/// The store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Store {
    state: Mutex<State>,
    changes: broadcast::Sender<Arc<Change>>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            state: Mutex::new(State::default()),
            changes: broadcast::channel(HISTORY).0,
        }
    }
}

/// Reads the (namespace, name) of an object.
pub fn key_of(object: &Value) -> Key {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_owned(),
        meta["name"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Reads an object's resourceVersion (0 when absent or not a number).
pub fn rv_of(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

impl Store {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current resourceVersion of the whole store.
    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    /// One object.
    pub fn get(&self, resource: Resource, namespace: &str, name: &str) -> Option<Value> {
        let state = self.lock();
        state
            .objects
            .get(&resource)?
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// All objects of a resource (in one namespace, or everywhere with `None`), and the version
    /// the list is consistent at.
    pub fn list(&self, resource: Resource, namespace: Option<&str>) -> (Vec<Value>, u64) {
        let state = self.lock();
        let items = state
            .objects
            .get(&resource)
            .map(|objects| {
                objects
                    .iter()
                    .filter(|((ns, _), _)| namespace.is_none_or(|want| want == ns))
                    .map(|(_, object)| object.clone())
                    .collect()
            })
            .unwrap_or_default();
        (items, state.rv)
    }

    /// Calls `visit` with every object of `resource`, in place (no copies), under the lock.
    pub fn visit(&self, resource: Resource, mut visit: impl FnMut(&Value)) {
        let state = self.lock();
        for object in state
            .objects
            .get(&resource)
            .into_iter()
            .flat_map(|o| o.values())
        {
            visit(object);
        }
    }

    /// Stores a new object; sets its resourceVersion.
    pub fn create(&self, resource: Resource, mut object: Value) -> Result<Value, StoreError> {
        let mut state = self.lock();
        let key = key_of(&object);
        if state
            .objects
            .get(&resource)
            .is_some_and(|objects| objects.contains_key(&key))
        {
            return Err(StoreError::AlreadyExists);
        }
        let rv = state.next_rv();
        object["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        state
            .objects
            .entry(resource)
            .or_default()
            .insert(key, object.clone());
        self.record(&mut state, rv, resource, EventType::Added, &object, None);
        Ok(object)
    }

    /// Read-modify-write of one object under the store's lock. `change` edits the current object
    /// in place; an unchanged result writes nothing. A resourceVersion the edit leaves in the
    /// object that differs from the stored one is a conflict.
    pub fn update_with<E>(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
        change: impl FnOnce(&mut Value) -> Result<(), E>,
    ) -> Result<Value, UpdateError<E>> {
        let mut state = self.lock();
        let key = (namespace.to_owned(), name.to_owned());
        let current = state
            .objects
            .get(&resource)
            .and_then(|objects| objects.get(&key))
            .cloned()
            .ok_or(UpdateError::Store(StoreError::NotFound))?;
        let mut updated = current.clone();
        change(&mut updated).map_err(UpdateError::Rejected)?;
        // A caller's stale resourceVersion in the edited object is a conflict.
        let sent_rv = rv_of(&updated);
        if sent_rv != 0 && sent_rv != rv_of(&current) {
            return Err(UpdateError::Store(StoreError::Conflict));
        }
        updated["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        if updated == current {
            return Ok(current);
        }
        let rv = state.next_rv();
        updated["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        state
            .objects
            .entry(resource)
            .or_default()
            .insert(key, updated.clone());
        self.record(
            &mut state,
            rv,
            resource,
            EventType::Modified,
            &updated,
            Some(current),
        );
        Ok(updated)
    }

    /// Removes an object; returns its last state at the deletion's resourceVersion.
    pub fn delete(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
    ) -> Result<Value, StoreError> {
        let mut state = self.lock();
        let key = (namespace.to_owned(), name.to_owned());
        let mut object = state
            .objects
            .get_mut(&resource)
            .and_then(|objects| objects.remove(&key))
            .ok_or(StoreError::NotFound)?;
        let rv = state.next_rv();
        object["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        self.record(&mut state, rv, resource, EventType::Deleted, &object, None);
        Ok(object)
    }

    /// Starts a watch of everything after `from_rv`: the remembered changes since then, and a
    /// receiver for what comes next (subscribed under the lock, so nothing falls in between).
    pub fn watch_from(&self, from_rv: u64) -> Result<WatchStart, StoreError> {
        let state = self.lock();
        let oldest = state.history.front().map_or(state.rv, |c| c.rv - 1);
        let oldest = oldest.max(state.compacted);
        if from_rv < oldest {
            return Err(StoreError::TooOld {
                requested: from_rv,
                oldest,
            });
        }
        let backlog = state
            .history
            .iter()
            .filter(|c| c.rv > from_rv)
            .cloned()
            .collect();
        Ok((backlog, self.changes.subscribe()))
    }

    /// Forgets every change so far, as a compaction does: watches must start from now on.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.history.clear();
        state.compacted = state.rv;
    }

    /// A receiver of every change from now on (for controllers).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    fn record(
        &self,
        state: &mut State,
        rv: u64,
        resource: Resource,
        kind: EventType,
        object: &Value,
        previous: Option<Value>,
    ) {
        let at = std::time::Instant::now();
        let change = Arc::new(Change {
            rv,
            resource,
            kind,
            object: object.clone(),
            previous,
            at,
        });
        while state.history.len() >= HISTORY
            || state
                .history
                .front()
                .is_some_and(|c| at.duration_since(c.at) > RETENTION)
        {
            state.history.pop_front();
        }
        state.history.push_back(change.clone());
        // No receivers is fine: nobody is watching.
        let _ = self.changes.send(change);
    }
}

impl State {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{CONFIGMAPS, PODS};
    use serde_json::json;

    fn cm(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "ns"}})
    }

    #[test]
    fn every_write_gets_a_newer_resource_version() {
        let store = Store::default();
        let a = store.create(CONFIGMAPS, cm("a")).unwrap();
        let b = store.create(CONFIGMAPS, cm("b")).unwrap();
        assert!(rv_of(&b) > rv_of(&a));
        let a2 = store
            .update_with(CONFIGMAPS, "ns", "a", |o| {
                o["data"] = json!({"k": "v"});
                Ok::<_, ()>(())
            })
            .unwrap();
        assert!(rv_of(&a2) > rv_of(&b));
        assert_eq!(
            store.create(CONFIGMAPS, cm("a")),
            Err(StoreError::AlreadyExists)
        );
    }

    #[test]
    fn a_stale_resource_version_conflicts_and_an_unchanged_object_writes_nothing() {
        let store = Store::default();
        let a = store.create(CONFIGMAPS, cm("a")).unwrap();
        let stale = rv_of(&a);
        let set = |value: &str| {
            let value = value.to_owned();
            move |o: &mut Value| {
                o["data"] = json!({"k": value});
                Ok::<_, ()>(())
            }
        };
        store.update_with(CONFIGMAPS, "ns", "a", set("1")).unwrap();
        let conflict = store.update_with(CONFIGMAPS, "ns", "a", |o| {
            o["metadata"]["resourceVersion"] = json!(stale.to_string());
            set("2")(o)
        });
        assert_eq!(conflict, Err(UpdateError::Store(StoreError::Conflict)));
        let before = store.current_rv();
        store
            .update_with(CONFIGMAPS, "ns", "a", |_| Ok::<_, ()>(()))
            .unwrap();
        assert_eq!(
            store.current_rv(),
            before,
            "a no-op update does not bump the version"
        );
    }

    #[test]
    fn watches_resume_from_history_and_too_old_versions_are_refused() {
        let store = Store::default();
        let first = store
            .create(PODS, json!({"metadata": {"name": "p", "namespace": "ns"}}))
            .unwrap();
        store.create(CONFIGMAPS, cm("c")).unwrap();
        store.delete(PODS, "ns", "p").unwrap();
        let (backlog, _rx) = store.watch_from(rv_of(&first)).unwrap();
        let kinds: Vec<_> = backlog.iter().map(|c| (c.resource, c.kind)).collect();
        assert_eq!(
            kinds,
            [(CONFIGMAPS, EventType::Added), (PODS, EventType::Deleted)]
        );

        for i in 0..HISTORY {
            store.create(CONFIGMAPS, cm(&format!("x{i}"))).unwrap();
        }
        assert!(matches!(
            store.watch_from(rv_of(&first)),
            Err(StoreError::TooOld { .. })
        ));
        assert!(store.watch_from(store.current_rv()).is_ok());
        store.compact();
        let now = store.current_rv();
        assert!(
            matches!(store.watch_from(now - 1), Err(StoreError::TooOld { .. })),
            "compaction forgets everything before now"
        );
        assert!(store.watch_from(now).is_ok());
    }
}
