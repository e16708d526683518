//! Argument types of the client-side commands. The flags are a contract
//! that scripts rely on: add, never rename.

use clap::{Args, Subcommand, ValueEnum};

/// The embedded default config's TCP listener.
pub const DEFAULT_BROKER: &str = "127.0.0.1:9471";

/// A value the broker's own parser takes, sent as written: a misspelt
/// policy is a bad command line (status 2), found before connecting. Rules
/// across options (retention on a compacted topic) stay the broker's.
fn parsed_as<T: std::str::FromStr>(s: &str) -> Result<String, String>
where
    T::Err: PolicyError,
{
    s.parse::<T>().map(|_| s.to_owned()).map_err(|e| e.reason())
}

/// A policy parser's refusal in words for clap, which already names the
/// value and the option: the reason alone, without the "invalid storage
/// config:" its Display starts with for a config file's or the broker's
/// messages.
trait PolicyError {
    fn reason(&self) -> String;
}

impl PolicyError for crate::storage::StorageError {
    fn reason(&self) -> String {
        match self {
            Self::InvalidConfig(why) => (*why).to_owned(),
            other => other.to_string(),
        }
    }
}

impl PolicyError for crate::broker::BrokerError {
    fn reason(&self) -> String {
        match self {
            Self::InvalidConfig(why) => (*why).to_owned(),
            other => other.to_string(),
        }
    }
}

/// A name a topic can have: a bench's topic is made by the bench, and a
/// name the broker would refuse is a bad command line.
fn topic_name(s: &str) -> Result<String, String> {
    crate::broker::validate_topic_name(s)
        .map(|()| s.to_owned())
        .map_err(|e| e.to_string())
}

#[derive(Args, Debug, Clone)]
pub struct BrokerArg {
    /// Broker address: HOST:PORT for TCP, or a path for a Unix socket (any
    /// address with a '/' or ending in .sock is a path: ./skiff.sock).
    #[arg(
        long,
        global = true,
        env = "SKIFF_BROKER",
        default_value = DEFAULT_BROKER,
        value_name = "ADDRESS"
    )]
    pub broker: String,
    /// CA certificates (PEM) to check the broker's certificate against;
    /// without it, the system's CA store. Any --tls-* option means TLS.
    #[arg(long, global = true, env = "SKIFF_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// This client's certificate chain (PEM), for a broker that requires
    /// client certificates (mutual TLS); needs --tls-key.
    #[arg(long, global = true, env = "SKIFF_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, global = true, env = "SKIFF_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<std::path::PathBuf>,
    /// The name the broker's certificate must carry, when it is not the
    /// host in --broker (connecting by IP to a certificate for a name).
    #[arg(
        long,
        global = true,
        env = "SKIFF_TLS_SERVER_NAME",
        value_name = "NAME"
    )]
    pub tls_server_name: Option<String>,
}

impl BrokerArg {
    /// The TLS options, if any --tls-* option is given.
    pub fn tls(&self) -> Option<crate::client::TlsOptions> {
        let o = crate::client::TlsOptions {
            ca_file: self.tls_ca.clone(),
            cert_file: self.tls_cert.clone(),
            key_file: self.tls_key.clone(),
            server_name: self.tls_server_name.clone(),
        };
        (o != crate::client::TlsOptions::default()).then_some(o)
    }

    /// How the command's clients connect.
    pub fn client_config(&self) -> crate::client::ClientConfig {
        crate::client::ClientConfig {
            tls: self.tls(),
            ..crate::client::ClientConfig::default()
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum TopicsCommand {
    /// Create a topic with a preallocated ring per partition.
    Create {
        name: String,
        /// Partitions (default: the broker's topic_defaults.partitions).
        #[arg(long)]
        partitions: Option<u32>,
        /// Size of each segment file (multiple of 4096).
        #[arg(long)]
        segment_bytes: Option<u64>,
        /// Segments per partition ring (at least 2).
        #[arg(long)]
        segments: Option<u32>,
        /// Drop data older than this (0: size retention only).
        #[arg(long)]
        retention_ms: Option<u64>,
        /// always | interval:MS | never
        #[arg(long, value_parser = parsed_as::<crate::storage::Durability>)]
        fsync: Option<String>,
        /// overwrite | reject: what a full ring does.
        #[arg(long, value_parser = parsed_as::<crate::storage::OverflowPolicy>)]
        overflow: Option<String>,
        /// Drop records whose `msg-id` header was seen on the topic within
        /// this many ms (0: off).
        #[arg(long)]
        msg_id_window_ms: Option<u64>,
        /// Drop records whose `msg-id` header is among the topic's last N
        /// ids (0: off; at most 100000).
        #[arg(long)]
        msg_id_window_records: Option<u32>,
        /// delete | compact | compact,delete: compact keeps the latest
        /// record per key (records need keys; a tombstone deletes one).
        #[arg(long, value_parser = parsed_as::<crate::broker::CleanupPolicy>)]
        cleanup: Option<String>,
        /// On a compacted topic, how long a tombstone stays (default: a day).
        #[arg(long)]
        tombstone_retention_ms: Option<u64>,
        /// How long to wait for the broker's answer. A create writes each
        /// partition's first segment: on an SD card, about a minute for 64
        /// partitions of 16 MiB segments. A create that outlasts it still
        /// finishes on the broker.
        #[arg(long, value_name = "MS", default_value_t = 300_000)]
        timeout_ms: u64,
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// List topic names, one per line.
    List {
        /// json: {"topics": [...], "disk_budget_bytes", "disk_reserved_bytes",
        /// "disk_free_bytes"}: storage.disk_budget_bytes and what the
        /// topics' rings reserve of it (the broker's own topics' included,
        /// made or not).
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Show a topic's config and each partition's offsets, segments and
    /// bytes.
    Describe {
        name: String,
        /// json: one object with the config and, per partition, "log_start",
        /// "log_end", "bytes", "segments_used", the oldest record and the
        /// next retention step.
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Change a topic live (no restart); the change survives restarts.
    Alter {
        name: String,
        /// Drop data older than this (0: size retention only).
        #[arg(long)]
        retention_ms: Option<u64>,
        /// always | interval:MS | never
        #[arg(long, value_parser = parsed_as::<crate::storage::Durability>)]
        fsync: Option<String>,
        /// delete | compact | compact,delete
        #[arg(long, value_parser = parsed_as::<crate::broker::CleanupPolicy>)]
        cleanup: Option<String>,
        /// On a compacted topic, how long a tombstone stays.
        #[arg(long)]
        tombstone_retention_ms: Option<u64>,
        /// Grow or shrink every partition's ring to this many segments
        /// (a shrink drops the oldest segments of a ring that overwrites;
        /// a compacted ring's data must fit).
        #[arg(long)]
        segments: Option<u32>,
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Compact a compacted topic now (merge its oldest segments, keeping the
    /// latest record per key).
    Compact {
        name: String,
        /// Return when the compaction has finished, and print what it did.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Delete a topic and its data.
    Delete {
        name: String,
        #[command(flatten)]
        broker: BrokerArg,
    },
}

#[derive(Args, Debug)]
#[command(
    after_help = "Records are sent by an idempotent producer: through a broker that is not up \
yet, a lost connection or a broker restart it retries (for up to --retry-timeout-ms, 2 minutes \
by default, with a line on stderr at most once a second), and the broker writes every record \
exactly once. A refusal that may pass (a full `overflow = reject` ring, a full mirror backlog) is \
retried the same way, and named when the time runs out; a TLS certificate refused is not retried. Without a key, records stick to one partition per batch, starting at a random \
one. Exits 0 only when every record is acknowledged."
)]
pub struct ProduceArgs {
    pub topic: String,
    /// Record key (routes the record to a partition by hash).
    #[arg(long)]
    pub key: Option<String>,
    /// Send to this partition instead of the key's.
    #[arg(long)]
    pub partition: Option<u32>,
    /// Record values; without any, one record per line of stdin (the
    /// line without its \n or \r\n).
    pub values: Vec<String>,
    /// Send one tombstone (a record without a value) for --key instead of
    /// values: on a compacted topic it deletes the key.
    #[arg(long, requires = "key", conflicts_with_all = ["values", "msg_id_header"])]
    pub tombstone: bool,
    /// Produce as the named idempotent producer: the same name gets the
    /// same producer id with a new epoch, which fences an older `skiff
    /// produce` still running under that name.
    #[arg(long, value_name = "NAME")]
    pub idempotent_name: Option<String>,
    /// Each record (VALUE argument or stdin line) is `ID<TAB>VALUE`; the
    /// record is sent as VALUE with header H = ID. A topic with a msg-id
    /// window drops records whose id it has seen (use H = msg-id).
    #[arg(long, value_name = "H")]
    pub msg_id_header: Option<String>,
    /// How long to keep trying to connect, and to deliver each record,
    /// before giving up (exit 1).
    #[arg(long, value_name = "MS", default_value_t = 120_000)]
    pub retry_timeout_ms: u64,
    /// No notice on stderr of records dropped as duplicates, nor of
    /// retries (errors are still printed).
    #[arg(long, short)]
    pub quiet: bool,
    #[command(flatten)]
    pub broker: BrokerArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
#[command(
    after_help = "When to stop: after --count records, after --timeout-ms without a new record, \
or else, when stdout is not a terminal (a pipe or a file), at the end of the log: once every \
record up to each partition's end when the consume started is printed (like kcat -e). At a \
terminal, or with --follow, it waits for new records until interrupted."
)]
pub struct ConsumeArgs {
    pub topic: String,
    /// earliest | latest | OFFSET | @UNIX_MS (default earliest; with
    /// --group: where a partition with no committed offset starts, default
    /// latest, and only earliest or latest)
    #[arg(long)]
    pub from: Option<String>,
    /// Read as a member of this consumer group: share the topic's
    /// partitions with the group's other members, start from the group's
    /// committed offsets, commit what is printed, and leave the group on
    /// exit (SIGINT and SIGTERM included). Runs until --count,
    /// --timeout-ms or a signal.
    #[arg(long, value_name = "G")]
    pub group: Option<String>,
    /// Take records as a worker of this share group (a queue): every
    /// worker of the group gets records of any partition, each locked to
    /// it; needs --exec. --from applies to the group's first start
    /// (default latest).
    #[arg(long, value_name = "G")]
    pub share_group: Option<String>,
    /// With --share-group: run CMD (with /bin/sh -c) for each record, the
    /// value on stdin and SKIFF_TOPIC, SKIFF_PARTITION, SKIFF_OFFSET,
    /// SKIFF_KEY and SKIFF_DELIVERY_COUNT in the environment. Exit 0
    /// accepts the record, 75 (EX_TEMPFAIL) releases it for redelivery,
    /// any other status rejects it (to the dead-letter topic).
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,
    /// With --group: the member is removed after this long without a
    /// heartbeat.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub session_timeout_ms: u64,
    /// With --group: the partition assignor (range | roundrobin |
    /// cooperative-sticky).
    #[arg(long, default_value = "cooperative-sticky")]
    pub assignor: String,
    /// Read only this partition (default: all of them).
    #[arg(long)]
    pub partition: Option<u32>,
    /// Exit after this many records.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit after this many ms without a new record (with --group,
    /// counted from when the member has joined).
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Wait for new records at the end of the log even when stdout is not
    /// a terminal.
    #[arg(long, short)]
    pub follow: bool,
    /// text: each record's value on a line. json: one object a line with
    /// "topic", "partition", "offset", "timestamp", "key", "value" and
    /// "headers" (bytes that are not UTF-8 as base64, said by the
    /// "*_encoding" fields).
    #[arg(long, value_enum, default_value = "text")]
    pub format: OutputFormat,
    /// read_committed: a transaction's records once it commits, never an
    /// aborted one's, and nothing past a transaction still open.
    /// read_uncommitted: every record as written. Topics without
    /// transactions read the same either way.
    #[arg(long, value_enum, default_value = "read_committed")]
    pub isolation: IsolationArg,
    #[command(flatten)]
    pub broker: BrokerArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum IsolationArg {
    ReadCommitted,
    ReadUncommitted,
}

impl IsolationArg {
    pub fn wire(self) -> crate::protocol::Isolation {
        match self {
            Self::ReadCommitted => crate::protocol::Isolation::ReadCommitted,
            Self::ReadUncommitted => crate::protocol::Isolation::ReadUncommitted,
        }
    }
}

#[derive(Args, Debug)]
#[command(
    after_help = "Reads TOPIC<TAB>VALUE lines from stdin (each without its \\n or \\r\\n) and writes \
them all in one transaction, \
sending each record as its line is read. At the end of input the transaction commits (or aborts, \
with --abort); the exit status is 0 only once that is durable. A transaction left open (this \
command killed) is aborted by the broker after --transaction-timeout-ms, or when the same --id \
starts again. Records with the value only are never seen by read_committed consumers until the \
commit. A record that fails aborts the transaction at once. With --consume IN --group G --to OUT, \
records of IN are copied to OUT instead, each poll in one transaction with G's offsets (exactly \
once across crashes)."
)]
pub struct TxnArgs {
    /// The transactional id: a new `skiff txn` with the same id fences
    /// (and aborts the transaction of) an older one still running.
    #[arg(long, value_name = "TXID")]
    pub id: Option<String>,
    /// Abort instead of committing at the end of input.
    #[arg(long)]
    pub abort: bool,
    /// The broker aborts the transaction if it is still open this long
    /// after it began.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    pub transaction_timeout_ms: u64,
    /// Instead of stdin: read this topic as a member of --group and copy
    /// each polled batch of records to --to in one transaction, together
    /// with the group's offsets (consume-transform-produce, exactly once).
    #[arg(long, value_name = "TOPIC", requires_all = ["group", "to"])]
    pub consume: Option<String>,
    /// With --consume: the consumer group whose offsets commit with each
    /// transaction.
    #[arg(long, value_name = "GROUP", requires = "consume")]
    pub group: Option<String>,
    /// With --consume: the topic written to.
    #[arg(long, value_name = "TOPIC", requires = "consume")]
    pub to: Option<String>,
    /// With --consume: where a partition without a committed offset
    /// starts, earliest or latest.
    #[arg(
        long,
        value_name = "WHERE",
        default_value = "latest",
        requires = "consume"
    )]
    pub from: String,
    /// With --consume: exit after this many records copied.
    #[arg(long, requires = "consume")]
    pub count: Option<u64>,
    /// With --consume: exit after this many ms without a new record,
    /// counted from when the member has joined the group.
    #[arg(long, value_name = "MS", requires = "consume")]
    pub timeout_ms: Option<u64>,
    /// With --consume: the member is removed after this long without a
    /// heartbeat.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 10_000,
        requires = "consume"
    )]
    pub session_timeout_ms: u64,
    #[command(subcommand)]
    pub command: Option<TxnCommand>,
    #[command(flatten)]
    pub broker: BrokerArg,
}

#[derive(Subcommand, Debug)]
pub enum TxnCommand {
    /// List transactional ids: state, producer id and epoch, partitions.
    List {
        /// json: an array of {"id", "state", "producer_id",
        /// "producer_epoch", "transaction_timeout_ms", "partitions"}.
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
    },
}

#[derive(Subcommand, Debug)]
pub enum GroupsCommand {
    /// List consumer groups: name, state, members.
    List {
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Show a group's members, assignment and committed offsets with lag.
    Describe {
        group: String,
        /// json: one object with "state", "generation", "members" (each
        /// with its "assignment") and "offsets" ("committed", "log_end",
        /// "lag" per partition).
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Set a group's committed offsets for every partition of a topic;
    /// refused while the group has members.
    ResetOffsets {
        group: String,
        /// The topic whose partitions get the new offsets.
        #[arg(long)]
        topic: String,
        /// earliest | latest | OFFSET | @UNIX_MS
        #[arg(long)]
        to: String,
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Delete a group and its committed offsets; refused while it has
    /// members.
    Delete {
        group: String,
        #[command(flatten)]
        broker: BrokerArg,
    },
}

#[derive(Subcommand, Debug)]
pub enum ShareGroupsCommand {
    /// List share groups: topics, share partitions, records in flight,
    /// active members.
    List {
        /// json: an array of {"group", "topics", "partitions",
        /// "in_flight", "members"}.
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Show a share group's windows per partition (start, records
    /// acquired, awaiting redelivery, delivery counts) and its members.
    Describe {
        group: String,
        /// json: one object with "members" and, per partition, its window
        /// ("start", "next", "acquired", "awaiting_redelivery", ...) and
        /// its records in flight.
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Delete a share group's state; refused while it has active members.
    Delete {
        group: String,
        #[command(flatten)]
        broker: BrokerArg,
    },
}

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// Print the records of TOPIC's dead-letter topic: where each came
    /// from, its delivery count and why it failed.
    List {
        topic: String,
        /// The dead-letter topic, when not TOPIC.dlq (a
        /// [[share.overrides]] dead_letter_topic).
        #[arg(long, value_name = "NAME")]
        dead_letter_topic: Option<String>,
        /// json: one object a line, as `skiff consume --format json`
        /// prints a record, with "dlq": where it came from (topic,
        /// partition, offset), its delivery count and the error.
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Publish dead-letter records again to their original topic, without
    /// their skiff.dlq.* headers; each is replayed once, also across runs.
    Replay {
        topic: String,
        /// The dead-letter topic, when not TOPIC.dlq (a
        /// [[share.overrides]] dead_letter_topic).
        #[arg(long, value_name = "NAME")]
        dead_letter_topic: Option<String>,
        /// Replay at most this many records (default: all).
        #[arg(long)]
        count: Option<u64>,
        #[command(flatten)]
        broker: BrokerArg,
    },
}

#[derive(Subcommand, Debug)]
pub enum MirrorCommand {
    /// The link to upstream Kafka and each rule's backlog, bytes at risk,
    /// forwarded and dropped records.
    Status {
        /// json: one object with "link", "last_error" and "rules", each
        /// rule's counters ("backlog_records", "bytes_at_risk", ...).
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Stop forwarding a rule's topics (they keep their backlog).
    Pause {
        rule: String,
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Forward a paused rule's topics again.
    Resume {
        rule: String,
        #[command(flatten)]
        broker: BrokerArg,
    },
}

#[derive(Subcommand, Debug)]
pub enum AclCommand {
    /// Print whether IDENTITY may do OPERATION on TOPIC under the config's
    /// [acl], and the rule that decides it. Exit 0: allow, 1: deny.
    Check {
        identity: String,
        /// produce | consume | create | delete | alter | describe | group | mirror
        operation: String,
        /// The topic (a group name for the group operation).
        topic: String,
        /// Config file (TOML); without it the embedded default.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
}

#[derive(Args, Debug)]
pub struct BenchHandshakeArgs {
    /// Handshakes of each kind (full, then resumed).
    #[arg(long, default_value_t = 500)]
    pub count: u32,
    /// Then open this many TLS connections (hello done) and hold them for
    /// --hold-ms, for measuring the broker's memory per connection.
    #[arg(long, default_value_t = 0)]
    pub hold: u32,
    /// How long --hold connections are held open.
    #[arg(long, default_value_t = 5_000)]
    pub hold_ms: u64,
    #[command(flatten)]
    pub broker: BrokerArg,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Durable produce: records/s, MB/s, ack latency percentiles.
    Produce(BenchProduceArgs),
    /// Replay a topic from the earliest offset: records/s, MB/s.
    Consume(BenchConsumeArgs),
    /// Raw sequential O_DIRECT write bandwidth of the disk holding DIR
    /// (1 MiB writes, 4 in flight): the yardstick for produce figures; and
    /// its read bandwidth (the file read back, 1 MiB at a time), the
    /// yardstick for replay figures beside loopback's.
    Disk(BenchDiskArgs),
    /// The disk's durable-write latency: one-block O_DIRECT overwrites,
    /// each followed by fdatasync (p50, p99, max): the floor under every
    /// ack with fsync always, for ack p99s to be read against.
    Sync(BenchSyncArgs),
    /// TLS handshakes per second against --broker (a TLS listener), full
    /// and resumed; optionally hold many connections open.
    Handshake(BenchHandshakeArgs),
    /// Raw loopback TCP bandwidth (1 MiB writes and reads, one
    /// connection): the yardstick for replay figures.
    Loopback(BenchLoopbackArgs),
    /// A consumer group keeping up with an open-loop producer: end-to-end
    /// latency, leave-to-reread time, commit rate and fsyncs per commit.
    Group(BenchGroupArgs),
    /// Share-group throughput: N workers accept every record of a filled
    /// topic through one share group (an in-process handler, not --exec),
    /// next to one plain consumer reading the same records.
    Share(BenchShareArgs),
    /// Transactional produce with N records per transaction next to plain
    /// idempotent produce, in the same run (one producer each, in turn).
    Txn(BenchTxnArgs),
}

#[derive(Args, Debug, Clone)]
pub struct BenchShareArgs {
    /// The bench topic: deleted if it exists, made anew, deleted at the end.
    #[arg(long, default_value = "skiff-bench-share", value_parser = topic_name)]
    pub topic: String,
    /// Partitions of the bench topic; every worker takes from all of them.
    #[arg(long, default_value_t = 1)]
    pub partitions: u32,
    /// Workers of the share group (threads of this process, a connection
    /// each).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Records in the topic, all taken and accepted.
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Record value size in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Records per share fetch (and per acknowledgement).
    #[arg(long, default_value_t = 100)]
    pub batch: u32,
    /// always | interval:MS | never (for the bench topic; the share state
    /// is always fsynced).
    #[arg(long, default_value = "always")]
    pub fsync: String,
    #[command(flatten)]
    pub broker: BrokerArg,
}

#[derive(Args, Debug, Clone)]
pub struct BenchTxnArgs {
    /// The bench topic: deleted if it exists and made anew.
    #[arg(long, default_value = "skiff-bench-txn", value_parser = topic_name)]
    pub topic: String,
    /// Partitions of the bench topic.
    #[arg(long, default_value_t = 1)]
    pub partitions: u32,
    /// Records each mode writes.
    #[arg(long, default_value_t = 100_000)]
    pub records: u64,
    /// Records per transaction, one transactional mode per value.
    #[arg(long, value_delimiter = ',', default_value = "10,1000")]
    pub per_txn: Vec<u64>,
    /// Transactional producers writing at once (a connection and a
    /// transactional id each), sharing the records between them.
    #[arg(long, default_value_t = 1)]
    pub producers: u32,
    /// Record value size in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// always | interval:MS | never (for the bench topic).
    #[arg(long, default_value = "always")]
    pub fsync: String,
    #[command(flatten)]
    pub broker: BrokerArg,
}

#[derive(Args, Debug, Clone)]
pub struct BenchGroupArgs {
    /// The bench topic: deleted if it exists, made anew, deleted at the end.
    #[arg(long, default_value = "skiff-bench-group", value_parser = topic_name)]
    pub topic: String,
    /// Partitions of the bench topic, shared out among the members.
    #[arg(long, default_value_t = 8)]
    pub partitions: u32,
    /// Members of the group (threads of this process, a connection each).
    #[arg(long, default_value_t = 4)]
    pub members: usize,
    /// Records per second the producer sends (open loop).
    #[arg(long, default_value_t = 200_000)]
    pub rate: u64,
    /// How long the producer sends; member 0 leaves cleanly half-way.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Record value size in bytes (at least 8: the send time).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// always | interval:MS | never (for the bench topic).
    #[arg(long, default_value = "always")]
    pub fsync: String,
    /// The members' heartbeat interval: how soon they hear of a rebalance.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Concurrent committers in the commit-rate phase.
    #[arg(long, default_value_t = 64)]
    pub committers: u32,
    /// How long the commit-rate phase lasts (after the producer's).
    #[arg(long, default_value_t = 5)]
    pub commit_seconds: u64,
    /// The broker's metrics endpoint, to count offsets-log writes per commit.
    #[arg(long, value_name = "ADDRESS")]
    pub metrics: Option<String>,
    #[command(flatten)]
    pub broker: BrokerArg,
}

#[derive(Args, Debug)]
pub struct BenchLoopbackArgs {
    /// Bytes to send (rounded down to whole MiB, at least 1 MiB).
    #[arg(long, default_value_t = 1 << 30)]
    pub bytes: u64,
    /// Also measure at a producer's depth: this many bytes sent, then a
    /// one-byte answer awaited, and again (`window_mb_per_s`); give it the
    /// records in flight times their size.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    pub window: Option<u64>,
}

#[derive(Args, Debug)]
pub struct BenchDiskArgs {
    /// A directory on the disk to measure (point it at the data directory's).
    #[arg(long, default_value = ".")]
    pub dir: std::path::PathBuf,
    /// Bytes to write (rounded down to whole MiB, at least 1 MiB).
    #[arg(long, default_value_t = 1 << 30)]
    pub bytes: u64,
    /// Also measure writes over blocks written once already (what skiff's
    /// pre-written segments see); writes twice as much again.
    #[arg(long)]
    pub overwrite: bool,
    /// Also measure durable windows of this many bytes at a producer's
    /// depth: each written over written blocks and fdatasynced before the
    /// next (`window_mb_per_s`); give it the records in flight times their
    /// size.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    pub window: Option<u64>,
}

#[derive(Args, Debug)]
pub struct BenchSyncArgs {
    /// A directory on the disk to measure (point it at the data directory's).
    #[arg(long, default_value = ".")]
    pub dir: std::path::PathBuf,
    /// Durable writes to time.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub count: u64,
    /// Space the writes out to this many a second, sleeping between them as
    /// a lightly loaded broker does between records, and report the CPU
    /// each costs: the floor under the broker's CPU per record at that
    /// rate (`skiff bench produce --rate ... --broker-pid`). Without it,
    /// the writes go back to back.
    #[arg(long, value_name = "WRITES_PER_S", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub rate: Option<u64>,
}

#[derive(Args, Debug)]
pub struct BenchProduceArgs {
    /// Records to send in all, shared out among the producers.
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: u64,
    /// Record value size in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Concurrent producer connections.
    #[arg(long, default_value_t = 1)]
    pub producers: u32,
    /// Partitions of the bench topic. Producer i writes to partition
    /// i mod N: 4 producers on 4 partitions write one each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub partitions: u32,
    /// always | interval:MS | never (for the bench topic).
    #[arg(long, default_value = "always")]
    pub fsync: String,
    /// The bench topic: deleted if it exists, made anew, deleted at the
    /// end (see --keep and --existing-topic).
    #[arg(long, default_value = "skiff-bench", value_parser = topic_name)]
    pub topic: String,
    /// Segments of 64 MiB in the bench topic's ring: more to keep a
    /// larger backlog (scripts/bench-mirror's 1 GiB catch-up).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..=4096))]
    pub segments: u32,
    /// Leave the bench topic (and the disk its rings reserve) behind for
    /// `skiff bench consume`; without it the topic is deleted at the end.
    #[arg(long)]
    pub keep: bool,
    /// Produce into --topic as the caller made it: neither deleted and
    /// made again first nor deleted at the end, so that what is counted
    /// around the run (a device's flushes) is the run's alone.
    #[arg(long, conflicts_with_all = ["compare_idempotence", "compare_tls", "compare_compaction"])]
    pub existing_topic: bool,
    /// At most this many records un-acknowledged per producer.
    #[arg(long, default_value_t = 1000)]
    pub in_flight: u32,
    /// Each producer a device: skiff's protocol spoken directly on a
    /// connection of its own, one record per produce request, the next
    /// once the last is answered (with --in-flight 1 --queued 0), instead
    /// of the client library's producer, which costs the bench several
    /// times as much CPU per record: with many producers on the broker's
    /// machine the bench is otherwise what is measured. Plain TCP or the
    /// Unix socket.
    #[arg(long)]
    pub devices: bool,
    /// Records each producer may hold beyond those in flight, built into
    /// batches and waiting for acks to make room (default: as many as
    /// --in-flight). Their latency counts from when they were given to
    /// the producer. 0: the bench waits for an ack before each send.
    #[arg(long)]
    pub queued: Option<u32>,
    /// Open loop: send at this many records/s in all (split evenly over the
    /// producers), each record when it is due, and count its latency from
    /// when it was due, so stalls are not hidden (the open loop of
    /// docs/performance.md; try half of the closed loop's rate). --in-flight and --queued
    /// still bound what is outstanding: a record held back by them is late.
    #[arg(long, value_name = "RECORDS_PER_S")]
    pub rate: Option<u64>,
    /// Idempotent producers (producer id, epoch, sequences checked by the
    /// broker), as the client library's default.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub idempotent: bool,
    /// Measure what idempotence costs in one run: the messages go in this
    /// many rounds alternating between an idempotent and a plain producer
    /// (ABBA order), so both see the same machine; prints both rates and
    /// their ratio. Ignores --idempotent and --producers.
    #[arg(long, value_name = "ROUNDS")]
    pub compare_idempotence: Option<u32>,
    /// Measure what TLS costs in one run: the messages go in --rounds
    /// rounds alternating (ABBA) between a plaintext producer on --broker
    /// and a TLS producer on this address (with the --tls-* options);
    /// prints both rates and their ratio.
    #[arg(long, value_name = "TLS_ADDRESS")]
    pub compare_tls: Option<String>,
    /// Rounds for --compare-tls.
    #[arg(long, default_value_t = 4)]
    pub rounds: u32,
    /// The broker's process id: report its CPU time (user + sys, from
    /// /proc/PID/stat) over the run, and per million records.
    #[arg(long, value_name = "PID")]
    pub broker_pid: Option<u32>,
    /// Keyed records: record i gets the key `k<i mod KEYS>` (the key
    /// updated over and over, as a compacted topic sees).
    #[arg(long, value_name = "KEYS")]
    pub keys: Option<u64>,
    /// The bench topic's cleanup policy: delete | compact | compact,delete
    /// (a compacted one needs --keys).
    #[arg(long, default_value = "delete")]
    pub cleanup: String,
    /// Measure what a running compaction costs producers, in one run: the
    /// messages go in this many rounds of two slices (ABBA order), each
    /// slice on a fresh topic while another topic holds --fill-bytes of
    /// keyed records, compacted (the cleaner at its configured cap) in
    /// one slice of a pair and plain (no cleaner) in the other; prints
    /// both rates and p99s and their ratios.
    #[arg(long, value_name = "ROUNDS")]
    pub compare_compaction: Option<u32>,
    /// For --compare-compaction: bytes of keyed records (100 keys) in the
    /// topic the cleaner works on.
    #[arg(long, default_value_t = 48 * 1024 * 1024)]
    pub fill_bytes: u64,
    #[command(flatten)]
    pub broker: BrokerArg,
}

impl BenchProduceArgs {
    /// `--queued`, defaulting to one more window of `--in-flight`.
    pub fn queued(&self) -> u32 {
        self.queued.unwrap_or(self.in_flight)
    }
}

#[derive(Args, Debug)]
pub struct BenchConsumeArgs {
    /// The topic read, from its earliest offset (`skiff bench produce
    /// --keep` leaves one behind).
    #[arg(long, default_value = "skiff-bench", value_parser = topic_name)]
    pub topic: String,
    /// Stop after this many records (default: everything up to the latest offset).
    #[arg(long)]
    pub messages: Option<u64>,
    /// Read the topic again from its start until at least this many
    /// seconds have passed (a replay of a small topic over in a tenth of
    /// a second measures start-up more than reading).
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub min_seconds: f64,
    /// The broker's process id: report its CPU time over the run.
    #[arg(long, value_name = "PID")]
    pub broker_pid: Option<u32>,
    #[command(flatten)]
    pub broker: BrokerArg,
}
