//! The Kubernetes streaming protocols, shared by the runtime shim's streaming server, the
//! kubelet's API and the tests' clients: SPDY/3.1 sessions ([`spdy`]), the HTTP/1.1 upgrade that
//! starts them ([`upgrade`]), and what exec/attach (`remotecommand`) and port-forward put on
//! their streams ([`remotecommand`], [`portforward`]), and exec/attach over WebSocket
//! ([`websocket`]).

pub mod portforward;
pub mod remotecommand;
pub mod spdy;
pub mod upgrade;
pub mod websocket;
