//! The helper's command line. The host passes everything here (its
//! environment is not inherited): `--socket PATH --gem-version V
//! [--idle-seconds N]`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// The idle period when the host names none.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(60);
/// The longest idle period accepted.
const MAX_IDLE_SECONDS: u64 = 86_400;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub socket: PathBuf,
    pub gem_version: String,
    /// With no client and nothing held for this long, the helper exits.
    pub idle: Duration,
}

/// What is wrong with the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgsError {
    Missing(&'static str),
    NoValue(String),
    BadIdle(String),
    Unknown(String),
    NotUtf8(&'static str),
}

impl std::fmt::Display for ArgsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArgsError::Missing(a) => write!(f, "{a} is required"),
            ArgsError::NoValue(a) => write!(f, "{a} needs a value"),
            ArgsError::BadIdle(v) => write!(
                f,
                "--idle-seconds must be a whole number of seconds in 1..={MAX_IDLE_SECONDS} (got {v:?})"
            ),
            ArgsError::Unknown(a) => write!(f, "unknown argument {a:?}"),
            ArgsError::NotUtf8(a) => write!(f, "{a} is not UTF-8"),
        }
    }
}

impl Args {
    /// Parses the arguments after the program name.
    pub fn parse(mut it: impl Iterator<Item = OsString>) -> Result<Args, ArgsError> {
        let mut socket = None;
        let mut gem_version = None;
        let mut idle = DEFAULT_IDLE;
        while let Some(a) = it.next() {
            let name = a.to_string_lossy().into_owned();
            let mut value = || it.next().ok_or_else(|| ArgsError::NoValue(name.clone()));
            match name.as_str() {
                "--socket" => socket = Some(PathBuf::from(value()?)),
                "--gem-version" => {
                    gem_version = Some(
                        value()?
                            .into_string()
                            .map_err(|_| ArgsError::NotUtf8("--gem-version"))?,
                    )
                }
                "--idle-seconds" => {
                    let v = value()?.to_string_lossy().into_owned();
                    let n: u64 = v.parse().map_err(|_| ArgsError::BadIdle(v.clone()))?;
                    if !(1..=MAX_IDLE_SECONDS).contains(&n) {
                        return Err(ArgsError::BadIdle(v));
                    }
                    idle = Duration::from_secs(n);
                }
                _ => return Err(ArgsError::Unknown(name)),
            }
        }
        Ok(Args {
            socket: socket.ok_or(ArgsError::Missing("--socket"))?,
            gem_version: gem_version.ok_or(ArgsError::Missing("--gem-version"))?,
            idle,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(a: &[&str]) -> Result<Args, ArgsError> {
        Args::parse(a.iter().map(OsString::from))
    }

    #[test]
    fn parses_what_the_host_passes() {
        let a = parse(&["--socket", "/d/s.sock", "--gem-version", "0.1.0"]).unwrap();
        assert_eq!(a.socket, PathBuf::from("/d/s.sock"));
        assert_eq!(a.idle, DEFAULT_IDLE);
        let a = parse(&[
            "--idle-seconds",
            "2",
            "--socket",
            "/s",
            "--gem-version",
            "1",
        ])
        .unwrap();
        assert_eq!(a.idle, Duration::from_secs(2));
    }

    #[test]
    fn refuses_anything_else() {
        assert_eq!(
            parse(&["--gem-version", "1"]),
            Err(ArgsError::Missing("--socket"))
        );
        assert_eq!(
            parse(&["--socket"]),
            Err(ArgsError::NoValue("--socket".into()))
        );
        for bad in ["0", "-1", "x", "86401"] {
            assert!(matches!(
                parse(&[
                    "--socket",
                    "/s",
                    "--gem-version",
                    "1",
                    "--idle-seconds",
                    bad
                ]),
                Err(ArgsError::BadIdle(_))
            ));
        }
        assert!(matches!(parse(&["--fork"]), Err(ArgsError::Unknown(_))));
    }
}
