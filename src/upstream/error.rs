//! What can go wrong with an upstream exchange, in the upstream's own words.
//!
//! Invariant: each failure says once whether it is worth retrying ([`UpstreamError::retryable`])
//! and whether it is a sign of an unhealthy upstream ([`UpstreamError::is_failure`]), and reaches
//! the client only through the one `From<UpstreamError> for GatewayError`.

use std::time::Duration;

use crate::error::GatewayError;
use crate::outcome::UpstreamOutcome;

/// Why an upstream exchange (or the attempt at one) gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be opened (DNS, TCP, TLS), or none within `upstream.connect_timeout`.
    #[error("upstream connect failed ({})", .cause.as_str())]
    Connect { cause: ConnectCause },
    /// No whole answer before the fetch's deadline (`upstream.total_timeout`).
    #[error("upstream did not answer in time")]
    Timeout,
    /// The body is longer than `upstream.max_body_bytes`.
    #[error("upstream body exceeds upstream.max_body_bytes")]
    BodyTooLarge,
    /// The exchange broke off: a reset, a truncated body, an HTTP protocol error.
    #[error("upstream exchange broke off")]
    Protocol,
    /// An answer the gateway cannot pass on as sent: an interim (1xx) status as the final one,
    /// or a content coding it did not ask for.
    #[error("upstream answer cannot be passed on as sent")]
    BadResponse,
    /// The request URL could not be built from the base URL (validation makes this unreachable).
    #[error("upstream request URL is invalid")]
    Url,
    /// The app's circuit breaker refused the attempt; it may be tried again after this long.
    #[error("upstream circuit is open")]
    CircuitOpen { retry_after: Duration },
    /// No upstream slot came free within `upstream.queue_timeout`.
    #[error("no upstream slot free in time")]
    Overloaded,
}

impl UpstreamError {
    /// Worth another attempt: the exchange failed in a way the next one may not.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. }
                | UpstreamError::Timeout
                | UpstreamError::Protocol
                | UpstreamError::BadResponse
        )
    }

    /// A sign of an unhealthy upstream, counted by its circuit breaker: connection failures and
    /// timeouts. Faults of one run's answer (a body over the cap, a broken body) are not, so they
    /// never stop the app's other runs; nor are the gateway's own refusals.
    pub fn is_failure(&self) -> bool {
        matches!(self, UpstreamError::Connect { .. } | UpstreamError::Timeout)
    }

    /// The `outcome` label of the attempt that ended so.
    pub fn outcome(&self) -> UpstreamOutcome {
        match self {
            UpstreamError::Timeout
            | UpstreamError::Connect {
                cause: ConnectCause::Timeout,
            } => UpstreamOutcome::Timeout,
            UpstreamError::Connect { .. } => UpstreamOutcome::ConnectError,
            UpstreamError::BodyTooLarge => UpstreamOutcome::BodyTooLarge,
            UpstreamError::CircuitOpen { .. } => UpstreamOutcome::CircuitOpen,
            UpstreamError::Protocol
            | UpstreamError::BadResponse
            | UpstreamError::Url
            | UpstreamError::Overloaded => UpstreamOutcome::BadResponse,
        }
    }
}

/// Why a connection to the upstream could not be opened, as one word for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectCause {
    /// The host name did not resolve.
    Dns,
    /// Nothing listens on the port.
    Refused,
    /// The connection (TCP or TLS) was not up within `upstream.connect_timeout`.
    Timeout,
    /// No route to the host or its network.
    Unreachable,
    /// The peer reset or dropped the connection while it was being set up.
    Reset,
    /// The upstream's certificate was refused (unknown issuer, expired, wrong name, …).
    TlsCertificate,
    /// The upstream ended the handshake with a TLS alert.
    TlsAlert,
    /// The peer does not speak TLS (an `https://` URL on a plain-HTTP port, say) or broke the
    /// handshake.
    TlsProtocol,
    /// No TLS version, cipher suite or key exchange in common.
    TlsIncompatible,
    /// Another TLS failure.
    TlsOther,
    /// None of the above.
    Other,
}

impl ConnectCause {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectCause::Dns => "dns",
            ConnectCause::Refused => "refused",
            ConnectCause::Timeout => "timeout",
            ConnectCause::Unreachable => "unreachable",
            ConnectCause::Reset => "reset",
            ConnectCause::TlsCertificate => "tls_certificate",
            ConnectCause::TlsAlert => "tls_alert",
            ConnectCause::TlsProtocol => "tls_protocol",
            ConnectCause::TlsIncompatible => "tls_incompatible",
            ConnectCause::TlsOther => "tls_other",
            ConnectCause::Other => "other",
        }
    }

    pub(super) fn of_tls(e: &rustls::Error) -> ConnectCause {
        use rustls::Error as E;
        match e {
            E::InvalidCertificate(_) | E::InvalidCertRevocationList(_) => {
                ConnectCause::TlsCertificate
            }
            E::AlertReceived(_) => ConnectCause::TlsAlert,
            E::InvalidMessage(_)
            | E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. }
            | E::PeerMisbehaved(_)
            | E::DecryptError => ConnectCause::TlsProtocol,
            E::PeerIncompatible(_) => ConnectCause::TlsIncompatible,
            _ => ConnectCause::TlsOther,
        }
    }
}

impl From<UpstreamError> for GatewayError {
    fn from(e: UpstreamError) -> GatewayError {
        match e {
            UpstreamError::Connect {
                cause: ConnectCause::Timeout,
            }
            | UpstreamError::Timeout => GatewayError::UpstreamTimeout,
            UpstreamError::Connect { .. } => GatewayError::UpstreamConnect,
            UpstreamError::BodyTooLarge => GatewayError::UpstreamBodyTooLarge,
            UpstreamError::Protocol | UpstreamError::BadResponse => GatewayError::UpstreamProtocol,
            UpstreamError::Url => GatewayError::Internal,
            UpstreamError::CircuitOpen { retry_after } => GatewayError::CircuitOpen {
                retry_after_secs: retry_after.as_secs_f64().ceil().max(1.0) as u64,
            },
            UpstreamError::Overloaded => GatewayError::Overloaded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_timeout_is_a_timeout_to_the_client_and_in_metrics() {
        let e = UpstreamError::Connect {
            cause: ConnectCause::Timeout,
        };
        assert_eq!(GatewayError::from(e), GatewayError::UpstreamTimeout);
        assert_eq!(e.outcome(), UpstreamOutcome::Timeout);
        let refused = UpstreamError::Connect {
            cause: ConnectCause::Refused,
        };
        assert_eq!(GatewayError::from(refused), GatewayError::UpstreamConnect);
        assert_eq!(refused.outcome(), UpstreamOutcome::ConnectError);
    }

    #[test]
    fn a_refusal_carries_its_wait_in_whole_seconds_at_least_one() {
        let open = |ms| UpstreamError::CircuitOpen {
            retry_after: Duration::from_millis(ms),
        };
        for (ms, secs) in [(1, 1), (1000, 1), (1001, 2), (0, 1)] {
            assert_eq!(
                GatewayError::from(open(ms)),
                GatewayError::CircuitOpen {
                    retry_after_secs: secs
                },
                "{ms} ms"
            );
        }
        assert_eq!(
            GatewayError::from(UpstreamError::Overloaded),
            GatewayError::Overloaded
        );
        assert!(!UpstreamError::Overloaded.retryable());
        assert!(!open(5).retryable() && !open(5).is_failure());
    }
}
