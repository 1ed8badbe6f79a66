//! The ADS gRPC endpoints with their own response framing.
//!
//! tonic's generated server encodes all the responses of a stream into one
//! buffer that keeps the capacity of the largest message for as long as the
//! stream lives: with a thousand proxies and pushes of a few hundred
//! kilobytes, that alone held half a gigabyte (its request decoder does the
//! same, on a smaller scale). Here each response is framed in a buffer of its
//! exact size, freed once written, and requests are read from a buffer let go
//! whenever it empties. The streams themselves are [`serve`]d by the parent
//! module.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

use super::delta::Delta;
use super::sotw::StateOfTheWorld;
use super::{Ads, CallerIdentity, Encoded, Protocol, serve};

const SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const STATE_OF_THE_WORLD: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// The largest request accepted: a subscription to every cluster of a big mesh.
const MAX_REQUEST: usize = 16 << 20;

/// The ADS service, ready for `tonic::transport::Server::add_service`.
#[derive(Clone)]
pub struct AdsServer(pub(super) Ads);

impl NamedService for AdsServer {
    const NAME: &'static str = SERVICE;
}

impl<B> tonic::codegen::Service<http::Request<B>> for AdsServer
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let ads = &self.0;
        let caller = match &ads.authenticator {
            Some(authenticator) => {
                match authenticator.authenticate(request.headers(), request.extensions()) {
                    Ok(caller) => Some(caller),
                    Err(status) => return ready(Ok(status.into_http())),
                }
            }
            None => None,
        };
        let body = match request.uri().path() {
            STATE_OF_THE_WORLD => stream::<StateOfTheWorld, B>(ads, caller, request.into_body()),
            DELTA => stream::<Delta, B>(ads, caller, request.into_body()),
            other => {
                let status = Status::unimplemented(format!("no method {other}"));
                return ready(Ok(status.into_http()));
            }
        };
        let response = http::Response::builder()
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(body)
            .unwrap_or_default();
        ready(Ok(response))
    }
}

/// One stream of protocol `P`, from the request body to the response body.
fn stream<P, B>(ads: &Ads, caller: Option<CallerIdentity>, body: B) -> Body
where
    P: Protocol,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    framed(serve::<P>(
        ads.session(caller),
        requests::<P::Request, B>(body),
        ads.config.clone(),
        ads.shutdown.clone(),
    ))
}

/// The proxy's requests, decoded from the body's gRPC frames. The buffer is
/// let go whenever it empties: a stream lives for hours and its largest
/// request (a subscription to every cluster) is rare.
fn requests<Req, B>(body: B) -> impl Stream<Item = Result<Req, Status>> + Send + Unpin + 'static
where
    Req: Message + Default + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    let start = (Box::pin(body), BytesMut::new());
    Box::pin(futures::stream::unfold(Some(start), |state| async move {
        let (mut body, mut buffer) = state?;
        loop {
            match next_message(&mut buffer) {
                Ok(Some(message)) => {
                    return Some((
                        Req::decode(message).map_err(|e| {
                            Status::invalid_argument(format!("undecodable request: {e}"))
                        }),
                        Some((body, buffer)),
                    ));
                }
                Ok(None) => {}
                Err(status) => return Some((Err(status), None)),
            }
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        buffer.extend_from_slice(&data);
                    }
                }
                // The proxy went away, cleanly or not.
                Some(Err(_)) | None => return None,
            }
        }
    }))
}

/// Takes the first whole message out of the buffer, if there is one.
fn next_message(buffer: &mut BytesMut) -> Result<Option<Bytes>, Status> {
    let Some(header) = buffer.get(..5) else {
        return Ok(None);
    };
    if header[0] != 0 {
        return Err(Status::unimplemented(
            "compressed requests are not accepted",
        ));
    }
    let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if length > MAX_REQUEST {
        return Err(Status::resource_exhausted(format!(
            "a request of {length} bytes is over the limit of {MAX_REQUEST}"
        )));
    }
    if buffer.len() < 5 + length {
        return Ok(None);
    }
    let mut message = buffer.split_to(5 + length).freeze();
    if buffer.is_empty() {
        *buffer = BytesMut::new();
    }
    Ok(Some(message.split_off(5)))
}

/// The gRPC trailers that end a stream with `status`.
fn trailers(status: &Status) -> Frame<Bytes> {
    let mut headers = http::HeaderMap::new();
    // A status whose message cannot be a header value is sent without it.
    if status.add_header(&mut headers).is_err() {
        let _ = Status::new(status.code(), "").add_header(&mut headers);
    }
    Frame::trailers(headers)
}

/// Responses as a gRPC body: one frame per message, then the trailers.
fn framed(responses: ReceiverStream<Result<Encoded, Status>>) -> Body {
    let frames = futures::stream::unfold(Some(responses), |state| async move {
        let mut responses = state?;
        let (frames, rest) = match responses.next().await {
            // A message's chunks (some shared with other streams) go out as
            // consecutive data frames: gRPC framing does not care where
            // HTTP/2 frames split a message.
            Some(Ok(response)) => (
                response.chunks.into_iter().map(Frame::data).collect(),
                Some(responses),
            ),
            Some(Err(status)) => (vec![trailers(&status)], None),
            None => (vec![trailers(&Status::ok(""))], None),
        };
        Some((
            futures::stream::iter(frames.into_iter().map(Ok::<_, Infallible>)),
            rest,
        ))
    })
    .flatten();
    Body::new(StreamBody::new(frames))
}
