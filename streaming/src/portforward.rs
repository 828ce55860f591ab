//! port-forward over SPDY (`portforward.k8s.io`): for each connection the client opens a pair
//! of streams with the same `requestID` and the pod's `port`, one `error` and one `data`. The
//! server connects to that port inside the pod's network namespace and copies bytes both ways
//! on the data stream; a failure is written as text to the error stream.

/// The sub-protocol.
pub const PROTOCOL: &str = "portforward.k8s.io";
/// Header: the pod port.
pub const PORT: &str = "port";
/// Header: pairs a data stream with its error stream.
pub const REQUEST_ID: &str = "requestID";
/// Stream type: bytes of the connection.
pub const DATA: &str = "data";
/// Stream type: errors, as text.
pub const ERROR: &str = "error";
