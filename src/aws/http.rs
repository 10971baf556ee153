//! The one HTTP client every SDK client of a kiln process shares.
//!
//! Left to itself each SDK client (EC2, SSM, S3, ... and each region's copy)
//! builds its own default HTTPS client, with its own connection pool, and parses
//! the system root certificates (read from disk once per process) into a rustls
//! trust store twice: once while the client is constructed, again for its first
//! request (see `HyperClient::validate_base_client_config`). A cache-hit bake
//! makes two calls through two clients, so it paid for that four times and
//! opened a second connection to the same endpoint. Sharing one client through
//! the `SdkConfig` builds one connector and reuses the kept-alive connection.
//!
//! The TLS side is also built only when a request is made over HTTPS: against a
//! local emulator (`endpoint_url = "http://..."`) no certificate is ever read;
//! against AWS the first call pays for it as before. Connectors are the SDK's own
//! (aws-smithy-http-client, rustls with aws-lc, proxy settings from the
//! environment), so requests go out exactly as with the SDK's default client.

use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
use aws_smithy_http_client::{Builder, ConnectorBuilder};
use aws_smithy_runtime_api::client::connector_metadata::ConnectorMetadata;
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;

/// A client whose connectors send `http://` requests over plain TCP and build
/// the TLS connector on the first `https://` request.
#[derive(Debug)]
struct Client {
    plain: SharedHttpClient,
    tls: SharedHttpClient,
}

/// The HTTP client to put in the `SdkConfig`.
pub fn shared_client() -> SharedHttpClient {
    SharedHttpClient::new(Client {
        plain: Builder::new().build_with_connector_fn(|settings, components| {
            connector_builder(settings, components).build_http()
        }),
        tls: Builder::new().build_with_connector_fn(|settings, components| {
            // What aws-smithy-runtime's default HTTPS client builds.
            connector_builder(settings, components)
                .tls_provider(Provider::Rustls(CryptoMode::AwsLc))
                .build()
        }),
    })
}

fn connector_builder(
    settings: Option<&HttpConnectorSettings>,
    components: Option<&RuntimeComponents>,
) -> ConnectorBuilder {
    let mut b = ConnectorBuilder::default();
    b.set_connector_settings(settings.cloned());
    if let Some(c) = components {
        b.set_sleep_impl(c.sleep_impl());
    }
    b.set_proxy_config(Some(ProxyConfig::from_env()));
    b
}

impl HttpClient for Client {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        // Both inner clients cache their connectors per settings, so this is cheap
        // on every call after the first.
        SharedHttpConnector::new(Connector {
            plain: self.plain.http_connector(settings, components),
            tls: self.tls.clone(),
            settings: settings.clone(),
            components: components.clone(),
        })
    }

    // No `validate_base_client_config`: the SDK's client builds (and drops) a TLS
    // connector there, reading every root certificate each time a service client
    // is constructed, only to have certificate errors show up early.

    /// Reported in the user agent, as the SDK's default client does.
    fn connector_metadata(&self) -> Option<ConnectorMetadata> {
        self.plain.connector_metadata()
    }
}

#[derive(Debug)]
struct Connector {
    plain: SharedHttpConnector,
    tls: SharedHttpClient,
    settings: HttpConnectorSettings,
    components: RuntimeComponents,
}

impl HttpConnector for Connector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        if is_plain_http(request.uri()) {
            self.plain.call(request)
        } else {
            self.tls
                .http_connector(&self.settings, &self.components)
                .call(request)
        }
    }
}

/// Only an explicit `http://` URL goes without TLS.
fn is_plain_http(uri: &str) -> bool {
    uri.get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
}

#[cfg(test)]
mod tests {
    use super::is_plain_http;

    #[test]
    fn only_http_urls_skip_tls() {
        assert!(is_plain_http("http://127.0.0.1:5000/"));
        assert!(is_plain_http("HTTP://localhost/"));
        assert!(!is_plain_http("https://ec2.us-east-1.amazonaws.com/"));
        assert!(!is_plain_http("http:/"));
        assert!(!is_plain_http(""));
    }
}
