//! The config error: where (source and line) and what (kind).

use std::fmt;

/// A config that cannot be used. Display reads like a compiler message:
/// `skiff-bad.toml: unknown key 'server.max_conections' (line 3)`.
#[derive(Debug)]
pub struct ConfigError {
    /// The file path, `profile 'NAME' (...)`, `embedded default config` or
    /// `command line`.
    /// (Boxed, as `more` is, to keep the error small: it is returned
    /// through every config call.)
    pub source_name: Box<str>,
    /// 1-based line of the offending key, when it comes from a file.
    pub line: Option<usize>,
    pub kind: ConfigErrorKind,
    /// The key probably meant, for an unknown one: shown after the line.
    pub did_you_mean: Option<String>,
    /// For a key check, the source's other bad keys (unknown, not allowed
    /// there, or a section that is not a table), in file order, each with
    /// its line and hint: one run of `skiff config check` shows them all,
    /// not one per run.
    pub more: Box<[ConfigError]>,
}

#[derive(Debug)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// The file could not be read: wrong path, or permissions (under
    /// systemd's DynamicUser the file must be world-readable or in
    /// /etc/skiff with a matching group).
    Io(std::io::Error),
    /// Not TOML: a missing quote or bracket, or a key given twice.
    Syntax(String),
    /// A key the schema does not have: usually a typo, or a key from a
    /// newer skiff.
    UnknownKey(String),
    /// A value of the wrong type or spelling (`fsync = "sometimes"`).
    BadValue { key: String, message: String },
    /// A well-typed value that breaks a rule: alignment, a range, or a
    /// relation to another key.
    Invalid { key: &'static str, reason: String },
    /// `profile = "..."` or `--profile` names no embedded profile.
    UnknownProfile(String),
    /// A profile describes a device, not an install: `data_dir` and
    /// `profile` belong in the config file.
    NotAllowedInProfile(String),
}

impl ConfigError {
    pub(crate) fn new(source_name: String, line: Option<usize>, kind: ConfigErrorKind) -> Self {
        ConfigError {
            source_name: source_name.into_boxed_str(),
            line,
            kind,
            did_you_mean: None,
            more: Box::default(),
        }
    }

    /// The dotted key the error is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match &self.kind {
            ConfigErrorKind::UnknownKey(k)
            | ConfigErrorKind::BadValue { key: k, .. }
            | ConfigErrorKind::NotAllowedInProfile(k) => Some(k),
            ConfigErrorKind::Invalid { key, .. } => Some(key),
            ConfigErrorKind::Io(_)
            | ConfigErrorKind::Syntax(_)
            | ConfigErrorKind::UnknownProfile(_) => None,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.source_name)?;
        self.write_what(f)?;
        for e in &self.more {
            write!(f, "; also ")?;
            e.write_what(f)?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// The error without its source: what, the line, the hint.
    fn write_what(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ConfigErrorKind::Io(e) => write!(f, "cannot read: {e}")?,
            ConfigErrorKind::Syntax(m) => {
                // toml's messages span lines ("invalid table header\nexpected ..."):
                // keep the error on one line for logs and journald.
                write!(f, "not valid TOML: {}", m.trim_end().replace('\n', ": "))?
            }
            ConfigErrorKind::UnknownKey(k) => write!(f, "unknown key '{k}'")?,
            ConfigErrorKind::BadValue { key, message } => {
                write!(f, "bad value for '{key}': {}", message.trim_end())?
            }
            ConfigErrorKind::Invalid { key, reason } => write!(f, "invalid '{key}': {reason}")?,
            ConfigErrorKind::UnknownProfile(name) => write!(
                f,
                "unknown profile '{name}' (available: {})",
                super::profile_names().join(", ")
            )?,
            ConfigErrorKind::NotAllowedInProfile(k) => write!(
                f,
                "'{k}' is not allowed in a device profile (set it in the config file)"
            )?,
        }
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        if let Some(key) = &self.did_you_mean {
            write!(f, "; did you mean '{key}'?")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ConfigErrorKind::Io(e) => Some(e),
            _ => None,
        }
    }
}
