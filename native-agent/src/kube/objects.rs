//! API objects into engine objects, once, at the edge: each object's JSON goes through the
//! engine's own parser ([`switchyard_engine::input::parse`]), so a watched cluster and a
//! manifests folder are read by the same code and fail with the same field-level messages.

use std::fmt;

use kube::core::DynamicObject;
use serde_json::Value;
use switchyard_engine::cluster::ObjectRef;
use switchyard_engine::input::{self, Object};
use switchyard_engine::model::ObjectKey;

use super::Kind;

/// An object the engine could not read; it is skipped (its last good version stays).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ObjectError {
    pub kind: Kind,
    /// `namespace/name`, or the name of a cluster-scoped object.
    pub name: String,
    pub resource_version: Option<String>,
    /// Where in the object, e.g. `spec.ports[0].port`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.as_str(), self.name)?;
        if let Some(rv) = &self.resource_version {
            write!(f, " (resourceVersion {rv})")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The engine's reference to an object of `kind`, from its metadata alone (a deletion needs no
/// readable body).
pub fn object_ref(kind: Kind, obj: &DynamicObject) -> ObjectRef {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let namespace = obj.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    match kind {
        Kind::Service => ObjectRef::Service(ObjectKey::new(namespace, name)),
        Kind::EndpointSlice => ObjectRef::EndpointSlice(ObjectKey::new(namespace, name)),
        Kind::Node => ObjectRef::Node(name),
    }
}

/// Reads one object. `Ok(None)`: an object the proxy ignores, as kube-proxy does (an
/// EndpointSlice without a `kubernetes.io/service-name` label).
pub fn to_engine(kind: Kind, obj: &DynamicObject) -> Result<Option<Object>, ObjectError> {
    let name = match (&obj.metadata.namespace, &obj.metadata.name) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        (_, n) => n.clone().unwrap_or_default(),
    };
    let fail = |field: Option<String>, message: String| ObjectError {
        kind,
        name: name.clone(),
        resource_version: obj.metadata.resource_version.clone(),
        field,
        message,
    };
    let mut json = serde_json::to_value(obj).map_err(|e| fail(None, format!("cannot serialize: {e}")))?;
    if let Value::Object(m) = &mut json {
        // List items come without their type (the list has it); the parser dispatches on it.
        m.insert("apiVersion".into(), Value::String(kind.api_version().into()));
        m.insert("kind".into(), Value::String(kind.as_str().into()));
        if let Some(Value::Object(meta)) = m.get_mut("metadata") {
            // The bulk of most objects, and nothing the proxy reads.
            meta.remove("managedFields");
        }
    }
    let text = json.to_string();
    match input::parse(kind.as_str(), &text) {
        Ok(parsed) => Ok(parsed.objects.into_iter().next()),
        Err(problems) => {
            let p = problems.into_iter().next();
            Err(match p {
                Some(p) => fail(p.field, p.message),
                None => fail(None, "unreadable".into()),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic(v: Value) -> DynamicObject {
        serde_json::from_value(v).expect("a DynamicObject")
    }

    /// A list item without apiVersion/kind, as an API server sends it, still reads.
    #[test]
    fn list_item_without_type_reads() {
        let o = dynamic(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "7",
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]}
        }));
        let Some(Object::Service(s)) = to_engine(Kind::Service, &o).expect("reads") else { panic!() };
        assert_eq!(s.key, ObjectKey::new("shop", "web"));
        assert_eq!(object_ref(Kind::Service, &o), ObjectRef::Service(ObjectKey::new("shop", "web")));
    }

    /// A bad field is named with the object and its resourceVersion.
    #[test]
    fn bad_field_is_named() {
        let o = dynamic(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "9"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 99999}]}
        }));
        let e = to_engine(Kind::Service, &o).expect_err("port out of range");
        assert_eq!(
            e.to_string(),
            "Service shop/web (resourceVersion 9): field spec.ports[0].port: port 99999 is outside 1-65535"
        );
    }

    /// A slice that names no service is ignored, not an error.
    #[test]
    fn unowned_slice_is_ignored() {
        let o = dynamic(serde_json::json!({
            "metadata": {"name": "x", "namespace": "d"}, "addressType": "IPv4", "endpoints": []
        }));
        assert_eq!(to_engine(Kind::EndpointSlice, &o), Ok(None));
    }
}
