//! Which concrete addresses a version's configured endpoints stand for. An endpoint
//! whose host is an IP address is itself; one whose host is a name (a Kubernetes
//! headless Service, a DNS round robin) stands for every address the name resolves
//! to, looked up again every few seconds so replicas join and leave.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

/// A configured endpoint, split for resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configured {
    /// `http`, or `https` (TLS to the worker).
    scheme: String,
    /// The host as written (a name or an IP address).
    host: String,
    port: u16,
}

impl Configured {
    /// Parses `http://host:port` or `https://host:port` (a missing port is 80 or 443,
    /// as for any URL).
    pub fn parse(endpoint: &str) -> Result<Configured, String> {
        let uri: tonic::codegen::http::Uri = endpoint
            .parse()
            .map_err(|e| format!("\"{endpoint}\" is not a URL: {e}"))?;
        let (scheme, default_port) = match uri.scheme_str() {
            Some("http") => ("http", 80),
            Some("https") => ("https", 443),
            _ => {
                return Err(format!(
                    "\"{endpoint}\" must start with http:// or https://"
                ));
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("\"{endpoint}\" names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(default_port);
        Ok(Configured {
            scheme: scheme.to_owned(),
            host: host.to_owned(),
            port,
        })
    }

    /// Whether calls to it use TLS.
    pub fn is_tls(&self) -> bool {
        self.scheme == "https"
    }

    /// The host as written: the name a worker's certificate must carry.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The endpoint itself when its host is an IP address; `None` when it is a name.
    pub fn literal(&self) -> Option<String> {
        let ip: IpAddr = self.host.parse().ok()?;
        Some(self.url(SocketAddr::new(ip, self.port)))
    }

    /// The endpoint at one resolved `address`.
    pub fn url(&self, address: SocketAddr) -> String {
        format!("{}://{address}", self.scheme)
    }

    /// Every address the endpoint stands for now (empty when the name does not
    /// resolve: the caller keeps what it had).
    pub async fn resolve(&self) -> Result<BTreeSet<String>, std::io::Error> {
        if let Some(literal) = self.literal() {
            return Ok(BTreeSet::from([literal]));
        }
        let found = tokio::net::lookup_host((self.host.as_str(), self.port)).await?;
        Ok(found.map(|address| self.url(address)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_endpoints_are_themselves_and_names_need_resolving() {
        let ip = Configured::parse("http://127.0.0.1:9001").expect("valid");
        assert_eq!(ip.literal().as_deref(), Some("http://127.0.0.1:9001"));
        let v6 = Configured::parse("http://[::1]:9001").expect("valid");
        assert_eq!(v6.literal().as_deref(), Some("http://[::1]:9001"));
        let name = Configured::parse("http://workers.ns.svc:9001").expect("valid");
        assert_eq!(name.literal(), None);
        assert_eq!(
            name.url("10.0.0.7:9001".parse().expect("address")),
            "http://10.0.0.7:9001"
        );
        assert!(Configured::parse("ftp://x:1").is_err());
        assert!(Configured::parse("not a url").is_err());
    }

    #[tokio::test]
    async fn a_name_resolves_to_its_addresses() {
        let localhost = Configured::parse("http://localhost:9001").expect("valid");
        let found = localhost.resolve().await.expect("localhost resolves");
        assert!(
            found.iter().all(|e| e.ends_with(":9001")) && !found.is_empty(),
            "{found:?}"
        );
    }
}
