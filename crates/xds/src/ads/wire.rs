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
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryResponse, Resource};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};

/// The `resources` field of both response messages.
const RESOURCES_FIELD: u32 = 2;

/// Which flavour's encoding of a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    StateOfTheWorld,
    Delta,
}

/// One response, framed for gRPC: the 5-byte length prefix and the
/// proxy's own fields, then the resources, a whole layer's in one shared
/// chunk where the response carries all of that layer's.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub type_url: String,
    /// What Envoy warms next (see `Protocol::resend`): the resources a
    /// delta response carries, by name; for a state-of-the-world response of
    /// clusters, those that are new or changed (it carries them all).
    pub names: Vec<Arc<str>>,
    pub chunks: Vec<Bytes>,
}

impl Encoded {
    /// A response of `fields` (a message without resources) followed by
    /// the `selected` resources.
    pub fn new<M: Message>(
        flavour: Flavour,
        type_url: &str,
        fields: &M,
        selected: &Selected<'_>,
    ) -> Encoded {
        let mut chunks = Vec::with_capacity(1 + selected.layers.len());
        let mut names = Vec::new();
        let mut body_length = 0;
        for layer in &selected.layers {
            let chunk = match layer.set.segment(type_url, flavour) {
                Some((count, segment)) if count == layer.entries.len() => segment,
                _ => {
                    let length = layer
                        .entries
                        .iter()
                        .map(|(_, r)| r.wire.of(flavour).len())
                        .sum();
                    let mut chunk = BytesMut::with_capacity(length);
                    for (_, resource) in &layer.entries {
                        chunk.extend_from_slice(resource.wire.of(flavour));
                    }
                    chunk.freeze()
                }
            };
            body_length += chunk.len();
            if flavour == Flavour::Delta {
                names.extend(layer.entries.iter().map(|(name, _)| Arc::clone(name)));
            }
            chunks.push(chunk);
        }
        let length = fields.encoded_len() + body_length;
        let mut head = BytesMut::with_capacity(5 + fields.encoded_len());
        head.put_u8(0);
        head.put_u32(u32::try_from(length).unwrap_or(u32::MAX));
        // A BytesMut with room for it all: encoding cannot fail.
        let _ = fields.encode(&mut head);
        chunks.insert(0, head.freeze());
        chunks.retain(|chunk| !chunk.is_empty());
        Encoded {
            type_url: type_url.to_string(),
            names,
            chunks,
        }
    }

    /// A response carrying only a type and a nonce (both flavours number
    /// those fields alike): the acknowledgement of a health report.
    pub fn bare(type_url: &str, nonce: String) -> Encoded {
        let fields = DiscoveryResponse {
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        };
        Encoded::new(
            Flavour::StateOfTheWorld,
            type_url,
            &fields,
            &Selected::default(),
        )
    }

    /// The size of the message, without the gRPC prefix.
    pub fn len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum::<usize>() - 5
    }
}

/// Resources chosen for a response, layer by layer (see
/// [`super::Resources::select`]).
#[derive(Default)]
pub struct Selected<'a> {
    pub(super) layers: Vec<Layer<'a>>,
}

pub(super) struct Layer<'a> {
    pub(super) set: &'a super::ResourceSet,
    pub(super) entries: Vec<(&'a Arc<str>, &'a super::Versioned)>,
}

impl<'a> Selected<'a> {
    pub fn iter(&self) -> impl Iterator<Item = (&'a Arc<str>, &'a super::Versioned)> + '_ {
        self.layers
            .iter()
            .flat_map(|layer| layer.entries.iter().copied())
    }

    pub fn is_empty(&self) -> bool {
        self.layers.iter().all(|layer| layer.entries.is_empty())
    }
}

/// A resource encoded as an entry of each flavour's `resources` field.
#[derive(Debug, Clone, PartialEq)]
pub struct Entries {
    state_of_the_world: Bytes,
    delta: Bytes,
}

impl Entries {
    pub fn of(&self, flavour: Flavour) -> &Bytes {
        match flavour {
            Flavour::StateOfTheWorld => &self.state_of_the_world,
            Flavour::Delta => &self.delta,
        }
    }

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
    use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse;

    use super::*;
    use crate::ads::{ResourceSet, Resources};

    fn any(value: &[u8]) -> Any {
        Any {
            type_url: "type.googleapis.com/test".into(),
            value: value.to_vec(),
        }
    }

    #[test]
    fn responses_decode_as_prost_encodes_them() {
        let mut whole = ResourceSet::default();
        whole.insert("t", "a", any(b"first"));
        whole.insert("t", "b", any(&[7; 300]));
        let mut other = ResourceSet::default();
        other.insert("t", "c", any(b"inbound"));
        other.insert("t", "d", any(b"not chosen"));
        let resources = Resources::layered(vec![Arc::new(whole), Arc::new(other)]);
        let selected = resources.select("t", |name, _| name != "d");
        let sotw = Encoded::new(
            Flavour::StateOfTheWorld,
            "t",
            &DiscoveryResponse {
                version_info: "v1".into(),
                type_url: "t".into(),
                nonce: "9".into(),
                ..Default::default()
            },
            &selected,
        );
        // The prefix and fields, the whole first layer shared, the chosen
        // part of the second.
        assert_eq!(sotw.chunks.len(), 3);
        let frame: Vec<u8> = sotw.chunks.concat();
        let decoded = DiscoveryResponse::decode(&frame[5..]).unwrap();
        assert_eq!(
            decoded.resources,
            vec![any(b"first"), any(&[7; 300]), any(b"inbound")]
        );
        assert_eq!(
            (decoded.version_info.as_str(), decoded.nonce.as_str()),
            ("v1", "9")
        );
        assert_eq!(sotw.len(), decoded.encoded_len());
        assert_eq!(
            u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize,
            sotw.len()
        );

        let delta = Encoded::new(
            Flavour::Delta,
            "t",
            &DeltaDiscoveryResponse {
                system_version_info: "s".into(),
                type_url: "t".into(),
                removed_resources: vec!["gone".into()],
                nonce: "10".into(),
                ..Default::default()
            },
            &selected,
        );
        let frame: Vec<u8> = delta.chunks.concat();
        let decoded = DeltaDiscoveryResponse::decode(&frame[5..]).unwrap();
        let names: Vec<_> = decoded.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(decoded.resources[1].resource, Some(any(&[7; 300])));
        let (_, a) = resources.get("t", "a").unwrap();
        assert_eq!(
            decoded.resources[0].version,
            super::super::version_of(a.version)
        );
        assert_eq!(decoded.removed_resources, ["gone"]);
        let names: Vec<&str> = delta.names.iter().map(|n| &**n).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }
}
