//! Argument types of the client-side commands. The flags are a contract
//! that scripts rely on: add, never rename.

use clap::{Args, Subcommand, ValueEnum};

/// The embedded default config's TCP listener.
pub const DEFAULT_BROKER: &str = "127.0.0.1:9471";

#[derive(Args, Debug, Clone)]
pub struct BrokerArg {
    /// Broker address: host:port, or the path of a Unix socket.
    #[arg(long, global = true, default_value = DEFAULT_BROKER)]
    pub broker: String,
}

#[derive(Subcommand, Debug)]
pub enum TopicsCommand {
    /// Create a topic with a preallocated ring per partition.
    Create {
        name: String,
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
        #[arg(long)]
        fsync: Option<String>,
        /// overwrite | reject: what a full ring does.
        #[arg(long)]
        overflow: Option<String>,
        /// Drop records whose `msg-id` header was seen on the topic within
        /// this many ms (0: off).
        #[arg(long)]
        msg_id_window_ms: Option<u64>,
        /// Drop records whose `msg-id` header is among the topic's last N
        /// ids (0: off; at most 100000).
        #[arg(long)]
        msg_id_window_records: Option<u32>,
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// List topic names, one per line.
    List {
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Show a topic's config and each partition's offsets.
    Describe {
        name: String,
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
    after_help = "Records are sent by an idempotent producer: through a lost connection or a \
broker restart it retries (for up to 2 minutes) and the broker writes every record exactly \
once. Exits 0 only when every record is acknowledged."
)]
pub struct ProduceArgs {
    pub topic: String,
    /// Record key (routes the record to a partition by hash).
    #[arg(long)]
    pub key: Option<String>,
    /// Send to this partition instead of the key's.
    #[arg(long)]
    pub partition: Option<u32>,
    /// Record values; without any, one record per line of stdin.
    pub values: Vec<String>,
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
    #[command(flatten)]
    pub broker: BrokerArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct ConsumeArgs {
    pub topic: String,
    /// earliest | latest | OFFSET | @UNIX_MS
    #[arg(long, default_value = "earliest")]
    pub from: String,
    /// Read only this partition (default: all of them).
    #[arg(long)]
    pub partition: Option<u32>,
    /// Exit after this many records.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit after this many ms without a new record.
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: OutputFormat,
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
    /// (1 MiB writes, 4 in flight): the yardstick for produce figures.
    Disk(BenchDiskArgs),
    /// Raw loopback TCP bandwidth (1 MiB writes and reads, one
    /// connection): the yardstick for replay figures.
    Loopback(BenchLoopbackArgs),
}

#[derive(Args, Debug)]
pub struct BenchLoopbackArgs {
    /// Bytes to send (rounded down to whole MiB, at least 1 MiB).
    #[arg(long, default_value_t = 1 << 30)]
    pub bytes: u64,
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
}

#[derive(Args, Debug)]
pub struct BenchProduceArgs {
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: u64,
    /// Record value size in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Concurrent producer connections.
    #[arg(long, default_value_t = 1)]
    pub producers: u32,
    /// always | interval:MS | never (for the bench topic).
    #[arg(long, default_value = "always")]
    pub fsync: String,
    #[arg(long, default_value = "skiff-bench")]
    pub topic: String,
    /// At most this many records un-acknowledged per producer.
    #[arg(long, default_value_t = 1000)]
    pub in_flight: u32,
    /// Records each producer may hold beyond those in flight, built into
    /// batches and waiting for acks to make room (default: as many as
    /// --in-flight). Their latency counts from when they were given to
    /// the producer. 0: the bench waits for an ack before each send.
    #[arg(long)]
    pub queued: Option<u32>,
    /// Open loop: send at this many records/s in all (split evenly over the
    /// producers), each record when it is due, and count its latency from
    /// when it was due, so stalls are not hidden (BENCHMARKING.md's open
    /// loop; try half of the closed loop's rate). --in-flight and --queued
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
    #[arg(long, default_value = "skiff-bench")]
    pub topic: String,
    /// Stop after this many records (default: everything up to the latest offset).
    #[arg(long)]
    pub messages: Option<u64>,
    #[command(flatten)]
    pub broker: BrokerArg,
}
