//! The registry of admin objects of one process, and delegation to peer processes.
//!
//! Later crates register their objects here (`SIBMessagingEngine`, `TransactionService`, ...)
//! without touching the transport. The registry refuses an operation an object does not list
//! before calling it. A node agent sets a [`Delegate`] to answer for its servers. A forwarded
//! call carries `x-keel-forwarded`, and a process answers it from its own objects only, so
//! delegation can never loop.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use keel_core::{ObjectName, ObjectPattern};
use serde_json::{Map, Value};

use crate::{AdminClient, AdminError, AdminObject, Principal};

/// At most this many objects per process. A process registers a handful per messaging engine
/// and destination; more means a leak (objects registered and never unregistered).
pub const MAX_OBJECTS: usize = 10_000;
/// Bound on each peer's answer to a fanned-out query: one hung server must not hang
/// `queryNames` on its node agent.
pub const PEER_QUERY_TIMEOUT_MS: u64 = 2_000;

/// Lets a node agent answer for the processes it supervises: queries fan out to every peer,
/// and invoke/attribute calls on a name whose `process=` key is a peer are forwarded to it.
pub trait Delegate: Send + Sync + 'static {
    /// (process name, client) for each live peer right now.
    fn peers(&self) -> Vec<(String, AdminClient)>;
}

struct Entry {
    /// Cached at registration: `find` runs on every call and must not call into objects.
    name: ObjectName,
    /// `canonical(name)`, so lookups compare strings instead of sorting properties per entry.
    key: String,
    object: Arc<dyn AdminObject>,
}

impl Entry {
    fn is(&self, name: &ObjectName, key: &str) -> bool {
        // The key is a fast filter; `same_object` stays the definition of identity.
        self.key == key && self.name.same_object(name)
    }
}

/// Domain and properties in sorted order: equal for names that denote the same object.
fn canonical(name: &ObjectName) -> String {
    let text = name.to_string();
    let (domain, props) = text.split_once(':').unwrap_or(("", text.as_str()));
    let mut props: Vec<&str> = props.split(',').collect();
    props.sort_unstable();
    format!("{domain}:{}", props.join(","))
}

/// The admin objects of one process. Locks are never held across an `.await` or while an
/// object's code runs, so a slow operation cannot block registration or other calls.
pub struct Registry {
    objects: RwLock<Vec<Entry>>,
    delegate: RwLock<Option<Arc<dyn Delegate>>>,
}

impl Registry {
    /// An empty registry, shared between the endpoint and the components that register.
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry {
            objects: RwLock::new(Vec::new()),
            delegate: RwLock::new(None),
        })
    }

    // A panic elsewhere while holding the lock leaves the Vec consistent (every mutation is a
    // single push/replace/remove), so a poisoned lock is still safe to use.
    fn read(&self) -> RwLockReadGuard<'_, Vec<Entry>> {
        self.objects.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Vec<Entry>> {
        self.objects.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `obj`, replacing an object with the same name (`ObjectName::same_object`), so
    /// a component that restarts simply registers again. Past [`MAX_OBJECTS`] the object is
    /// refused with an error log rather than a panic: admin must never take a server down.
    pub fn register(&self, obj: Arc<dyn AdminObject>) {
        let name = obj.name();
        let key = canonical(&name);
        let mut objects = self.write();
        if let Some(entry) = objects.iter_mut().find(|e| e.is(&name, &key)) {
            *entry = Entry {
                name,
                key,
                object: obj,
            };
            return;
        }
        if objects.len() >= MAX_OBJECTS {
            tracing::error!(
                object = %name,
                limit = MAX_OBJECTS,
                "admin object {name} not registered: this process already holds {MAX_OBJECTS} admin objects (a component registers objects without unregistering them)"
            );
            return;
        }
        objects.push(Entry {
            name,
            key,
            object: obj,
        });
        assert!(objects.len() <= MAX_OBJECTS);
    }

    /// Removes the object with this name (any property order); unknown names are ignored, so
    /// a component may unregister unconditionally when it stops.
    pub fn unregister(&self, name: &ObjectName) {
        let key = canonical(name);
        self.write().retain(|e| !e.is(name, &key));
    }

    /// The local object with this name (JMX identity: property order does not matter).
    pub fn find(&self, name: &ObjectName) -> Option<Arc<dyn AdminObject>> {
        let key = canonical(name);
        self.read()
            .iter()
            .find(|e| e.is(name, &key))
            .map(|e| e.object.clone())
    }

    /// Names of this process's objects matching `pattern`, sorted by display string.
    pub fn query_local(&self, pattern: &ObjectPattern) -> Vec<ObjectName> {
        let mut names: Vec<ObjectName> = self
            .read()
            .iter()
            .filter(|e| pattern.matches(&e.name))
            .map(|e| e.name.clone())
            .collect();
        names.sort_by_cached_key(|n| n.to_string());
        names
    }

    /// Makes this registry answer for peer processes too (a node agent for its servers).
    pub fn set_delegate(&self, d: Arc<dyn Delegate>) {
        *self.delegate.write().unwrap_or_else(|e| e.into_inner()) = Some(d);
    }

    fn peers(&self) -> Vec<(String, AdminClient)> {
        let delegate = self
            .delegate
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        delegate.map(|d| d.peers()).unwrap_or_default()
    }

    /// Local ∪ every peer's answers, sorted and deduplicated. Peer errors are logged with
    /// `tracing::warn` and skipped (a down server must not hide the rest of the node); each
    /// peer is asked concurrently with a [`PEER_QUERY_TIMEOUT_MS`] bound.
    pub async fn query(&self, pattern: &str) -> Result<Vec<String>, AdminError> {
        self.query_scoped(pattern, true).await
    }

    pub(crate) async fn query_scoped(
        &self,
        pattern: &str,
        fan_out: bool,
    ) -> Result<Vec<String>, AdminError> {
        let parsed = ObjectPattern::parse(pattern)?;
        let mut names: Vec<String> = self
            .query_local(&parsed)
            .iter()
            .map(|n| n.to_string())
            .collect();
        if fan_out {
            let mut asks = tokio::task::JoinSet::new();
            for (process, client) in self.peers() {
                let client = client.forwarding(PEER_QUERY_TIMEOUT_MS);
                let pattern = pattern.to_string();
                asks.spawn(async move { (process, client.addr(), client.query(&pattern).await) });
            }
            while let Some(joined) = asks.join_next().await {
                match joined {
                    Ok((_, _, Ok(peer_names))) => {
                        // A peer's answer is checked like any input: only well-formed names
                        // that match the pattern are passed on.
                        names.extend(peer_names.into_iter().filter(|n| {
                            ObjectName::parse(n)
                                .map(|name| parsed.matches(&name))
                                .unwrap_or(false)
                        }))
                    }
                    Ok((process, addr, Err(e))) => {
                        tracing::warn!(process = %process, addr = %addr, "query {pattern} skipped process {process}: {e}")
                    }
                    Err(e) => {
                        tracing::warn!("query {pattern}: a peer query task ended abnormally: {e}")
                    }
                }
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Runs `op` on the object `name`: a local object first, else the peer named by the
    /// name's `process=` key, else [`AdminError::NotFound`].
    ///
    /// Runs with every right: for the process's own callers. Calls from the admin API go
    /// through `invoke_as`, which checks the caller's role.
    pub async fn invoke(
        &self,
        name: &str,
        op: &str,
        args: Vec<Value>,
    ) -> Result<Value, AdminError> {
        self.invoke_scoped(name, op, args, true, None).await
    }

    /// [`Registry::invoke`] for `caller`: refused with [`AdminError::Forbidden`] unless the
    /// caller holds the operation's role. A forwarded call carries the caller's name, and the
    /// process that holds the object checks.
    pub async fn invoke_as(
        &self,
        caller: &Principal,
        name: &str,
        op: &str,
        args: Vec<Value>,
    ) -> Result<Value, AdminError> {
        self.invoke_scoped(name, op, args, true, Some(caller)).await
    }

    pub(crate) async fn invoke_scoped(
        &self,
        name: &str,
        op: &str,
        args: Vec<Value>,
        forward: bool,
        caller: Option<&Principal>,
    ) -> Result<Value, AdminError> {
        match self.locate(name, forward)? {
            Located::Local(obj) => {
                let ops = obj.operations();
                let Some(found) = ops.iter().find(|o| o.name == op) else {
                    return Err(AdminError::UnknownOperation {
                        name: obj.name().to_string(),
                        op: op.to_string(),
                        known: ops.iter().map(|o| o.name.to_string()).collect(),
                    });
                };
                if let Some(caller) = caller {
                    if !caller.grants.admin(found.role) {
                        return Err(AdminError::Forbidden {
                            why: keel_core::roles::refusal(
                                &caller.user,
                                found.role,
                                &format!("operation `{op}` of {}", obj.name()),
                            ),
                        });
                    }
                }
                obj.invoke(op, args).await
            }
            Located::Peer(client) => {
                let client = match caller {
                    Some(c) => client.on_behalf_of(&c.user),
                    None => client,
                };
                client.invoke(name, op, args).await
            }
        }
    }

    /// One attribute of `name` (local, else forwarded like [`Registry::invoke`]).
    pub async fn attribute(&self, name: &str, attribute: &str) -> Result<Value, AdminError> {
        self.attribute_scoped(name, attribute, true).await
    }

    pub(crate) async fn attribute_scoped(
        &self,
        name: &str,
        attribute: &str,
        forward: bool,
    ) -> Result<Value, AdminError> {
        match self.locate(name, forward)? {
            Located::Local(obj) => {
                let mut attributes = obj.attributes();
                attributes.remove(attribute).ok_or_else(|| {
                    let mut known: Vec<String> = attributes.keys().cloned().collect();
                    known.sort();
                    AdminError::UnknownAttribute {
                        name: obj.name().to_string(),
                        attribute: attribute.to_string(),
                        known,
                    }
                })
            }
            Located::Peer(client) => client.attribute(name, attribute).await,
        }
    }

    /// Every attribute of `name` (local, else forwarded like [`Registry::invoke`]).
    pub async fn attributes(&self, name: &str) -> Result<Map<String, Value>, AdminError> {
        self.attributes_scoped(name, true).await
    }

    pub(crate) async fn attributes_scoped(
        &self,
        name: &str,
        forward: bool,
    ) -> Result<Map<String, Value>, AdminError> {
        match self.locate(name, forward)? {
            Located::Local(obj) => Ok(obj.attributes()),
            Located::Peer(client) => client.attributes(name).await,
        }
    }

    fn locate(&self, name: &str, forward: bool) -> Result<Located, AdminError> {
        let parsed = ObjectName::parse(name)?;
        if let Some(obj) = self.find(&parsed) {
            return Ok(Located::Local(obj));
        }
        if forward {
            if let Some(process) = parsed.get("process") {
                if let Some((_, client)) = self.peers().into_iter().find(|(p, _)| p == process) {
                    // Forwarded calls keep the peer client's own timeout: operations such as
                    // starting an engine legitimately take longer than a query.
                    let timeout_ms = client.timeout_ms();
                    return Ok(Located::Peer(client.forwarding(timeout_ms)));
                }
            }
        }
        Err(AdminError::NotFound {
            name: name.to_string(),
        })
    }
}

enum Located {
    Local(Arc<dyn AdminObject>),
    Peer(AdminClient),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OpFuture;

    struct Obj(ObjectName, &'static str);

    impl AdminObject for Obj {
        fn name(&self) -> ObjectName {
            self.0.clone()
        }
        fn attributes(&self) -> Map<String, Value> {
            let mut m = Map::new();
            m.insert("tag".into(), Value::from(self.1));
            m
        }
        fn operations(&self) -> Vec<crate::Op> {
            vec![crate::Op::monitor("tag", "returns the tag")]
        }
        fn invoke<'a>(&'a self, _op: &'a str, _args: Vec<Value>) -> OpFuture<'a> {
            Box::pin(async move { Ok(Value::from(self.1)) })
        }
    }

    fn server(n: &str) -> ObjectName {
        ObjectName::new(&[("type", "Server"), ("name", n)])
    }

    #[test]
    fn register_replaces_same_object_whatever_the_key_order() {
        let r = Registry::new();
        r.register(Arc::new(Obj(server("s1"), "first")));
        r.register(Arc::new(Obj(
            ObjectName::parse("Keel:name=s1,type=Server").unwrap(),
            "second",
        )));
        let all = r.query_local(&ObjectPattern::parse("*").unwrap());
        assert_eq!(all.len(), 1);
        assert_eq!(r.find(&server("s1")).unwrap().attributes()["tag"], "second");
        r.unregister(&server("s1"));
        assert!(r.find(&server("s1")).is_none());
    }

    #[test]
    fn query_local_is_sorted_and_filtered() {
        let r = Registry::new();
        for n in ["b", "c", "a"] {
            r.register(Arc::new(Obj(server(n), n)));
        }
        r.register(Arc::new(Obj(
            ObjectName::new(&[("type", "NodeAgent"), ("name", "n1")]),
            "",
        )));
        let names: Vec<String> = r
            .query_local(&ObjectPattern::parse("type=Server,*").unwrap())
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "Keel:type=Server,name=a",
                "Keel:type=Server,name=b",
                "Keel:type=Server,name=c"
            ]
        );
    }

    #[test]
    fn registration_is_bounded_without_panicking() {
        let r = Registry::new();
        for i in 0..MAX_OBJECTS + 5 {
            r.register(Arc::new(Obj(server(&format!("s{i}")), "")));
        }
        assert_eq!(
            r.query_local(&ObjectPattern::parse("*").unwrap()).len(),
            MAX_OBJECTS
        );
        // Replacing an existing object still works at the limit.
        r.register(Arc::new(Obj(server("s0"), "again")));
        assert_eq!(r.find(&server("s0")).unwrap().attributes()["tag"], "again");
    }

    #[tokio::test]
    async fn unknown_names_attributes_and_operations_are_explained() {
        let r = Registry::new();
        r.register(Arc::new(Obj(server("s1"), "x")));
        let name = server("s1").to_string();
        assert!(matches!(
            r.invoke("Keel:type=Server,name=zz", "tag", vec![]).await,
            Err(AdminError::NotFound { .. })
        ));
        assert!(matches!(
            r.invoke("not a name", "tag", vec![]).await,
            Err(AdminError::BadName(_))
        ));
        match r.attribute(&name, "nope").await {
            Err(AdminError::UnknownAttribute { known, .. }) => assert_eq!(known, ["tag"]),
            other => panic!("{other:?}"),
        }
        match r.invoke(&name, "nope", vec![]).await {
            Err(AdminError::UnknownOperation { known, .. }) => assert_eq!(known, ["tag"]),
            other => panic!("{other:?}"),
        }
        assert_eq!(r.invoke(&name, "tag", vec![]).await.unwrap(), "x");
        assert_eq!(r.attributes(&name).await.unwrap()["tag"], "x");
    }
}
