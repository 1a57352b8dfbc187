//! Which certificates a configuration needs: one per node agent and one per server, each for
//! the names its node is reached by (`localhost`, `127.0.0.1` and the node's `host`). The files
//! themselves are keel-tls's (`secrets/tls/`); the profile makes them at creation, and a
//! profile from before certificates gets them when its node agent starts (`ensure_certificates`).

use keel_core::layout::NODE_AGENT;
use keel_tls::{Identity, Pki};

use crate::error::Result;
use crate::model::Config;
use crate::profile::Profile;

/// The certificates `cfg` needs, node by node: the node agent, then each server.
pub fn identities(cfg: &Config) -> Vec<Identity> {
    let mut out = Vec::new();
    for node in &cfg.nodes {
        let mut hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        if !hosts.contains(&node.host) {
            hosts.push(node.host.clone());
        }
        let id = |process: &str| Identity {
            node: node.name.clone(),
            process: process.to_string(),
            hosts: hosts.clone(),
        };
        out.push(id(NODE_AGENT));
        for s in &node.servers {
            out.push(id(&s.name));
        }
    }
    out
}

impl Profile {
    /// The profile's certificates.
    pub fn pki(&self) -> Pki {
        Pki::at(self.layout().tls_dir())
    }

    /// Makes the CA and the certificates `cfg` needs that are missing; returns their names.
    pub fn ensure_certificates(&self, cfg: &Config) -> Result<Vec<String>> {
        Ok(self
            .pki()
            .ensure(&cfg.cell.name, &identities(cfg), keel_core::unix_s())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::CreateOptions;

    #[test]
    fn a_new_profile_has_a_ca_and_a_certificate_per_process() {
        let dir = tempfile::tempdir().unwrap();
        let p = Profile::create(&dir.path().join("p"), &CreateOptions::default()).unwrap();
        let names: Vec<String> = p
            .pki()
            .list()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["ca", "node01.nodeagent", "node01.server1"]);
        let cfg = p.master().load().unwrap();
        assert!(p.ensure_certificates(&cfg).unwrap().is_empty());
        // A profile from before certificates gets them.
        std::fs::remove_dir_all(p.layout().tls_dir()).unwrap();
        assert_eq!(
            p.ensure_certificates(&cfg).unwrap(),
            ["ca", "node01.nodeagent", "node01.server1"]
        );
    }
}
