//! Kubernetes' protobuf encoding of request bodies
//! (`application/vnd.kubernetes.protobuf`), which kubectl and client-go's
//! typed clients send the core kinds in (`kubectl create namespace`,
//! `create serviceaccount`): the `k8s\0` envelope (`runtime.Unknown`)
//! around the object's message, read with the descriptors of
//! `vmesh_proto::kubernetes_descriptors` and turned into the object's JSON
//! as Kubernetes writes it (fields left at their zero value omitted, times
//! in RFC 3339, int-or-strings as either). Answers are always JSON, which
//! those clients accept as well.
//!
//! Not here: what the object means (it is decoded and validated as any
//! JSON body is).

use prost_reflect::{DynamicMessage, MapKey, ReflectMessage};
use serde_json::{Map, Value};

pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// What every Kubernetes protobuf body starts with.
const MAGIC: &[u8] = b"k8s\0";

/// Go's zero `time.Time` in seconds since the epoch: an unset time (any
/// time before the epoch reads as unset).
#[cfg(test)]
const GO_ZERO_TIME: i64 = -62_135_596_800;

#[derive(Debug, thiserror::Error)]
pub enum ProtobufError {
    #[error("the body does not start with Kubernetes' protobuf prefix")]
    NoMagic,
    #[error("the body is not a Kubernetes protobuf envelope: {0}")]
    Envelope(prost::DecodeError),
    #[error("the envelope's content encoding {0:?} is not supported")]
    Encoding(String),
    #[error("{api_version} {kind} is not a kind served in protobuf; send JSON")]
    Unsupported { api_version: String, kind: String },
    #[error("the {kind} message does not decode: {error}")]
    Message {
        kind: String,
        error: prost::DecodeError,
    },
}

/// The JSON object a protobuf body holds.
pub fn to_json(body: &[u8]) -> Result<Value, ProtobufError> {
    let pool = vmesh_proto::kubernetes_descriptors();
    let envelope = body.strip_prefix(MAGIC).ok_or(ProtobufError::NoMagic)?;
    let unknown = pool
        .get_message_by_name("k8s.io.apimachinery.pkg.runtime.Unknown")
        .expect("runtime.Unknown is among the descriptors");
    let unknown = DynamicMessage::decode(unknown, envelope).map_err(ProtobufError::Envelope)?;
    let text = |message: &DynamicMessage, field: &str| {
        message
            .get_field_by_name(field)
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let type_meta = unknown
        .get_field_by_name("typeMeta")
        .and_then(|v| v.as_message().cloned());
    let api_version = type_meta
        .as_ref()
        .map(|t| text(t, "apiVersion"))
        .unwrap_or_default();
    let kind = type_meta
        .as_ref()
        .map(|t| text(t, "kind"))
        .unwrap_or_default();
    let encoding = text(&unknown, "contentEncoding");
    if !encoding.is_empty() {
        return Err(ProtobufError::Encoding(encoding));
    }
    let message = (api_version == "v1")
        .then(|| pool.get_message_by_name(&format!("k8s.io.api.core.v1.{kind}")))
        .flatten()
        .ok_or_else(|| ProtobufError::Unsupported {
            api_version: api_version.clone(),
            kind: kind.clone(),
        })?;
    let raw = unknown
        .get_field_by_name("raw")
        .and_then(|v| v.as_bytes().cloned())
        .unwrap_or_default();
    let object = DynamicMessage::decode(message, raw).map_err(|error| ProtobufError::Message {
        kind: kind.clone(),
        error,
    })?;
    let mut json = message_json(&object);
    if let Value::Object(map) = &mut json {
        map.insert("apiVersion".into(), Value::String(api_version));
        map.insert("kind".into(), Value::String(kind));
    }
    Ok(json)
}

/// A message as Kubernetes' JSON: the well-known apimachinery types by
/// their JSON forms, every other message as an object of its set fields
/// (the proto field names are the JSON names), zero values omitted.
fn message_json(message: &DynamicMessage) -> Value {
    let get = |name: &str| message.get_field_by_name(name);
    match message.descriptor().full_name() {
        "k8s.io.apimachinery.pkg.apis.meta.v1.Time"
        | "k8s.io.apimachinery.pkg.apis.meta.v1.MicroTime" => {
            let seconds = get("seconds").and_then(|v| v.as_i64()).unwrap_or(0);
            let nanos = get("nanos").and_then(|v| v.as_i32()).unwrap_or(0);
            match u64::try_from(seconds) {
                Ok(seconds) => {
                    let time = std::time::UNIX_EPOCH
                        + std::time::Duration::new(seconds, u32::try_from(nanos).unwrap_or(0));
                    Value::String(humantime::format_rfc3339_seconds(time).to_string())
                }
                _ => Value::Null,
            }
        }
        "k8s.io.apimachinery.pkg.util.intstr.IntOrString" => {
            match get("type").and_then(|v| v.as_i64()).unwrap_or(0) {
                0 => Value::from(get("intVal").and_then(|v| v.as_i32()).unwrap_or(0)),
                _ => Value::String(
                    get("strVal")
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                ),
            }
        }
        "k8s.io.apimachinery.pkg.api.resource.Quantity" => Value::String(
            get("string")
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        ),
        _ => {
            let mut object = Map::new();
            for (field, value) in message.fields() {
                let value = value_json(value);
                if !is_zero(&value) {
                    object.insert(field.name().to_string(), value);
                }
            }
            Value::Object(object)
        }
    }
}

fn value_json(value: &prost_reflect::Value) -> Value {
    use base64::Engine;
    use prost_reflect::Value as V;
    match value {
        V::Bool(b) => Value::Bool(*b),
        V::I32(n) => Value::from(*n),
        V::I64(n) => Value::from(*n),
        V::U32(n) => Value::from(*n),
        V::U64(n) => Value::from(*n),
        V::F32(n) => Value::from(f64::from(*n)),
        V::F64(n) => Value::from(*n),
        V::String(s) => Value::String(s.clone()),
        V::Bytes(b) => Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
        V::EnumNumber(n) => Value::from(*n),
        V::Message(m) => message_json(m),
        V::List(items) => Value::Array(items.iter().map(value_json).collect()),
        // Map entries keep their values, empty ones included (a label may be "").
        V::Map(entries) => Value::Object(
            entries
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        MapKey::String(s) => s.clone(),
                        MapKey::Bool(b) => b.to_string(),
                        MapKey::I32(n) => n.to_string(),
                        MapKey::I64(n) => n.to_string(),
                        MapKey::U32(n) => n.to_string(),
                        MapKey::U64(n) => n.to_string(),
                    };
                    (key, value_json(v))
                })
                .collect(),
        ),
    }
}

/// Go's `omitempty`: what Kubernetes' JSON leaves out.
fn is_zero(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use serde_json::json;

    /// A body as client-go writes one: the envelope around the message.
    fn encode(api_version: &str, kind: &str, object: &DynamicMessage) -> Vec<u8> {
        let pool = vmesh_proto::kubernetes_descriptors();
        let message = |name: &str| DynamicMessage::new(pool.get_message_by_name(name).unwrap());
        let mut type_meta = message("k8s.io.apimachinery.pkg.runtime.TypeMeta");
        type_meta.set_field_by_name(
            "apiVersion",
            prost_reflect::Value::String(api_version.into()),
        );
        type_meta.set_field_by_name("kind", prost_reflect::Value::String(kind.into()));
        let mut unknown = message("k8s.io.apimachinery.pkg.runtime.Unknown");
        unknown.set_field_by_name("typeMeta", prost_reflect::Value::Message(type_meta));
        unknown.set_field_by_name(
            "raw",
            prost_reflect::Value::Bytes(object.encode_to_vec().into()),
        );
        let mut body = MAGIC.to_vec();
        body.extend(unknown.encode_to_vec());
        body
    }

    #[test]
    fn a_service_reads_as_kubernetes_json() {
        let pool = vmesh_proto::kubernetes_descriptors();
        let service_json = json!({
            "metadata": {"name": "payment", "namespace": "vm-workloads", "labels": {"app": "payment", "empty": ""},
                         "creationTimestamp": {"seconds": GO_ZERO_TIME}},
            "spec": {"ports": [{"name": "http", "port": 8080, "targetPort": {"type": 0, "intVal": 9080}},
                               {"name": "grpc", "port": 9090, "targetPort": {"type": 1, "strVal": "grpc"}}],
                     "selector": {"app": "payment"}, "type": "", "sessionAffinity": ""},
        });
        let service = DynamicMessage::deserialize(
            pool.get_message_by_name("k8s.io.api.core.v1.Service")
                .unwrap(),
            service_json,
        )
        .unwrap();
        let json = to_json(&encode("v1", "Service", &service)).unwrap();
        assert_eq!(
            json,
            json!({
                "metadata": {"name": "payment", "namespace": "vm-workloads", "labels": {"app": "payment", "empty": ""}},
                "spec": {"ports": [{"name": "http", "port": 8080, "targetPort": 9080},
                                   {"name": "grpc", "port": 9090, "targetPort": "grpc"}],
                         "selector": {"app": "payment"}},
                "apiVersion": "v1",
                "kind": "Service",
            })
        );
    }

    #[test]
    fn bodies_that_are_not_core_objects_are_refused() {
        assert!(matches!(to_json(b"{}"), Err(ProtobufError::NoMagic)));
        assert!(matches!(
            to_json(b"k8s\0\xff\xff"),
            Err(ProtobufError::Envelope(_))
        ));
        let pool = vmesh_proto::kubernetes_descriptors();
        let empty = DynamicMessage::new(
            pool.get_message_by_name("k8s.io.api.core.v1.Namespace")
                .unwrap(),
        );
        assert!(matches!(
            to_json(&encode("apps/v1", "Deployment", &empty)),
            Err(ProtobufError::Unsupported { .. })
        ));
    }
}
