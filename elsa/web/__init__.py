"""``elsa web``: per-job accounting in the browser (Flask app served by waitress).

Pages (each also as JSON, with ``Accept: application/json`` or a ``.json``
suffix, carrying the same keys as the matching ``elsa`` report):

* ``/jobs``           the jobs of ``elsa jobs``: filters in the URL, sortable, paginated
* ``/jobs/<JID>``     one job: facts, usage per source, efficiency, process tree, chart
* ``/users``          usage per user (``/accounts``: per account tag) over a period
* ``/apps``           the ``elsa apps`` report, where application accounting is on
* ``/daemon``         ``elsa-jobmng status``
* ``/login``          local login against the system's accounts (PAM)

Who the visitor is comes from a trusted reverse proxy's header or the local
login (:mod:`elsa.web.identity`); what they see follows the CLI's rule: their
own jobs, everything for root and the admin group.
"""

from __future__ import annotations

from typing import Dict

from elsa.config import Option, positive


def _listen(v: str) -> str | None:
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "must be HOST:PORT, e.g. 127.0.0.1:8466"
    return None


OPTIONS: Dict[str, Option] = {
    "listen": Option(str, "127.0.0.1:8466", "Address (HOST:PORT) elsa web listens on."
                     " Loopback by default: put a reverse proxy in front for other hosts.",
                     check=_listen),
    "trusted_proxies": Option(list, [], "Addresses of reverse proxies whose user header is"
                              " believed (e.g. [\"127.0.0.1\"]). Empty: no header is"
                              " believed.", item_type=str),
    "user_header": Option(str, "Remote-User", "Header carrying the authenticated user name"
                          " (the proxy's REMOTE_USER), set by a trusted proxy. Without"
                          " underscores: servers drop such headers."),
    "login": Option(bool, True, "Offer a login form checked against the system's accounts"
                    " (PAM service 'login')."),
    "pam_service": Option(str, "login", "PAM service used by the login form."),
    "actions": Option(bool, False, "Let admins kill, freeze, thaw and end jobs from the"
                      " job page (each with a confirmation and a CSRF token)."),
    "page_size": Option(int, 50, "Jobs per page.", check=positive),
    "session_hours": Option(float, 12.0, "Hours a login stays valid.", check=positive),
}
