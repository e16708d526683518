//! The configuration: TOML schema, embedded default, device profiles,
//! validation, and the memory budget.
//!
//! A config is built in layers, each a TOML table deep-merged over the one
//! before (a key present in a later layer wins):
//!
//! 1. the embedded default (`default.toml`, every key present),
//! 2. an optional device profile from `firmware-config/` (embedded in the
//!    binary), named by `--profile` or by `profile = "NAME"` in the file,
//! 3. an optional config file (`--config FILE`).
//!
//! Because the embedded default names every key, the Rust structs have no
//! serde defaults: `default.toml` is the only place a default value lives.
//!
//! Every error names its source (file, profile or the embedded default), the
//! dotted key and, when known, the line: `skiff-bad.toml: unknown key
//! 'server.max_conections' (line 3)`.

mod budget;
mod error;
mod profiles;
mod schema;

pub use budget::{
    human, BudgetLine, DiskBudget, MemoryBudget, CONNECTION_STATE_BYTES, PRODUCER_ENTRY_BYTES,
    RUNTIME_BASE_BYTES, SHARE_KEPT_REASON_BYTES, SHARE_MEMBER_BYTES, SHARE_PARTITION_BYTES,
    SHARE_WINDOW_RECORD_BYTES, TLS_CONNECTION_BYTES, TLS_HANDSHAKE_BYTES_MAX, TXN_ID_BYTES,
};
pub use error::{ConfigError, ConfigErrorKind};
pub use profiles::{profile_names, profile_text, PROFILES};
pub use schema::{
    AclConfig, AclRule, Config, FsyncPolicy, IdentityFrom, LogConfig, MetricsConfig,
    MirrorAggregate, MirrorConfig, MirrorRule, MirrorSasl, MirrorTls, OverflowPolicy, ParseError,
    ProducersConfig, QuotaOverride, QuotasConfig, ServerConfig, StorageBackend, StorageSection,
    TlsSection, TopicDefaults, UnixIdentity, ACL_OPERATIONS,
};
pub use schema::{ShareOverride, ShareSection};

use std::path::{Path, PathBuf};

/// skiff's default TCP port (produce/consume protocol).
pub const DEFAULT_PORT: u16 = 9471;
/// The port device profiles use for the metrics endpoint.
pub const DEFAULT_METRICS_PORT: u16 = 9472;

/// The most executor threads the network side runs on (one per core but
/// the storage thread's); the memory budget counts each one.
pub const NETWORK_THREADS_MAX: usize = 4;

/// The embedded default config, the first layer of every config.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// Where a layer came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    Embedded,
    Profile(String),
    File(PathBuf),
}

impl Origin {
    fn name(&self) -> String {
        match self {
            Origin::Embedded => "embedded default config".to_string(),
            Origin::Profile(name) => format!("profile '{name}' (firmware-config/{name}.toml)"),
            Origin::File(path) => path.display().to_string(),
        }
    }
}

/// One parsed layer: its origin, spans (for line numbers) and table.
struct Layer {
    origin: Origin,
    /// The span-preserving parse, used to find the line of a dotted key.
    doc: toml_edit::ImDocument<String>,
    table: toml::Table,
    /// Byte offsets of the text's newlines: a key's line is a binary
    /// search, not a count from the start per key (that count was half of
    /// parsing the embedded default).
    newlines: Vec<usize>,
}

impl Layer {
    fn parse(origin: Origin, text: String) -> Result<Layer, ConfigError> {
        let doc = toml_edit::ImDocument::parse(text.clone()).map_err(|e| {
            let line = e.span().map(|s| line_of(&text, s.start));
            ConfigError::new(
                origin.name(),
                line,
                ConfigErrorKind::Syntax(e.message().to_string()),
            )
        })?;
        // The same text parsed by `toml` into a plain table for merging; it
        // cannot fail where toml_edit succeeded (same parser underneath), but
        // map the error anyway rather than assume.
        let table: toml::Table = toml::from_str(&text).map_err(|e| {
            let line = e.span().map(|s| line_of(&text, s.start));
            ConfigError::new(
                origin.name(),
                line,
                ConfigErrorKind::Syntax(e.message().to_string()),
            )
        })?;
        let newlines = newline_offsets(doc.raw());
        let layer = Layer {
            origin,
            doc,
            table,
            newlines,
        };
        layer.check_keys()?;
        Ok(layer)
    }

    /// Rejects keys the schema does not know, keys that do not belong in
    /// this kind of layer (a profile names a device, not an install, so it
    /// has no `data_dir`) and sections that are not tables: every one, in
    /// one error in file order, each with its dotted path and line.
    ///
    /// serde's `deny_unknown_fields` would catch unknown keys too, but its
    /// error names neither the full path nor the line; this walk does.
    fn check_keys(&self) -> Result<(), ConfigError> {
        let known = known_keys();
        let mut problems = Vec::new();
        let mut stack: Vec<(String, &dyn toml_edit::TableLike)> = vec![(
            String::new(),
            self.doc.as_table() as &dyn toml_edit::TableLike,
        )];
        while let Some((prefix, table)) = stack.pop() {
            for (key, item) in table.iter() {
                let path = if prefix.is_empty() {
                    key.to_string()
                } else {
                    format!("{prefix}.{key}")
                };
                let line = table
                    .get_key_value(key)
                    .and_then(|(k, _)| k.span())
                    .map(|s| self.line(s.start));
                if !known.iter().any(|k| k.path == path) {
                    let mut err = ConfigError::new(
                        self.origin.name(),
                        line,
                        ConfigErrorKind::UnknownKey(path.clone()),
                    );
                    err.did_you_mean = did_you_mean(&path, known);
                    problems.push(err);
                    continue;
                }
                // Returning here hid the unknown keys not yet walked, so a
                // fix of this one met a typo on the next run.
                if matches!(self.origin, Origin::Profile(_))
                    && (path == "data_dir" || path == "profile")
                {
                    problems.push(ConfigError::new(
                        self.origin.name(),
                        line,
                        ConfigErrorKind::NotAllowedInProfile(path),
                    ));
                    continue;
                }
                let section = known.iter().any(|k| k.path == path && k.is_section);
                match item.as_table_like() {
                    Some(inner) if section => stack.push((path, inner)),
                    _ if section => problems.push(ConfigError::new(
                        self.origin.name(),
                        line,
                        ConfigErrorKind::BadValue {
                            key: path,
                            message: "expected a table".to_string(),
                        },
                    )),
                    _ => {}
                }
            }
        }
        // The walk's order is a stack's: the file's is the reader's.
        problems.sort_by_key(|e| (e.line.unwrap_or(usize::MAX), e.key().map(str::to_owned)));
        let mut problems = problems.into_iter();
        match problems.next() {
            Some(mut first) => {
                first.more = problems.collect();
                Err(first)
            }
            None => Ok(()),
        }
    }

    /// 1-based line number of a byte offset, as [`line_of`].
    fn line(&self, offset: usize) -> usize {
        self.newlines.partition_point(|&n| n < offset) + 1
    }

    /// The line of a dotted key in this layer, if the layer sets it. A part
    /// may index an array of tables as serde names it (`mirror.rules[1]`);
    /// a key an element leaves to its default gives the element's line.
    fn line_of_key(&self, dotted: &str) -> Option<Option<usize>> {
        let line = |span: Option<std::ops::Range<usize>>| span.map(|s| self.line(s.start));
        let mut table: &dyn toml_edit::TableLike = self.doc.as_table();
        // The line of the innermost array element walked into, if any.
        let mut element = None;
        let mut parts = dotted.split('.').peekable();
        while let Some(part) = parts.next() {
            let (name, index) = match part.strip_suffix(']').and_then(|p| p.split_once('[')) {
                Some((name, i)) => (name, Some(i.parse::<usize>().ok()?)),
                None => (part, None),
            };
            let Some((key, item)) = table.get_key_value(name) else {
                return element;
            };
            let (inner, span) = match index {
                None if parts.peek().is_none() => return Some(line(key.span())),
                None => (item.as_table_like(), None),
                Some(i) => match item {
                    toml_edit::Item::ArrayOfTables(a) => {
                        let t = a.get(i)?;
                        (Some(t as &dyn toml_edit::TableLike), t.span())
                    }
                    toml_edit::Item::Value(toml_edit::Value::Array(a)) => {
                        let v = a.get(i)?;
                        (
                            v.as_inline_table().map(|t| t as &dyn toml_edit::TableLike),
                            v.span(),
                        )
                    }
                    _ => return None,
                },
            };
            if index.is_some() {
                element = Some(line(span));
                if parts.peek().is_none() {
                    return element;
                }
            }
            match inner {
                Some(t) => table = t,
                None => return element,
            }
        }
        None
    }
}

/// A key of the schema, found by serializing the embedded default.
struct KnownKey {
    path: String,
    is_section: bool,
}

/// The known key an unknown `path` most likely meant: the same name in
/// another section (`server.fsync` for `topic_defaults.fsync`), else the
/// closest spelling, if close enough (clap's measure and threshold for
/// subcommands).
fn did_you_mean(path: &str, known: &[KnownKey]) -> Option<String> {
    let leaf = |p: &str| p.rsplit('.').next().unwrap_or(p).to_string();
    let name = leaf(path);
    let mut moved = known
        .iter()
        .filter(|k| !k.is_section && leaf(&k.path) == name);
    if let (Some(k), None) = (moved.next(), moved.next()) {
        return Some(k.path.clone());
    }
    known
        .iter()
        .map(|k| (strsim::jaro(path, &k.path), k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k.path.clone())
}

/// The schema's keys: every key of the embedded default (which names them
/// all) plus `profile`, which the default leaves unset. Walked once: every
/// layer of every load checks against them.
fn known_keys() -> &'static [KnownKey] {
    static KNOWN: std::sync::OnceLock<Vec<KnownKey>> = std::sync::OnceLock::new();
    KNOWN.get_or_init(walk_known_keys)
}

fn walk_known_keys() -> Vec<KnownKey> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut Vec<KnownKey>) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            if let toml::Value::Table(inner) = value {
                out.push(KnownKey {
                    path: path.clone(),
                    is_section: true,
                });
                walk(&path, inner, out);
            } else {
                out.push(KnownKey {
                    path,
                    is_section: false,
                });
            }
        }
    }
    let mut out = vec![KnownKey {
        path: "profile".to_string(),
        is_section: false,
    }];
    // The embedded default is checked by a unit test to parse; if it ever did
    // not, no key would be known and every config would fail loudly.
    if let Ok(table) = toml::from_str::<toml::Table>(DEFAULT_TOML) {
        walk("", &table, &mut out);
    }
    out
}

/// Byte offsets of `text`'s newlines.
fn newline_offsets(text: &str) -> Vec<usize> {
    text.bytes()
        .enumerate()
        .filter_map(|(i, b)| (b == b'\n').then_some(i))
        .collect()
}

/// The embedded default's layer, parsed once: every load starts from it
/// (the config fuzz target loads it once a run). A parse
/// that fails is not kept, and fails each load alike.
fn embedded_layer() -> Result<&'static Layer, ConfigError> {
    static EMBEDDED: std::sync::OnceLock<Layer> = std::sync::OnceLock::new();
    if let Some(layer) = EMBEDDED.get() {
        return Ok(layer);
    }
    let layer = Layer::parse(Origin::Embedded, DEFAULT_TOML.to_string())?;
    Ok(EMBEDDED.get_or_init(|| layer))
}

/// 1-based line number of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Deep merge: keys of `over` replace those of `base`; tables merge.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

impl Config {
    /// The embedded default config.
    pub fn embedded_default() -> Config {
        // The embedded default is a compile-time constant checked by the unit
        // tests (`embedded_default_is_valid`), so failing here is a build
        // defect, not a runtime condition.
        match Config::load_layers(None, None) {
            Ok(cfg) => cfg,
            Err(e) => panic!("the embedded default config is invalid: {e}"),
        }
    }

    /// Loads a config file layered over the embedded default (and over the
    /// profile the file names, if any). `None` gives the embedded default.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_layers(path, None)
    }

    /// The embedded default with a device profile layered over it.
    pub fn with_profile(name: &str) -> Result<Config, ConfigError> {
        Config::load_layers(None, Some(name))
    }

    /// The general form behind `skiff serve [--config FILE] [--profile NAME]`:
    /// default, then the profile (`profile` argument, else the file's
    /// `profile` key), then the file. Validated.
    pub fn load_layers(path: Option<&Path>, profile: Option<&str>) -> Result<Config, ConfigError> {
        let file = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    ConfigError::new(p.display().to_string(), None, ConfigErrorKind::Io(e))
                })?;
                Some((p.to_path_buf(), text))
            }
            None => None,
        };
        Config::load_text_layers(file, profile)
    }

    /// As [`Config::load`] for a file's text already read; `name` stands
    /// for the file in errors. (The config fuzz target comes in here.)
    pub fn from_text(name: &str, text: &str) -> Result<Config, ConfigError> {
        Config::load_text_layers(Some((PathBuf::from(name), text.to_owned())), None)
    }

    fn load_text_layers(
        file: Option<(PathBuf, String)>,
        profile: Option<&str>,
    ) -> Result<Config, ConfigError> {
        let embedded = embedded_layer()?;
        let file = match file {
            Some((path, text)) => Some(Layer::parse(Origin::File(path), text)?),
            None => None,
        };
        let from_file = file
            .as_ref()
            .and_then(|f| f.table.get("profile"))
            .and_then(|v| v.as_str().map(str::to_string));
        let profile_name = profile.map(str::to_string).or(from_file);
        let profile_layer = if let Some(name) = &profile_name {
            let text = profile_text(name).ok_or_else(|| {
                let origin = file
                    .as_ref()
                    .map(|f| f.origin.name())
                    .unwrap_or_else(|| "--profile".to_string());
                let line = file
                    .as_ref()
                    .and_then(|f| f.line_of_key("profile"))
                    .flatten();
                ConfigError::new(origin, line, ConfigErrorKind::UnknownProfile(name.clone()))
            })?;
            Some(Layer::parse(
                Origin::Profile(name.clone()),
                text.to_string(),
            )?)
        } else {
            None
        };
        let layers: Vec<&Layer> = std::iter::once(embedded)
            .chain(&profile_layer)
            .chain(&file)
            .collect();

        let mut merged = toml::Table::new();
        for layer in &layers {
            merge(&mut merged, layer.table.clone());
        }
        if let Some(name) = &profile_name {
            // Record the profile actually applied (a --profile argument wins
            // over the file's key), so the effective config says what it is.
            merged.insert("profile".to_string(), toml::Value::String(name.clone()));
        }
        let cfg: Config =
            serde_path_to_error::deserialize(toml::Value::Table(merged)).map_err(|e| {
                let key = e.path().to_string();
                let message = e.into_inner().message().to_string();
                locate(
                    &layers,
                    &key,
                    ConfigErrorKind::BadValue {
                        key: key.clone(),
                        message,
                    },
                )
            })?;
        cfg.validate().map_err(|(key, reason)| {
            let kind = ConfigErrorKind::Invalid { key, reason };
            let err = locate(&layers, &invalid_at(&cfg, key), kind);
            // Rules without an upstream: a file that leaves mirror.upstream
            // unset has no line for it, but its rules are what need one.
            if err.line.is_none() && key == "mirror.upstream" && cfg.mirror.upstream.is_empty() {
                return locate(&layers, "mirror.rules[0]", err.kind);
            }
            err
        })?;
        Ok(cfg)
    }

    /// Command-line overrides (`--data-dir`, `--listen`), applied after
    /// loading and validated again.
    pub fn apply_overrides(
        &mut self,
        data_dir: Option<PathBuf>,
        listen: Option<String>,
    ) -> Result<(), ConfigError> {
        if let Some(dir) = data_dir {
            self.data_dir = dir;
        }
        if let Some(listen) = listen {
            self.server.listen = listen;
        }
        self.validate().map_err(|(key, reason)| {
            ConfigError::new(
                "command line".to_string(),
                None,
                ConfigErrorKind::Invalid { key, reason },
            )
        })
    }

    /// The effective config as TOML: every key, defaults included. Feeding
    /// it back to [`Config::load`] gives the same config.
    pub fn to_toml_string(&self) -> String {
        // Serializing plain structs of strings and integers to TOML cannot
        // fail (no maps with non-string keys, no values after tables).
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// The worst-case memory this config lets skiff use, one line per user.
    pub fn memory_budget(&self) -> MemoryBudget {
        MemoryBudget::of(self)
    }

    /// The storage thread's queue of jobs: `storage.append_queue_depth`,
    /// and at least a job per connection. A fan-in's devices each append a
    /// record at once while the thread gathers their round; behind a full
    /// queue each waited, holding the broker's order of idempotent submits
    /// while it did, so every append behind it cost a wake-up (1,000
    /// devices on a queue of 64: rate 0.83, broker CPU 1.14 per record).
    pub fn append_queue_jobs(&self) -> u32 {
        self.storage
            .append_queue_depth
            .max(self.server.max_connections)
    }

    /// Bounds of the recycled produce-batch buffers ([`crate::bufpool`]):
    /// how many are kept, the largest kept (a whole frame's, lent to its
    /// batch), and their bytes in all (what the memory budget counts).
    pub fn batch_pool_bounds(&self) -> PoolBounds {
        let queue = self.storage.append_queue_depth as usize;
        let batch = usize::try_from(self.storage.max_batch_bytes).unwrap_or(usize::MAX);
        let buffers = crate::bufpool::BUFFERS_DEFAULT.min(queue);
        // A large batch may come in its frame's whole read buffer, a little
        // larger than a batch; the bytes kept stay what the budget counts.
        let frame = usize::try_from(self.server.max_frame_bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(crate::protocol::FRAME_HEADER_BYTES);
        PoolBounds {
            buffers,
            buffer_bytes_max: batch.max(frame),
            bytes_max: usize::try_from(crate::bufpool::bytes_max(buffers, batch))
                .unwrap_or(usize::MAX),
        }
    }
}

/// The server's batch pool's bounds (`crate::bufpool::BatchPool::bounded`).
#[derive(Debug, Clone, Copy)]
pub struct PoolBounds {
    pub buffers: usize,
    pub buffer_bytes_max: usize,
    pub bytes_max: usize,
}

impl Default for Config {
    /// The embedded default.
    fn default() -> Config {
        Config::embedded_default()
    }
}

/// Attributes an error about `key` to the last layer that sets it (that is
/// the value that won the merge). When only a built-in layer under the
/// user's sets it (the embedded default, or a profile under a file), that
/// value is fine on its own and the conflict comes from a value the user
/// changed elsewhere (`storage.max_batch_bytes` raised past the frame size
/// the default or the profile sets): name the user's top layer, no line.
fn locate(layers: &[&Layer], key: &str, kind: ConfigErrorKind) -> ConfigError {
    let top = layers.last().map(|l| l.origin.name()).unwrap_or_default();
    let top_index = layers.len().saturating_sub(1);
    for (i, layer) in layers.iter().enumerate().rev() {
        if let Some(line) = layer.line_of_key(key) {
            if !matches!(layer.origin, Origin::File(_)) && i < top_index {
                break;
            }
            return ConfigError::new(layer.origin.name(), line, kind);
        }
    }
    ConfigError::new(top, None, kind)
}

/// Where to look for the line of a validation error about `key`: in a
/// list of tables, every element's keys are named alike
/// (`mirror.rules.aggregate.window_ms`), so in the element that failed.
fn invalid_at(cfg: &Config, key: &str) -> String {
    match cfg.failed_element(key) {
        Some((list, i)) => format!("{list}[{i}]{}", &key[list.len()..]),
        None => key.to_owned(),
    }
}

/// The keys a SIGHUP applies (`Server::reload`): every other change waits
/// for a restart.
const RELOADABLE: &[&str] = &[
    "acl",
    "quotas",
    "server.unix_identities",
    "server.tls.cert",
    "server.tls.key",
    "server.tls.client_ca",
    "server.tls.crl",
];

/// The dotted keys whose values differ between the config the broker
/// started with and `new`, leaving out those a reload applies: what a
/// SIGHUP cannot apply, for its log line to name.
pub fn restart_only_changes(running: &Config, new: &Config) -> Vec<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        if RELOADABLE.contains(&path) || a == b {
            return;
        }
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                let null = serde_json::Value::Null;
                for k in keys {
                    let sub = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(
                        &sub,
                        a.get(k).unwrap_or(&null),
                        b.get(k).unwrap_or(&null),
                        out,
                    );
                }
            }
            _ => out.push(path.to_owned()),
        }
    }
    let (Ok(a), Ok(b)) = (serde_json::to_value(running), serde_json::to_value(new)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    walk("", &a, &b, &mut out);
    out
}

/// What `skiff config check FILE` prints: the effective config, then the
/// memory budget and the disk budget.
pub fn check_report(cfg: &Config) -> String {
    let mut out = String::new();
    out.push_str("# effective configuration\n");
    out.push_str(&cfg.to_toml_string());
    out.push('\n');
    out.push_str(&cfg.memory_budget().to_string());
    out.push('\n');
    out.push_str(&DiskBudget::of(cfg).to_string());
    out
}

#[cfg(test)]
mod tests;
