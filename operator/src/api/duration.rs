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

/// `scaleToZeroAfter`: a [`Duration`], or `Auto` (learn it from the
/// workload's traffic).
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(transparent)]
pub struct DurationOrAuto(String);

impl DurationOrAuto {
    /// The word that asks for a learned keep-alive.
    pub const AUTO: &'static str = "Auto";

    /// Parses `text`: `Auto` or a duration.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == Self::AUTO {
            return Ok(Self(text.to_string()));
        }
        Duration::parse(text)
            .map(|d| Self(d.0))
            .map_err(|e| format!("{e} (or {})", Self::AUTO))
    }

    /// Whether it is `Auto`.
    pub fn is_auto(&self) -> bool {
        self.0 == Self::AUTO
    }

    /// The fixed duration (`None` for `Auto`).
    pub fn fixed(&self) -> Option<std::time::Duration> {
        if self.is_auto() {
            None
        } else {
            Duration(self.0.clone()).to_std().ok()
        }
    }

    /// As written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Deserialize through `parse` (so a bad value fails with its message) and
/// the inline string schema, for the string newtypes of this module.
macro_rules! parsed_string {
    ($type:ident, $pattern:literal, $description:literal) => {
        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                $type::parse(&text).map_err(serde::de::Error::custom)
            }
        }

        impl JsonSchema for $type {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($type).into()
            }

            fn inline_schema() -> bool {
                true
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "maxLength": 32,
                    "pattern": $pattern,
                    "description": $description
                })
            }
        }
    };
}

parsed_string!(
    Duration,
    "^([0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h))+$",
    "A duration such as 500ms, 60s, 5m or 1h30m."
);
parsed_string!(
    DurationOrAuto,
    "^(Auto|([0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h))+)$",
    "A duration such as 60s or 5m, or Auto."
);

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

    #[test]
    fn auto_or_a_duration() {
        let auto = DurationOrAuto::parse("Auto").unwrap();
        assert!(auto.is_auto() && auto.fixed().is_none());
        let fixed = DurationOrAuto::parse("5m").unwrap();
        assert_eq!(fixed.fixed(), Some(std::time::Duration::from_secs(300)));
        assert_eq!(fixed.as_str(), "5m");
        let error = DurationOrAuto::parse("auto").unwrap_err();
        assert!(error.contains("or Auto"), "{error}");
    }
}
