"""The control protocol's wire format, shared by the daemon and :mod:`elsa.client`.

One JSON object per line over an AF_UNIX stream socket. This module holds what
both ends must agree on: protocol versions, the error codes, the request and
reply envelopes, and the readers that validate a request's fields. It does no
I/O. The protocol is documented in docs/protocol.md; :data:`ERROR_CODES` is
its error table.
"""

from __future__ import annotations

import json
import signal as signal_mod
from typing import Any, Dict, List, Optional

from elsa.errors import JobNotFound, ProtocolError

#: The protocol version this daemon speaks, and every version it accepts.
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)

#: Every error code a reply can carry (docs/protocol.md, "Errors"). Stable:
#: codes are never renamed or reused; new ones may be added.
ERROR_CODES: Dict[str, str] = {
    "bad-request": "the line is not a JSON object, or a field is missing, of the wrong "
                   "type or out of range",
    "unknown-op": "'op' names no operation this daemon knows",
    "unsupported-version": "'v' names a protocol version this daemon does not speak",
    "too-large": "the request line is longer than limits.max_request_bytes",
    "busy": "too many connections; sent once, then the connection is closed",
    "limit": "a per-connection limit was reached (more than 64 outstanding waits)",
    "permission-denied": "the caller may not act on that process or job",
    "no-such-job": "no job has that id",
    "not-in-job": "the pid is not a member of any job",
    "no-such-process": "the process does not exist (or exited meanwhile)",
    "bad-job-state": "the job has ended; the operation needs a running job",
    "backend": "the grouping backend refused or failed (e.g. freeze on cnproc, bad cpus)",
    "kernel": "a kernel interface failed",
    "no-privilege": "the daemon lacks a privilege it needs for this",
    "store": "the persistent store failed",
    "internal": "a bug in elsad; the message says what; the daemon carries on",
}


class UnknownOperation(ProtocolError):
    code = "unknown-op"


class UnsupportedVersion(ProtocolError):
    code = "unsupported-version"


class NotInJob(JobNotFound):
    code = "not-in-job"


class LimitReached(ProtocolError):
    code = "limit"


# -- envelopes ---------------------------------------------------------------------------

#: The wire's encoder and decoder, built once: json.dumps and json.loads with any
#: option build a new one per call (its scanner too): elsad's CPU per sequential
#: jobof round trip went from 145 to 120 µs with these (AMD EPYC VM, issue 18).
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode(obj: Dict[str, Any]) -> bytes:
    """One protocol line: compact JSON (never NaN or Infinity) and a newline."""
    return _ENCODER.encode(obj).encode() + b"\n"


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"{name} is not valid JSON (RFC 8259 has no NaN or Infinity)")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_request(line: bytes) -> Dict[str, Any]:
    """A request line to its JSON object; ``bad-request`` for anything else."""
    try:
        # What json.loads does with bytes: UTF-8 (or 16/32, by its first bytes).
        req = _DECODER.decode(line.decode(json.detect_encoding(line), "surrogatepass"))
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError("request nests too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"request is not valid JSON: {exc}") from None
    if not isinstance(req, dict):
        raise ProtocolError(f"request must be a JSON object, got {kind(req)}")
    return req


def request_id(req: Dict[str, Any]) -> Any:
    """The request's ``id``, echoed in its reply (a string or a 64-bit integer)."""
    req_id = req.get("id")
    if req_id is None:
        return None
    if isinstance(req_id, str) and len(req_id) <= 256:
        return req_id
    if isinstance(req_id, int) and not isinstance(req_id, bool) and abs(req_id) < 2 ** 63:
        return req_id
    raise ProtocolError("'id' must be a string (<= 256 chars) or a 64-bit integer")


def check_version(req: Dict[str, Any]) -> None:
    """Refuse a request for a protocol version this daemon does not speak."""
    version = req.get("v", PROTOCOL_VERSION)
    if type(version) is not int or version not in SUPPORTED_VERSIONS:  # not 1.0, "1", true
        raise UnsupportedVersion(
            f"protocol version {json.dumps(version)[:32]} not supported; this daemon speaks "
            f"{', '.join(f'v{v}' for v in SUPPORTED_VERSIONS)} (send \"v\" as an integer)")


def ok_reply(req_id: Any, result: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {"v": PROTOCOL_VERSION, "ok": True, "result": result}
    if req_id is not None:
        out["id"] = req_id
    return out


def error_reply(req_id: Any, code: str, message: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {"v": PROTOCOL_VERSION, "ok": False,
                           "error": {"code": code, "message": message}}
    if req_id is not None:
        out["id"] = req_id
    return out


def parse_reply(line: bytes) -> Dict[str, Any]:
    """A reply line to its JSON object (the client's side)."""
    try:
        reply = json.loads(line)
    except ValueError:
        raise ProtocolError(f"elsad sent a malformed reply: {line[:200]!r}") from None
    if not isinstance(reply, dict):
        raise ProtocolError(f"elsad sent a reply that is not an object: {line[:200]!r}")
    return reply


# -- request fields ----------------------------------------------------------------------

def kind(value: Any) -> str:
    """The JSON type name of *value*, for error messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def get_int(req: Dict[str, Any], key: str, *, required: bool = True, minimum: int = 0,
            maximum: int = 2 ** 63 - 1) -> Optional[int]:
    value = req.get(key)
    if value is None:
        if required:
            raise ProtocolError(f"'{key}' is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"'{key}' must be an integer, got {kind(value)}")
    if not minimum <= value <= maximum:
        raise ProtocolError(f"'{key}' out of range [{minimum}, {maximum}]: {value}")
    return value


def get_jid(req: Dict[str, Any]) -> int:
    """The job id of a request: the hex string (``0x0035969e00000402``) as every
    reply carries it (docs/jobid.md); a JSON integer is accepted too."""
    from elsa.core.model import parse_jid

    value = req.get("jid")
    if value is None:
        raise ProtocolError("'jid' is required")
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ProtocolError("'jid' must be a job id string like 0x0035969e00000402, "
                            f"got {kind(value)}")
    if isinstance(value, str) and (len(value) > 40 or not value.lower().startswith("0x")):
        raise ProtocolError("'jid' must be a hex job id like 0x0035969e00000402, "
                            f"got {value[:40]!r}")
    try:
        return parse_jid(value)
    except ValueError as exc:
        raise ProtocolError(f"'jid': {exc}") from exc


def get_str(req: Dict[str, Any], key: str, default: str = "", max_len: int = 256) -> str:
    value = req.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, str):
        raise ProtocolError(f"'{key}' must be a string, got {kind(value)}")
    if len(value) > max_len:
        raise ProtocolError(f"'{key}' longer than {max_len} characters")
    # No control characters: names and tags end up in terminals and reports.
    if not value.isprintable():
        raise ProtocolError(f"'{key}' contains control characters")
    return value


def get_str_map(req: Dict[str, Any], key: str, max_entries: int = 64) -> Dict[str, str]:
    value = req.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"'{key}' must be an object mapping names to strings, "
                            f"got {kind(value)}")
    if len(value) > max_entries:
        raise ProtocolError(f"'{key}' has more than {max_entries} entries")
    for k, v in value.items():
        if (not k or len(k) > 128 or "=" in k or not k.isprintable() or " " in k
                or not isinstance(v, str) or len(v) > 1024 or not v.isprintable()):
            raise ProtocolError(
                f"'{key}' must map names (1-128 printable characters, no '=' or space) to "
                f"strings (<= 1024 printable characters); bad entry {k[:64]!r}")
    return dict(value)


def get_pids(req: Dict[str, Any], key: str = "pids") -> List[int]:
    value = req.get(key)
    if not isinstance(value, list) or not value:
        raise ProtocolError(f"'{key}' must be a non-empty array of pids, got {kind(value)}")
    if len(value) > 4096:
        raise ProtocolError(f"'{key}' has more than 4096 pids")
    out: List[int] = []
    for p in value:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 2 ** 31:
            raise ProtocolError(f"'{key}' must contain pids (1 to 2^31-1), got {p!r:.40}")
        if p not in out:
            out.append(p)
    return out


def get_signal(req: Dict[str, Any]) -> int:
    value = req.get("signal", int(signal_mod.SIGTERM))
    if isinstance(value, str):
        return parse_signal(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"'signal' must be a number or a name, got {kind(value)}")
    if not 1 <= value <= signal_mod.SIGRTMAX:
        raise ProtocolError(f"'signal' out of range [1, {int(signal_mod.SIGRTMAX)}]: {value}")
    return value


def parse_signal(text: str) -> int:
    """``"TERM"``, ``"SIGTERM"``, ``"sigkill"`` or ``"9"`` to a signal number."""
    name = text.strip().upper()
    if name.isdigit():
        number = int(name)
        if 1 <= number <= signal_mod.SIGRTMAX:
            return number
        raise ProtocolError(f"signal number out of range: {text[:32]!r}")
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal_mod.Signals[name])
    except KeyError:
        raise ProtocolError(f"unknown signal {text[:32]!r} (use a name like TERM or KILL, "
                            "or a number)") from None
