//! Guarded commands: remediation that runs a program, safely.
//!
//! - **Allowlist**: the program (`argv[0]`, an absolute path) must be listed in
//!   `[decision] allowed_commands`. A program that runs code or other programs named in its
//!   arguments (a shell, `env`, `python*`, `perl`, `busybox`, …, by file name, also through a
//!   symlink) also needs `allow_interpreter = true`.
//! - **No shell**: the command runs as an argument vector. Event data only reaches it through
//!   typed **parameters**, each taken from a label shared by every alert of the group and
//!   validated (a string against an anchored pattern, an integer within bounds, or one of a
//!   list of values) before it replaces its `{name}` placeholder. A value that fails validation
//!   blocks the execution, with the reason in the audit log. Patterns are checked when the
//!   configuration loads: none may admit whitespace or control characters, a leading `-`,
//!   `..`, or a `/` (unless the parameter is declared a `path`).
//! - **Controlled environment**: the environment is cleared except for `env` (whose values
//!   never appear in `Debug` output), the working directory is `cwd`, standard input is empty,
//!   standard output and error are kept up to `max_output` bytes each, and optional resource
//!   `limits` (CPU time, address space, open files) hold from the program's first instruction.
//! - **Process group**: the command runs in a process group of its own, and the whole group
//!   is killed (`SIGKILL`) when the command ends, times out, or its delivery is dropped, so
//!   nothing it started outlives it.
//! - **Modes**: `dry_run` records the argv it would run; `suggest` records it as a suggestion
//!   for a person to confirm; `auto` runs it. A remediation runs at most once per firing
//!   episode of a group (an idempotency key), is never retried, and never runs for resolved
//!   alerts.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use regex::Regex;
use regex_syntax::hir::{Class, Hir, HirKind};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use super::{BuildContext, Built, DeliveryError, ExecutionMode, Receiver};
use crate::decision::Notification;

/// A parameter's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamType {
    /// Text matching `pattern` (anchored).
    #[default]
    String,
    /// A whole number within `min` … `max`.
    Integer,
    /// One of `values`.
    Enum,
}

/// One command parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// The label the value comes from; the parameter's name by default.
    #[serde(default)]
    pub label: Option<String>,
    /// The value's type.
    #[serde(default, rename = "type")]
    pub kind: ParamType,
    /// For strings: the pattern the whole value must match.
    #[serde(default)]
    pub pattern: Option<String>,
    /// For strings: the value is a path, so its pattern may admit `/` (never whitespace, a
    /// leading `-` or `..`).
    #[serde(default)]
    pub path: bool,
    /// For integers: the smallest value allowed.
    #[serde(default)]
    pub min: Option<i64>,
    /// For integers: the largest value allowed.
    #[serde(default)]
    pub max: Option<i64>,
    /// For enums: the values allowed.
    #[serde(default)]
    pub values: Vec<String>,
}

/// `type = "command"` settings: the `command` table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandReceiverConfig {
    /// What to run and how (required).
    pub command: Option<CommandConfig>,
}

impl CommandReceiverConfig {
    pub(crate) fn build(&self, ctx: &BuildContext<'_>) -> Built {
        let c = self
            .command
            .clone()
            .ok_or("a `command` table is required")?;
        CommandReceiver::new(c, ctx.allowed_commands, ctx.timeout)
            .map(|c| Box::new(c) as Box<dyn Receiver>)
    }
}

/// A number of bytes: an integer, or a string with a binary unit (`"512MiB"`, `"64 KiB"`,
/// `"1GiB"`, `"100B"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"512MiB"` and the like.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("`{text}` is not a size (e.g. \"512MiB\")"))?;
        let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kib" | "k" => 1 << 10,
            "mib" | "m" => 1 << 20,
            "gib" | "g" => 1 << 30,
            "tib" | "t" => 1 << 40,
            other => {
                return Err(format!(
                    "`{other}` is not a unit of size: use B, KiB, MiB, GiB or TiB"
                ));
            }
        };
        number
            .checked_mul(scale)
            .map(Self)
            .ok_or_else(|| format!("`{text}` is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Bytes(n) => Ok(Self(n)),
            Raw::Text(t) => Self::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// `limits = { cpu = "10s", memory = "512MiB", open_files = 256 }`: resource limits the
/// command and everything it starts run under. None by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResourceLimits {
    /// CPU time (`RLIMIT_CPU`, whole seconds, rounded up): the kernel kills the process
    /// past it.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Duration>,
    /// Address space (`RLIMIT_AS`): allocations beyond it fail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// Open file descriptors (`RLIMIT_NOFILE`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_files: Option<u64>,
}

impl ResourceLimits {
    fn is_empty(&self) -> bool {
        self.cpu.is_none() && self.memory.is_none() && self.open_files.is_none()
    }

    /// The options of util-linux's `prlimit` that set these limits (soft = hard).
    fn prlimit_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(cpu) = self.cpu {
            let secs = cpu.as_secs() + u64::from(cpu.subsec_nanos() > 0);
            out.push(format!("--cpu={}", secs.max(1)));
        }
        if let Some(memory) = self.memory {
            out.push(format!("--as={}", memory.0));
        }
        if let Some(files) = self.open_files {
            out.push(format!("--nofile={files}"));
        }
        out
    }
}

/// Where util-linux's `prlimit` may be (fixed paths: `PATH` is the command's, not ours).
const PRLIMIT: &[&str] = &["/usr/bin/prlimit", "/bin/prlimit"];

/// The `command` table of a `type = "command"` receiver. Its `Debug` output shows the names
/// of `env` variables, never their values (they may be secrets).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// The program (absolute path, allowlisted) and its arguments, with `{param}` placeholders.
    pub argv: Vec<String>,
    /// The parameters the placeholders name.
    #[serde(default)]
    pub params: BTreeMap<String, ParamSpec>,
    /// `dry_run` (the default), `suggest` or `auto`.
    #[serde(default = "default_mode")]
    pub mode: ExecutionMode,
    /// Working directory.
    #[serde(default = "default_cwd")]
    pub cwd: PathBuf,
    /// The whole environment of the command.
    #[serde(default = "default_env")]
    pub env: BTreeMap<String, String>,
    /// Bytes of standard output (and of standard error) kept.
    #[serde(default = "default_max_output")]
    pub max_output: usize,
    /// The program is an interpreter (a shell, `env`, `python` …) and that is intended: it
    /// runs whatever its arguments say, so the allowlist alone does not bound it.
    #[serde(default)]
    pub allow_interpreter: bool,
    /// Resource limits.
    #[serde(default)]
    pub limits: ResourceLimits,
}

impl fmt::Debug for CommandConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// `env` with its values redacted.
        struct Keys<'a>(&'a BTreeMap<String, String>);
        impl fmt::Debug for Keys<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map()
                    .entries(self.0.keys().map(|k| (k, format_args!("<redacted>"))))
                    .finish()
            }
        }
        f.debug_struct("CommandConfig")
            .field("argv", &self.argv)
            .field("params", &self.params)
            .field("mode", &self.mode)
            .field("cwd", &self.cwd)
            .field("env", &Keys(&self.env))
            .field("max_output", &self.max_output)
            .field("allow_interpreter", &self.allow_interpreter)
            .field("limits", &self.limits)
            .finish()
    }
}

fn default_mode() -> ExecutionMode {
    ExecutionMode::DryRun
}
fn default_cwd() -> PathBuf {
    PathBuf::from("/")
}
fn default_env() -> BTreeMap<String, String> {
    BTreeMap::from([(
        "PATH".to_owned(),
        "/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
    )])
}
fn default_max_output() -> usize {
    64 * 1024
}

/// Programs that run code or other programs named in their arguments, by file name.
const INTERPRETERS: &[&str] = &[
    "sh", "bash", "dash", "zsh", "ksh", "ksh93", "mksh", "pdksh", "ash", "csh", "tcsh", "fish",
    "rbash", "busybox", "toybox", "env", "node", "nodejs", "deno", "bun", "awk", "gawk", "mawk",
    "nawk", "xargs", "find", "sudo", "doas", "su", "runuser", "nohup", "nice", "ionice", "chrt",
    "taskset", "timeout", "setsid", "stdbuf", "chroot", "nsenter", "unshare", "flock", "watch",
    "strace", "ltrace", "gdb", "script", "expect", "pwsh", "java", "jshell", "irb", "make", "ssh",
    "prlimit",
];
/// Interpreter families, with or without a version (`python3.11`, `perl5.36`).
const INTERPRETER_FAMILIES: &[&str] = &[
    "python",
    "pypy",
    "perl",
    "ruby",
    "php",
    "lua",
    "luajit",
    "tclsh",
    "wish",
    "guile",
    "Rscript",
    "osascript",
    "escript",
];

/// The interpreter's name when `program` (or what it links to) is one.
fn interpreter(program: &Path) -> Option<String> {
    let is_one = |name: &str| {
        INTERPRETERS.contains(&name)
            || INTERPRETER_FAMILIES.iter().any(|family| {
                name.strip_prefix(family)
                    .is_some_and(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'))
            })
    };
    let name_of = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    // A symlink (`/usr/bin/python` → `python3.11`, `/usr/local/bin/fix` → `/bin/bash`)
    // counts by what it points to as well.
    [
        Some(program.to_path_buf()),
        std::fs::canonicalize(program).ok(),
    ]
    .into_iter()
    .flatten()
    .filter_map(|p| name_of(&p))
    .find(|n| is_one(n))
}

/// Strings a parameter's pattern must refuse, and what each stands for.
const PROBES: &[(&str, &str)] = &[
    (" ", "whitespace"),
    ("\t", "whitespace"),
    ("\n", "a line break"),
    ("-x", "a leading `-`"),
    ("--rf", "a leading `-`"),
    ("..", "`..`"),
    ("a/b", "`/`"),
    ("/", "`/`"),
];

/// Why the anchored pattern `re` (from `pattern`) admits values it must not, or `None`.
/// First the probes, for a concrete example; then the pattern's syntax tree, for what no
/// probe shows (`[a-z]+ [a-z]+` admits a space only between letters).
fn admits(pattern: &str, re: &Regex, path: bool) -> Option<String> {
    for (probe, what) in PROBES {
        if path && what.contains('/') {
            continue;
        }
        if re.is_match(probe) {
            return Some(format!("it admits {what} (it matches the probe {probe:?})"));
        }
    }
    let hir = regex_syntax::parse(pattern).ok()?;
    let mut bad = None;
    let shape = Shape::of(&hir, path, &mut bad);
    if let Some(c) = bad {
        let what = if c == '/' {
            "`/`".to_owned()
        } else {
            format!("whitespace or a control character ({c:?})")
        };
        return Some(format!("it admits {what} inside a value"));
    }
    if shape.first_dash {
        return Some("it admits a leading `-`".into());
    }
    if shape.dotdot {
        return Some("it admits `..` inside a value".into());
    }
    None
}

/// What a pattern's matches can look like, as far as the checks care.
#[derive(Debug, Clone, Copy, Default)]
struct Shape {
    /// It matches the empty string.
    nullable: bool,
    /// A match can start with `-`.
    first_dash: bool,
    /// A match can start with `.`.
    first_dot: bool,
    /// A match can end with `.`.
    last_dot: bool,
    /// A match can contain `..`.
    dotdot: bool,
}

/// Characters no value may hold: whitespace, control characters and (unless a path) `/`.
fn forbidden_in(lo: char, hi: char, path: bool) -> Option<char> {
    const RANGES: &[(u32, u32)] = &[
        (0x00, 0x20),
        (0x7F, 0xA0),
        (0x1680, 0x1680),
        (0x2000, 0x200A),
        (0x2028, 0x2029),
        (0x202F, 0x202F),
        (0x205F, 0x205F),
        (0x3000, 0x3000),
        (0xFEFF, 0xFEFF),
    ];
    let slash = (u32::from('/'), u32::from('/'));
    RANGES
        .iter()
        .chain((!path).then_some(&slash))
        .find(|(a, b)| *a <= u32::from(hi) && u32::from(lo) <= *b)
        .and_then(|(a, _)| char::from_u32((*a).max(u32::from(lo))))
}

impl Shape {
    fn of(hir: &Hir, path: bool, bad: &mut Option<char>) -> Shape {
        match hir.kind() {
            HirKind::Empty | HirKind::Look(_) => Shape {
                nullable: true,
                ..Shape::default()
            },
            HirKind::Literal(lit) => {
                let text = String::from_utf8_lossy(&lit.0);
                for c in text.chars() {
                    if bad.is_none() {
                        *bad = forbidden_in(c, c, path);
                    }
                }
                Shape {
                    nullable: text.is_empty(),
                    first_dash: text.starts_with('-'),
                    first_dot: text.starts_with('.'),
                    last_dot: text.ends_with('.'),
                    dotdot: text.contains(".."),
                }
            }
            HirKind::Class(class) => {
                let ranges: Vec<(char, char)> = match class {
                    Class::Unicode(c) => c.ranges().iter().map(|r| (r.start(), r.end())).collect(),
                    Class::Bytes(c) => c
                        .ranges()
                        .iter()
                        .map(|r| (char::from(r.start()), char::from(r.end())))
                        .collect(),
                };
                let has = |x: char| ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&x));
                for (lo, hi) in &ranges {
                    if bad.is_none() {
                        *bad = forbidden_in(*lo, *hi, path);
                    }
                }
                Shape {
                    nullable: ranges.is_empty(),
                    first_dash: has('-'),
                    first_dot: has('.'),
                    last_dot: has('.'),
                    dotdot: false,
                }
            }
            HirKind::Capture(c) => Shape::of(&c.sub, path, bad),
            HirKind::Repetition(r) => {
                let sub = Shape::of(&r.sub, path, bad);
                Shape {
                    nullable: r.min == 0 || sub.nullable,
                    dotdot: sub.dotdot
                        || (sub.last_dot && sub.first_dot && r.max.is_none_or(|m| m >= 2)),
                    ..sub
                }
            }
            HirKind::Concat(parts) => {
                let mut acc = Shape {
                    nullable: true,
                    ..Shape::default()
                };
                for part in parts {
                    let s = Shape::of(part, path, bad);
                    acc = Shape {
                        first_dash: acc.first_dash || (acc.nullable && s.first_dash),
                        first_dot: acc.first_dot || (acc.nullable && s.first_dot),
                        last_dot: s.last_dot || (s.nullable && acc.last_dot),
                        dotdot: acc.dotdot || s.dotdot || (acc.last_dot && s.first_dot),
                        nullable: acc.nullable && s.nullable,
                    };
                }
                acc
            }
            HirKind::Alternation(branches) => branches
                .iter()
                .map(|b| Shape::of(b, path, bad))
                .fold(Shape::default(), |a, s| Shape {
                    nullable: a.nullable || s.nullable,
                    first_dash: a.first_dash || s.first_dash,
                    first_dot: a.first_dot || s.first_dot,
                    last_dot: a.last_dot || s.last_dot,
                    dotdot: a.dotdot || s.dotdot,
                }),
        }
    }
}

/// A validated parameter.
#[derive(Debug)]
enum Check {
    Pattern(Regex),
    Range(i64, i64),
    OneOf(Vec<String>),
}

/// One piece of an argument: literal text or a parameter's value.
#[derive(Debug)]
enum Piece {
    Text(String),
    Param(String),
}

/// Runs allowlisted commands. See the [module docs](self).
#[derive(Debug)]
pub struct CommandReceiver {
    config: CommandConfig,
    params: BTreeMap<String, (String, Check)>,
    /// `argv` split into literal text and parameters once, so a value is never scanned
    /// for placeholders again.
    template: Vec<Vec<Piece>>,
    timeout: Duration,
    /// util-linux's `prlimit` and its options, when `limits` are set.
    prlimit: Option<(PathBuf, Vec<String>)>,
}

/// `arg` as literal text and `{param}` pieces.
fn pieces(arg: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut rest = arg;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        if open > 0 {
            out.push(Piece::Text(rest[..open].to_owned()));
        }
        out.push(Piece::Param(rest[open + 1..open + close].to_owned()));
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() || out.is_empty() {
        out.push(Piece::Text(rest.to_owned()));
    }
    out
}

/// Placeholders `{name}` in `arg`.
fn placeholders(arg: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = arg;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        out.push(&rest[open + 1..open + close]);
        rest = &rest[open + close + 1..];
    }
    out
}

impl CommandReceiver {
    /// A receiver for `config`; `allowed` is the allowlist of programs.
    pub fn new(
        config: CommandConfig,
        allowed: &[PathBuf],
        timeout: Duration,
    ) -> Result<Self, String> {
        let program = config.argv.first().ok_or("argv must name a program")?;
        if !program.starts_with('/') {
            return Err(format!("`{program}`: the program must be an absolute path"));
        }
        if !placeholders(program).is_empty() {
            return Err("the program itself cannot be a parameter".into());
        }
        if !allowed.iter().any(|a| a.as_os_str() == program.as_str()) {
            return Err(format!("`{program}` is not in [decision] allowed_commands"));
        }
        if let Some(name) = interpreter(Path::new(program))
            && !config.allow_interpreter
        {
            return Err(format!(
                "`{program}` is an interpreter (`{name}`): it runs whatever its arguments say, \
                 so the allowlist does not bound what runs; run a dedicated program instead, \
                 or set `allow_interpreter = true` if that is intended"
            ));
        }
        let mut params = BTreeMap::new();
        for (name, spec) in &config.params {
            let check = match spec.kind {
                ParamType::String => {
                    let pattern = spec
                        .pattern
                        .as_deref()
                        .ok_or_else(|| format!("parameter `{name}`: a string needs a `pattern`"))?;
                    let re = Regex::new(&format!("^(?:{pattern})$"))
                        .map_err(|e| format!("parameter `{name}`: {e}"))?;
                    if let Some(why) = admits(pattern, &re, spec.path) {
                        let allowed = if spec.path {
                            "whitespace, a leading `-` or `..`"
                        } else {
                            "whitespace, a leading `-`, `..` or `/` (set `path = true` for a path)"
                        };
                        return Err(format!(
                            "parameter `{name}`: the pattern `{pattern}` is too loose: {why}; \
                             a value must never hold {allowed}; name the characters allowed, \
                             e.g. `[a-z0-9][a-z0-9_-]*`"
                        ));
                    }
                    Check::Pattern(re)
                }
                ParamType::Integer => {
                    // Non-negative unless asked: a negative number reads as an option, and
                    // to `kill` a negative pid is a process group.
                    let (min, max) = (spec.min.unwrap_or(0), spec.max.unwrap_or(i64::MAX));
                    if min > max {
                        return Err(format!("parameter `{name}`: min is above max"));
                    }
                    Check::Range(min, max)
                }
                ParamType::Enum => {
                    if spec.values.is_empty() {
                        return Err(format!("parameter `{name}`: an enum needs `values`"));
                    }
                    Check::OneOf(spec.values.clone())
                }
            };
            params.insert(
                name.clone(),
                (spec.label.clone().unwrap_or_else(|| name.clone()), check),
            );
        }
        for arg in &config.argv {
            for p in placeholders(arg) {
                if !params.contains_key(p) {
                    return Err(format!("`{{{p}}}` in argv is not a declared parameter"));
                }
            }
        }
        // Limits through util-linux's `prlimit`, which sets them on itself and then execs the
        // program: they hold from the program's first instruction, and whatever it starts
        // inherits them. (Without `unsafe` there is no `pre_exec`; `prlimit(2)` on the child's
        // pid after spawn would leave a window in which the program runs, and forks, unbounded.)
        let prlimit = if config.limits.is_empty() {
            None
        } else {
            let found = PRLIMIT.iter().map(PathBuf::from).find(|p| p.is_file());
            let Some(found) = found else {
                return Err(format!(
                    "`limits` need util-linux's `prlimit`, not found at {}: install util-linux, \
                     or remove `limits`",
                    PRLIMIT.join(" or ")
                ));
            };
            Some((found, config.limits.prlimit_args()))
        };
        let template = config.argv.iter().map(|a| pieces(a)).collect();
        Ok(Self {
            config,
            params,
            template,
            timeout,
            prlimit,
        })
    }

    /// The argv for `n`, with every parameter validated.
    fn argv(&self, n: &Notification) -> Result<Vec<String>, String> {
        let labels = n.common_labels();
        let mut values = BTreeMap::new();
        for (name, (label, check)) in &self.params {
            let value = labels.get(label).ok_or_else(|| {
                format!(
                    "parameter `{name}`: label `{label}` is not shared by every alert of the group"
                )
            })?;
            let valid = match check {
                // A leading `-` would read as an option, whatever the pattern allows.
                Check::Pattern(re) => {
                    (!value.starts_with('-') && re.is_match(value)).then(|| value.clone())
                }
                Check::Range(min, max) => value
                    .trim()
                    .parse::<i64>()
                    .ok()
                    .filter(|v| (*min..=*max).contains(v))
                    .map(|v| v.to_string()),
                Check::OneOf(allowed) => allowed.contains(value).then(|| value.clone()),
            };
            let valid = valid
                .ok_or_else(|| format!("parameter `{name}`: {value:?} is not a valid value"))?;
            values.insert(name.as_str(), valid);
        }
        Ok(self
            .template
            .iter()
            .map(|arg| {
                arg.iter()
                    .map(|piece| match piece {
                        Piece::Text(t) => t.as_str(),
                        Piece::Param(p) => values.get(p.as_str()).map_or("", String::as_str),
                    })
                    .collect()
            })
            .collect())
    }

    /// The program spawned and its arguments: `argv` itself, or `argv` under `prlimit`.
    fn spawned(&self, argv: Vec<String>) -> (String, Vec<String>) {
        match &self.prlimit {
            None => {
                let mut argv = argv.into_iter();
                let program = argv.next().unwrap_or_default();
                (program, argv.collect())
            }
            Some((prlimit, options)) => {
                let mut args = options.clone();
                args.push("--".into());
                args.extend(argv);
                (prlimit.to_string_lossy().into_owned(), args)
            }
        }
    }
}

/// Reads `pipe` to the end, keeping the first `cap` bytes (reading on, so the child never
/// blocks on a full pipe).
async fn capped(pipe: Option<impl tokio::io::AsyncRead + Unpin>, cap: usize) -> (String, usize) {
    let Some(mut pipe) = pipe else {
        return (String::new(), 0);
    };
    let mut kept = Vec::new();
    let mut dropped = 0usize;
    let mut buf = [0u8; 8192];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = cap.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
        dropped += n.saturating_sub(room);
    }
    (String::from_utf8_lossy(&kept).into_owned(), dropped)
}

/// Kills a command's whole process group when dropped: when the command ended (what it left
/// behind goes too), when it timed out, and when its delivery is dropped mid-run.
#[derive(Debug)]
struct ProcessGroup(Option<rustix::process::Pid>);

impl ProcessGroup {
    /// The group led by the child `pid` (spawned with `process_group(0)`).
    fn led_by(pid: Option<u32>) -> Self {
        Self(
            pid.and_then(|p| i32::try_from(p).ok())
                .and_then(rustix::process::Pid::from_raw),
        )
    }

    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // ESRCH (nothing left in the group) is the common case.
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Receiver for CommandReceiver {
    fn kind(&self) -> &'static str {
        "command"
    }

    fn target(&self) -> String {
        self.config.argv.first().cloned().unwrap_or_default()
    }

    fn is_remediation(&self) -> bool {
        true
    }

    fn mode(&self) -> ExecutionMode {
        self.config.mode
    }

    fn prepare(&self, n: &Notification) -> Result<Value, String> {
        let argv = self.argv(n)?;
        let mut plan = json!({ "argv": argv, "cwd": self.config.cwd });
        if !self.config.limits.is_empty() {
            plan["limits"] = json!(self.config.limits);
        }
        Ok(plan)
    }

    fn deliver<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Result<String, DeliveryError>> {
        Box::pin(async move {
            let argv = self.argv(n).map_err(DeliveryError::permanent)?;
            let shown = argv.first().cloned().unwrap_or_default();
            let (program, args) = self.spawned(argv);
            let mut child = tokio::process::Command::new(&program)
                .args(&args)
                .env_clear()
                .envs(&self.config.env)
                .current_dir(&self.config.cwd)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| DeliveryError::permanent(format!("cannot start {shown}: {e}")))?;
            // Declared after `child`, so dropped before it: the group dies first.
            let mut group = ProcessGroup::led_by(child.id());
            let cap = self.config.max_output;
            let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
            let run = async {
                let ((out, out_dropped), (err, err_dropped), status) =
                    tokio::join!(capped(stdout, cap), capped(stderr, cap), child.wait());
                (out, out_dropped, err, err_dropped, status)
            };
            let (out, out_dropped, err, err_dropped, status) =
                match tokio::time::timeout(self.timeout, run).await {
                    Ok(done) => done,
                    Err(_) => {
                        group.kill();
                        return Err(DeliveryError::permanent(format!(
                            "killed (with its process group) after the {:?} timeout",
                            self.timeout
                        )));
                    }
                };
            group.kill();
            let status = status
                .map_err(|e| DeliveryError::permanent(format!("waiting for the command: {e}")))?;
            let report = json!({
                "exit": status.code(),
                "signal": std::os::unix::process::ExitStatusExt::signal(&status),
                "stdout": out,
                "stderr": err,
                "truncated_bytes": out_dropped + err_dropped,
            })
            .to_string();
            if status.success() {
                Ok(report)
            } else {
                Err(DeliveryError::permanent(format!(
                    "command failed: {report}"
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string_param(pattern: &str) -> ParamSpec {
        ParamSpec {
            label: None,
            kind: ParamType::String,
            pattern: Some(pattern.into()),
            path: false,
            min: None,
            max: None,
            values: vec![],
        }
    }

    fn config(argv: &[&str]) -> CommandConfig {
        CommandConfig {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            params: BTreeMap::from([("service".to_owned(), string_param("[a-z][a-z0-9-]*"))]),
            mode: ExecutionMode::Auto,
            cwd: default_cwd(),
            env: default_env(),
            max_output: 16,
            allow_interpreter: false,
            limits: ResourceLimits::default(),
        }
    }

    #[test]
    fn programs_must_be_absolute_allowlisted_and_placeholders_declared() {
        let allowed = [PathBuf::from("/bin/echo")];
        let t = Duration::from_secs(1);
        assert!(CommandReceiver::new(config(&["/bin/echo", "{service}"]), &allowed, t).is_ok());
        let err = CommandReceiver::new(config(&["echo", "x"]), &allowed, t).unwrap_err();
        assert!(err.contains("absolute"), "{err}");
        let err = CommandReceiver::new(config(&["/bin/sh", "-c", "x"]), &allowed, t).unwrap_err();
        assert!(err.contains("allowed_commands"), "{err}");
        let err = CommandReceiver::new(config(&["/bin/echo", "{host}"]), &allowed, t).unwrap_err();
        assert!(err.contains("not a declared parameter"), "{err}");
    }

    #[test]
    fn an_allowlisted_interpreter_needs_allow_interpreter() {
        let t = Duration::from_secs(1);
        for program in [
            "/bin/sh",
            "/usr/bin/env",
            "/usr/bin/python3.11",
            "/usr/local/bin/perl",
            "/bin/busybox",
        ] {
            let allowed = [PathBuf::from(program)];
            let err = CommandReceiver::new(config(&[program, "x"]), &allowed, t).unwrap_err();
            assert!(
                err.contains("is an interpreter") && err.contains("allow_interpreter = true"),
                "{program}: {err}"
            );
            let mut c = config(&[program, "x"]);
            c.allow_interpreter = true;
            assert!(CommandReceiver::new(c, &allowed, t).is_ok(), "{program}");
        }
        let allowed = [PathBuf::from("/usr/bin/systemctl")];
        let c = config(&["/usr/bin/systemctl", "restart", "{service}"]);
        assert!(CommandReceiver::new(c, &allowed, t).is_ok());
    }

    /// The error for `pattern` (a path or not), or `None` when it is accepted.
    fn refusal(pattern: &str, path: bool) -> Option<String> {
        let mut c = config(&["/bin/echo", "{service}"]);
        let mut spec = string_param(pattern);
        spec.path = path;
        c.params.insert("service".into(), spec);
        CommandReceiver::new(c, &[PathBuf::from("/bin/echo")], Duration::from_secs(1)).err()
    }

    #[test]
    fn loose_patterns_are_refused_naming_what_they_admit() {
        let cases = [
            (".*", "the probe \" \""),
            (".+", "the probe \" \""),
            ("\\S+", "the probe \"-x\""),
            ("[a-z]+ [a-z]+", "whitespace or a control character (' ')"),
            (
                "[a-z]+\\s?[a-z]",
                "whitespace or a control character ('\\t')",
            ),
            ("[^/]+", "the probe \" \""),
            ("[a-z-]+", "the probe \"-x\""),
            ("[a-z]*-[a-z]+", "the probe \"-x\""),
            ("(?:-|[a-z])[a-z]{2}", "a leading `-`"),
            ("[a-z.]+", "the probe \"..\""),
            ("[a-z]+\\.\\.?[a-z]+", "`..` inside a value"),
            ("[a-z]+(?:\\.[a-z]*)+", "`..` inside a value"),
            ("[a-z0-9/]+", "the probe \"a/b\""),
            ("[a-z]{2}/[a-z]+", "`/` inside a value"),
        ];
        for (pattern, why) in cases {
            let err = refusal(pattern, false).unwrap_or_else(|| panic!("{pattern} accepted"));
            assert!(
                err.contains(why) && err.contains("too loose"),
                "{pattern}: {err}"
            );
        }
        for fine in [
            "[a-z][a-z0-9-]*",
            "[a-z]+(?:\\.[a-z]+)*",
            "\\w+",
            "web-[0-9]{1,3}",
            "api|web|db",
        ] {
            assert_eq!(refusal(fine, false), None, "{fine}");
        }
        // A path may hold `/`, never `..`, whitespace or a leading `-`.
        assert_eq!(refusal("/var/log/[a-z]+(?:/[a-z]+)*", true), None);
        let err = refusal("[a-z./]+", true).unwrap();
        assert!(err.contains("\"..\"") && err.contains("`..`"), "{err}");
        let err = refusal("/srv/.+", true).unwrap();
        assert!(err.contains("too loose"), "{err}");
    }

    #[test]
    fn debug_output_names_env_variables_but_never_their_values() {
        let mut c = config(&["/bin/echo"]);
        c.env.insert("API_TOKEN".into(), "s3cr3t-value".into());
        let debug = format!("{c:?}");
        assert!(debug.contains("API_TOKEN"), "{debug}");
        assert!(!debug.contains("s3cr3t-value"), "{debug}");
        let r =
            CommandReceiver::new(c, &[PathBuf::from("/bin/echo")], Duration::from_secs(1)).unwrap();
        assert!(!format!("{r:?}").contains("s3cr3t-value"));
    }

    #[test]
    fn limits_parse_and_become_prlimit_options() {
        let limits: ResourceLimits =
            toml::from_str("cpu = \"1500ms\"\nmemory = \"512MiB\"\nopen_files = 64").unwrap();
        assert_eq!(
            limits.prlimit_args(),
            ["--cpu=2", "--as=536870912", "--nofile=64"]
        );
        assert_eq!(ByteSize::parse("64 KiB"), Ok(ByteSize(65_536)));
        assert_eq!(ByteSize::parse("100"), Ok(ByteSize(100)));
        assert!(ByteSize::parse("12 parsecs").unwrap_err().contains("unit"));
        assert!(toml::from_str::<ResourceLimits>("memory = \"lots\"").is_err());
        assert!(toml::from_str::<ResourceLimits>("nproc = 3").is_err());
        let mut c = config(&["/bin/echo", "{service}"]);
        c.limits = limits;
        let r =
            CommandReceiver::new(c, &[PathBuf::from("/bin/echo")], Duration::from_secs(1)).unwrap();
        let (program, args) = r.spawned(vec!["/bin/echo".into(), "api".into()]);
        assert!(program.ends_with("/prlimit"), "{program}");
        assert_eq!(
            args,
            [
                "--cpu=2",
                "--as=536870912",
                "--nofile=64",
                "--",
                "/bin/echo",
                "api"
            ]
        );
    }

    #[test]
    fn values_are_validated_normalised_and_never_options() {
        use crate::decision::rule::Severity;
        use crate::decision::{AlertRecord, AlertStatus, Notification, NotificationKind};
        let mut c = config(&["/bin/echo", "--unit={service}.service", "{pid}"]);
        c.params.insert(
            "pid".into(),
            ParamSpec {
                label: None,
                kind: ParamType::Integer,
                pattern: None,
                path: false,
                min: None,
                max: Some(99_999),
                values: vec![],
            },
        );
        let r =
            CommandReceiver::new(c, &[PathBuf::from("/bin/echo")], Duration::from_secs(1)).unwrap();
        let notification = |service: &str, pid: &str| {
            let alert = AlertRecord {
                fingerprint: "f".into(),
                rule: "r".into(),
                status: AlertStatus::Firing,
                severity: Severity::Warning,
                labels: BTreeMap::from([
                    ("service".to_owned(), service.to_owned()),
                    ("pid".to_owned(), pid.to_owned()),
                ]),
                annotations: BTreeMap::new(),
                starts_at_ms: 0,
                ends_at_ms: None,
                series_id: 1,
            };
            Notification::new(
                "x",
                "r",
                "g",
                BTreeMap::new(),
                vec![alert],
                0,
                0,
                NotificationKind::Alerts,
            )
        };
        assert_eq!(
            r.argv(&notification("api", "+0042")).unwrap(),
            vec!["/bin/echo", "--unit=api.service", "42"]
        );
        assert!(
            r.argv(&notification("api", "-1")).is_err(),
            "negative: a process group to kill"
        );
        assert!(r.argv(&notification("-rf", "1")).is_err(), "leading dash");
        // A value holding another placeholder is not expanded again.
        let mut c = config(&["/bin/echo", "{service}"]);
        c.params.get_mut("service").unwrap().pattern = Some("[a-z{}]+".into());
        let r =
            CommandReceiver::new(c, &[PathBuf::from("/bin/echo")], Duration::from_secs(1)).unwrap();
        assert_eq!(
            r.argv(&notification("a{service}", "1")).unwrap(),
            vec!["/bin/echo", "a{service}"]
        );
    }

    #[test]
    fn placeholders_are_found_inside_arguments() {
        assert_eq!(placeholders("--unit={service}.service"), vec!["service"]);
        assert_eq!(placeholders("{a}-{b}"), vec!["a", "b"]);
        assert!(placeholders("plain").is_empty());
    }
}
