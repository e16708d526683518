//! Windowed aggregates: a rule with `aggregate = { ... }` folds each
//! source partition's records into tumbling windows per key and sends one
//! JSON record per closed window instead of the records.
//!
//! Everything here is a function of the source partition's record sequence
//! in offset order, which is what makes the output exactly once across
//! crashes (the forwarder carries [`Checkpoint`] in the same upstream
//! transaction as the windows it closes):
//!
//! - The watermark is the largest timestamp seen so far.
//! - The *horizon* only rises: to `watermark - lateness_ms`, and past the
//!   oldest open window when more than `max_open_windows` are open (an
//!   early close). A window is closed (emitted) once its end is at or below
//!   the horizon; a record whose window is closed is late.
//! - A window's records all come after the checkpoint's `resume` offset
//!   (the first record of the oldest open window), and are exactly the
//!   well-formed records of `[resume, next)` whose window ends above the
//!   checkpoint's horizon: the horizon only rises, so none of them was late.
//!   So [`PartitionAgg::replay`] rebuilds the open windows from the log,
//!   and late counts not yet emitted travel in the checkpoint itself.

use std::collections::HashMap;
use std::fmt;

/// A rule's aggregate settings, validated with the config.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub window_ms: i64,
    pub lateness_ms: i64,
    pub fields: Vec<String>,
    pub max_open_windows: usize,
}

impl Spec {
    pub fn from_config(cfg: &crate::config::MirrorAggregate) -> Self {
        Self {
            window_ms: i64::try_from(cfg.window_ms).unwrap_or(i64::MAX).max(1),
            lateness_ms: i64::try_from(cfg.lateness_ms).unwrap_or(i64::MAX),
            fields: cfg.fields.clone(),
            max_open_windows: usize::try_from(cfg.max_open_windows)
                .unwrap_or(usize::MAX)
                .max(1),
        }
    }
}

/// Why a value was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Malformed {
    /// Neither a JSON object or number nor a CBOR map or number.
    NotJsonOrCbor,
    /// A named field holds something else than a finite number.
    NotANumber(String),
    /// None of the rule's fields is in it.
    NoField,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotJsonOrCbor => {
                f.write_str("not a JSON object or number, nor a CBOR map or number")
            }
            Self::NotANumber(field) => write!(f, "field '{field}' is not a finite number"),
            Self::NoField => f.write_str("none of the rule's fields is in it"),
        }
    }
}

/// Reads the named fields of `value` as f64 into `out` (one slot per field,
/// `None` when absent), skipping everything else without building a tree.
/// A value that parses as JSON is JSON; anything else is tried as CBOR. A
/// bare number is the field `value`.
pub fn extract(value: &[u8], fields: &[String], out: &mut [Option<f64>]) -> Result<(), Malformed> {
    out.iter_mut().for_each(|o| *o = None);
    let mut json = Json { b: value, i: 0 };
    match json.top(fields, out) {
        Some(Some(bad)) => return Err(bad),
        Some(None) => {}
        None => {
            out.iter_mut().for_each(|o| *o = None);
            cbor(value, fields, out)?;
        }
    }
    if out.iter().all(Option::is_none) {
        return Err(Malformed::NoField);
    }
    Ok(())
}

/// Nesting deeper than this is not read (and the value is malformed).
const JSON_DEPTH_MAX: u32 = 64;

/// A JSON reader that extracts numbers of named fields and checks the rest
/// only for its syntax. `None` from any step: not JSON.
struct Json<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Json<'a> {
    /// The whole value: `Some(why)` when JSON but a field is no number.
    fn top(&mut self, fields: &[String], out: &mut [Option<f64>]) -> Option<Option<Malformed>> {
        self.ws();
        let bad = if self.peek()? == b'{' {
            self.object(fields, out)?
        } else {
            let v = self.number()?;
            if let Some(i) = fields.iter().position(|f| f == "value") {
                out[i] = Some(v);
            }
            None
        };
        self.ws();
        (self.i == self.b.len()).then_some(bad)
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.peek()? == c).then(|| self.i += 1)
    }

    fn object(&mut self, fields: &[String], out: &mut [Option<f64>]) -> Option<Option<Malformed>> {
        self.eat(b'{')?;
        let mut bad = None;
        if self.eat(b'}').is_some() {
            return Some(None);
        }
        loop {
            self.ws();
            let key = self.string()?;
            self.eat(b':')?;
            self.ws();
            match fields.iter().position(|f| *f == key) {
                Some(slot) if matches!(self.peek()?, b'-' | b'0'..=b'9') => match self.number()? {
                    v if v.is_finite() => out[slot] = Some(v),
                    _ => {
                        bad.get_or_insert_with(|| Malformed::NotANumber(fields[slot].clone()));
                    }
                },
                Some(slot) => {
                    self.skip(1)?;
                    bad.get_or_insert_with(|| Malformed::NotANumber(fields[slot].clone()));
                }
                None => self.skip(1)?,
            }
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(bad);
                }
                _ => return None,
            }
        }
    }

    /// A string at the cursor, unescaped.
    fn string(&mut self) -> Option<std::borrow::Cow<'a, str>> {
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.i + 1;
        let mut end = start;
        loop {
            match *self.b.get(end)? {
                b'"' => break,
                b'\\' => return self.escaped(start),
                0..=0x1f => return None,
                _ => end += 1,
            }
        }
        self.i = end + 1;
        std::str::from_utf8(&self.b[start..end])
            .ok()
            .map(Into::into)
    }

    fn escaped(&mut self, start: usize) -> Option<std::borrow::Cow<'a, str>> {
        let mut text = String::new();
        let mut i = start;
        loop {
            let run = i;
            while !matches!(*self.b.get(i)?, b'"' | b'\\' | 0..=0x1f) {
                i += 1;
            }
            text.push_str(std::str::from_utf8(&self.b[run..i]).ok()?);
            match self.b[i] {
                b'"' => break,
                b'\\' => {
                    let c = match *self.b.get(i + 1)? {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hex4 = |at: usize| {
                                let t = std::str::from_utf8(self.b.get(at..at + 4)?).ok()?;
                                u32::from_str_radix(t, 16).ok()
                            };
                            let mut c = hex4(i + 2)?;
                            i += 4;
                            if (0xd800..0xdc00).contains(&c)
                                && self.b.get(i + 2..i + 4) == Some(b"\\u")
                            {
                                let low = hex4(i + 4)?;
                                c = 0x10000 + ((c - 0xd800) << 10) + low.checked_sub(0xdc00)?;
                                i += 6;
                            }
                            char::from_u32(c)?
                        }
                        _ => return None,
                    };
                    text.push(c);
                    i += 2;
                }
                _ => return None,
            }
        }
        self.i = i + 1;
        Some(text.into())
    }

    /// A JSON number, read with Rust's correctly rounded parser.
    fn number(&mut self) -> Option<f64> {
        let start = self.i;
        while matches!(
            self.peek(),
            Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
        ) {
            self.i += 1;
        }
        let text = std::str::from_utf8(&self.b[start..self.i]).ok()?;
        let digits = text.strip_prefix('-').unwrap_or(text);
        if !digits.starts_with(|c: char| c.is_ascii_digit()) {
            return None;
        }
        text.parse().ok()
    }

    /// Any value, checked for its syntax only.
    fn skip(&mut self, depth: u32) -> Option<()> {
        if depth > JSON_DEPTH_MAX {
            return None;
        }
        self.ws();
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' | b'[' => {
                let (open, close) = (self.b[self.i], self.b[self.i] + 2);
                self.i += 1;
                if self.eat(close).is_some() {
                    return Some(());
                }
                loop {
                    if open == b'{' {
                        self.ws();
                        self.string()?;
                        self.eat(b':')?;
                    }
                    self.skip(depth + 1)?;
                    self.ws();
                    match self.peek()? {
                        b',' => self.i += 1,
                        c if c == close => {
                            self.i += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                }
            }
            b't' | b'f' | b'n' => {
                let word: &[u8] = match self.b[self.i] {
                    b't' => b"true",
                    b'f' => b"false",
                    _ => b"null",
                };
                let ok = self.b[self.i..].starts_with(word);
                self.i += word.len();
                ok.then_some(())
            }
            _ => self.number().map(drop),
        }
    }
}

/// A CBOR map (text keys) or number; unknown entries are skipped.
fn cbor(value: &[u8], fields: &[String], out: &mut [Option<f64>]) -> Result<(), Malformed> {
    use minicbor::data::Type;
    let bad = |_| Malformed::NotJsonOrCbor;
    let mut d = minicbor::Decoder::new(value);
    let top = d.datatype().map_err(bad)?;
    if !matches!(top, Type::Map | Type::MapIndef) {
        let v = cbor_number(&mut d)?.ok_or(Malformed::NotJsonOrCbor)?;
        if d.position() != value.len() {
            return Err(Malformed::NotJsonOrCbor);
        }
        if let Some(i) = fields.iter().position(|f| f == "value") {
            out[i] = Some(v);
        }
        return Ok(());
    }
    let len = d.map().map_err(bad)?;
    let mut wrong = None;
    let mut i = 0u64;
    loop {
        match len {
            Some(n) if i == n => break,
            None if d.datatype().map_err(bad)? == Type::Break => {
                d.skip().map_err(bad)?;
                break;
            }
            _ => {}
        }
        i += 1;
        let slot = match d.datatype().map_err(bad)? {
            Type::String => {
                let k = d.str().map_err(bad)?;
                fields.iter().position(|f| f == k)
            }
            _ => {
                d.skip().map_err(bad)?;
                None
            }
        };
        match slot {
            Some(s) => match cbor_number(&mut d)? {
                Some(v) if v.is_finite() => out[s] = Some(v),
                _ => {
                    wrong.get_or_insert_with(|| Malformed::NotANumber(fields[s].clone()));
                }
            },
            None => d.skip().map_err(bad)?,
        }
    }
    if d.position() != value.len() {
        return Err(Malformed::NotJsonOrCbor);
    }
    wrong.map_or(Ok(()), Err)
}

/// The number at `d`, or `None` (skipped) for any other item.
fn cbor_number(d: &mut minicbor::Decoder<'_>) -> Result<Option<f64>, Malformed> {
    use minicbor::data::Type;
    let bad = |_| Malformed::NotJsonOrCbor;
    Ok(match d.datatype().map_err(bad)? {
        Type::U8
        | Type::U16
        | Type::U32
        | Type::U64
        | Type::I8
        | Type::I16
        | Type::I32
        | Type::I64
        | Type::Int => Some(i128::from(d.int().map_err(bad)?) as f64),
        Type::F16 => {
            let bytes = d.input().get(d.position() + 1..d.position() + 3);
            let bits = bytes.map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
            d.skip().map_err(bad)?;
            Some(f16_to_f64(bits))
        }
        Type::F32 | Type::F64 => Some(d.f64().map_err(bad)?),
        _ => {
            d.skip().map_err(bad)?;
            None
        }
    })
}

/// IEEE 754 half precision (CBOR major 7, 25).
fn f16_to_f64(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((bits >> 10) & 0x1f);
    let mant = f64::from(bits & 0x3ff);
    sign * match exp {
        0 => mant * 2f64.powi(-24),
        31 if mant == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + mant / 1024.0) * 2f64.powi(e - 15),
    }
}

/// One field's figures in one window.
#[derive(Debug, Clone, Copy, PartialEq)]
struct FieldAgg {
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
    last: f64,
}

impl FieldAgg {
    const EMPTY: Self = Self {
        count: 0,
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
        sum: 0.0,
        last: 0.0,
    };

    fn fold(&mut self, v: f64) {
        self.count += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += v;
        self.last = v;
    }
}

/// An open window of one key.
#[derive(Debug, Clone)]
struct Window {
    start: i64,
    /// The offset of its first record: replay starts at the oldest one.
    first_offset: u64,
    count: u64,
    fields: Box<[FieldAgg]>,
}

/// A record key; `None` for records without one.
pub type Key = Option<Box<[u8]>>;

/// A window closed and ready to go upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct Closed {
    pub key: Key,
    pub start: i64,
    pub end: i64,
    /// The record's value: the JSON the docs describe.
    pub json: Vec<u8>,
}

/// Counts since they were last taken (at a commit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub late: u64,
    pub malformed: u64,
    pub closed_early: u64,
    pub emitted: u64,
}

/// What the checkpoint carries besides the next offset. Offsets and
/// horizon are exact; `late` holds the late counts of keys whose next
/// window is not emitted yet (hex keys, `None` for no key). As text:
/// `window_ms resume watermark|- horizon [key|-:count ...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The window length the state was made with: another one cannot be
    /// replayed into the same windows.
    pub window_ms: i64,
    /// Where replay starts: the first record of the oldest open window.
    pub resume: u64,
    pub watermark: Option<i64>,
    pub horizon: i64,
    pub late: Vec<(Option<String>, u64)>,
}

impl Checkpoint {
    pub fn encode(&self) -> String {
        use std::fmt::Write;
        let mut t = format!("{} {} ", self.window_ms, self.resume);
        match self.watermark {
            Some(w) => write!(t, "{w}"),
            None => write!(t, "-"),
        }
        .expect("String writes are infallible");
        write!(t, " {}", self.horizon).expect("String writes are infallible");
        for (key, n) in &self.late {
            write!(t, " {}:{n}", key.as_deref().unwrap_or("-"))
                .expect("String writes are infallible");
        }
        t
    }

    pub fn decode(text: &str) -> Option<Self> {
        let mut words = text.split(' ');
        let mut next = || words.next();
        let window_ms = next()?.parse().ok()?;
        let resume = next()?.parse().ok()?;
        let watermark = match next()? {
            "-" => None,
            w => Some(w.parse().ok()?),
        };
        let horizon = next()?.parse().ok()?;
        let late = words
            .map(|w| {
                let (key, n) = w.split_once(':')?;
                Some(((key != "-").then(|| key.to_owned()), n.parse().ok()?))
            })
            .collect::<Option<_>>()?;
        Some(Self {
            window_ms,
            resume,
            watermark,
            horizon,
            late,
        })
    }
}

/// One source partition's windows.
#[derive(Debug)]
pub struct PartitionAgg {
    spec: std::sync::Arc<Spec>,
    watermark: Option<i64>,
    horizon: i64,
    keyed: HashMap<Box<[u8]>, Vec<Window>>,
    unkeyed: Vec<Window>,
    /// Open windows by end, in the order they opened: the close order.
    by_end: std::collections::VecDeque<(i64, Key)>,
    open: usize,
    /// Late records per key, for that key's next emitted window; at most
    /// `max_open_windows` keys (more are only counted).
    late: HashMap<Key, u64>,
    /// Closed since last drained.
    pub closed: Vec<Closed>,
    /// Counted since last taken.
    pub counts: Counts,
    /// The last malformed value seen: (offset, why).
    pub last_malformed: Option<(u64, Malformed)>,
    scratch: Vec<Option<f64>>,
}

impl PartitionAgg {
    pub fn new(spec: std::sync::Arc<Spec>) -> Self {
        let scratch = vec![None; spec.fields.len()];
        Self {
            spec,
            watermark: None,
            horizon: i64::MIN,
            keyed: HashMap::new(),
            unkeyed: Vec::new(),
            by_end: std::collections::VecDeque::new(),
            open: 0,
            late: HashMap::new(),
            closed: Vec::new(),
            counts: Counts::default(),
            last_malformed: None,
            scratch,
        }
    }

    /// The state a checkpoint recorded, without its open windows: those
    /// are [`replay`](Self::replay)ed from the log. `None` when the
    /// checkpoint was made with another window length.
    pub fn restore(spec: std::sync::Arc<Spec>, cp: &Checkpoint) -> Option<Self> {
        if cp.window_ms != spec.window_ms {
            return None;
        }
        let mut agg = Self::new(spec);
        agg.watermark = cp.watermark;
        agg.horizon = cp.horizon;
        for (key, n) in &cp.late {
            let key = match key {
                None => None,
                Some(hex) => Some(unhex(hex)?.into_boxed_slice()),
            };
            agg.late.insert(key, *n);
        }
        Some(agg)
    }

    /// Keeps watermark and horizon, drops everything else: for a window
    /// length that changed (nothing already emitted is emitted again).
    pub fn restart_from(spec: std::sync::Arc<Spec>, cp: &Checkpoint) -> Self {
        let mut agg = Self::new(spec);
        agg.watermark = cp.watermark;
        agg.horizon = cp.horizon;
        agg
    }

    pub fn open_windows(&self) -> usize {
        self.open
    }

    /// The checkpoint that goes with having read everything below `next`.
    pub fn checkpoint(&self, next: u64) -> Checkpoint {
        let resume = self
            .keyed
            .values()
            .chain(std::iter::once(&self.unkeyed))
            .flatten()
            .map(|w| w.first_offset)
            .min()
            .unwrap_or(next);
        let mut late: Vec<(Option<String>, u64)> = self
            .late
            .iter()
            .map(|(k, n)| (k.as_deref().map(hex), *n))
            .collect();
        late.sort();
        Checkpoint {
            window_ms: self.spec.window_ms,
            resume,
            watermark: self.watermark,
            horizon: self.horizon,
            late,
        }
    }

    fn window_of(&self, ts: i64) -> (i64, i64) {
        let start = ts.div_euclid(self.spec.window_ms) * self.spec.window_ms;
        (start, start.saturating_add(self.spec.window_ms))
    }

    /// Folds one record read past the checkpoint: closes what its
    /// timestamp closes, counts it late or malformed, or adds it to its
    /// window (and closes the oldest ones early past the limit).
    pub fn fold(&mut self, offset: u64, ts: i64, key: Option<&[u8]>, value: Option<&[u8]>) {
        if self.watermark.is_none_or(|w| ts > w) {
            self.watermark = Some(ts);
            self.raise_horizon(ts.saturating_sub(self.spec.lateness_ms), false);
        }
        let (start, end) = self.window_of(ts);
        if end <= self.horizon {
            self.counts.late += 1;
            let max = self.spec.max_open_windows;
            let k: Key = key.map(Box::from);
            let full = self.late.len() >= max;
            if let Some(n) = self.late.get_mut(&k) {
                *n += 1;
            } else if !full {
                self.late.insert(k, 1);
            }
            return;
        }
        if self.add(offset, key, value, start, end) {
            while self.open > self.spec.max_open_windows {
                let Some(&(oldest, _)) = self.by_end.front() else {
                    break;
                };
                self.raise_horizon(oldest, true);
            }
        }
    }

    /// Folds one record of `[resume, next)` again after a restart: only
    /// into windows that are still open, and nothing is counted or closed.
    pub fn replay(&mut self, offset: u64, ts: i64, key: Option<&[u8]>, value: Option<&[u8]>) {
        let (start, end) = self.window_of(ts);
        if end > self.horizon {
            let counts = self.counts;
            let malformed = self.last_malformed.take();
            self.add(offset, key, value, start, end);
            self.counts = counts;
            self.last_malformed = malformed;
        }
    }

    /// Adds a well-formed record to its window; false if malformed.
    fn add(
        &mut self,
        offset: u64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        start: i64,
        end: i64,
    ) -> bool {
        let mut scratch = std::mem::take(&mut self.scratch);
        let parsed = extract(value.unwrap_or_default(), &self.spec.fields, &mut scratch);
        if let Err(e) = parsed {
            self.counts.malformed += 1;
            self.last_malformed = Some((offset, e));
            self.scratch = scratch;
            return false;
        }
        let nfields = self.spec.fields.len();
        let windows = match key {
            Some(k) => match self.keyed.get_mut(k) {
                Some(w) => w,
                None => self.keyed.entry(Box::from(k)).or_default(),
            },
            None => &mut self.unkeyed,
        };
        let at = match windows.binary_search_by_key(&start, |w| w.start) {
            Ok(i) => i,
            Err(i) => {
                windows.insert(
                    i,
                    Window {
                        start,
                        first_offset: offset,
                        count: 0,
                        fields: vec![FieldAgg::EMPTY; nfields].into_boxed_slice(),
                    },
                );
                self.open += 1;
                // Ends mostly come in rising order: this is a push_back.
                let at = self.by_end.partition_point(|(e, _)| *e <= end);
                self.by_end.insert(at, (end, key.map(Box::from)));
                i
            }
        };
        let w = &mut windows[at];
        w.count += 1;
        for (f, v) in w.fields.iter_mut().zip(&scratch) {
            if let Some(v) = v {
                f.fold(*v);
            }
        }
        self.scratch = scratch;
        true
    }

    /// Closes every window that ends at or below `to`, in end order.
    fn raise_horizon(&mut self, to: i64, early: bool) {
        if to <= self.horizon {
            return;
        }
        self.horizon = to;
        while self.by_end.front().is_some_and(|(end, _)| *end <= to) {
            let (end, key) = self.by_end.pop_front().expect("front checked");
            let windows = match &key {
                Some(k) => self.keyed.get_mut(k),
                None => Some(&mut self.unkeyed),
            };
            let Some(windows) = windows else { continue };
            let start = end - self.spec.window_ms;
            let Ok(i) = windows.binary_search_by_key(&start, |w| w.start) else {
                continue;
            };
            let w = windows.remove(i);
            if windows.is_empty() {
                if let Some(k) = &key {
                    self.keyed.remove(k);
                }
            }
            self.open -= 1;
            let late = self.late.remove(&key).unwrap_or(0);
            let json = encode(&self.spec.fields, key.as_deref(), &w, end, late);
            self.counts.emitted += 1;
            if early {
                self.counts.closed_early += 1;
            }
            self.closed.push(Closed {
                key,
                start: w.start,
                end,
                json,
            });
        }
    }
}

/// The output record's value (written by hand: serde's machinery for it
/// would cost the binary more than this).
fn encode(fields: &[String], key: Option<&[u8]>, w: &Window, end: i64, late: u64) -> Vec<u8> {
    use std::fmt::Write;
    let mut o = String::with_capacity(96 + 96 * fields.len());
    o.push_str("{\"key\":");
    match key {
        Some(k) => json_string(&mut o, &String::from_utf8_lossy(k)),
        None => o.push_str("null"),
    }
    let _ = write!(
        o,
        ",\"window_start\":{},\"window_end\":{end},\"count\":{},\"fields\":{{",
        w.start, w.count
    );
    for (i, (name, f)) in fields.iter().zip(w.fields.iter()).enumerate() {
        if i > 0 {
            o.push(',');
        }
        json_string(&mut o, name);
        let mean = f.sum / f.count.max(1) as f64;
        for (label, v) in [
            (":{\"min\":", f.min),
            (",\"max\":", f.max),
            (",\"sum\":", f.sum),
            (",\"mean\":", mean),
            (",\"last\":", f.last),
        ] {
            o.push_str(label);
            json_number(&mut o, (f.count > 0 && v.is_finite()).then_some(v));
        }
        let _ = write!(o, ",\"count\":{}}}", f.count);
    }
    let _ = write!(o, "}},\"late_dropped\":{late}}}");
    o.into_bytes()
}

/// `v` as JSON text: the shortest decimal that reads back as `v`, with a
/// fraction (`5.0`) so readers see a float; `null` for `None`.
fn json_number(o: &mut String, v: Option<f64>) {
    use std::fmt::Write;
    match v {
        Some(v) => {
            let at = o.len();
            let _ = write!(o, "{v}");
            if !o[at..].contains('.') {
                o.push_str(".0");
            }
        }
        None => o.push_str("null"),
    }
}

fn json_string(o: &mut String, text: &str) {
    use std::fmt::Write;
    o.push('"');
    for c in text.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", u32::from(c));
            }
            c => o.push(c),
        }
    }
    o.push('"');
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Bytes one open window holds beyond its key: the window with its field
/// figures, and its place in the close order (allocator overhead aside).
pub fn bytes_per_window(fields: usize) -> usize {
    std::mem::size_of::<Window>()
        + fields * std::mem::size_of::<FieldAgg>()
        + std::mem::size_of::<Key>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn spec(window: i64, lateness: i64, fields: &[&str], max: usize) -> Arc<Spec> {
        Arc::new(Spec {
            window_ms: window,
            lateness_ms: lateness,
            fields: fields.iter().map(|f| f.to_string()).collect(),
            max_open_windows: max,
        })
    }

    fn fields(v: &[u8], names: &[&str]) -> Result<Vec<Option<f64>>, Malformed> {
        let names: Vec<String> = names.iter().map(|f| f.to_string()).collect();
        let mut out = vec![None; names.len()];
        extract(v, &names, &mut out).map(|()| out)
    }

    #[test]
    fn json_objects_numbers_and_cbor_maps() {
        assert_eq!(
            fields(br#"{"rh":40,"x":{"c":1},"c":-21.5,"s":"a"}"#, &["c", "rh"]),
            Ok(vec![Some(-21.5), Some(40.0)])
        );
        assert_eq!(fields(b" 7.25 ", &["value"]), Ok(vec![Some(7.25)]));
        assert_eq!(
            fields(br#"{"c":1}"#, &["c", "rh"]),
            Ok(vec![Some(1.0), None])
        );
        assert_eq!(
            fields(br#"{"c":"warm"}"#, &["c"]),
            Err(Malformed::NotANumber("c".into()))
        );
        assert_eq!(fields(br#"{"x":1}"#, &["c"]), Err(Malformed::NoField));
        assert_eq!(fields(b"7", &["c"]), Err(Malformed::NoField));
        assert_eq!(fields(b"{\"c\":1", &["c"]), Err(Malformed::NotJsonOrCbor));
        assert_eq!(fields(b"\xff\x00", &["c"]), Err(Malformed::NotJsonOrCbor));
        assert_eq!(fields(b"", &["c"]), Err(Malformed::NotJsonOrCbor));
        // Escaped keys, nested and literal values skipped, exact decimals.
        assert_eq!(
            fields(
                br#" { "a\"b" : [1, {"c": [true, null]}, "x\\y\u00e9"], "\u0063" : 0.1, "rh": -2.5E1 } "#,
                &["c", "rh"]
            ),
            Ok(vec![Some(0.1), Some(-25.0)])
        );
        assert_eq!(
            fields(br#"{"c":1,}"#, &["c"]),
            Err(Malformed::NotJsonOrCbor)
        );
        assert_eq!(
            fields(br#"{"c":+1}"#, &["c"]),
            Err(Malformed::NotJsonOrCbor)
        );
        assert_eq!(
            fields(br#"{"c":[1,2}"#, &["c"]),
            Err(Malformed::NotJsonOrCbor)
        );
        assert_eq!(
            fields(br#"{"c":nul}"#, &["c"]),
            Err(Malformed::NotJsonOrCbor)
        );
        assert_eq!(
            fields(br#"{"c":1e999}"#, &["c"]),
            Err(Malformed::NotANumber("c".into()))
        );
        assert_eq!(
            fields(br#"{"c":true}"#, &["c"]),
            Err(Malformed::NotANumber("c".into()))
        );
        let deep = format!("{{\"x\":{}1{},\"c\":1}}", "[".repeat(100), "]".repeat(100));
        assert_eq!(
            fields(deep.as_bytes(), &["c"]),
            Err(Malformed::NotJsonOrCbor)
        );

        let mut buf = Vec::new();
        let mut e = minicbor::Encoder::new(&mut buf);
        e.map(4).unwrap();
        e.str("skip")
            .unwrap()
            .array(2)
            .unwrap()
            .u8(1)
            .unwrap()
            .u8(2)
            .unwrap();
        e.str("c").unwrap().f32(21.5).unwrap();
        e.u8(9).unwrap().str("int key").unwrap();
        e.str("rh").unwrap().i64(-3).unwrap();
        assert_eq!(fields(&buf, &["c", "rh"]), Ok(vec![Some(21.5), Some(-3.0)]));
        // Half floats, and a bare CBOR float.
        assert_eq!(
            fields(&[0xa1, 0x61, b'c', 0xf9, 0x3e, 0x00], &["c"]),
            Ok(vec![Some(1.5)])
        );
        let mut buf = Vec::new();
        minicbor::Encoder::new(&mut buf).f64(-0.5).unwrap();
        assert_eq!(fields(&buf, &["value"]), Ok(vec![Some(-0.5)]));
        // An indefinite map with a string where a number belongs.
        assert_eq!(
            fields(&[0xbf, 0x61, b'c', 0x61, b'x', 0xff], &["c"]),
            Err(Malformed::NotANumber("c".into()))
        );
    }

    fn run(agg: &mut PartitionAgg, records: &[(i64, &str, &str)]) -> Vec<Closed> {
        for (i, (ts, key, value)) in records.iter().enumerate() {
            agg.fold(i as u64, *ts, Some(key.as_bytes()), Some(value.as_bytes()));
        }
        std::mem::take(&mut agg.closed)
    }

    fn json(c: &Closed) -> serde_json::Value {
        serde_json::from_slice(&c.json)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&c.json)))
    }

    #[test]
    fn windows_close_past_lateness_and_late_records_count_in_the_next() {
        let mut agg = PartitionAgg::new(spec(10, 5, &["v"], 100));
        let closed = run(
            &mut agg,
            &[
                (1, "a", r#"{"v":3}"#),
                (4, "a", r#"{"v":1}"#),
                (12, "a", r#"{"v":2}"#),
                (9, "a", r#"{"v":5}"#),   // on time: 9 < 10 + 5
                (15, "b", r#"{"v":0}"#),  // closes a's [0, 10)
                (3, "a", r#"{"v":100}"#), // late
                (31, "a", "oops"),        // malformed, but moves the watermark
            ],
        );
        assert_eq!(closed.len(), 3, "{closed:?}");
        let w = json(&closed[0]);
        assert_eq!(
            w,
            serde_json::json!({"key":"a","window_start":0,"window_end":10,"count":3,
                "fields":{"v":{"min":1.0,"max":5.0,"sum":9.0,"mean":3.0,"last":5.0,"count":3}},
                "late_dropped":0})
        );
        assert_eq!(json(&closed[1])["window_start"], 10);
        assert_eq!(json(&closed[1])["late_dropped"], 1);
        assert_eq!(json(&closed[2])["key"], "b");
        assert_eq!(agg.counts.late, 1);
        assert_eq!(agg.counts.malformed, 1);
        assert_eq!(agg.counts.emitted, 3);
        assert_eq!(agg.open_windows(), 0);
    }

    #[test]
    fn past_the_limit_the_oldest_windows_close_early_and_stay_closed() {
        let mut agg = PartitionAgg::new(spec(10, 1000, &["v"], 2));
        let closed = run(
            &mut agg,
            &[(1, "a", "1"), (11, "a", "2"), (21, "a", "3"), (2, "a", "4")],
        );
        // Fields "v" only: bare numbers are "value", so nothing folds.
        assert!(closed.is_empty());
        let mut agg = PartitionAgg::new(spec(10, 1000, &["value"], 2));
        let closed = run(
            &mut agg,
            &[(1, "a", "1"), (11, "a", "2"), (21, "a", "3"), (2, "a", "4")],
        );
        assert_eq!(closed.len(), 1);
        assert_eq!(json(&closed[0])["window_start"], 0);
        assert_eq!(agg.counts.closed_early, 1);
        assert_eq!(
            agg.counts.late, 1,
            "the early-closed window takes nothing more"
        );
        // A third open window again: every window of the oldest end goes.
        agg.fold(9, 12, Some(b"b"), Some(b"5"));
        let closed = std::mem::take(&mut agg.closed);
        let starts: Vec<_> = closed.iter().map(|c| (c.key.clone(), c.start)).collect();
        assert_eq!(
            starts,
            vec![
                (Some(Box::from(&b"a"[..])), 10),
                (Some(Box::from(&b"b"[..])), 10)
            ]
        );
        assert_eq!(json(&closed[0])["late_dropped"], 1);
        assert_eq!(agg.counts.closed_early, 3);
        assert_eq!(agg.open_windows(), 1);
    }

    /// The point of it all: cut anywhere, restore and replay, and the rest
    /// of the output is what one uninterrupted run gives.
    #[test]
    fn restore_and_replay_at_any_offset_gives_the_same_windows() {
        let spec = spec(100, 30, &["c", "rh"], 6);
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let records: Vec<(i64, String, Vec<u8>)> = (0..600)
            .map(|i| {
                let ts = i * 3 + (next() % 90) as i64 - 45;
                let key = format!("k{}", next() % 5);
                let value = match next() % 20 {
                    0 => b"junk".to_vec(),
                    1 => format!("{{\"rh\":{}}}", next() % 100).into_bytes(),
                    _ => {
                        format!("{{\"c\":{}.5,\"rh\":{}}}", next() % 40, next() % 100).into_bytes()
                    }
                };
                (ts, key, value)
            })
            .collect();
        let fold_all = |agg: &mut PartitionAgg, from: usize, to: usize| {
            for (i, (ts, k, v)) in records.iter().enumerate().take(to).skip(from) {
                agg.fold(i as u64, *ts, Some(k.as_bytes()), Some(v));
            }
        };
        let mut whole = PartitionAgg::new(spec.clone());
        fold_all(&mut whole, 0, records.len());
        assert!(whole.counts.closed_early > 0 && whole.counts.late > 0);
        let expected = std::mem::take(&mut whole.closed);

        for cut in (0..records.len()).step_by(7) {
            let mut first = PartitionAgg::new(spec.clone());
            fold_all(&mut first, 0, cut);
            let mut out = std::mem::take(&mut first.closed);
            let cp = Checkpoint::decode(&first.checkpoint(cut as u64).encode()).unwrap();
            let mut second = PartitionAgg::restore(spec.clone(), &cp).unwrap();
            for (i, (ts, k, v)) in records
                .iter()
                .enumerate()
                .take(cut)
                .skip(cp.resume as usize)
            {
                second.replay(i as u64, *ts, Some(k.as_bytes()), Some(v));
            }
            assert_eq!(second.open_windows(), first.open_windows(), "cut {cut}");
            fold_all(&mut second, cut, records.len());
            out.append(&mut second.closed);
            assert_eq!(out, expected, "cut at {cut}");
        }
    }

    #[test]
    fn keys_and_numbers_are_written_as_json() {
        let mut agg = PartitionAgg::new(spec(10, 0, &["value", "x"], 10));
        agg.fold(0, 1, Some(b"q\"\\\n\x01\xff"), Some(b"1e300"));
        agg.fold(1, 2, None, Some(b"-0.1"));
        agg.fold(2, 20, None, Some(b"1"));
        let closed = std::mem::take(&mut agg.closed);
        let w = json(&closed[0]);
        assert_eq!(w["key"], "q\"\\\n\u{1}\u{fffd}");
        assert_eq!(w["fields"]["value"]["max"].as_f64(), Some(1e300));
        assert_eq!(w["fields"]["x"]["min"], serde_json::Value::Null);
        let w = json(&closed[1]);
        assert_eq!(w["key"], serde_json::Value::Null);
        assert_eq!(w["fields"]["value"]["sum"].as_f64(), Some(-0.1));
    }

    #[test]
    fn checkpoints_round_trip_and_a_changed_window_is_refused() {
        let mut agg = PartitionAgg::new(spec(10, 0, &["value"], 10));
        agg.fold(5, 100, Some(b"\x00k"), Some(b"1"));
        agg.fold(6, 50, Some(b"\x00k"), Some(b"1"));
        agg.fold(7, 50, None, Some(b"1"));
        let cp = agg.checkpoint(8);
        assert_eq!(cp.resume, 5);
        assert_eq!(cp.late, vec![(None, 1), (Some("006b".into()), 1)]);
        let back = Checkpoint::decode(&cp.encode()).unwrap();
        assert_eq!(back, cp);
        assert!(PartitionAgg::restore(spec(10, 0, &["value"], 10), &back).is_some());
        assert!(PartitionAgg::restore(spec(20, 0, &["value"], 10), &back).is_none());
    }
}
