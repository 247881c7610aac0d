//! Durations written the Kubernetes way (`500ms`, `60s`, `5m`, `1h30m`).

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

/// A duration kept exactly as the user wrote it, so that what is applied is
/// what is read back; parsed with Go's `time.ParseDuration` rules.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(transparent)]
pub struct Duration(String);

impl Duration {
    /// Parses `text`, failing on anything Go would not accept or a negative value.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parsed: kube::core::Duration = text
            .parse()
            .map_err(|e| format!("invalid duration {text:?}: {e}"))?;
        if parsed.is_negative() {
            return Err(format!("invalid duration {text:?}: must not be negative"));
        }
        Ok(Self(text.to_string()))
    }

    /// The duration as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// As a std duration.
    pub fn to_std(&self) -> Result<std::time::Duration, String> {
        let parsed: kube::core::Duration = self
            .0
            .parse()
            .map_err(|e| format!("invalid duration {:?}: {e}", self.0))?;
        Ok(parsed.into())
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Duration::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "maxLength": 32,
            "pattern": "^([0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h))+$",
            "description": "A duration such as 500ms, 60s, 5m or 1h30m."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_text_and_parses_like_go() {
        let d = Duration::parse("1m30s").unwrap();
        assert_eq!(d.as_str(), "1m30s");
        assert_eq!(d.to_std().unwrap(), std::time::Duration::from_secs(90));
        assert_eq!(
            Duration::parse("500ms")
                .unwrap()
                .to_std()
                .unwrap()
                .as_millis(),
            500
        );
        assert!(Duration::parse("60").is_err(), "a unit is required");
        assert!(Duration::parse("-5s").is_err());
        assert!(Duration::parse("5 minutes").is_err());
    }
}
