//! How a pool's settings are written in the primary's state document (see `plan::snapshot`):
//! plain data that reads back to exactly the same [`PoolSpec`](super::PoolSpec).
//!
//! The file format's readers (`value`) are not used for this: they are written for people
//! (`size = 4`, never `"4"`; sizes of memory rounded for display), while a state document must
//! read back what it wrote, byte for byte. So each setting is written the way its value is
//! exact: a command as its words, an amount of memory in bytes (a signal writes its number itself), and
//! the others as the text their `Display` writes and their `FromStr` reads back unchanged
//! (checked by the round-trip test of `plan::snapshot`).

use std::fmt::Display;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use super::value::{ByteSize, Command};

/// A value written as the text of its `Display`, read with its `FromStr`.
pub(super) mod text {
    use super::*;

    pub(crate) fn serialize<T: Display, S: Serializer>(
        value: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub(crate) fn deserialize<'de, T, D>(deserializer: D) -> Result<T, D::Error>
    where
        T: FromStr<Err = String>,
        D: Deserializer<'de>,
    {
        String::deserialize(deserializer)?
            .parse()
            .map_err(de::Error::custom)
    }
}

/// An optional value written as its text.
pub(super) mod text_opt {
    use super::*;

    pub(crate) fn serialize<T: Display, S: Serializer>(
        value: &Option<T>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        value
            .as_ref()
            .map(ToString::to_string)
            .serialize(serializer)
    }

    pub(crate) fn deserialize<'de, T, D>(deserializer: D) -> Result<Option<T>, D::Error>
    where
        T: FromStr<Err = String>,
        D: Deserializer<'de>,
    {
        Option::<String>::deserialize(deserializer)?
            .map(|text| text.parse().map_err(de::Error::custom))
            .transpose()
    }
}

/// A command, as its words.
pub(super) mod words {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(
        command: &Command,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        command.words().serialize(serializer)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Command, D::Error> {
        Command::new(Vec::<String>::deserialize(deserializer)?).map_err(de::Error::custom)
    }
}

/// An optional command, as its words.
pub(super) mod words_opt {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(
        command: &Option<Command>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        command.as_ref().map(Command::words).serialize(serializer)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Command>, D::Error> {
        Option::<Vec<String>>::deserialize(deserializer)?
            .map(|words| Command::new(words).map_err(de::Error::custom))
            .transpose()
    }
}

/// An optional amount of memory, in bytes.
pub(super) mod bytes_opt {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(
        size: &Option<ByteSize>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        size.map(|size| size.0).serialize(serializer)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<ByteSize>, D::Error> {
        Ok(Option::<u64>::deserialize(deserializer)?.map(ByteSize))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::{
        Budget, ByteSize, Command, IpcProtocol, IpcSpec, LogRateLimit, OutputTarget, PoolSpec,
        Readiness, Signal, Size,
    };

    /// Every setting away from its default, with values the file format would write
    /// differently (a signal with no name, an amount of memory that is not a round number).
    fn unusual() -> PoolSpec {
        let mut spec = PoolSpec::new(Command::new(["node", "app.js", "--flag=a b", ""]).unwrap());
        spec.size = Size::Auto;
        spec.sockets = vec!["http".into(), "admin".into()];
        spec.ready = Readiness::Delay(Duration::from_millis(1500));
        spec.ready_timeout = Duration::from_nanos(1_000_000_001);
        spec.env.insert("B".into(), "2".into());
        spec.env.insert("A".into(), "1".into());
        spec.cwd = Some("app".into());
        spec.user = Some("www-data".into());
        spec.group = Some("1000".into());
        spec.after = vec!["migrate".into()];
        spec.oneshot = true;
        spec.before_start = Some(Command::new(["npm", "run", "build"]).unwrap());
        spec.before_start_timeout = Duration::from_secs(90);
        spec.ttl = Some(Duration::from_secs(3601));
        spec.strict = true;
        spec.max_surge = Some(Budget::Percent(25));
        spec.max_unavailable = Some(Budget::Count(2));
        spec.stop_signal = Signal::from_number(40).unwrap();
        spec.stdout = OutputTarget::File("/var/log/app.log".into());
        spec.stderr = OutputTarget::Null;
        spec.log_max_size = Some(ByteSize(1536));
        spec.log_keep = 9;
        spec.log_rate_limit = Some(LogRateLimit {
            lines: 10,
            per: Duration::from_millis(1500),
        });
        spec.max_memory = Some(ByteSize(123_456_789));
        spec.watchdog = Some(Duration::from_micros(1));
        spec.ipc = Some(IpcSpec {
            protocol: IpcProtocol::Node,
            max_message: 4097,
        });
        spec.preload = false;
        spec.silent = true;
        spec
    }

    #[test]
    fn a_whole_config_reads_back_exactly() {
        let mut config = crate::config::Config::default();
        for (name, listen, mode) in [
            ("http", "127.0.0.1:8000", "reuseport"),
            ("v6", "[::1]:0", "shared"),
            ("unix", "unix:/run/app.sock", "shared"),
        ] {
            let mut socket = crate::config::SocketSpec::new(listen.parse().unwrap());
            socket.mode = mode.parse().unwrap();
            socket.backlog = 77;
            config.sockets.insert(name.into(), socket);
        }
        config.pools.insert("web".into(), unusual());
        config
            .pools
            .insert("jobs".into(), PoolSpec::new(Command::new(["j"]).unwrap()));
        let text = serde_json::to_string(&config).unwrap();
        let back: crate::config::Config = serde_json::from_str(&text).unwrap();
        assert_eq!(back, config, "{text}");
        let order: Vec<&String> = back.pools.keys().collect();
        assert_eq!(order, ["web", "jobs"], "declaration order kept");
    }

    #[test]
    fn every_setting_reads_back_exactly() {
        for spec in [PoolSpec::new(Command::new(["app"]).unwrap()), unusual()] {
            let text = serde_json::to_string(&spec).unwrap();
            let back: PoolSpec = serde_json::from_str(&text).unwrap();
            assert_eq!(back, spec, "{text}");
        }
    }
}
