"""The Flask application of ``elsa web``: routes, content negotiation, access rules.

Every page reads the store through :mod:`elsa.report.query` — the code behind
``elsa jobs``/``job``/``summary`` — so the browser and the CLI never disagree.
The store is opened read-only per request (an SQLite open costs well under a
millisecond; a per-thread handle would outlive a store replaced by recovery).
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlencode

from flask import (
    Flask,
    Response,
    abort,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from elsa.errors import StoreError
from elsa.web import identity
from elsa.web.identity import Visitor

ACTIONS = ("kill", "freeze", "thaw", "end")


def _secret_key(state_dir: str) -> bytes:
    """The session-signing key, kept in the state dir (0600) so logins survive a restart."""
    path = os.path.join(state_dir, "web-secret")
    try:
        with open(path, "rb") as fh:
            key = fh.read()
        if len(key) >= 32:
            return key
    except FileNotFoundError:
        pass
    except PermissionError:
        return secrets.token_bytes(32)  # not ours to read: sessions last until restart
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
    except OSError:
        pass  # read-only state dir: sessions last until restart
    return key


def create_app(*, db_path: str, state_dir: str, socket_path: str,
               web: Dict[str, Any], admin_group: str = "", billing: Any = None) -> Flask:
    """The app over the store *db_path*; *web* is the validated ``[web]`` section;
    *billing* the :class:`elsa.billing.rates.BillingConfig` whose charges the pages show
    (None, or no rate set: no charges)."""
    if billing is not None and not (any(billing.prime.values())
                                    or any(billing.nonprime.values())):
        billing = None
    app = Flask(__name__)
    app.config.update(SECRET_KEY=_secret_key(state_dir), SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict", JSON_SORT_KEYS=False)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # The CLI's units and exit text, so a page reads like the report.
    from elsa.report import sacct, text

    app.jinja_env.filters.update(dur=text.fmt_us, kb=text.fmt_kb, nbytes=text.fmt_bytes,
                                 when=_when, hexjid=hexjid, fact=fact,
                                 exit=lambda j: sacct.exit_text(*sacct.job_exit(j)))
    app.jinja_env.globals.update(page_url=_page_url)

    def store():
        from elsa.report.connect import open_db

        db = g.get("db")
        if db is None:
            db = g.db = open_db(db_path)
        return db

    @app.teardown_appcontext
    def _close(_exc: Optional[BaseException]) -> None:
        db = g.pop("db", None)
        if db is not None:
            db.conn.close()

    @app.before_request
    def _who() -> Optional[Response]:
        g.visitor = identity.from_request(request.remote_addr, request.headers, session, web,
                                          admin_group)
        if request.endpoint in ("login", "static", "favicon") or g.visitor is not None:
            return None
        if _wants_json():
            return _json_error(401, "not signed in: sign in at /login or come through the "
                                    "site's authenticating proxy")
        return redirect(url_for("login", next=request.full_path))

    @app.context_processor
    def _ctx() -> Dict[str, Any]:
        return {"visitor": g.get("visitor"), "csrf_token": _csrf_token,
                "actions": bool(web["actions"])}

    # -- pages ------------------------------------------------------------------------------

    @app.route("/favicon.ico")
    def favicon() -> Response:
        return redirect(url_for("static", filename="favicon.svg"))

    @app.route("/")
    def index() -> Response:
        return redirect(url_for("jobs_page"))

    @app.route("/jobs")
    @app.route("/jobs.json", endpoint="jobs_json")
    def jobs_page() -> Any:
        from elsa.report import query

        v: Visitor = g.visitor
        args = request.args
        flt, problems = _job_filters(args)
        if not v.admin:
            flt["owner_uid"] = v.uid
        elif args.get("user"):
            who = identity.lookup(args["user"], admin_group)
            if who is None:
                problems.append(f"no user {args['user']!r} on this host")
            flt["owner_uid"] = who.uid if who else -1
        sort = args.get("sort", "created")
        if sort not in query.JOB_SORTS:
            problems.append(f"cannot sort by {sort!r}")
            sort = "created"
        order = args.get("order", "desc")
        if order not in ("asc", "desc"):
            problems.append(f"order {order!r} is neither asc nor desc")
        descending = order != "asc"
        size = int(web["page_size"])
        page = _int(args.get("page"), 1)
        if not 1 <= page <= MAX_PAGE:
            problems.append(f"page {args.get('page')!r} is not a number from 1 to {MAX_PAGE}")
            page = 1
        total, rows = query.jobs_page(store(), sort=sort, descending=descending,
                                      offset=(page - 1) * size, limit=size, **flt)
        sacct.add_root_exits(store(), rows)  # the Exit column: `elsa jobs --format exit`'s
        filters = {k: vals[0] if len(vals) == 1 else vals
                   for k, vals in args.to_dict(flat=False).items()}
        data = {"total": total, "page": page, "page_size": size, "sort": sort,
                "order": "desc" if descending else "asc", "filters": filters,
                "jobs": [_job_json(r) for r in rows]}
        return _respond("jobs.html", data, problems=problems, sorts=query.JOB_SORTS,
                        pages=max(1, -(-total // size)))

    @app.route("/jobs/<jid>")
    @app.route("/jobs/<jid>.json", endpoint="job_json")
    def job_page(jid: str) -> Any:
        from elsa.report import query

        job_id = _parse_jid(jid)
        detail = query.job_detail(store(), job_id)
        if detail is None or not g.visitor.may_see(detail.get("owner_uid")):
            # The same answer for "no such job" and "not yours": no probing of ids.
            return _not_found(f"no job {hexjid(job_id)} that you may see")
        sacct.add_root_exits(store(), [detail])
        data = _job_json(detail)
        data["processes"] = detail["processes"]
        data["process_source"] = detail.get("process_source")
        data["tree"] = process_tree(detail["processes"])
        data["efficiency"] = efficiency(detail)
        data["samples"] = _samples(store(), job_id)
        data["applications"] = _applications(store(), job_id)
        data["charge"] = _job_charge(detail, job_id)
        return _respond("job.html", data)

    @app.route("/users")
    @app.route("/users.json", endpoint="users_json")
    def users_page() -> Any:
        from elsa.report import query

        since, until, problems = _window(request.args)
        rows = query.summary(store(), "user", since, until)
        if not g.visitor.admin:
            rows = [r for r in rows if r.get("uid") == g.visitor.uid]
        _add_charges(rows, "user", since, until)
        data = {"since": since, "until": until, "by": "user", "rows": rows,
                "per_day": _per_day(store(), since, until, g.visitor)}
        return _respond("users.html", data, problems=problems)

    @app.route("/accounts")
    @app.route("/accounts.json", endpoint="accounts_json")
    def accounts_page() -> Any:
        from elsa.report import query

        since, until, problems = _window(request.args)
        rows = query.usage_by_tag(store(), "account", since, until,
                                  None if g.visitor.admin else g.visitor.uid)
        _add_charges(rows, "account", since, until)
        data = {"since": since, "until": until, "by": "account", "rows": rows,
                "per_day": _per_day(store(), since, until, g.visitor)}
        return _respond("users.html", data, problems=problems)

    @app.route("/apps")
    @app.route("/apps.json", endpoint="apps_json")
    def apps_page() -> Any:
        from elsa.apps import report as apps

        since, until, problems = _window(request.args)
        by = request.args.get("by", "binary")
        if by not in apps.GROUPS:
            problems.append(f"cannot group applications by {by!r}")
            by = "binary"
        uid = None if g.visitor.admin else g.visitor.uid
        try:
            rows = apps.usage(store(), by, since=since, until=until, uid=uid)
            error = None
        except StoreError:
            raise  # no store to read: the 503 naming it, as every page
        except Exception as exc:  # a store without app_runs (older schema)
            rows, error = [], f"no application records in this store ({exc})"
        if by == "user":
            from elsa.users import user_name

            for r in rows:
                r["user"] = user_name(r["uid"])
        if by == "job":
            for r in rows:
                r["jid"] = hexjid(r["jid"]) if r["jid"] is not None else None
        cols = list(apps.GROUP_KEYS[by]) + (["user"] if by == "user" else []) + [
            "runs", "users", "wall_us", "cpu_user_us", "cpu_system_us", "max_rss_kb"]
        data = {"by": by, "since": since, "until": until, "rows": rows, "columns": cols,
                "error": error}
        return _respond("apps.html", data, problems=problems, groups=list(apps.GROUPS))

    def _bill(by: str, since: Optional[float], until: Optional[float]) -> Dict[str, Any]:
        """The charges of ``elsa bill --by BY`` for the window (all time when open)."""
        from elsa.billing import bill

        lo = 0.0 if since is None else since
        hi = time.time() if until is None else until
        # A user's bill holds their own items only (docs/security.md), as their rows do.
        return bill.compute(store(), billing, lo, hi, by,
                            uid=None if g.visitor.admin else g.visitor.uid)

    def _add_charges(rows: List[Dict[str, Any]], by: str, since: Optional[float],
                     until: Optional[float]) -> None:
        if billing is None or (since is not None and since >= (until or time.time())):
            return  # a window after now holds nothing to charge (bill.compute needs one)
        data = _bill(by, since, until)
        charges = {r["key"]: r["charge"] for r in data["rows"]}
        for r in rows:
            key = r.get("user") if by == "user" else r.get(by)
            c = charges.get(key)
            r["charge"] = None if c is None else str(c)

    def _job_charge(detail: Dict[str, Any], jid: int) -> Optional[Dict[str, Any]]:
        if billing is None or not detail.get("created"):
            return None
        from elsa.billing import bill

        end = detail.get("ended") or time.time()
        for it in bill.job_items(store(), bill.Biller(billing), detail["created"] - 1,
                                 end + 1):
            if it["jid"] == jid:
                return {"charge": str(it["charge"]), "unit": billing.unit}
        return None

    @app.route("/daemon")
    @app.route("/daemon.json", endpoint="daemon_json")
    def daemon_page() -> Any:
        from elsa.client import Client
        from elsa.errors import ElsaError

        try:
            with Client(socket_path, timeout=5.0) as c:
                status = c.status()
            error = None
        except ElsaError as exc:
            status, error = None, exc.message
        data = {"status": status, "error": error}
        return _respond("daemon.html", data)

    @app.route("/jobs/<jid>/action", methods=["POST"])
    def job_action(jid: str) -> Any:
        from elsa.client import Client
        from elsa.errors import ElsaError

        if not web["actions"] or not g.visitor.admin:
            abort(403)
        if not secrets.compare_digest(request.form.get("csrf", ""), session.get("csrf", "-")):
            abort(400, "missing or wrong CSRF token: reload the page and try again")
        op = request.form.get("op", "")
        if op not in ACTIONS or request.form.get("confirm") != "yes":
            abort(400, f"unknown action {op!r} or not confirmed")
        job_id = _parse_jid(jid)
        try:
            with Client(socket_path, timeout=30.0) as c:
                getattr(c, op)(job_id)
            session["flash"] = f"{op}: done"
        except ElsaError as exc:
            session["flash"] = f"{op} failed: {exc.message}"
        return redirect(url_for("job_page", jid=hexjid(job_id)))

    # -- login -----------------------------------------------------------------------------

    @app.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        error = None
        if request.method == "POST":
            if not web["login"]:
                abort(403)
            name = request.form.get("user", "")
            ok = bool(name) and identity.check_password(name, request.form.get("password", ""),
                                                        web["pam_service"])
            if ok and identity.lookup(name, admin_group) is not None:
                session.clear()
                session.update(user=name, expires=time.time() + 3600 * web["session_hours"])
                nxt = request.args.get("next", "")
                return redirect(nxt if local_path(nxt) else url_for("jobs_page"))
            error = "wrong user name or password"
        return render_template("login.html", error=error, enabled=web["login"]), (
            401 if error else 200)

    @app.route("/logout", methods=["POST"])
    def logout() -> Any:
        session.clear()
        return redirect(url_for("login"))

    @app.errorhandler(400)
    @app.errorhandler(403)
    @app.errorhandler(404)
    @app.errorhandler(405)
    def _http_error(exc: Any) -> Any:
        msg = getattr(exc, "description", str(exc))
        allowed = sorted(getattr(exc, "valid_methods", None) or ())
        headers = {"Allow": ", ".join(allowed)} if allowed else {}
        if allowed:  # e.g. a GET on a job's action URL (a link followed, a reload)
            takes = [m for m in allowed if m not in ("HEAD", "OPTIONS")]
            msg = (f"{request.method} is not allowed on {request.path}: it takes "
                   f"{' or '.join(takes)} only"
                   + ("; use the buttons of ELSA's pages" if takes == ["POST"] else ""))
        if _wants_json():
            body, code = _json_error(exc.code, msg)
            return body, code, headers
        return render_template("error.html", code=exc.code, message=msg), exc.code, headers

    @app.errorhandler(StoreError)
    def _no_store(exc: StoreError) -> Any:
        # No store yet (elsa web started before elsad made it), a wrong state_dir, or one
        # this user cannot read: the page says which and what to check.
        if _wants_json():
            return _json_error(503, exc.message)
        return render_template("error.html", code=503, message=exc.message), 503

    return app


# -- helpers --------------------------------------------------------------------------------

def local_path(target: str) -> bool:
    """Whether *target* (a login's ``next``) is a path on this site: never an open
    redirect. Browsers drop tabs and newlines from a URL and read a backslash as a
    slash (WHATWG URL standard), so "/\t/evil" and "/\\evil" lead to another host,
    as "//evil" does."""
    return (target.startswith("/") and not target.startswith("//") and "\\" not in target
            and all(c.isprintable() and not c.isspace() for c in target))


def _wants_json() -> bool:
    if request.path.endswith(".json"):
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json" and request.accept_mimetypes[best] > \
        request.accept_mimetypes["text/html"]


def _respond(template: str, data: Dict[str, Any], **extra: Any) -> Any:
    """The page, or its JSON; a JSON request with problems (bad filters) gets a 400
    naming them, a page shows them above its table."""
    if _wants_json():
        if extra.get("problems"):
            return _json_error(400, "; ".join(extra["problems"]))
        return jsonify(data)
    flash = session.pop("flash", None)
    return render_template(template, d=data, flash=flash, **extra)


def _json_error(code: int, message: str) -> Tuple[Response, int]:
    return jsonify({"error": message}), code


def _not_found(message: str) -> Any:
    if _wants_json():
        return _json_error(404, message)
    return render_template("error.html", code=404, message=message), 404


def _csrf_token() -> str:
    tok = session.get("csrf")
    if not tok:
        tok = session["csrf"] = secrets.token_urlsafe(32)
    return tok


#: The highest page number asked for (offsets stay far inside SQLite's integers).
MAX_PAGE = 10 ** 9
#: Times a filter may name: the epoch to the end of year 9999.
LATEST = 253402300799.0


def _int(text: Optional[str], default: int) -> int:
    """*text* as an integer; *default* when absent, -1 when not a number."""
    try:
        return int(text) if text else default
    except ValueError:
        return -1


def _parse_jid(text: str) -> int:
    from elsa.core.model import parse_jid

    try:
        return parse_jid(text)
    except ValueError:
        abort(404, f"not a job id: {text!r}")
        raise  # unreachable: abort raises


def _window(args: Any) -> Tuple[Optional[float], Optional[float], List[str]]:
    import argparse

    from elsa.errors import ElsaError
    from elsa.report.cli import check_window, parse_time

    out: List[Optional[float]] = []
    problems: List[str] = []
    for key in ("since", "until"):
        text = args.get(key)
        if not text:
            out.append(None)
            continue
        try:
            t = parse_time(text)
        except argparse.ArgumentTypeError as exc:
            problems.append(f"{key}: {exc}")
            out.append(None)
            continue
        if not 0 <= t <= LATEST:
            problems.append(f"{key}: {text!r} is not a time between 1970 and 9999")
            t = None
        out.append(t)
    try:
        check_window(out[0], out[1])  # as the CLI: until before since is refused
    except ElsaError as exc:
        problems.append(exc.message)
        return None, None, problems  # as for a bad time: the page shows it, unfiltered
    return out[0], out[1], problems


def _job_filters(args: Any) -> Tuple[Dict[str, Any], List[str]]:
    since, until, problems = _window(args)
    flt: Dict[str, Any] = {"since": since, "until": until}
    if args.get("name"):
        flt["name"] = args["name"]
    state = args.get("state")
    if state in ("running", "ended"):
        flt["state"] = state
    elif state:
        problems.append(f"state {state!r} is neither running nor ended")
    tags = {}
    for item in args.getlist("tag"):
        if not item:
            continue  # the form's empty Tag field: no tag filter
        k, sep, val = item.partition("=")
        if not sep or not k:
            problems.append(f"tag filter {item!r} is not KEY=VALUE")
            continue
        tags[k] = val
    if tags:
        flt["tags"] = tags
    return flt, problems


def _page_url(**change: Any) -> str:
    """The current URL with some query arguments changed (filters stay bookmarkable)."""
    args = request.args.to_dict(flat=False)
    for k, v in change.items():
        args[k] = [str(v)]
    return request.path + "?" + urlencode(args, doseq=True)


def _job_json(r: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: v for k, v in r.items() if k not in ("processes", "process_source")}
    out["jid"] = hexjid(r["jid"])
    return out


def _when(t: Optional[float]) -> str:
    """A time as the CLI prints it (the server's zone), with the zone named: the
    visitor's browser may run in another."""
    from elsa.report.text import fmt_time

    return "-" if t is None else f"{fmt_time(t)} {time.strftime('%Z', time.localtime(t))}"


def fact(v: Any) -> str:
    """A status value as ``elsa-jobmng status`` writes it, not Python's repr: yes/no,
    comma lists, '-' for none."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if v is None or v == "" or v == [] or v == {}:
        return "-"
    if isinstance(v, (list, tuple)):
        return ", ".join(fact(x) for x in v)
    if isinstance(v, dict):  # inside a list (a gap's why and jobs)
        return "; ".join(f"{k} {fact(x)}" for k, x in v.items())
    return str(v)


def hexjid(jid: Any) -> str:
    return jid if isinstance(jid, str) else f"{int(jid):#018x}"


def process_tree(procs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Processes as a forest (parent -> children, start order): the command flow of ``ja -f``."""
    nodes = [dict(p, children=[]) for p in procs]
    by_pid: Dict[int, Dict[str, Any]] = {}
    for n in nodes:  # the latest process of a reused pid that started before the child wins
        by_pid.setdefault(n["pid"], n)
    roots = []
    for n in nodes:
        parent = by_pid.get(n.get("ppid"))  # type: ignore[arg-type]
        if parent is not None and parent is not n:
            parent["children"].append(n)
        else:
            roots.append(n)
    return roots


def efficiency(detail: Dict[str, Any]) -> Dict[str, Any]:
    """The job's CPU and memory efficiency: ``elsa eff``'s figures (one rule for
    both: cores allowed from the job's cpuset or CPU limit, CPU of the job's own
    time), each with why it is unknown when it is."""
    from elsa.report.sacct import efficiency as eff

    e = eff(detail)
    return {k: e[k] for k in EFFICIENCY_KEYS}


#: What the job page shows of ``elsa eff``'s figures (the job's name, state and exit
#: are on the page already).
EFFICIENCY_KEYS = ("wall_s", "cpu_s", "cores", "cpu_efficiency", "cpu_efficiency_why",
                   "max_rss_kb", "memory_limit_kb", "memory_efficiency",
                   "memory_efficiency_why")


def _samples(db: Any, jid: int) -> List[Dict[str, Any]]:
    try:
        rows = db.execute("SELECT t, cpu_us, mem_bytes FROM job_samples WHERE jid = ? "
                          "ORDER BY t", (jid,)).fetchall()
    except Exception:  # a store without samples (older schema): no chart
        return []
    # label: the chart's time axis in the server's zone, as the page's times.
    return [{"t": t, "cpu_us": c, "mem_bytes": m,
             "label": time.strftime("%H:%M:%S", time.localtime(t))} for t, c, m in rows]


def _applications(db: Any, jid: int) -> List[Dict[str, Any]]:
    from elsa.apps import report as apps

    try:
        return [r.to_json() for r in apps.job_programs(db, jid)]
    except Exception:  # a store without app_runs (older schema)
        return []


def _per_day(db: Any, since: Optional[float], until: Optional[float],
             v: Visitor) -> List[Dict[str, Any]]:
    from elsa.report import query

    rows = query.usage_per_day(db, since, until, None if v.admin else v.uid)
    return rows
