//! Routing: the tables and counters a pipeline declares, and the checking of what
//! plugins send to them (`row` and `count` outputs).
//!
//! A plugin's row arrives as JSON text; it is checked against the table's declared
//! columns here, once, and encoded by the ClickHouse sink's table
//! ([`crate::sinks::clickhouse::Table::encode`]), so the sink only concatenates bytes.
//! A bad row fails its event (dead letter naming the table and column), never the
//! batch.

use std::collections::HashMap;
use std::sync::Arc;

use super::config::PipelineConfig;
use crate::model::{Counter, MAX_COUNTER_KEY, PluginOutput, Target};
use crate::sinks::clickhouse::Table;

/// A checked row: the table's index in [`Routes::tables`] and the declared columns
/// encoded in RowBinary.
#[derive(Debug, Clone)]
pub struct RowData {
    pub table: usize,
    pub data: Vec<u8>,
}

/// A checked increment: the counter's index in [`Routes::counters`].
#[derive(Debug, Clone)]
pub struct Increment {
    pub counter: usize,
    pub key: String,
    pub delta: i64,
}

/// What one event sends besides itself, accumulated over the chain.
#[derive(Debug, Clone, Default)]
pub struct Fanout {
    pub rows: Vec<RowData>,
    pub increments: Vec<Increment>,
    pub forwards: Vec<Target>,
}

/// Why a pipeline's declarations (tables, counters) are refused.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("{0}")]
    Table(String),
    #[error("table {0} is declared twice")]
    DuplicateTable(String),
    #[error("{0}")]
    Counter(String),
    #[error("counter {0} is declared twice")]
    DuplicateCounter(String),
}

/// Why a plugin's outputs are refused (the event goes to the dead letters with this
/// reason; none of the event's outputs is written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputError {
    #[error("forward to {0:?}, which is no webhook or topic sink of the pipeline")]
    UnknownTarget(String),
    #[error("row for table {0:?}, which the pipeline does not declare")]
    UnknownTable(String),
    #[error("{0}")]
    BadRow(String),
    #[error("count for counter {0:?}, which the pipeline does not declare")]
    UnknownCounter(String),
    #[error("count for counter {counter}: the key must be 1-{MAX_COUNTER_KEY} bytes, got {len}")]
    BadCounterKey { counter: String, len: usize },
}

/// The tables and counters of a pipeline.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    /// Shared with the ClickHouse sink that writes them.
    pub tables: Arc<[Table]>,
    /// Shared with the increments that name them, which may outlive a pipeline swap.
    pub counters: Vec<Arc<Counter>>,
    table_index: HashMap<String, usize>,
    counter_index: HashMap<String, usize>,
    targets: HashMap<String, Target>,
}

impl Routes {
    /// Checks the declarations of a pipeline.
    pub fn new(cfg: &PipelineConfig) -> Result<Self, RouteError> {
        let mut routes = Self::default();
        let mut tables = Vec::with_capacity(cfg.tables.len());
        for t in &cfg.tables {
            let table = Table::new(t).map_err(RouteError::Table)?;
            if routes
                .table_index
                .insert(table.name.clone(), tables.len())
                .is_some()
            {
                return Err(RouteError::DuplicateTable(table.name));
            }
            tables.push(table);
        }
        routes.tables = tables.into();
        for (i, w) in cfg.webhooks.iter().enumerate() {
            routes.targets.insert(w.name.clone(), Target::Webhook(i));
        }
        for (i, t) in cfg.topics.iter().enumerate() {
            routes.targets.insert(t.name.clone(), Target::Topic(i));
        }
        for c in &cfg.counters {
            let counter = c.declare().map_err(RouteError::Counter)?;
            if routes
                .counter_index
                .insert(counter.name.clone(), routes.counters.len())
                .is_some()
            {
                return Err(RouteError::DuplicateCounter(counter.name));
            }
            routes.counters.push(Arc::new(counter));
        }
        Ok(routes)
    }

    /// The counter named `name`, if declared.
    pub fn counter(&self, name: &str) -> Option<&Counter> {
        self.counter_index.get(name).map(|&i| &*self.counters[i])
    }

    /// Checks a plugin's outputs and adds them to `fanout`. On error nothing is added
    /// and the message names the output at fault.
    pub fn resolve(
        &self,
        outputs: Vec<PluginOutput>,
        fanout: &mut Fanout,
    ) -> Result<(), OutputError> {
        let mut rows = Vec::new();
        let mut increments = Vec::new();
        let mut forwards = Vec::new();
        for output in outputs {
            match output {
                PluginOutput::Forward(name) => {
                    let Some(&target) = self.targets.get(&name) else {
                        return Err(OutputError::UnknownTarget(name));
                    };
                    if !forwards.contains(&target) {
                        forwards.push(target);
                    }
                }
                PluginOutput::Row { table, columns } => {
                    let Some(&i) = self.table_index.get(&table) else {
                        return Err(OutputError::UnknownTable(table));
                    };
                    rows.push(RowData {
                        table: i,
                        data: self.tables[i]
                            .encode(&columns)
                            .map_err(OutputError::BadRow)?,
                    });
                }
                PluginOutput::Count {
                    counter,
                    key,
                    delta,
                } => {
                    let Some(&i) = self.counter_index.get(&counter) else {
                        return Err(OutputError::UnknownCounter(counter));
                    };
                    if key.is_empty() || key.len() > MAX_COUNTER_KEY {
                        let len = key.len();
                        return Err(OutputError::BadCounterKey { counter, len });
                    }
                    if delta != 0 {
                        increments.push(Increment {
                            counter: i,
                            key,
                            delta,
                        });
                    }
                }
            }
        }
        fanout.rows.append(&mut rows);
        fanout.increments.append(&mut increments);
        for t in forwards {
            if !fanout.forwards.contains(&t) {
                fanout.forwards.push(t);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(toml_text: &str) -> Result<Routes, RouteError> {
        let cfg: PipelineConfig = toml::from_str(toml_text).unwrap();
        Routes::new(&cfg)
    }

    fn views() -> Routes {
        routes(
            r#"
            [[table]]
            name = "profile_viewed"
            columns = ["profile_id String", "viewer Nullable(String)", "ms UInt16", "at DateTime", "day Date", "ok Bool", "score Float64", "delta Int8"]
            order_by = ["profile_id", "timestamp"]
            [[counter]]
            name = "profile_views"
            by_day = true
            "#,
        )
        .unwrap()
    }

    fn row(table: &str, columns: &str) -> PluginOutput {
        PluginOutput::Row {
            table: table.into(),
            columns: columns.into(),
        }
    }

    #[test]
    fn rows_are_encoded_in_rowbinary_in_declared_order() {
        let r = views();
        let mut f = Fanout::default();
        r.resolve(
            vec![row(
                "profile_viewed",
                r#"{"delta":-2,"profile_id":"p1","ms":513,"at":1000,"day":"1970-01-03","ok":true,"score":0.5}"#,
            )],
            &mut f,
        )
        .unwrap();
        let mut want = vec![2, b'p', b'1', 1, 0x01, 0x02, 1, 0, 0, 0, 2, 0, 1];
        want.extend_from_slice(&0.5f64.to_le_bytes());
        want.push(0xfe);
        assert_eq!(f.rows[0].data, want);
        assert_eq!(f.rows[0].table, 0);
    }

    #[test]
    fn bad_rows_name_the_table_and_column() {
        let r = views();
        let cases = [
            (
                r#"{"profile_id":1}"#,
                "column profile_id is String, got a number",
            ),
            (
                r#"{"profile_id":"p","ms":70000,"at":0,"day":"1970-01-01","ok":true,"score":1,"delta":0}"#,
                "UInt16; 70000 is out of range",
            ),
            (r#"{"profile_id":"p"}"#, "column ms is missing"),
            (r#"{"profile_id":"p","nope":1}"#, "has no column \"nope\""),
            ("[1]", "not a JSON object"),
            (
                r#"{"profile_id":"p","ms":1,"at":"yesterday","day":"1970-01-01","ok":true,"score":1,"delta":0}"#,
                "not RFC 3339",
            ),
        ];
        for (json, want) in cases {
            let mut f = Fanout::default();
            let err = r
                .resolve(vec![row("profile_viewed", json)], &mut f)
                .unwrap_err();
            assert!(
                matches!(&err, OutputError::BadRow(why) if why.contains(want)),
                "{json}: {err}"
            );
            assert!(f.rows.is_empty());
        }
        let err = r
            .resolve(vec![row("nope", "{}")], &mut Fanout::default())
            .unwrap_err();
        assert_eq!(err, OutputError::UnknownTable("nope".into()));
        assert!(err.to_string().contains("does not declare"), "{err}");
    }

    #[test]
    fn counts_need_a_declared_counter_and_a_sane_key() {
        let r = views();
        let count = |counter: &str, key: &str| PluginOutput::Count {
            counter: counter.into(),
            key: key.into(),
            delta: 1,
        };
        let mut f = Fanout::default();
        r.resolve(vec![count("profile_views", "p1")], &mut f)
            .unwrap();
        assert_eq!(f.increments.len(), 1);
        assert_eq!(
            r.resolve(vec![count("likes", "p1")], &mut f),
            Err(OutputError::UnknownCounter("likes".into()))
        );
        assert_eq!(
            r.resolve(vec![count("profile_views", "")], &mut f),
            Err(OutputError::BadCounterKey {
                counter: "profile_views".into(),
                len: 0
            })
        );
        let long = "k".repeat(MAX_COUNTER_KEY + 1);
        assert!(matches!(
            r.resolve(vec![count("profile_views", &long)], &mut f),
            Err(OutputError::BadCounterKey { .. })
        ));
        assert_eq!(f.increments.len(), 1, "a failed resolve adds nothing");
    }

    #[test]
    fn forwards_name_a_webhook_or_topic_sink() {
        let r = routes(
            "[[webhook]]\nname = \"crm\"\nurl = \"http://x/\"\n[[topic]]\nname = \"out\"\ntopic = \"o\"\n",
        )
        .unwrap();
        let mut f = Fanout::default();
        r.resolve(
            vec![
                PluginOutput::Forward("out".into()),
                PluginOutput::Forward("crm".into()),
                PluginOutput::Forward("out".into()),
            ],
            &mut f,
        )
        .unwrap();
        assert_eq!(f.forwards, vec![Target::Topic(0), Target::Webhook(0)]);
        let err = r
            .resolve(
                vec![PluginOutput::Forward("nope".into())],
                &mut Fanout::default(),
            )
            .unwrap_err();
        assert_eq!(err, OutputError::UnknownTarget("nope".into()));
        assert!(
            err.to_string().contains("no webhook or topic sink"),
            "{err}"
        );
    }

    #[test]
    fn bad_declarations_are_refused() {
        for (text, want) in [
            (
                "[[table]]\nname = \"events\"\ncolumns = [\"a String\"]",
                "not be events, dead_letters, identities",
            ),
            (
                "[[table]]\nname = \"identities\"\ncolumns = [\"a String\"]",
                "not be events, dead_letters, identities",
            ),
            (
                "[[table]]\nname = \"t\"\ncolumns = [\"a Map\"]",
                "unsupported column type",
            ),
            (
                "[[table]]\nname = \"t\"\ncolumns = [\"event_id String\"]",
                "filled by weir",
            ),
            (
                "[[table]]\nname = \"t\"\ncolumns = [\"a String\"]\norder_by = [\"b\"]",
                "order_by",
            ),
            ("[[table]]\nname = \"t\"\ncolumns = [\"a\"]", "name Type"),
            (
                "[[counter]]\nname = \"c\"\n[[counter]]\nname = \"c\"",
                "declared twice",
            ),
        ] {
            let err = routes(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn ddl_puts_system_columns_first() {
        let ddl = views().tables[0].ddl("weir", &Default::default());
        assert!(ddl.starts_with("CREATE TABLE IF NOT EXISTS weir.profile_viewed (event_id String, app String, timestamp DateTime,"), "{ddl}");
        assert!(ddl.contains("viewer Nullable(String)"));
        assert!(ddl.contains("ok UInt8"));
        assert!(
            ddl.ends_with(
                "ORDER BY (profile_id, timestamp, kafka_partition, kafka_offset, kafka_index) \
                 PRIMARY KEY (profile_id, timestamp)"
            ),
            "{ddl}"
        );
    }
}
