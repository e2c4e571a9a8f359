"""TOML configuration: schema, defaults, validation.

Every key has a default (so an absent file means "embedded defaults") and a
one-line doc used to generate ``packaging/elsa.toml``. Unknown keys and wrong
types are refused with a message naming the file, the key and the expected
type. Per-plugin tables (``[backends.<name>]``, ``[sources.<name>]``) are kept
raw here and validated by the plugin that owns them with :func:`validate_table`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from elsa.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on RHEL 9's Python 3.9
    import tomli as tomllib

DEFAULT_PATH = "/etc/elsa/elsa.toml"
ENV_VAR = "ELSA_CONFIG"

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Option:
    """One configuration key: its type, default and documentation."""

    type: Any  # a type or a tuple of types accepted by isinstance
    default: Any
    doc: str
    choices: Tuple[Any, ...] = ()
    # Extra check returning an error message, or None when the value is fine.
    check: Optional[Callable[[Any], Optional[str]]] = None
    item_type: Any = None  # for lists: the type of each element


def _type_name(t: Any) -> str:
    names = {str: "string", int: "integer", float: "number", bool: "boolean",
             list: "array", dict: "table"}
    if isinstance(t, tuple):
        return " or ".join(names.get(x, x.__name__) for x in t)
    return names.get(t, getattr(t, "__name__", str(t)))


def _a(t: Any) -> str:
    """*t*'s name with its article: "an integer", "a string"."""
    name = _type_name(t)
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


# Checks for Option(check=...), for the core and for plugins' option tables.
def positive(v: Any) -> Optional[str]:
    return None if v > 0 else "must be greater than 0"


def non_negative(v: Any) -> Optional[str]:
    return None if v >= 0 else "must be 0 or more"


def rcvbuf_size(v: Any) -> Optional[str]:
    """A socket receive buffer: setsockopt takes a C int, which the kernel doubles
    (socket(7))."""
    return positive(v) or (None if v <= MAX_RCVBUF else f"must be at most {MAX_RCVBUF} (1 GiB)")


MAX_RCVBUF = 1 << 30


def _absolute(v: Any) -> Optional[str]:
    return None if os.path.isabs(v) else "must be an absolute path"


#: Bytes of a socket path: AF_UNIX's sun_path holds 108 with the NUL (unix(7)).
SOCKET_PATH_MAX = 107


def _socket_path(v: Any) -> Optional[str]:
    if not os.path.isabs(v):
        return "must be an absolute path"
    if len(os.fsencode(v)) > SOCKET_PATH_MAX:
        return (f"must be at most {SOCKET_PATH_MAX} bytes long (an AF_UNIX socket's limit); "
                "use a shorter path such as /run/elsa/elsad.sock")
    return None


CORE_OPTIONS: Dict[str, Option] = {
    "backend": Option(str, "auto", "Grouping backend: auto (cgroup2 where a writable cgroup v2"
                      " hierarchy is mounted, else cnproc), cnproc, cgroup2, cpuset, or a"
                      " plugin's."),
    "socket": Option(str, "/run/elsa/elsad.sock", "Path of the control socket (AF_UNIX).",
                     check=_socket_path),
    "state_dir": Option(str, "/var/lib/elsa", "Directory of the persistent store (SQLite).",
                        check=_absolute),
    "log_level": Option(str, "info", "Log level.", choices=LOG_LEVELS),
    "job_end": Option(str, "last-exit",
                      "When a job ends: 'last-exit' (its last member exited) or 'explicit'"
                      " (only on 'end').", choices=("last-exit", "explicit")),
    "netlink_rcvbuf": Option(int, 32 * 1024 * 1024,
                             "Receive buffer (bytes) for the proc connector socket; set with"
                             " SO_RCVBUFFORCE so it may exceed net.core.rmem_max;"
                             " at most 1 GiB.",
                             check=rcvbuf_size),
    "proc_event_filter": Option(bool, True,
                                "Ask the kernel for the fork, exec and exit events only (Linux"
                                " 6.6 and later; older kernels send every event regardless)."
                                " false: every event is read, so that a gap in the events'"
                                " sequence numbers also reveals events the kernel could not"
                                " send at all (docs/daemon.md, 'Event loss and resync')."),
    "admin_group": Option(str, "", "Group whose members may manage every job (besides root)."
                          " Empty: root only."),
    "disabled_plugins": Option(list, [], "Plugins (entry-point names) never to load.",
                               item_type=str),
    "plugins": Option(list, [], "Extra plugin modules to load by import path (site-local"
                      " plugins that are not installed with an entry point).", item_type=str),
    "exited_linger": Option(float, 15.0, "Seconds an exited process stays resolvable to its job"
                            " in memory, so late accounting records are still attributed"
                            " (later ones are resolved from the stored history).",
                            check=non_negative),
    "burst_hold": Option(float, 5.0, "Longest time (seconds) elsad leaves the kernel's queues"
                         " unread while processes start and end faster than ~250 a second,"
                         " catching up when the burst is over, so that its work does not slow"
                         " the workload (docs/daemon.md, 'Burst hold'). 0: never hold.",
                         check=non_negative),
    "nice": Option(int, 0, "Nice value elsad runs at (0..19). Above 0 a busy machine's"
                   " workload goes first and elsad catches up from the kernel's buffers"
                   " (netlink_rcvbuf, the taskstats rcvbuf, the pacct file); when the proc"
                   " connector backlog nevertheless outgrows a loop pass, elsad returns to"
                   " nice 0 until it has caught up (status: 'priority').",
                   check=lambda v: None if 0 <= v <= 19 else "must be 0..19"),  # type: ignore[operator]
}

LIMIT_OPTIONS: Dict[str, Option] = {
    "max_request_bytes": Option(int, 65536, "Largest accepted control request line, in bytes.",
                                check=positive),
    "idle_timeout": Option((int, float), 30.0, "Seconds a client connection may stay idle.",
                           check=positive),
    "max_connections": Option(int, 256, "Concurrent control connections accepted.",
                              check=positive),
    "max_jobs_per_user": Option(int, 1000, "Running jobs one user (not root or the admin "
                                "group) may have; further creates are refused.",
                                check=positive),
    "empty_job_timeout": Option((int, float), 3600.0, "Seconds after which a job that "
                                "never had a process is ended (0: never).",
                                check=lambda v: None if v >= 0 else "must be 0 or more"),
}

PLUGIN_TABLES = ("backends", "sources")

# Feature sections beside the core ([billing], [web], [export.prometheus], ...): the
# section's (dotted) name -> "module:ATTRIBUTE" of its option table. Imported only
# when the config has the section (or to render the example), so that a command
# that needs none of them does not pay for their imports. A feature adds one line.
SECTIONS: Dict[str, str] = {
    "apps": "elsa.apps.options:OPTIONS",
    "billing": "elsa.billing.rates:OPTIONS",
    "billing.rates": "elsa.billing.rates:RATE_OPTIONS",
    "billing.nonprime": "elsa.billing.rates:NONPRIME_OPTIONS",
    "billing.schedule": "elsa.billing.rates:SCHEDULE_OPTIONS",
    "central": "elsa.central.shipper:OPTIONS",
    "reports": "elsa.report.remote:OPTIONS",
    "thresholds": "elsa.core.thresholds:OPTIONS",
    "web": "elsa.web:OPTIONS",
    "export.prometheus": "elsa.export.prometheus:OPTIONS",
    "export.apel": "elsa.export.apel:OPTIONS",
}


def validate_table(table: Mapping[str, Any], options: Mapping[str, Option], *,
                   where: str, path: str, tables: Sequence[str] = ()) -> Dict[str, Any]:
    """Validate *table* against *options*; return it completed with defaults.

    *where* is the dotted table name used in messages (``""`` for the top
    level), *path* the file the table came from. *tables* are the dotted names
    of the sub-tables that may also sit under it (``billing.rates``): they are
    not keys, but a misspelt ``[billing.rate]`` arrives here as an unknown key,
    so the message names them as well.
    """
    out: Dict[str, Any] = {}
    for key, value in table.items():
        name = f"{where}.{key}" if where else key
        opt = options.get(key)
        if opt is None:
            known = ", ".join(sorted(options)) or "(none)"
            subs = ", ".join(f"[{t}]" for t in sorted(tables))
            raise ConfigError(f"{path}: unknown key '{name}'; known keys here: {known}"
                              + (f"; sub-tables: {subs}" if subs else ""))
        out[key] = check_value(value, opt, name=name, path=path)
    for key, opt in options.items():
        if key not in out:
            default = opt.default
            out[key] = list(default) if isinstance(default, list) else default
    return out


def check_value(value: Any, opt: Option, *, name: str, path: str) -> Any:
    """Check one value; ints are accepted where floats are expected."""
    expected = opt.type
    ok_types = expected if isinstance(expected, tuple) else (expected,)
    if float in ok_types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    # bool is an int subclass in Python; TOML keeps them apart, so do we.
    if isinstance(value, bool) and bool not in ok_types:
        ok = False
    else:
        ok = isinstance(value, ok_types)
    if not ok:
        raise ConfigError(
            f"{path}: key '{name}' must be {_a(expected)}, got "
            f"{_type_name(type(value))} {value!r}")
    if opt.item_type is not None:
        for i, item in enumerate(value):
            if not isinstance(item, opt.item_type):
                raise ConfigError(
                    f"{path}: key '{name}[{i}]' must be {_a(opt.item_type)}, got "
                    f"{_type_name(type(item))} {item!r}")
    if opt.choices and value not in opt.choices:
        raise ConfigError(f"{path}: key '{name}' must be one of "
                          f"{', '.join(map(repr, opt.choices))}; got {value!r}")
    if opt.check is not None:
        problem = opt.check(value)
        if problem:
            # A table's check names the bad entry and quotes its value itself.
            got = "" if isinstance(value, dict) else f"; got {value!r}"
            raise ConfigError(f"{path}: key '{name}' {problem}{got}")
    return value


@dataclass(frozen=True)
class Config:
    """The validated configuration. Plugin tables stay raw until the plugin validates them."""

    backend: str = "auto"
    socket: str = "/run/elsa/elsad.sock"
    state_dir: str = "/var/lib/elsa"
    log_level: str = "info"
    job_end: str = "last-exit"
    netlink_rcvbuf: int = 32 * 1024 * 1024
    proc_event_filter: bool = True
    admin_group: str = ""
    sources: Tuple[str, ...] = ()  # enabled sources: [sources.<name>] tables
    # [sources.<name>] tables with enabled = false: off even where on by default.
    disabled_sources: Tuple[str, ...] = ()
    disabled_plugins: Tuple[str, ...] = ()
    plugins: Tuple[str, ...] = ()
    exited_linger: float = 15.0
    burst_hold: float = 5.0
    nice: int = 0
    limits: Mapping[str, Any] = field(default_factory=lambda: {
        k: o.default for k, o in LIMIT_OPTIONS.items()})
    backends: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source_tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Validated feature sections (see SECTIONS), defaults filled in, keyed by dotted name.
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    path: str = "<defaults>"

    def section(self, name: str) -> Mapping[str, Any]:
        """The validated feature section *name* (e.g. ``"web"``), defaults filled in."""
        got = self.sections.get(name)
        if got is not None:
            return got
        return validate_table({}, section_options(name), where=name, path=self.path)

    def backend_table(self, name: str) -> Mapping[str, Any]:
        """The raw ``[backends.<name>]`` table (empty when absent)."""
        return self.backends.get(name, {})

    def source_table(self, name: str) -> Mapping[str, Any]:
        """The raw ``[sources.<name>]`` table (empty when absent)."""
        return self.source_tables.get(name, {})


def resolve_path(cli_path: Optional[str], env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The config file to read: ``--config``, else ``$ELSA_CONFIG``, else the default
    path if it exists, else ``None`` (embedded defaults)."""
    env = os.environ if env is None else env
    if cli_path:
        return cli_path
    if env.get(ENV_VAR):
        return env[ENV_VAR]
    return DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None


def load(path: Optional[str]) -> Config:
    """Read and validate the config at *path* (``None``: embedded defaults)."""
    if path is None:
        return parse({}, "<defaults>")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; create it (see "
                          "packaging/elsa.toml) or drop --config/ELSA_CONFIG") from None
    except PermissionError:
        raise ConfigError(f"{path}: cannot read config file (permission denied)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 TOML: {exc}") from None
    return parse(data, path)


def section_options(name: str) -> Mapping[str, Option]:
    """The option table of feature section *name* (a key of :data:`SECTIONS`)."""
    import importlib

    module, _, attr = SECTIONS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def _parse_sections(data: Mapping[str, Any], path: str) -> Dict[str, Dict[str, Any]]:
    """Validate every feature section present in *data*; return them by dotted name."""
    out: Dict[str, Dict[str, Any]] = {}
    for root in _section_roots() - set(SECTIONS):
        node = data.get(root)
        if node is None:
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: key '{root}' must be a table, got {node!r}")
        for key in node:
            if f"{root}.{key}" not in SECTIONS:
                known = ", ".join(sorted(n for n in SECTIONS if n.startswith(root + ".")))
                raise ConfigError(f"{path}: unknown table '{root}.{key}'; known here: {known}")
    for name in SECTIONS:
        node: Any = data
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if node is None:
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: key '{name}' must be a table, got {node!r}")
        # A nested section's parent ([export]) also holds its children's tables.
        own = {k: v for k, v in node.items() if f"{name}.{k}" not in SECTIONS}
        children = [n for n in SECTIONS
                    if n.startswith(name + ".") and "." not in n[len(name) + 1:]]
        out[name] = validate_table(own, section_options(name), where=name, path=path,
                                   tables=children)
    return out


def _section_roots() -> set:
    return {name.split(".")[0] for name in SECTIONS}


def parse(data: Mapping[str, Any], path: str) -> Config:
    """Validate an already-parsed TOML document."""
    roots = _section_roots()
    top = {k: v for k, v in data.items()
           if k not in PLUGIN_TABLES and k != "limits" and k not in roots}
    core = validate_table(top, CORE_OPTIONS, where="", path=path)
    limits_raw = data.get("limits", {})
    if not isinstance(limits_raw, dict):
        raise ConfigError(f"{path}: key 'limits' must be a table, got {limits_raw!r}")
    limits = validate_table(limits_raw, LIMIT_OPTIONS, where="limits", path=path)
    tables: Dict[str, Dict[str, Mapping[str, Any]]] = {}
    for kind in PLUGIN_TABLES:
        raw = data.get(kind, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: key '{kind}' must be a table of tables, got {raw!r}")
        for name, table in raw.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: key '{kind}.{name}' must be a table, got {table!r}")
        tables[kind] = dict(raw)
    # A source is enabled by its [sources.<name>] table (or, for a source whose
    # spec is default_enabled, without one); `enabled = false` switches it off.
    # The key is the core's, so it is taken out before the plugin validates the table.
    enabled: List[str] = []
    disabled: List[str] = []
    for name, table in list(tables["sources"].items()):
        flag = table.get("enabled", True)
        if not isinstance(flag, bool):
            raise ConfigError(f"{path}: key 'sources.{name}.enabled' must be a boolean, "
                              f"got {flag!r}")
        (enabled if flag else disabled).append(name)
        tables["sources"][name] = {k: v for k, v in table.items() if k != "enabled"}
    return Config(
        backend=core["backend"], socket=core["socket"], state_dir=core["state_dir"],
        log_level=core["log_level"], job_end=core["job_end"],
        netlink_rcvbuf=core["netlink_rcvbuf"], proc_event_filter=core["proc_event_filter"],
        admin_group=core["admin_group"],
        sources=tuple(enabled), disabled_sources=tuple(disabled),
        disabled_plugins=tuple(core["disabled_plugins"]),
        plugins=tuple(core["plugins"]),
        exited_linger=core["exited_linger"], burst_hold=core["burst_hold"], nice=core["nice"],
        limits=limits,
        backends=tables["backends"], source_tables=tables["sources"],
        sections=_parse_sections(data, path), path=path)


def render_example(plugin_options: Mapping[str, Mapping[str, Option]] = {}) -> str:
    """A commented example config listing every key with its default."""
    lines = ["# ELSA configuration (/etc/elsa/elsa.toml). Every key is optional;",
             "# the values shown are the embedded defaults.", ""]

    def emit(options: Mapping[str, Option]) -> None:
        for key, opt in options.items():
            lines.append(f"# {opt.doc}")
            if opt.choices:
                lines.append(f"# One of: {', '.join(map(repr, opt.choices))}.")
            lines.append(f"#{key} = {_toml_value(opt.default)}")
            lines.append("")

    emit(CORE_OPTIONS)
    lines.append("[limits]")
    emit(LIMIT_OPTIONS)
    for name in SECTIONS:
        lines.append(f"[{name}]")
        emit(section_options(name))
    for table, options in plugin_options.items():
        if table.startswith("sources."):
            # A [sources.<name>] table enables its source: keep it commented.
            lines.append("# Uncomment the table to enable this source (sources on by default"
                         " run without it;\n# add 'enabled = false' to switch one off)."
                         f"\n#[{table}]")
        else:
            lines.append(f"[{table}]")
        emit(options)
    return "\n".join(lines).rstrip() + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)
