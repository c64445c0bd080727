//! ClickHouse over its HTTP interface: the table's DDL, `RowBinary`
//! inserts, a ping, and which failures are worth retrying.
//!
//! Why plain HTTP with reqwest rather than the `clickhouse` crate: the crate
//! speaks RowBinaryWithNamesAndTypes, which Debian's ClickHouse 18.16 lacks
//! (validation must be off), and its `Inserter` drops its pending rows when
//! an insert fails, while the ingester must keep a batch and send it again
//! until it is in. Plain `RowBinary` (row.rs says why not JSON) works the
//! same on 18.16 and on current servers, and a batch is just bytes we can
//! resend.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use venus_shared::secret::Secret;

use crate::config::ClickHouseSettings;
use crate::row::{Layout, COLUMNS};
use crate::schema::Schema;

/// The question for the mark of `group` for `topic`/`partition`: its
/// highest offset and how many marks there are (none: no mark).
pub fn marks_read_sql(
    database: &str,
    table: &str,
    group: &str,
    topic: &str,
    partition: i32,
) -> String {
    format!(
        "SELECT max(high_offset), count() FROM {database}.{table}_marks WHERE consumer_group = {} AND kafka_topic = {} AND kafka_partition = {partition} FORMAT TabSeparated",
        crate::dedup::quote(group),
        crate::dedup::quote(topic)
    )
}

/// The insert of marks of `group`: (topic, partition, high offset).
pub fn marks_write_sql(
    database: &str,
    table: &str,
    group: &str,
    marks: &[(&str, i32, i64)],
) -> String {
    let mut sql = format!(
        "INSERT INTO {database}.{table}_marks (consumer_group, kafka_topic, kafka_partition, high_offset, written_at) VALUES "
    );
    for (i, (topic, partition, high)) in marks.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!(
            "({}, {}, {partition}, {high}, now())",
            crate::dedup::quote(group),
            crate::dedup::quote(topic)
        ));
    }
    sql
}

/// The insert statement: the columns named, in the order rows are written,
/// so a table with more columns (defaults) still takes the rows.
pub fn insert_sql(database: &str, table: &str) -> String {
    let names: Vec<&str> = COLUMNS.iter().map(|(name, _)| *name).collect();
    format!(
        "INSERT INTO {database}.{table} ({}) FORMAT RowBinary",
        names.join(", ")
    )
}

/// A server's `version()`, as far as the ingester cares: major and minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
}

impl Version {
    /// Reads `18.16.1` or `25.8.2.29`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(Self { major, minor })
    }

    /// Servers from 19.6 have `TTL`.
    fn has_ttl(self) -> bool {
        self >= Version {
            major: 19,
            minor: 6,
        }
    }

    /// Servers from 21.11 have asynchronous inserts.
    fn has_async_insert(self) -> bool {
        self >= Version {
            major: 21,
            minor: 11,
        }
    }
}

/// The settings every insert carries, so that a 2xx means the rows are
/// written whatever the user's profile says. Only what `version` knows is
/// sent: old servers refuse unknown settings.
///
/// `async_insert=0`: a profile with `async_insert=1,
/// wait_for_async_insert=0` would answer before the rows are written, and
/// the ingester would commit past rows a crash then loses.
///
/// `insert_deduplicate=1` on replicated tables (cluster mode): a batch
/// resent to another replica after a failure is dropped if the first one
/// wrote it (docs/INGESTER.md, "Cluster mode"), whatever the profile says.
pub fn insert_settings(
    version: Option<Version>,
    replicated: bool,
) -> Vec<(&'static str, &'static str)> {
    let mut settings = Vec::new();
    if replicated {
        settings.push(("insert_deduplicate", "1"));
    }
    if version.is_some_and(Version::has_async_insert) {
        settings.push(("async_insert", "0"));
    }
    settings
}

/// What a failed request means for the rows it carried.
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    /// The server is away, slow or failing: try the same rows again later.
    #[error("ClickHouse unavailable: {0}")]
    Transient(String),
    /// The table or database is gone: create it, then try again.
    #[error("ClickHouse table missing: {0}")]
    MissingTable(String),
    /// The table lacks columns the rows need (`manage_schema: false`, or a
    /// table made by an older release): the operator must add them.
    #[error("ClickHouse table {table} lacks the columns {columns}; add them (see docs/INGESTER.md) or let the ingester manage the schema")]
    MissingColumns { table: String, columns: String },
    /// ClickHouse rejected the data itself: sending it again cannot help.
    #[error("ClickHouse rejected the rows (code {code}): {message}")]
    Rejected { code: u32, message: String },
}

/// ClickHouse error codes that mean "this data can never be inserted":
/// parse and type errors of the rows.
const REJECTED_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
    376, // CANNOT_PARSE_UUID
];

/// The `Code: N` of a ClickHouse error body.
fn error_code(body: &str) -> Option<u32> {
    let rest = &body[body.find("Code: ")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Sorts a failed response by its status and body.
pub fn classify(status: u16, body: &str) -> InsertError {
    let message: String = body.trim().chars().take(500).collect();
    match error_code(body) {
        // 60 UNKNOWN_TABLE, 81 UNKNOWN_DATABASE, 16 NO_SUCH_COLUMN_IN_TABLE:
        // prepare the schema again (which names missing columns).
        Some(60) | Some(81) | Some(16) => InsertError::MissingTable(message),
        Some(code) if REJECTED_CODES.contains(&code) => InsertError::Rejected { code, message },
        _ => InsertError::Transient(format!("HTTP {status}: {message}")),
    }
}

/// Whether a transient failure says the replica itself is unwell (and the
/// next one should take over): no answer at all (refused, reset, timed
/// out), a 5xx without a ClickHouse error (a proxy's), or a replica that
/// lost ZooKeeper (read-only). Not an error of the query or the user (a
/// wrong password is wrong on every replica), and not code 159 (another
/// replica did not run `ON CLUSTER` DDL in time).
fn replica_unwell(reason: &str) -> bool {
    match error_code(reason) {
        // 242 TABLE_IS_READ_ONLY, 225 NO_ZOOKEEPER, 999 KEEPER_EXCEPTION,
        // 210 NETWORK_ERROR, 209 SOCKET_TIMEOUT.
        Some(code) => matches!(code, 242 | 225 | 999 | 210 | 209),
        None => !reason.starts_with("HTTP 4"),
    }
}

/// A ClickHouse HTTP client for one table, on one server or on the
/// replicas of one shard (cluster mode), one at a time.
#[derive(Clone)]
pub struct ClickHouse {
    http: reqwest::Client,
    /// `url`, then `replica_urls`: the replicas of one shard.
    urls: Arc<Vec<String>>,
    /// The index in `urls` requests go to: it moves on to the next replica
    /// when one fails, and stays there while that one answers.
    current: Arc<AtomicUsize>,
    /// Readiness pings that got no answer in a row (3 move to the next
    /// replica: one slow ping is not a dead replica).
    ping_misses: Arc<AtomicUsize>,
    cluster: Option<String>,
    user: String,
    password: Secret,
    database: String,
    table: String,
    timeout: Duration,
    ping_timeout: Duration,
    /// The server's version, learnt when the schema is prepared (and again
    /// after the table went missing, as after an upgrade).
    version: Arc<Mutex<Option<Version>>>,
    /// The table's layout, once read (`None` until the schema is ready):
    /// rows are encoded the way the table stores them.
    layout: Arc<tokio::sync::watch::Sender<Option<Layout>>>,
    manage_schema: bool,
    ttl_days: u32,
}

impl ClickHouse {
    pub fn new(settings: &ClickHouseSettings) -> anyhow::Result<Self> {
        let tls = venus_shared::tls::client_config(
            "ingester.clickhouse.ca_file",
            settings.ca_file.as_deref(),
        )?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(settings.timeout_ms.min(5_000)))
            .pool_idle_timeout(Duration::from_secs(30))
            .use_preconfigured_tls(tls)
            .build()?;
        Ok(Self {
            http,
            urls: Arc::new(
                std::iter::once(&settings.url)
                    .chain(&settings.replica_urls)
                    .map(|url| url.trim_end_matches('/').to_owned())
                    .collect(),
            ),
            current: Arc::new(AtomicUsize::new(0)),
            ping_misses: Arc::new(AtomicUsize::new(0)),
            cluster: settings.cluster.clone(),
            user: settings.user.clone(),
            password: settings.password.clone(),
            database: settings.database.clone(),
            table: settings.table.clone(),
            timeout: Duration::from_millis(settings.timeout_ms),
            ping_timeout: Duration::from_millis(settings.ping_timeout_ms),
            version: Arc::new(Mutex::new(None)),
            layout: Arc::new(tokio::sync::watch::channel(None).0),
            manage_schema: settings.manage_schema,
            ttl_days: settings.ttl_days,
        })
    }

    /// `database.table`, for span attributes and logs.
    pub fn table_name(&self) -> String {
        format!("{}.{}", self.database, self.table)
    }

    /// Where the tables are.
    fn schema(&self) -> Schema<'_> {
        Schema {
            database: &self.database,
            table: &self.table,
            cluster: self.cluster.as_deref(),
        }
    }

    /// The URL requests go to now, with its index.
    fn target(&self) -> (usize, &str) {
        let index = self.current.load(Ordering::Relaxed) % self.urls.len();
        (index, &self.urls[index])
    }

    /// After `urls[index]` failed in a way that may be the server's: the
    /// next replica takes over (unless another request moved on already).
    /// With one URL nothing changes.
    fn fail_over(&self, index: usize, reason: &str) {
        if self.urls.len() < 2 {
            return;
        }
        let next = (index + 1) % self.urls.len();
        if self
            .current
            .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::warn!(
                failed = %venus_shared::secret::redact_urls(&self.urls[index]),
                now = %venus_shared::secret::redact_urls(&self.urls[next]),
                %reason,
                "ClickHouse replica failed; the next one takes over"
            );
        }
    }

    /// `result` of a request to `urls[index]`, failing over when the
    /// failure says that replica is unwell.
    fn checked<T>(&self, index: usize, result: Result<T, InsertError>) -> Result<T, InsertError> {
        if let Err(InsertError::Transient(reason)) = &result {
            if replica_unwell(reason) {
                self.fail_over(index, reason);
            }
        }
        result
    }

    /// The server's host and port, for span attributes.
    pub fn server_address(&self) -> String {
        reqwest::Url::parse(self.target().1)
            .ok()
            .and_then(|url| url.host_str().map(str::to_owned))
            .unwrap_or_default()
    }

    async fn post(
        &self,
        query: &str,
        body: impl Into<reqwest::Body>,
        timeout: Duration,
        query_id: &str,
    ) -> Result<String, InsertError> {
        let (index, url) = self.target();
        let result = async {
            let response = self
                .http
                .post(format!("{url}/"))
                .query(&[("query", query), ("query_id", query_id)])
                .query(&insert_settings(self.version(), self.cluster.is_some()))
                .basic_auth(&self.user, Some(self.password.expose()))
                .timeout(timeout)
                .body(body)
                .send()
                .await
                .map_err(|e| InsertError::Transient(error_chain(&e)))?;
            answer(response).await
        }
        .await;
        self.checked(index, result)
    }

    /// The table's layout, as soon as the schema is ready.
    pub fn layout_receiver(&self) -> tokio::sync::watch::Receiver<Option<Layout>> {
        self.layout.subscribe()
    }

    /// The table's layout (classic until it is known).
    pub fn layout(&self) -> Layout {
        self.layout.borrow().unwrap_or_default()
    }

    /// The server's version, once known.
    pub fn version(&self) -> Option<Version> {
        *self.version.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Readies the table for inserts: learns the server's version, creates
    /// the database and the tables when missing (`manage_schema`), and
    /// checks that the table has every column the rows carry.
    ///
    /// In cluster mode only what this replica lacks is created: `ON
    /// CLUSTER` DDL waits for every replica, and an ingester starting while
    /// one is down must not wait for it when the tables are there.
    pub async fn ensure_schema(&self) -> Result<(), InsertError> {
        let version = Version::parse(&self.query("SELECT version()").await?);
        *self.version.lock().unwrap_or_else(|e| e.into_inner()) = version;
        let new_layout = Layout::for_version(version.map(|v| (v.major, v.minor)));
        let schema = self.schema();
        // Only where the server has TTL (the check below says so otherwise).
        let ttl_days = if version.is_some_and(Version::has_ttl) {
            self.ttl_days
        } else {
            0
        };
        if self.manage_schema {
            // The statements go in the body: `query=` plus a body would be
            // read as one statement.
            if self.cluster.is_some() {
                let databases = self
                    .query(&format!(
                        "SELECT count() FROM system.databases WHERE name = '{}'",
                        self.database
                    ))
                    .await?;
                if databases.trim() == "0" {
                    self.cluster_ddl(&schema.create_database()).await?;
                }
                let tables = self.tables().await?;
                let wanted = [
                    (
                        self.table.clone(),
                        Some(schema.create_table(new_layout, ttl_days)),
                    ),
                    (schema.marks_table(), Some(schema.create_marks())),
                    (schema.distributed_table(), schema.create_distributed()),
                ];
                for (name, sql) in wanted {
                    if let Some(sql) = sql.filter(|_| !tables.contains(&name)) {
                        self.cluster_ddl(&sql).await?;
                    }
                }
            } else {
                for sql in schema.creates(new_layout, ttl_days) {
                    self.query(&sql).await?;
                }
            }
        }
        let marks = schema.marks_table();
        for (table, wanted) in [
            (
                self.table.as_str(),
                COLUMNS.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
            ),
            (
                marks.as_str(),
                vec![
                    "consumer_group",
                    "kafka_topic",
                    "kafka_partition",
                    "high_offset",
                    "written_at",
                ],
            ),
        ] {
            let typed = self.columns(table).await?;
            if table == self.table {
                if let Some((_, kind)) = typed.iter().find(|(name, _)| name == "upload_time") {
                    self.layout.send_replace(Some(Layout::of_upload_time(kind)));
                }
            }
            let present: Vec<&str> = typed.iter().map(|(name, _)| name.as_str()).collect();
            let name = format!("{}.{table}", self.database);
            if present.is_empty() {
                return Err(InsertError::MissingTable(format!(
                    "{name} does not exist (with manage_schema off, create it as docs/INGESTER.md shows)"
                )));
            }
            let missing: Vec<&str> = wanted
                .into_iter()
                .filter(|column| !present.contains(column))
                .collect();
            if missing.is_empty() {
                continue;
            }
            if self.manage_schema && table == self.table {
                // Columns a later version added: added to the table as it
                // is, in its own layout (`ALTER TABLE ADD COLUMN`; 18.16 has
                // no `IF NOT EXISTS` there, so only the missing ones).
                let layout = self.layout();
                for column in &missing {
                    let kind = layout
                        .columns()
                        .into_iter()
                        .find(|(n, _)| n == column)
                        .map(|(_, kind)| kind)
                        .unwrap_or("String");
                    self.ddl(&schema.add_column(column, kind)).await?;
                    tracing::info!(table = %name, column, kind, "column added");
                }
                continue;
            }
            return Err(InsertError::MissingColumns {
                table: name,
                columns: missing.join(", "),
            });
        }
        if self.manage_schema && self.cluster.is_some() {
            self.refresh_distributed(&schema).await?;
        }
        if self.ttl_days > 0 {
            if !version.is_some_and(Version::has_ttl) {
                return Err(InsertError::Transient(format!(
                    "ingester.clickhouse.ttl_days needs ClickHouse 19.6 or later for TTL (this server is {}): set it to 0 and drop old monthly partitions (ALTER TABLE {}.{} DROP PARTITION 202301)",
                    version.map(|v| format!("{}.{}", v.major, v.minor)).unwrap_or_else(|| "unknown".into()),
                    self.database,
                    self.table
                )));
            }
            if self.manage_schema && !self.has_ttl(self.ttl_days).await? {
                self.ddl(&schema.modify_ttl(self.ttl_days)).await?;
            }
        }
        Ok(())
    }

    /// Whether the table's `TTL` is `days` already. On one server the
    /// `ALTER` is cheap and always sent; in cluster mode it would wait for
    /// every replica (a dead one included), so only a change is sent.
    async fn has_ttl(&self, days: u32) -> Result<bool, InsertError> {
        if self.cluster.is_none() {
            return Ok(false);
        }
        let engine = self
            .query(&format!(
                "SELECT engine_full FROM system.tables WHERE database = '{}' AND name = '{}' FORMAT TabSeparated",
                self.database, self.table
            ))
            .await?;
        Ok(engine.contains(&format!("toIntervalDay({days})"))
            || engine.contains(&format!("INTERVAL {days} DAY")))
    }

    /// Cluster mode: makes `<table>_all` again when it lacks a column of
    /// the events table (columns were added), so that queries see them.
    async fn refresh_distributed(&self, schema: &Schema<'_>) -> Result<(), InsertError> {
        let (Some(drop), Some(create)) = (schema.drop_distributed(), schema.create_distributed())
        else {
            return Ok(());
        };
        let table = self.columns(&self.table).await?;
        let all = self.columns(&schema.distributed_table()).await?;
        if table
            .iter()
            .all(|(name, _)| all.iter().any(|(n, _)| n == name))
        {
            return Ok(());
        }
        tracing::info!(table = %schema.distributed_table(), "the Distributed table is made again with the new columns");
        self.cluster_ddl(&drop).await?;
        self.cluster_ddl(&create).await
    }

    /// Runs `sql` (sent as the body) and returns the response body.
    pub async fn query(&self, sql: &str) -> Result<String, InsertError> {
        self.query_with(sql, &[]).await
    }

    /// [`ClickHouse::query`] with `settings` in the URL.
    async fn query_with(
        &self,
        sql: &str,
        settings: &[(&str, &str)],
    ) -> Result<String, InsertError> {
        let (index, url) = self.target();
        let result = async {
            let response = self
                .http
                .post(format!("{url}/"))
                .query(settings)
                .basic_auth(&self.user, Some(self.password.expose()))
                .timeout(self.timeout)
                .body(sql.to_owned())
                .send()
                .await
                .map_err(|e| InsertError::Transient(error_chain(&e)))?;
            // A missing table (the marks', say) sends the writer back to
            // preparing the schema, as for an insert.
            answer(response).await
        }
        .await;
        self.checked(index, result)
    }

    /// Runs `ON CLUSTER` DDL. ClickHouse answers once every replica ran it,
    /// or with code 159 after `distributed_ddl_task_timeout`: a replica
    /// that is down runs it from ZooKeeper's queue when it is back, and
    /// this one has run it, so that answer is a warning, not a failure.
    /// The wait is half the request timeout, so that the answer comes
    /// before the request gives up.
    async fn cluster_ddl(&self, sql: &str) -> Result<(), InsertError> {
        let wait = (self.timeout.as_secs() / 2).max(1).to_string();
        match self
            .query_with(sql, &[("distributed_ddl_task_timeout", wait.as_str())])
            .await
        {
            Err(InsertError::Transient(reason)) if error_code(&reason) == Some(159) => {
                tracing::warn!(%reason, "a ClickHouse replica has not run the DDL yet; it will when it is back");
                Ok(())
            }
            other => other.map(|_| ()),
        }
    }

    /// Runs DDL: on this server, or on the cluster.
    async fn ddl(&self, sql: &str) -> Result<(), InsertError> {
        if self.cluster.is_some() {
            self.cluster_ddl(sql).await
        } else {
            self.query(sql).await.map(|_| ())
        }
    }

    /// The tables of the database on the server asked (empty: no
    /// database, or no tables).
    async fn tables(&self) -> Result<Vec<String>, InsertError> {
        Ok(self
            .query(&format!(
                "SELECT name FROM system.tables WHERE database = '{}' FORMAT TabSeparated",
                self.database
            ))
            .await?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// The (name, type) of `table`'s columns on the server asked.
    async fn columns(&self, table: &str) -> Result<Vec<(String, String)>, InsertError> {
        Ok(self
            .query(&format!(
                "SELECT name, type FROM system.columns WHERE database = '{}' AND table = '{table}' FORMAT TabSeparated",
                self.database
            ))
            .await?
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .map(|(name, kind)| (name.to_owned(), kind.to_owned()))
            .collect())
    }

    /// Inserts rows written by [`crate::row::write_row`], as the query
    /// `query_id` (so that [`ClickHouse::running`] can tell whether an
    /// attempt whose answer was lost is still at work).
    pub async fn insert(&self, rows: bytes::Bytes, query_id: &str) -> Result<(), InsertError> {
        let query = insert_sql(&self.database, &self.table);
        self.post(&query, rows, self.timeout, query_id)
            .await
            .map(|_| ())
    }

    /// The replica requests go to now (an index for [`ClickHouse::running`]).
    pub fn replica(&self) -> usize {
        self.target().0
    }

    /// Whether the query `query_id` is still running on `replica`, the
    /// server the attempt went to (after a failover, not the one in use).
    /// A replica that does not answer at all is taken as not running it:
    /// if it still completes, the replicated table drops the resent block
    /// when its bytes are the same.
    pub async fn running(&self, query_id: &str, replica: usize) -> Result<bool, InsertError> {
        let sql = format!(
            "SELECT count() FROM system.processes WHERE query_id = '{}'",
            query_id.replace(['\\', '\''], "")
        );
        let Some(url) = self
            .urls
            .get(replica)
            .filter(|_| replica != self.target().0)
        else {
            let answer = self.query(&sql).await?;
            return Ok(answer.trim() != "0");
        };
        let response = self
            .http
            .post(format!("{url}/"))
            .basic_auth(&self.user, Some(self.password.expose()))
            .timeout(self.ping_timeout)
            .body(sql)
            .send()
            .await;
        match response {
            Err(_) => Ok(false),
            Ok(response) => Ok(answer(response).await?.trim() != "0"),
        }
    }

    /// Which identities of the rows of `rows` marked in `suspects` are in
    /// the table already ([`crate::dedup`]).
    pub async fn present(
        &self,
        rows: &crate::batch::Rows,
        suspects: &[bool],
    ) -> Result<std::collections::HashSet<crate::dedup::Identity>, InsertError> {
        let mut present = std::collections::HashSet::new();
        let layout = self.layout();
        for sql in crate::dedup::presence_sql(&self.database, &self.table, rows, suspects, layout) {
            present.extend(crate::dedup::parse_present(&self.query(&sql).await?));
        }
        Ok(present)
    }

    /// The mark of `group` for `topic`/`partition` ([`crate::marks`]).
    pub async fn read_mark(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
    ) -> Result<Option<i64>, InsertError> {
        let answer = self
            .query(&marks_read_sql(
                &self.database,
                &self.table,
                group,
                topic,
                partition,
            ))
            .await?;
        let mut fields = answer.trim().split('\t');
        let high: i64 = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
        let count: u64 = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
        Ok((count > 0).then_some(high))
    }

    /// Writes marks of `group`: (topic, partition, high offset).
    pub async fn write_marks(
        &self,
        group: &str,
        marks: &[(&str, i32, i64)],
    ) -> Result<(), InsertError> {
        // Like the rows' inserts: answered only once written (a mark must be
        // readable before the rows it covers go in).
        // The statement in the body: 18.16 refuses a POST without one.
        let sql = marks_write_sql(&self.database, &self.table, group, marks);
        self.query_with(
            &sql,
            &insert_settings(self.version(), self.cluster.is_some()),
        )
        .await
        .map(|_| ())
    }

    /// `SELECT 1` with the short readiness timeout (a real query, not
    /// `/ping`, so that the credentials are checked too). A GET: read-only,
    /// and no body whose length old servers insist on.
    pub async fn ping(&self) -> Result<(), String> {
        let (index, url) = self.target();
        let result = async {
            let response = self
                .http
                .get(format!("{url}/"))
                .query(&[("query", "SELECT 1")])
                .basic_auth(&self.user, Some(self.password.expose()))
                .timeout(self.ping_timeout)
                .send()
                .await
                .map_err(|e| error_chain(&e))?;
            let status = response.status();
            if status.is_success() {
                return Ok(());
            }
            let body = response.text().await.unwrap_or_default();
            Err(format!("HTTP {}: {}", status.as_u16(), body.trim()))
        }
        .await;
        match &result {
            // A replica that stopped answering three pings in a row is left
            // before an insert has to find out.
            Err(reason) if !reason.starts_with("HTTP ") => {
                if self.ping_misses.fetch_add(1, Ordering::Relaxed) + 1 >= 3 {
                    self.ping_misses.store(0, Ordering::Relaxed);
                    self.fail_over(index, reason);
                }
            }
            _ => self.ping_misses.store(0, Ordering::Relaxed),
        }
        result
    }
}

/// A response's body, or its failure classified ([`classify`]).
async fn answer(response: reqwest::Response) -> Result<String, InsertError> {
    let status = response.status().as_u16();
    let text = response
        .text()
        .await
        .map_err(|e| InsertError::Transient(error_chain(&e)))?;
    if (200..300).contains(&status) {
        Ok(text)
    } else {
        Err(classify(status, &text))
    }
}

/// An error with its sources, e.g. "error sending request: connection
/// refused"; a URL's user and password never in it (it goes to the log and
/// `/readyz`).
fn error_chain(error: &dyn std::error::Error) -> String {
    venus_shared::secret::redact_urls(&full_chain(error))
}

fn full_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserts_pin_async_insert_off_only_where_the_server_has_it() {
        assert_eq!(
            Version::parse("18.16.1"),
            Some(Version {
                major: 18,
                minor: 16
            })
        );
        assert_eq!(
            Version::parse("25.8.2.29\n"),
            Some(Version {
                major: 25,
                minor: 8
            })
        );
        assert_eq!(Version::parse("garbage"), None);
        assert!(insert_settings(Version::parse("18.16.1"), false).is_empty());
        assert!(insert_settings(Version::parse("21.10.1"), false).is_empty());
        assert!(insert_settings(None, false).is_empty());
        assert_eq!(
            insert_settings(Version::parse("18.16.1"), true),
            vec![("insert_deduplicate", "1")]
        );
        for current in ["21.11.1", "25.8.2.29", "26.9.1"] {
            assert_eq!(
                insert_settings(Version::parse(current), false),
                vec![("async_insert", "0")],
                "{current}"
            );
        }
    }

    #[test]
    fn only_a_replica_that_is_unwell_is_left() {
        for unwell in [
            "error sending request: connection refused",
            "operation timed out",
            "HTTP 502: bad gateway",
            "HTTP 500: Code: 242, e.displayText() = DB::Exception: Table is in readonly mode",
        ] {
            assert!(replica_unwell(unwell), "{unwell}");
        }
        for not in [
            "HTTP 500: Code: 159, e.displayText() = DB::Exception: Watching task is executing longer than distributed_ddl_task_timeout",
            "HTTP 401: Code: 516, authentication failed",
            "HTTP 500: Code: 241, Memory limit exceeded",
            "HTTP 404: not found",
        ] {
            assert!(!replica_unwell(not), "{not}");
        }
    }

    #[test]
    fn data_errors_are_rejections_and_the_rest_is_retried() {
        let uuid = "Code: 376, e.displayText() = DB::Exception: Cannot parse uuid bad";
        assert!(matches!(
            classify(500, uuid),
            InsertError::Rejected { code: 376, .. }
        ));
        assert!(matches!(
            classify(
                404,
                "Code: 60, e.displayText() = DB::Exception: Table venus.nope doesn't exist."
            ),
            InsertError::MissingTable(_)
        ));
        assert!(matches!(
            classify(500, "Code: 241, Memory limit exceeded"),
            InsertError::Transient(_)
        ));
        assert!(matches!(
            classify(502, "bad gateway"),
            InsertError::Transient(_)
        ));
        assert!(matches!(
            classify(401, "Code: 516, authentication failed"),
            InsertError::Transient(_)
        ));
    }
}
