//! Edits of a configuration: what the CLI and the admin objects change, one object at a time.
//! Each edit refuses what would break a rule it can see; `Config::validate` checks the whole.

use crate::error::{ConfigError, Result};
use crate::fsx::natural_cmp;
use crate::paths::{rel_app, rel_datasource};

use super::types::*;
use super::validate::{check_datasource, destination_name_problem, name_problem};

pub(crate) fn bad_name(what: &'static str, name: &str) -> Result<()> {
    match name_problem(name) {
        None if what == "server" && name == keel_core::layout::NODE_AGENT => {
            Err(ConfigError::BadName {
                what,
                name: name.into(),
                problem: "it is reserved for the node agent".into(),
            })
        }
        None => Ok(()),
        Some(problem) => Err(ConfigError::BadName {
            what,
            name: name.into(),
            problem,
        }),
    }
}

impl Config {
    /// Every port the cell uses, highest last; ports are allocated above the highest.
    pub(crate) fn max_port(&self) -> u16 {
        let mut max = 0u16;
        for n in &self.nodes {
            max = max.max(n.admin_port);
            for s in &n.servers {
                max = max.max(s.admin_port).max(s.bus_port);
            }
        }
        max
    }

    /// Adds a server to `node` with the next two ports above the highest one in the cell, so
    /// ports never collide and stay in creation order; the monitor policy is the default.
    pub fn add_server(&mut self, node: &str, server: &str) -> Result<&ServerCfg> {
        bad_name("server", server)?;
        if let Some((n, _)) = self.find_server(server) {
            return Err(ConfigError::Duplicate {
                what: "server",
                name: server.into(),
                place: format!(" on node {}", n.name),
            });
        }
        let highest = self.max_port();
        let admin_port = highest.checked_add(1).filter(|p| *p >= MIN_PORT);
        let bus_port = highest.checked_add(2).filter(|p| *p >= MIN_PORT);
        let (Some(admin_port), Some(bus_port)) = (admin_port, bus_port) else {
            return Err(ConfigError::PortsExhausted {
                server: server.into(),
                highest,
            });
        };
        let known: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        let Some(n) = self.nodes.iter_mut().find(|n| n.name == node) else {
            return Err(ConfigError::UnknownNode {
                node: node.into(),
                known,
            });
        };
        let at = n
            .servers
            .partition_point(|s| natural_cmp(&s.name, server).is_lt());
        n.servers.insert(
            at,
            ServerCfg {
                name: server.into(),
                admin_port,
                bus_port,
                monitor: MonitorPolicy::default(),
            },
        );
        assert!(admin_port < bus_port);
        Ok(&n.servers[at])
    }

    /// Makes `server` a member of `bus` (creating the bus if needed) with a new messaging engine:
    /// name `<node>.<server>-<bus>`, a fresh UUID, starting with its server.
    pub fn add_bus_member(&mut self, bus: &str, server: &str) -> Result<&BusMember> {
        bad_name("bus", bus)?;
        let Some((node, _)) = self.find_server(server) else {
            let known = self
                .nodes
                .iter()
                .flat_map(|n| n.servers.iter().map(|s| s.name.clone()))
                .collect();
            return Err(ConfigError::UnknownServer {
                server: server.into(),
                known,
            });
        };
        let node = node.name.clone();
        let at = match self.buses.iter().position(|b| b.name == bus) {
            Some(i) => i,
            None => {
                let at = self
                    .buses
                    .partition_point(|b| natural_cmp(&b.name, bus).is_lt());
                self.buses.insert(
                    at,
                    BusCfg {
                        name: bus.into(),
                        members: Vec::new(),
                        destinations: Vec::new(),
                        allow_anonymous: false,
                        anonymous_user: None,
                        max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
                        duplicate_window_hours: DEFAULT_DUPLICATE_WINDOW_HOURS,
                    },
                );
                at
            }
        };
        let b = &mut self.buses[at];
        if let Some(m) = b.members.iter().find(|m| m.server == server) {
            return Err(ConfigError::AlreadyMember {
                bus: bus.into(),
                server: server.into(),
                me: m.me.clone(),
            });
        }
        b.members.push(BusMember {
            me: me_name(&node, server, bus),
            node,
            server: server.into(),
            uuid: uuid::Uuid::new_v4().to_string(),
            initial_state: InitialState::Started,
            store_url: None,
        });
        Ok(b.members.last().expect("just pushed"))
    }

    /// Puts an ME's data store in PostgreSQL (`Some(url)`) or back in the embedded SQLite file
    /// (`None`). The data does not move: take a backup first and restore into the new store.
    pub fn set_store_url(&mut self, me: &str, url: Option<String>) -> Result<&BusMember> {
        let known: Vec<String> = self
            .buses
            .iter()
            .flat_map(|b| b.members.iter().map(|m| m.me.clone()))
            .collect();
        let m = self
            .buses
            .iter_mut()
            .flat_map(|b| b.members.iter_mut())
            .find(|m| m.me == me)
            .ok_or_else(|| ConfigError::UnknownMe {
                me: me.to_string(),
                place: String::new(),
                known,
            })?;
        m.store_url = url;
        Ok(m)
    }

    /// Sets whether the messaging engine `me` (searched on every bus) starts with its server.
    pub fn set_initial_state(&mut self, me: &str, state: InitialState) -> Result<&BusMember> {
        let Some((bi, mi)) = self
            .buses
            .iter()
            .enumerate()
            .find_map(|(bi, b)| b.members.iter().position(|m| m.me == me).map(|mi| (bi, mi)))
        else {
            let known = self
                .buses
                .iter()
                .flat_map(|b| b.members.iter().map(|m| m.me.clone()))
                .collect();
            return Err(ConfigError::UnknownMe {
                me: me.into(),
                place: String::new(),
                known,
            });
        };
        let m = &mut self.buses[bi].members[mi];
        m.initial_state = state;
        Ok(m)
    }

    /// Adds a destination to `bus`, every optional setting at its default. `me` `None` means
    /// the bus's only member's ME; `reliability` `None` means assured_persistent. The default
    /// reliability is reliable_persistent, capped at `reliability`.
    pub fn add_destination(
        &mut self,
        bus: &str,
        name: &str,
        kind: DestinationKind,
        me: Option<&str>,
        reliability: Option<Reliability>,
    ) -> Result<&DestinationCfg> {
        if let Some(problem) = destination_name_problem(name) {
            return Err(ConfigError::BadDestinationName {
                name: name.into(),
                problem,
            });
        }
        let Some(at) = self.buses.iter().position(|b| b.name == bus) else {
            return Err(ConfigError::UnknownBus {
                bus: bus.into(),
                known: self.buses.iter().map(|b| b.name.clone()).collect(),
            });
        };
        let b = &mut self.buses[at];
        let known: Vec<String> = b.members.iter().map(|m| m.me.clone()).collect();
        let me = match me {
            Some(me) if known.iter().any(|k| k == me) => me.to_string(),
            Some(me) => {
                return Err(ConfigError::UnknownMe {
                    me: me.into(),
                    place: format!(" on bus {bus}"),
                    known,
                })
            }
            None if known.len() == 1 => known[0].clone(),
            None => {
                return Err(ConfigError::MeRequired {
                    bus: bus.into(),
                    known,
                })
            }
        };
        if b.destinations.iter().any(|d| d.name == name) {
            return Err(ConfigError::Duplicate {
                what: "destination",
                name: name.into(),
                place: format!(" on bus {bus}"),
            });
        }
        let mut d = DestinationCfg::new(name, kind, &me);
        if let Some(r) = reliability {
            d.reliability = r;
            d.default_reliability = DestinationCfg::default_reliability_for(r);
        }
        let at = b
            .destinations
            .partition_point(|x| natural_cmp(&x.name, name).is_lt());
        b.destinations.insert(at, d);
        Ok(&b.destinations[at])
    }

    /// Removes destination `name` from `bus`. Whether its messages allow it is the caller's
    /// question (the model does not see data stores); an application or exception destination
    /// that still names it fails validation at save.
    pub fn remove_destination(&mut self, bus: &str, name: &str) -> Result<DestinationCfg> {
        let Some(b) = self.buses.iter_mut().find(|b| b.name == bus) else {
            return Err(ConfigError::UnknownBus {
                bus: bus.into(),
                known: self.buses.iter().map(|b| b.name.clone()).collect(),
            });
        };
        match b.destinations.iter().position(|d| d.name == name) {
            Some(at) => Ok(b.destinations.remove(at)),
            None => Err(ConfigError::UnknownDestination {
                bus: bus.into(),
                name: name.into(),
                known: b.destinations.iter().map(|d| d.name.clone()).collect(),
            }),
        }
    }

    /// Adds a data source after checking it (name, URL without password, pool size).
    pub fn add_datasource(&mut self, d: DataSourceCfg) -> Result<&DataSourceCfg> {
        bad_name("data source", &d.name)?;
        if self.datasource(&d.name).is_some() {
            return Err(ConfigError::Duplicate {
                what: "data source",
                name: d.name,
                place: String::new(),
            });
        }
        check_datasource(&rel_datasource(&d.name), &d)?;
        let at = self
            .datasources
            .partition_point(|x| natural_cmp(&x.name, &d.name).is_lt());
        self.datasources.insert(at, d);
        Ok(&self.datasources[at])
    }

    /// Removes a data source; refused while an sql application uses it (the error names them).
    pub fn remove_datasource(&mut self, name: &str) -> Result<DataSourceCfg> {
        let Some(at) = self.datasources.iter().position(|d| d.name == name) else {
            return Err(ConfigError::UnknownDataSource {
                name: name.into(),
                known: self.datasources.iter().map(|d| d.name.clone()).collect(),
            });
        };
        let users: Vec<String> = self
            .apps
            .iter()
            .filter(|a| a.kind == AppKind::Sql && a.datasource.as_deref() == Some(name))
            .map(|a| a.name.clone())
            .collect();
        if !users.is_empty() {
            return Err(ConfigError::DataSourceInUse {
                name: name.into(),
                apps: users,
            });
        }
        Ok(self.datasources.remove(at))
    }

    /// Adds an application after checking it against the rest of the configuration (server,
    /// bus membership, the queue it receives from, what its kind needs).
    pub fn add_app(&mut self, a: AppCfg) -> Result<&AppCfg> {
        bad_name("application", &a.name)?;
        if let Some(old) = self.app(&a.name) {
            return Err(ConfigError::Duplicate {
                what: "message-driven application",
                name: a.name,
                place: format!(" (on server {})", old.server),
            });
        }
        if self.find_server(&a.server).is_none() {
            return Err(ConfigError::UnknownServer {
                server: a.server,
                known: self.server_names(),
            });
        }
        if self.bus(&a.bus).is_none() {
            return Err(ConfigError::UnknownBus {
                bus: a.bus,
                known: self.buses.iter().map(|b| b.name.clone()).collect(),
            });
        }
        if let Some(ds) = a.datasource.as_deref().filter(|_| a.kind == AppKind::Sql) {
            if self.datasource(ds).is_none() {
                return Err(ConfigError::UnknownDataSource {
                    name: ds.into(),
                    known: self.datasources.iter().map(|d| d.name.clone()).collect(),
                });
            }
        }
        self.check_app(&rel_app(&a.name), &a)?;
        let at = self
            .apps
            .partition_point(|x| natural_cmp(&x.name, &a.name).is_lt());
        self.apps.insert(at, a);
        Ok(&self.apps[at])
    }

    pub fn remove_app(&mut self, name: &str) -> Result<AppCfg> {
        match self.apps.iter().position(|a| a.name == name) {
            Some(at) => Ok(self.apps.remove(at)),
            None => Err(ConfigError::UnknownApp {
                name: name.into(),
                known: self.apps.iter().map(|a| a.name.clone()).collect(),
            }),
        }
    }
}
