//! The DDL of the ingester's tables, on one server or on every replica of a
//! cluster: the events table, its marks table beside it, and (in cluster
//! mode) a Distributed table for queries. Only text: `clickhouse.rs` sends
//! it, `--print-schema` prints it.
//!
//! Cluster mode (`ingester.clickhouse.cluster`) makes both tables
//! `Replicated…MergeTree` on every replica of the cluster (`ON CLUSTER`, the
//! servers' `{shard}` and `{replica}` macros), and adds `<table>_all`, a
//! `Distributed` table over the cluster. The ingester inserts into the
//! replicated table itself, on one replica of its shard, never through the
//! Distributed table:
//! * a Distributed insert is answered once the rows are queued on the
//!   receiving server's disk, before any replica has them (asynchronous,
//!   the default), or, with `insert_distributed_sync`, after a fan-out that
//!   can fail half done: neither is "a 2xx means written";
//! * the replicated table drops a block it has already been given
//!   (`insert_deduplicate`, the block's checksum in ZooKeeper): the writer
//!   resends the very same bytes after a failure, so a batch that reached a
//!   replica that then died, sent again to the other replica, is not a
//!   second copy;
//! * the marks and lookups of [`crate::dedup`] must read the server that
//!   holds the rows.
//!
//! `<table>_all` is what analysts query when the cluster has several shards
//! (with one, the replicated table on any replica holds every row).

use crate::row::Layout;

/// Where the tables are and on which servers.
#[derive(Debug, Clone, Copy)]
pub struct Schema<'a> {
    pub database: &'a str,
    pub table: &'a str,
    /// A cluster of the servers' `remote_servers`: `ON CLUSTER` DDL and
    /// Replicated engines. `None`: one server.
    pub cluster: Option<&'a str>,
}

impl<'a> Schema<'a> {
    /// The tables on one server.
    pub fn single(database: &'a str, table: &'a str) -> Self {
        Self {
            database,
            table,
            cluster: None,
        }
    }

    /// `" ON CLUSTER name"` in cluster mode, else nothing.
    fn on_cluster(&self) -> String {
        self.cluster
            .map(|cluster| format!(" ON CLUSTER {cluster}"))
            .unwrap_or_default()
    }

    /// A replacing engine keeping, per sorting key, the row with the
    /// highest `version` column; replicated in cluster mode, with one
    /// ZooKeeper path per shard, database and table.
    fn engine(&self, table: &str, version: &str) -> String {
        match self.cluster {
            None => format!("ReplacingMergeTree({version})"),
            Some(_) => format!(
                "ReplicatedReplacingMergeTree('/clickhouse/tables/{{shard}}/{}/{table}', '{{replica}}', {version})",
                self.database
            ),
        }
    }

    /// `CREATE DATABASE IF NOT EXISTS`.
    pub fn create_database(&self) -> String {
        format!(
            "CREATE DATABASE IF NOT EXISTS {}{}",
            self.database,
            self.on_cluster()
        )
    }

    /// The events table: a `ReplacingMergeTree` whose sorting key is the
    /// event's identity as the client means it, (`category`, the UTC day of
    /// `upload_time`, `app_id`, `event_id`): a batch a client sends again
    /// (after a timeout, a 503, a 1004) is one row per event for queries
    /// with `FINAL` and after merges, as long as it arrives the same UTC
    /// day; the last copy inserted stays (`ingested_at`). Time-range
    /// queries of a category read only the days they ask for. A message
    /// Kafka delivers again is never a second row even without `FINAL`: the
    /// writer does not insert it ([`crate::dedup`]). The column types are
    /// `layout`'s: 18.16's, or the current servers' (`DateTime64`,
    /// `LowCardinality`); the names, the key and every documented query are
    /// the same in both.
    pub fn create_table(&self, layout: Layout, ttl_days: u32) -> String {
        let columns: Vec<String> = layout
            .columns()
            .iter()
            .map(|(name, kind)| format!("    {name} {kind}"))
            .collect();
        format!(
            "CREATE TABLE IF NOT EXISTS {}.{}{} (
{}
) ENGINE = {}
PARTITION BY toYYYYMM(upload_time)
ORDER BY (category, toDate(upload_time, 'UTC'), app_id, event_id){}",
            self.database,
            self.table,
            self.on_cluster(),
            columns.join(",\n"),
            self.engine(self.table, "ingested_at"),
            if ttl_days > 0 {
                format!("\n{}", ttl_clause(ttl_days))
            } else {
                String::new()
            }
        )
    }

    /// The marks table beside the events table: per consumer group and
    /// partition, an offset no message beyond which has been inserted (or
    /// is being inserted). Written before the inserts it covers, so that
    /// whoever reads the partition next knows which messages may be in the
    /// table already ([`crate::marks`]). Replicated with the events in
    /// cluster mode.
    pub fn create_marks(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {}.{}{} (
    consumer_group String,
    kafka_topic String,
    kafka_partition Int32,
    high_offset Int64,
    written_at DateTime
) ENGINE = {}
ORDER BY (consumer_group, kafka_topic, kafka_partition)",
            self.database,
            self.marks_table(),
            self.on_cluster(),
            self.engine(&self.marks_table(), "high_offset"),
        )
    }

    /// The marks table's name.
    pub fn marks_table(&self) -> String {
        format!("{}_marks", self.table)
    }

    /// The Distributed table's name (cluster mode).
    pub fn distributed_table(&self) -> String {
        format!("{}_all", self.table)
    }

    /// In cluster mode, `<table>_all`: the events table of every shard, for
    /// queries. No sharding key: an insert into it with several shards
    /// fails, as it should (the ingester inserts into the replicated table).
    pub fn create_distributed(&self) -> Option<String> {
        let cluster = self.cluster?;
        Some(format!(
            "CREATE TABLE IF NOT EXISTS {db}.{all}{on} AS {db}.{table} ENGINE = Distributed({cluster}, {db}, {table})",
            db = self.database,
            all = self.distributed_table(),
            on = self.on_cluster(),
            table = self.table,
        ))
    }

    /// Drops `<table>_all` (it holds no data: only its columns change, when
    /// the events table got new ones; 18.16 refuses `ALTER … ON CLUSTER` of
    /// a Distributed table over replicated shards).
    pub fn drop_distributed(&self) -> Option<String> {
        self.cluster?;
        Some(format!(
            "DROP TABLE IF EXISTS {}.{}{}",
            self.database,
            self.distributed_table(),
            self.on_cluster()
        ))
    }

    /// Adds a column the rows carry and the table lacks (18.16 has no
    /// `ADD COLUMN IF NOT EXISTS`: only the missing ones are added). On a
    /// replicated table the change reaches every replica.
    pub fn add_column(&self, column: &str, kind: &str) -> String {
        format!(
            "ALTER TABLE {}.{}{} ADD COLUMN {column} {kind}",
            self.database,
            self.table,
            self.on_cluster()
        )
    }

    /// Sets the table's retention.
    pub fn modify_ttl(&self, days: u32) -> String {
        format!(
            "ALTER TABLE {}.{}{} MODIFY {}",
            self.database,
            self.table,
            self.on_cluster(),
            ttl_clause(days)
        )
    }

    /// Every `CREATE`, in the order they must run.
    pub fn creates(&self, layout: Layout, ttl_days: u32) -> Vec<String> {
        let mut statements = vec![
            self.create_database(),
            self.create_table(layout, ttl_days),
            self.create_marks(),
        ];
        statements.extend(self.create_distributed());
        statements
    }
}

/// Rows older than `days` (by `upload_time`) are deleted in merges.
pub fn ttl_clause(days: u32) -> String {
    format!("TTL toDateTime(upload_time) + INTERVAL {days} DAY")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ddl_has_every_column_and_the_replacing_engine() {
        let schema = Schema::single("venus", "events");
        let sql = schema.create_table(Layout::Classic, 0);
        assert!(!sql.contains("TTL"), "{sql}");
        assert!(schema.create_table(Layout::Classic, 30).contains("TTL"));
        for column in [
            "backend_id",
            "app_id",
            "category",
            "event_id",
            "upload_time",
            "client_time",
            "ip",
            "country",
            "region",
            "city",
            "meta",
            "data",
            "request_id",
            "trace_id",
            "kafka_topic",
            "kafka_partition",
            "kafka_offset",
            "ingested_at",
        ] {
            assert!(sql.contains(&format!("\n    {column} ")), "{column}");
        }
        assert!(sql.contains(") ENGINE = ReplacingMergeTree(ingested_at)\n"));
        assert!(sql.contains("\n    backend_id UUID,\n    app_id String,"));
        assert!(sql.contains("\n    ingested_at DateTime\n) ENGINE"));
        for unsupported in ["DateTime64", "LowCardinality", "JSON", "ON CLUSTER"] {
            assert!(!sql.contains(unsupported), "18.16 lacks {unsupported}");
        }
        assert!(sql.contains("ORDER BY (category, toDate(upload_time, 'UTC'), app_id, event_id)"));
        let current = schema.create_table(Layout::Current, 30);
        assert!(
            current.ends_with("\nTTL toDateTime(upload_time) + INTERVAL 30 DAY"),
            "{current}"
        );
        assert!(!schema.create_table(Layout::Current, 0).contains("TTL"));
        assert!(
            current.contains("\n    upload_time DateTime64(3, 'UTC'),"),
            "{current}"
        );
        assert!(
            current.contains("\n    category LowCardinality(String),"),
            "{current}"
        );
        assert!(
            current.contains("ORDER BY (category, toDate(upload_time, 'UTC'), app_id, event_id)")
        );
        assert_eq!(schema.creates(Layout::Classic, 0).len(), 3);
        assert!(schema.create_distributed().is_none());
    }

    #[test]
    fn cluster_mode_replicates_both_tables_and_adds_a_distributed_one() {
        let schema = Schema {
            database: "analytics",
            table: "events",
            cluster: Some("venus"),
        };
        assert_eq!(
            schema.create_database(),
            "CREATE DATABASE IF NOT EXISTS analytics ON CLUSTER venus"
        );
        let table = schema.create_table(Layout::Classic, 0);
        assert!(
            table.starts_with("CREATE TABLE IF NOT EXISTS analytics.events ON CLUSTER venus ("),
            "{table}"
        );
        assert!(
            table.contains(") ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/analytics/events', '{replica}', ingested_at)\n"),
            "{table}"
        );
        let marks = schema.create_marks();
        assert!(marks.contains("analytics.events_marks ON CLUSTER venus ("));
        assert!(marks.contains("ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/analytics/events_marks', '{replica}', high_offset)"), "{marks}");
        assert_eq!(
            schema.create_distributed().unwrap(),
            "CREATE TABLE IF NOT EXISTS analytics.events_all ON CLUSTER venus AS analytics.events ENGINE = Distributed(venus, analytics, events)"
        );
        assert_eq!(
            schema.drop_distributed().unwrap(),
            "DROP TABLE IF EXISTS analytics.events_all ON CLUSTER venus"
        );
        assert_eq!(
            schema.add_column("trace_id", "String"),
            "ALTER TABLE analytics.events ON CLUSTER venus ADD COLUMN trace_id String"
        );
        assert!(schema
            .modify_ttl(7)
            .starts_with("ALTER TABLE analytics.events ON CLUSTER venus MODIFY TTL"));
        let creates = schema.creates(Layout::Current, 0);
        assert_eq!(creates.len(), 4);
        assert!(creates[3].contains("Distributed"));
    }
}
