//! Protobuf request bodies (`application/vnd.kubernetes.protobuf`), which client-go's typed
//! clients — and so kubectl's typed commands (`create namespace|configmap|secret|serviceaccount|
//! token`, `certificate approve`) — always send for built-in kinds. The envelope is `k8s\0` and
//! a `runtime.Unknown` whose `raw` is the object; objects are decoded to JSON by a table of the
//! kinds those commands send (field numbers from the Kubernetes `generated.proto` files). Other
//! kinds get a 415 naming the ones accepted.

use base64::Engine;
use serde_json::{Map, Value, json};

/// The media type of Kubernetes protobuf.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";

#[derive(Clone, Copy)]
enum Ty {
    Str,
    Bytes,
    Bool,
    Int,
    Time,
    Msg(&'static [Field]),
    MapStr,
    MapBytes,
    MapMsg(&'static [Field]),
}

#[derive(Clone, Copy)]
struct Field {
    number: u64,
    name: &'static str,
    ty: Ty,
    repeated: bool,
}

const fn f(number: u64, name: &'static str, ty: Ty) -> Field {
    Field {
        number,
        name,
        ty,
        repeated: false,
    }
}

const fn r(number: u64, name: &'static str, ty: Ty) -> Field {
    Field {
        number,
        name,
        ty,
        repeated: true,
    }
}

const OWNER_REFERENCE: &[Field] = &[
    f(5, "apiVersion", Ty::Str),
    f(1, "kind", Ty::Str),
    f(3, "name", Ty::Str),
    f(4, "uid", Ty::Str),
    f(6, "controller", Ty::Bool),
    f(7, "blockOwnerDeletion", Ty::Bool),
];
const OBJECT_META: &[Field] = &[
    f(1, "name", Ty::Str),
    f(2, "generateName", Ty::Str),
    f(3, "namespace", Ty::Str),
    f(5, "uid", Ty::Str),
    f(6, "resourceVersion", Ty::Str),
    f(7, "generation", Ty::Int),
    f(8, "creationTimestamp", Ty::Time),
    f(9, "deletionTimestamp", Ty::Time),
    f(10, "deletionGracePeriodSeconds", Ty::Int),
    f(11, "labels", Ty::MapStr),
    f(12, "annotations", Ty::MapStr),
    r(13, "ownerReferences", Ty::Msg(OWNER_REFERENCE)),
    r(14, "finalizers", Ty::Str),
];
const NAMESPACE: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(2, "spec", Ty::Msg(&[r(1, "finalizers", Ty::Str)])),
    f(3, "status", Ty::Msg(&[f(1, "phase", Ty::Str)])),
];
const CONFIG_MAP: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(2, "data", Ty::MapStr),
    f(3, "binaryData", Ty::MapBytes),
    f(4, "immutable", Ty::Bool),
];
const SECRET: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(2, "data", Ty::MapBytes),
    f(3, "type", Ty::Str),
    f(4, "stringData", Ty::MapStr),
    f(5, "immutable", Ty::Bool),
];
const SERVICE_ACCOUNT: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    r(3, "imagePullSecrets", Ty::Msg(&[f(1, "name", Ty::Str)])),
    f(4, "automountServiceAccountToken", Ty::Bool),
];
const CSR_CONDITION: &[Field] = &[
    f(1, "type", Ty::Str),
    f(6, "status", Ty::Str),
    f(2, "reason", Ty::Str),
    f(3, "message", Ty::Str),
    f(4, "lastUpdateTime", Ty::Time),
    f(5, "lastTransitionTime", Ty::Time),
];
const CSR: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(
        2,
        "spec",
        Ty::Msg(&[
            f(1, "request", Ty::Bytes),
            f(7, "signerName", Ty::Str),
            f(8, "expirationSeconds", Ty::Int),
            r(5, "usages", Ty::Str),
            f(2, "username", Ty::Str),
            f(3, "uid", Ty::Str),
            r(4, "groups", Ty::Str),
            f(6, "extra", Ty::MapMsg(&[r(1, "items", Ty::Str)])),
        ]),
    ),
    f(
        3,
        "status",
        Ty::Msg(&[
            r(1, "conditions", Ty::Msg(CSR_CONDITION)),
            f(2, "certificate", Ty::Bytes),
        ]),
    ),
];
const TOKEN_REQUEST: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(
        2,
        "spec",
        Ty::Msg(&[
            r(1, "audiences", Ty::Str),
            f(4, "expirationSeconds", Ty::Int),
            f(
                3,
                "boundObjectRef",
                Ty::Msg(&[
                    f(1, "kind", Ty::Str),
                    f(2, "apiVersion", Ty::Str),
                    f(3, "name", Ty::Str),
                    f(4, "uid", Ty::Str),
                ]),
            ),
        ]),
    ),
];

/// The kinds whose protobuf bodies this server decodes.
const KINDS: &[(&str, &[Field])] = &[
    ("Namespace", NAMESPACE),
    ("ConfigMap", CONFIG_MAP),
    ("Secret", SECRET),
    ("ServiceAccount", SERVICE_ACCOUNT),
    ("CertificateSigningRequest", CSR),
    ("TokenRequest", TOKEN_REQUEST),
];

/// Why a protobuf body could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Malformed bytes (400).
    Malformed(String),
    /// A kind this server does not decode from protobuf (415).
    Unsupported(String),
}

/// Decodes a protobuf request body into the JSON object it encodes.
pub fn decode(body: &[u8]) -> Result<Value, DecodeError> {
    let envelope = body
        .strip_prefix(b"k8s\0")
        .ok_or_else(|| DecodeError::Malformed("missing the k8s protobuf prefix".into()))?;
    let mut api_version = String::new();
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    for item in Reader(envelope) {
        match item? {
            (1, Wire::Len(type_meta)) => {
                for item in Reader(type_meta) {
                    match item? {
                        (1, Wire::Len(v)) => api_version = utf8(v)?,
                        (2, Wire::Len(v)) => kind = utf8(v)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Len(v)) => raw = v,
            _ => {}
        }
    }
    let fields = KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, fields)| *fields)
        .ok_or_else(|| {
            DecodeError::Unsupported(format!(
                "protobuf bodies are accepted for {}; {kind} must be sent as JSON",
                KINDS.iter().map(|k| k.0).collect::<Vec<_>>().join(", ")
            ))
        })?;
    let mut object = message(raw, fields)?;
    object["apiVersion"] = json!(api_version);
    object["kind"] = json!(kind);
    Ok(object)
}

enum Wire<'a> {
    Varint(u64),
    Len(&'a [u8]),
    Fixed,
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self
                .0
                .split_first()
                .ok_or_else(|| DecodeError::Malformed("truncated varint".into()))?;
            self.0 = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Malformed("varint too long".into()))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Malformed("truncated field".into()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
}

impl<'a> Iterator for Reader<'a> {
    type Item = Result<(u64, Wire<'a>), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let item = (|| {
            let key = self.varint()?;
            let wire = match key & 7 {
                0 => Wire::Varint(self.varint()?),
                1 => {
                    self.take(8)?;
                    Wire::Fixed
                }
                2 => {
                    let len = usize::try_from(self.varint()?)
                        .map_err(|_| DecodeError::Malformed("length overflows".into()))?;
                    Wire::Len(self.take(len)?)
                }
                5 => {
                    self.take(4)?;
                    Wire::Fixed
                }
                other => {
                    return Err(DecodeError::Malformed(format!(
                        "unsupported wire type {other}"
                    )));
                }
            };
            Ok((key >> 3, wire))
        })();
        if item.is_err() {
            self.0 = &[];
        }
        Some(item)
    }
}

fn utf8(bytes: &[u8]) -> Result<String, DecodeError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| DecodeError::Malformed("a string field is not UTF-8".into()))
}

fn message(bytes: &[u8], fields: &[Field]) -> Result<Value, DecodeError> {
    let mut object = Map::new();
    for item in Reader(bytes) {
        let (number, wire) = item?;
        let Some(field) = fields.iter().find(|f| f.number == number) else {
            continue;
        };
        let value = match (field.ty, wire) {
            (Ty::Str, Wire::Len(v)) => json!(utf8(v)?),
            (Ty::Bytes, Wire::Len(v)) => json!(base64::engine::general_purpose::STANDARD.encode(v)),
            (Ty::Bool, Wire::Varint(v)) => json!(v != 0),
            (Ty::Int, Wire::Varint(v)) => json!(v as i64),
            (Ty::Time, Wire::Len(v)) => time(v)?,
            (Ty::Msg(inner), Wire::Len(v)) => message(v, inner)?,
            (Ty::MapStr | Ty::MapBytes | Ty::MapMsg(_), Wire::Len(entry)) => {
                let (mut key, mut value) = (String::new(), Value::Null);
                for item in Reader(entry) {
                    match (item?, field.ty) {
                        ((1, Wire::Len(k)), _) => key = utf8(k)?,
                        ((2, Wire::Len(v)), Ty::MapStr) => value = json!(utf8(v)?),
                        ((2, Wire::Len(v)), Ty::MapBytes) => {
                            value = json!(base64::engine::general_purpose::STANDARD.encode(v))
                        }
                        ((2, Wire::Len(v)), Ty::MapMsg(inner)) => value = message(v, inner)?,
                        _ => {}
                    }
                }
                let map = object
                    .entry(field.name)
                    .or_insert_with(|| Value::Object(Map::new()));
                map[&key] = value;
                continue;
            }
            _ => {
                return Err(DecodeError::Malformed(format!(
                    "field {} has an unexpected wire type",
                    field.name
                )));
            }
        };
        if field.repeated {
            match object.entry(field.name).or_insert_with(|| json!([])) {
                Value::Array(items) => items.push(value),
                _ => unreachable!("repeated fields are arrays"),
            }
        } else {
            object.insert(field.name.to_owned(), value);
        }
    }
    Ok(Value::Object(object))
}

fn time(bytes: &[u8]) -> Result<Value, DecodeError> {
    let mut seconds = 0i64;
    for item in Reader(bytes) {
        if let (1, Wire::Varint(v)) = item? {
            seconds = v as i64;
        }
    }
    let at = jiff::Timestamp::from_second(seconds)
        .map_err(|e| DecodeError::Malformed(format!("time out of range: {e}")))?;
    Ok(json!(at.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn len_field(number: u64, bytes: &[u8], out: &mut Vec<u8>) {
        varint(number << 3 | 2, out);
        varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }

    #[test]
    fn a_configmap_envelope_decodes_to_json() {
        let mut meta = Vec::new();
        len_field(1, b"settings", &mut meta);
        let mut entry = Vec::new();
        len_field(1, b"mode", &mut entry);
        len_field(2, b"two", &mut entry);
        let mut object = Vec::new();
        len_field(1, &meta, &mut object);
        len_field(2, &entry, &mut object);
        let mut type_meta = Vec::new();
        len_field(1, b"v1", &mut type_meta);
        len_field(2, b"ConfigMap", &mut type_meta);
        let mut unknown = Vec::new();
        len_field(1, &type_meta, &mut unknown);
        len_field(2, &object, &mut unknown);
        let body = [b"k8s\0".as_slice(), &unknown].concat();
        assert_eq!(
            decode(&body).unwrap(),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"mode": "two"}})
        );
        assert!(matches!(
            decode(&body[..body.len() - 2]),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(decode(b"{}"), Err(DecodeError::Malformed(_))));
    }
}
