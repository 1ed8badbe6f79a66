//! Responses as they go on the wire, built from resources encoded once.
//!
//! Every proxy that gets a resource gets the same bytes: each [`Versioned`]
//! resource carries its encoding as an entry of a state-of-the-world
//! response and of a delta response, made when it is built, and a response
//! to one proxy is its few fields of its own (version, nonce, removals)
//! followed by those shared entries, copied once into the frame. Protobuf
//! allows a message's fields in any order, and a repeated field's entries
//! one after another, so the result is the message prost would have
//! encoded.
//!
//! [`Versioned`]: super::Versioned

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};

/// The `resources` field of both response messages.
const RESOURCES_FIELD: u32 = 2;

/// One response, framed for gRPC (the 5-byte length prefix included).
#[derive(Debug, Clone)]
pub struct Encoded {
    pub type_url: String,
    /// The resources it carries, by name.
    pub names: Vec<Arc<str>>,
    pub frame: Bytes,
}

impl Encoded {
    /// A response of `fields` (a message without resources) followed by
    /// `entries`, each an encoded entry of its `resources` field.
    fn new<'a, M: Message>(
        type_url: &str,
        fields: &M,
        entries: impl Iterator<Item = (&'a Arc<str>, &'a Bytes)> + Clone,
    ) -> Encoded {
        let length = fields.encoded_len() + entries.clone().map(|(_, e)| e.len()).sum::<usize>();
        let mut frame = BytesMut::with_capacity(5 + length);
        frame.put_u8(0);
        frame.put_u32(u32::try_from(length).unwrap_or(u32::MAX));
        // A BytesMut with room for it all: encoding cannot fail.
        let _ = fields.encode(&mut frame);
        let mut names = Vec::new();
        for (name, entry) in entries {
            frame.extend_from_slice(entry);
            names.push(name.clone());
        }
        Encoded {
            type_url: type_url.to_string(),
            names,
            frame: frame.freeze(),
        }
    }

    /// A state-of-the-world response: `fields` says everything but the resources.
    pub fn state_of_the_world<'a>(
        fields: &DiscoveryResponse,
        resources: impl Iterator<Item = (&'a Arc<str>, &'a super::Versioned)> + Clone,
    ) -> Encoded {
        Encoded::new(
            &fields.type_url,
            fields,
            resources.map(|(name, r)| (name, &r.wire.state_of_the_world)),
        )
    }

    /// A delta response: `fields` says everything but the resources.
    pub fn delta<'a>(
        fields: &DeltaDiscoveryResponse,
        resources: impl Iterator<Item = (&'a Arc<str>, &'a super::Versioned)> + Clone,
    ) -> Encoded {
        Encoded::new(
            &fields.type_url,
            fields,
            resources.map(|(name, r)| (name, &r.wire.delta)),
        )
    }

    /// A response carrying only a type and a nonce (both flavours number
    /// those fields alike): the acknowledgement of a health report.
    pub fn bare(type_url: &str, nonce: String) -> Encoded {
        let fields = DiscoveryResponse {
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        };
        Encoded::new(type_url, &fields, std::iter::empty())
    }

    /// The size of the message, without the gRPC prefix.
    pub fn len(&self) -> usize {
        self.frame.len() - 5
    }
}

/// A resource encoded as an entry of each flavour's `resources` field.
#[derive(Debug, Clone, PartialEq)]
pub struct Entries {
    state_of_the_world: Bytes,
    delta: Bytes,
}

impl Entries {
    pub fn new(name: &str, version: &str, any: &Any) -> Entries {
        Entries {
            state_of_the_world: entry(any),
            delta: entry(&Resource {
                name: name.to_string(),
                version: version.to_string(),
                resource: Some(any.clone()),
                ..Default::default()
            }),
        }
    }
}

/// `message` as one entry of a `resources` field: key, length, bytes.
fn entry<M: Message>(message: &M) -> Bytes {
    let length = message.encoded_len();
    let mut buffer = BytesMut::with_capacity(length + 12);
    encode_key(RESOURCES_FIELD, WireType::LengthDelimited, &mut buffer);
    encode_varint(length as u64, &mut buffer);
    let _ = message.encode(&mut buffer);
    buffer.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ads::Versioned;

    fn any(value: &[u8]) -> Any {
        Any {
            type_url: "type.googleapis.com/test".into(),
            value: value.to_vec(),
        }
    }

    #[test]
    fn responses_decode_as_prost_encodes_them() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let resources = [
            (a.clone(), Versioned::new(&a, any(b"first"))),
            (b.clone(), Versioned::new(&b, any(&[7; 300]))),
        ];
        let sotw = Encoded::state_of_the_world(
            &DiscoveryResponse {
                version_info: "v1".into(),
                type_url: "t".into(),
                nonce: "9".into(),
                ..Default::default()
            },
            resources.iter().map(|(n, r)| (n, r)),
        );
        let decoded = DiscoveryResponse::decode(&sotw.frame[5..]).unwrap();
        assert_eq!(decoded.resources, vec![any(b"first"), any(&[7; 300])]);
        assert_eq!(
            (decoded.version_info.as_str(), decoded.nonce.as_str()),
            ("v1", "9")
        );
        assert_eq!(sotw.len(), decoded.encoded_len());
        assert_eq!(
            u32::from_be_bytes(sotw.frame[1..5].try_into().unwrap()) as usize,
            sotw.len()
        );

        let delta = Encoded::delta(
            &DeltaDiscoveryResponse {
                system_version_info: "s".into(),
                type_url: "t".into(),
                removed_resources: vec!["gone".into()],
                nonce: "10".into(),
                ..Default::default()
            },
            resources.iter().map(|(n, r)| (n, r)),
        );
        let decoded = DeltaDiscoveryResponse::decode(&delta.frame[5..]).unwrap();
        let names: Vec<_> = decoded.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(decoded.resources[1].resource, Some(any(&[7; 300])));
        assert_eq!(
            decoded.resources[0].version,
            super::super::version_of(resources[0].1.version)
        );
        assert_eq!(decoded.removed_resources, ["gone"]);
        assert_eq!(delta.names, [a, b]);
    }
}
