//! The values that the settings file and the environment set, kept with
//! where each came from, so that an unknown key or a bad value is reported
//! with its origin and the values the setting accepts.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use super::{ENV_PREFIX, Settings, SettingsError, redact_url};

/// Key of the one setting that the environment gives as a comma-separated
/// list.
pub(super) const LIST_KEY: &str = "worker.home_shards";

/// One value set by the file or a variable.
struct SetValue {
    /// The value as `config` reads it, for checking it against its type.
    value: Value,
    /// The value as the user wrote it, for messages.
    text: String,
    /// The file or the variable that set it.
    origin: String,
}

impl SetValue {
    /// Returns the value as written, for a message about `key`, with the
    /// password of a URL hidden. A list or a table set for a URL is not
    /// shown, as one of its strings may hold the password.
    fn shown(&self, key: &str) -> String {
        if !key.ends_with(".url") {
            return self.text.clone();
        }
        match &self.value {
            Value::String(_) => redact_url(&self.text),
            Value::Array(_) => "[…]".to_owned(),
            Value::Object(_) => "{…}".to_owned(),
            _ => self.text.clone(),
        }
    }
}

/// Every value the file and the environment set, by dotted key. A later
/// source replaces an earlier one's value, as it does in `config`.
pub(super) struct SetValues {
    /// The default settings, whose shape defines which keys exist.
    defaults: Value,
    values: BTreeMap<String, SetValue>,
}

impl SetValues {
    pub(super) fn new() -> Self {
        let defaults = serde_json::to_value(Settings::default()).expect("settings serialize");
        Self {
            defaults,
            values: BTreeMap::new(),
        }
    }

    /// Records every value of a settings file's table, which no longer
    /// contains the `models` table. Rejects a key that no setting has.
    pub(super) fn add_file(
        &mut self,
        path: &Path,
        table: &toml::Table,
    ) -> Result<(), SettingsError> {
        let origin = path.display().to_string();
        let mut leaves = Vec::new();
        collect_leaves(String::new(), table, &mut leaves);
        for (key, value) in leaves {
            self.check_key(&key, &origin)?;
            self.insert_toml(key, &value, &origin);
        }
        Ok(())
    }

    /// Records the fields of one model of a settings file's `models` table,
    /// so that a rejected price names the file.
    pub(super) fn add_file_model(&mut self, path: &Path, name: &str, fields: &toml::Value) {
        let Some(fields) = fields.as_table() else {
            return;
        };
        let origin = path.display().to_string();
        for (field, value) in fields {
            let key = format!("models.{}.{field}", name.to_ascii_lowercase());
            self.insert_toml(key, value, &origin);
        }
    }

    /// Records a model price field set by a variable, so that a rejected
    /// price names the variable.
    pub(super) fn add_model_field(&mut self, key: &str, text: &str, origin: &str) {
        self.insert(key.to_owned(), parse_scalar(text), text.to_owned(), origin);
    }

    fn insert_toml(&mut self, key: String, value: &toml::Value, origin: &str) {
        let text = match value {
            toml::Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let value = serde_json::to_value(value).unwrap_or(Value::Null);
        self.insert(key, value, text, origin);
    }

    /// Records `STREAM_CREDITS__SECTION__KEY` variables other than model
    /// prices. Rejects a variable that names no setting.
    pub(super) fn add_env(&mut self, vars: &[(String, String)]) -> Result<(), SettingsError> {
        let prefix = format!("{ENV_PREFIX}__");
        for (name, text) in vars {
            let Some(rest) = name
                .get(..prefix.len())
                .filter(|head| head.eq_ignore_ascii_case(&prefix))
                .map(|_| &name[prefix.len()..])
            else {
                continue;
            };
            let key = rest.to_ascii_lowercase().replace("__", ".");
            let origin = format!("environment variable {name}");
            self.check_key(&key, &origin)?;
            let value = if key == LIST_KEY {
                Value::Array(text.split(',').map(parse_scalar).collect())
            } else {
                parse_scalar(text)
            };
            self.insert(key, value, text.clone(), &origin);
        }
        Ok(())
    }

    fn insert(&mut self, key: String, value: Value, text: String, origin: &str) {
        let origin = origin.to_owned();
        self.values.insert(
            key,
            SetValue {
                value,
                text,
                origin,
            },
        );
    }

    /// Rejects a number with a fraction set for an integer setting, which
    /// `config` would otherwise round to the nearest integer, and a whole
    /// number beyond 64 bits, which it would clamp.
    pub(super) fn check_integers(&self) -> Result<(), SettingsError> {
        for (key, set) in &self.values {
            let beyond_64_bits = set
                .value
                .as_f64()
                .is_some_and(|number| number < i64::MIN as f64 || number > u64::MAX as f64);
            let has_fraction = set.value.as_f64().is_some_and(|number| number.fract() != 0.0);
            let default = key.split('.').try_fold(&self.defaults, |node, part| node.get(part));
            let integer_setting = default.is_some_and(|default| default.is_u64() || default.is_i64());
            if !(has_fraction || beyond_64_bits) || !integer_setting {
                continue;
            }
            return Err(SettingsError::Value {
                key: key.clone(),
                value: set.text.clone(),
                origin: set.origin.clone(),
                expected: self.expected(key, &set.value).unwrap_or_else(|| "an integer".to_owned()),
            });
        }
        Ok(())
    }

    /// Adds the value as written and where it was set to an error of
    /// [`Settings::validate`] about a key that the file or the environment
    /// set. Other errors are returned as they are.
    pub(super) fn locate(&self, error: SettingsError) -> SettingsError {
        let SettingsError::Invalid { key, reason } = error else {
            return error;
        };
        let Some(set) = self.values.get(&key) else {
            return self.with_related_origins(key, reason);
        };
        let value = set.shown(&key);
        SettingsError::Rejected {
            key,
            value,
            origin: set.origin.clone(),
            reason,
        }
    }

    /// Adds the values and origins behind an error about `key`, which no
    /// source set by that name. Those are the fields of its section, the
    /// keys its reason names (`limits.tokens_max` in a price check), or
    /// else the other fields of its model.
    fn with_related_origins(&self, key: String, reason: String) -> SettingsError {
        let describe = |(set_key, set): (&String, &SetValue)| {
            format!("`{set_key}` = `{}` in {}", set.shown(set_key), set.origin)
        };
        let section = format!("{key}.");
        let mut related: Vec<String> = self
            .values
            .iter()
            .filter(|(set_key, _)| set_key.starts_with(&section) || names_key(&reason, set_key))
            .map(describe)
            .collect();
        // A model field that no source set, such as a missing price of a
        // new model: the model's other fields show where it was defined.
        if related.is_empty()
            && key.starts_with("models.")
            && let Some((model, _)) = key.rsplit_once('.')
        {
            let model = format!("{model}.");
            related = self
                .values
                .iter()
                .filter(|(set_key, _)| model != "models." && set_key.starts_with(&model))
                .map(describe)
                .collect();
        }
        if related.is_empty() {
            return SettingsError::Invalid { key, reason };
        }
        SettingsError::Invalid {
            key,
            reason: format!("{reason} (set: {})", related.join(", ")),
        }
    }

    /// Fails when `key` is not a setting: unknown, or a section rather
    /// than one of its keys.
    fn check_key(&self, key: &str, origin: &str) -> Result<(), SettingsError> {
        let mut node = &self.defaults;
        let mut section = String::new();
        for part in key.split('.') {
            let child = match node {
                Value::Object(fields) => fields.get(part),
                _ => None,
            };
            let Some(child) = child else {
                return Err(unknown_key(key, origin, &section, node));
            };
            node = child;
            section = join_key(&section, part);
        }
        if node.is_object() {
            return Err(unknown_key(key, origin, &section, node));
        }
        Ok(())
    }

    /// Turns an error of the `config` crate into one that names the key,
    /// the value as written, where it was set and what the key accepts.
    /// Falls back to the crate's own message when the key is unknown.
    pub(super) fn explain(&self, error: config::ConfigError) -> SettingsError {
        let key = match &error {
            config::ConfigError::Type { key, .. } | config::ConfigError::At { key, .. } => {
                key.as_deref()
            }
            _ => None,
        };
        // A key inside a list, such as `worker.home_shards[1]`, is reported
        // as the list's key, which is what the user set.
        let key = key.map(|key| key.split('[').next().unwrap_or(key));
        let Some((key, set)) = key.and_then(|key| self.values.get_key_value(key)) else {
            return SettingsError::Load(error);
        };
        let value = set.shown(key);
        let Some(expected) = self.expected(key, &set.value) else {
            // A check of the setting's own parser, such as a shard number
            // in a list, rather than a wrong type.
            let reason = match &error {
                config::ConfigError::At { error, .. } => error.to_string(),
                other => other.to_string(),
            };
            return SettingsError::Rejected {
                key: key.clone(),
                value,
                origin: set.origin.clone(),
                reason,
            };
        };
        SettingsError::Value {
            key: key.clone(),
            value,
            origin: set.origin.clone(),
            expected,
        }
    }

    /// Finds what `key` accepts by deserializing the defaults with only
    /// `value` changed, so serde's message is about that key alone.
    fn expected(&self, key: &str, value: &Value) -> Option<String> {
        let mut tree = self.defaults.clone();
        let slot = key
            .split('.')
            .try_fold(&mut tree, |node, part| node.get_mut(part))?;
        *slot = value.clone();
        let message = serde_json::from_value::<Settings>(tree).err()?.to_string();
        let (_, expected) = message.rsplit_once(", expected ")?;
        // serde names no choice when a choice is given a number or a list.
        // A text that no choice has makes it list them.
        if expected == "string or map" && !value.is_string() {
            return self.expected(key, &Value::String(String::new()));
        }
        let positive = Settings::default().positive_counts().iter().any(|(name, _)| *name == key);
        Some(describe_type(expected, positive).to_owned())
    }
}

/// Collects the dotted key and value of every non-table value of `table`.
fn collect_leaves(prefix: String, table: &toml::Table, leaves: &mut Vec<(String, toml::Value)>) {
    for (name, value) in table {
        let key = join_key(&prefix, name);
        match value {
            toml::Value::Table(inner) => collect_leaves(key, inner, leaves),
            other => leaves.push((key, other.clone())),
        }
    }
}

fn join_key(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Reads a variable's value the way `config` does with `try_parsing`:
/// a boolean, else an integer, else a float, else the text.
fn parse_scalar(text: &str) -> Value {
    if let Ok(flag) = text.to_ascii_lowercase().parse::<bool>() {
        Value::Bool(flag)
    } else if let Ok(integer) = text.parse::<i64>() {
        Value::from(integer)
    } else if let Ok(float) = text.parse::<f64>() {
        Value::from(float)
    } else {
        Value::String(text.to_owned())
    }
}

/// Lists the keys of the section at which `key` went wrong.
fn unknown_key(key: &str, origin: &str, section: &str, node: &Value) -> SettingsError {
    let empty = Map::new();
    let fields = node.as_object().unwrap_or(&empty);
    let mut names: Vec<String> = fields
        .keys()
        .map(|name| format!("`{}`", join_key(section, name)))
        .collect();
    // Model prices are read apart from the other sections.
    if section.is_empty() {
        names.push("`models`".to_owned());
    }
    SettingsError::UnknownKey {
        key: key.to_owned(),
        origin: origin.to_owned(),
        expected: names.join(", "),
    }
}

/// Replaces the Rust type names that serde puts in its messages with
/// words an operator reads without knowing Rust. A `positive` setting
/// must also be greater than zero.
fn describe_type(expected: &str, positive: bool) -> &str {
    match (expected, positive) {
        ("u16", false) => "an integer from 0 to 65535",
        ("u16", true) => "an integer from 1 to 65535",
        ("u32", false) => "an integer from 0 to 4294967295",
        ("u32", true) => "an integer from 1 to 4294967295",
        ("u64" | "usize", false) => "an integer of 0 or more",
        ("u64" | "usize", true) => "an integer of 1 or more",
        ("i64", _) => "an integer",
        (other, _) => other,
    }
}

/// Returns whether `text` names the dotted `key` as a whole, so that
/// `limits.tokens_max` is not found in `limits.tokens_max_extra`. A full
/// stop right after the key ends it.
pub(super) fn names_key(text: &str, key: &str) -> bool {
    let is_word = |character: char| character.is_ascii_alphanumeric() || "_-".contains(character);
    text.match_indices(key).any(|(start, _)| {
        let before = text[..start].chars().next_back();
        let mut after = text[start + key.len()..].chars();
        let continues = match after.next() {
            Some('.') => after.next().is_some_and(is_word),
            next => next.is_some_and(is_word),
        };
        !before.is_some_and(|character| is_word(character) || character == '.') && !continues
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn related_origins_hide_url_passwords() {
        let mut set_values = SetValues::new();
        let url = ("STREAM_CREDITS__DATABASE__URL".to_owned(), "postgres://root:secret@127.0.0.1/db".to_owned());
        set_values.add_env(&[url]).unwrap();

        let text = set_values.locate(SettingsError::invalid("database", "bad section")).to_string();
        assert!(text.contains("`database.url` = `postgres://root:***@127.0.0.1/db`"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn shown_hides_a_url_list() {
        let mut set_values = SetValues::new();
        let table: toml::Table = toml::from_str("[database]\nurl = [\"postgres://root:secret@h/db\"]").unwrap();
        set_values.add_file(Path::new("a.toml"), &table).unwrap();

        let text = set_values.locate(SettingsError::invalid("database.url", "expected a string")).to_string();
        assert!(text.contains("invalid value `[…]` for `database.url` in a.toml"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn expected_lists_choices_for_a_number() {
        let set_values = SetValues::new();
        let expected = set_values.expected("reservations.overrun", &Value::from(5)).unwrap();
        assert_eq!(expected, "`debit` or `cap`");
    }
}
