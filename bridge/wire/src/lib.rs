//! XMTP v3 wire types.
//!
//! Contract: this crate is plain data. It holds the protobuf messages of the XMTP packages
//! Gatehouse speaks (generated from `proto/`, which follows the wire reference for
//! xmtp/proto revision `602f7056`) and, behind the `grpc` feature, the tonic stubs of
//! `xmtp.mls.api.v1.MlsApi` and `xmtp.identity.api.v1.IdentityApi`. No other crate defines
//! protobuf types; domain types live in `gatehouse-protocol`, which converts at its boundary.
//!
//! Legacy v2 types that XMTP v3 still names (`xmtp.message_contents.SignedPublicKey`,
//! `xmtp.message_contents.Signature`) are carried as opaque `bytes`: the wire form of an
//! embedded message and of a bytes field is the same, so nothing is lost when re-encoding.

#![forbid(unsafe_code)]
#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub use prost;
pub use prost::Message;

/// Includes one generated package: with gRPC stubs when the `grpc` feature is on.
macro_rules! generated {
    ($file:literal) => {
        #[cfg(feature = "grpc")]
        include!(concat!(env!("OUT_DIR"), "/grpc/", $file));
        #[cfg(not(feature = "grpc"))]
        include!(concat!(env!("OUT_DIR"), "/plain/", $file));
    };
}

/// `xmtp.*` packages.
pub mod xmtp {
    /// `xmtp.identity`
    pub mod identity {
        generated!("xmtp.identity.rs");
        /// `xmtp.identity.api.v1`
        pub mod api {
            pub mod v1 {
                generated!("xmtp.identity.api.v1.rs");
            }
        }
        /// `xmtp.identity.associations`
        pub mod associations {
            generated!("xmtp.identity.associations.rs");
        }
    }
    /// `xmtp.mls`
    pub mod mls {
        /// `xmtp.mls.api.v1`
        pub mod api {
            pub mod v1 {
                generated!("xmtp.mls.api.v1.rs");
            }
        }
        /// `xmtp.mls.message_contents`
        pub mod message_contents {
            generated!("xmtp.mls.message_contents.rs");
            /// `xmtp.mls.message_contents.content_types`
            pub mod content_types {
                generated!("xmtp.mls.message_contents.content_types.rs");
            }
        }
    }
    /// `xmtp.device_sync`
    pub mod device_sync {
        generated!("xmtp.device_sync.rs");
        pub mod consent_backup {
            generated!("xmtp.device_sync.consent_backup.rs");
        }
        pub mod content {
            generated!("xmtp.device_sync.content.rs");
        }
    }
}

pub use xmtp::device_sync;
pub use xmtp::identity::api::v1 as identity_api;
pub use xmtp::identity::associations;
pub use xmtp::mls::api::v1 as mls_api;
pub use xmtp::mls::message_contents;
