//! Closed sets of option values as clap `ValueEnum`s: a value outside the set is a usage error
//! (exit 2, with the accepted values in the sentence) caught before any command runs, instead
//! of a failure (exit 1) found halfway through one. Spellings are the ones the configuration and
//! the docs use (`assured_persistent`, not clap's default `assured-persistent`).

use clap::ValueEnum;

/// `--type` of a destination.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestinationType {
    /// Point to point: each message goes to one consumer.
    Queue,
    /// Topic space: each message goes to every durable subscription.
    Topic,
}

impl From<DestinationType> for keel_config::DestinationKind {
    fn from(t: DestinationType) -> Self {
        match t {
            DestinationType::Queue => keel_config::DestinationKind::Queue,
            DestinationType::Topic => keel_config::DestinationKind::Topic,
        }
    }
}

/// `--reliability`, weakest first.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
#[value(rename_all = "snake_case")]
pub enum Reliability {
    /// Not persisted; may be lost at any time.
    BestEffort,
    /// Not persisted; lost when its messaging engine stops.
    Express,
    /// Persisted in batches: a crash may lose the last few milliseconds.
    ReliablePersistent,
    /// Acknowledged only once durable; exactly once across engines.
    AssuredPersistent,
}

impl From<Reliability> for keel_config::Reliability {
    fn from(r: Reliability) -> Self {
        match r {
            Reliability::BestEffort => keel_config::Reliability::BestEffort,
            Reliability::Express => keel_config::Reliability::Express,
            Reliability::ReliablePersistent => keel_config::Reliability::ReliablePersistent,
            Reliability::AssuredPersistent => keel_config::Reliability::AssuredPersistent,
        }
    }
}

/// A log level for `logs view --min-level/--max-level`. The aliases are the names the log
/// repository has always accepted (`repo::level_of`), so no script's spelling stops working.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    #[value(alias = "e", alias = "severe")]
    Error,
    #[value(alias = "warning", alias = "w")]
    Warn,
    #[value(alias = "i")]
    Info,
    #[value(alias = "d", alias = "fine")]
    Debug,
    #[value(alias = "t", alias = "finest")]
    Trace,
}

impl Level {
    /// The repository's number for the level (1 = error .. 5 = trace).
    pub fn number(self) -> u8 {
        match self {
            Level::Error => 1,
            Level::Warn => 2,
            Level::Info => 3,
            Level::Debug => 4,
            Level::Trace => 5,
        }
    }
}

/// `logs view --format`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Like SystemOut.log.
    Text,
    /// One JSON object per line.
    Json,
    /// With process and fields.
    Advanced,
}

/// Whether an engine starts with its server.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitialState {
    Started,
    Stopped,
}

impl From<InitialState> for keel_config::InitialState {
    fn from(s: InitialState) -> Self {
        match s {
            InitialState::Started => keel_config::InitialState::Started,
            InitialState::Stopped => keel_config::InitialState::Stopped,
        }
    }
}

/// `datasource create --kind`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataSourceKind {
    /// PostgreSQL.
    Postgres,
    /// MariaDB, also MySQL.
    Mariadb,
}

impl From<DataSourceKind> for keel_config::DataSourceKind {
    fn from(k: DataSourceKind) -> Self {
        match k {
            DataSourceKind::Postgres => keel_config::DataSourceKind::Postgres,
            DataSourceKind::Mariadb => keel_config::DataSourceKind::MariaDb,
        }
    }
}

/// `app create --kind`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppKind {
    /// Forward each message to --to.
    Forward,
    /// Run --statement on --datasource for each message.
    Sql,
    /// Run the Rhai --script's `on_message(msg)` for each message.
    Script,
}

impl From<AppKind> for keel_config::AppKind {
    fn from(k: AppKind) -> Self {
        match k {
            AppKind::Forward => keel_config::AppKind::Forward,
            AppKind::Sql => keel_config::AppKind::Sql,
            AppKind::Script => keel_config::AppKind::Script,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;

    /// The CLI's spellings are the configuration's: a value the CLI accepts parses in the model.
    #[test]
    fn spellings_match_the_configuration() {
        for r in super::Reliability::value_variants() {
            let name = r.to_possible_value().unwrap().get_name().to_string();
            let model: keel_config::Reliability = name.parse().unwrap();
            assert_eq!(model, keel_config::Reliability::from(*r));
        }
        for t in super::DestinationType::value_variants() {
            let name = t.to_possible_value().unwrap().get_name().to_string();
            let model: keel_config::DestinationKind = name.parse().unwrap();
            assert_eq!(model, keel_config::DestinationKind::from(*t));
        }
        for k in super::DataSourceKind::value_variants() {
            let name = k.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(
                keel_config::DataSourceKind::parse(&name),
                Some(keel_config::DataSourceKind::from(*k))
            );
        }
        for k in super::AppKind::value_variants() {
            let name = k.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(
                keel_config::AppKind::parse(&name),
                Some(keel_config::AppKind::from(*k))
            );
        }
    }

    /// Every name and alias a level accepts means the same level in the log repository.
    #[test]
    fn level_names_match_the_log_repository() {
        for l in super::Level::value_variants() {
            let pv = l.to_possible_value().unwrap();
            let mut names = vec![pv.get_name().to_string()];
            names.extend(pv.get_name_and_aliases().map(str::to_string));
            for name in names {
                assert_eq!(keel_logs::repo::level_of(&name), Some(l.number()), "{name}");
            }
        }
    }
}
