"""structlog is imported without asyncio (and ssl); asyncio still works on demand.

Run in fresh interpreters: the test process itself may already hold asyncio.
"""

from tests.conftest import python_out

CHECK = r"""
import sys
import elsa.core.daemon, elsa.plugins, structlog
assert "asyncio" not in sys.modules, "asyncio imported"
assert "ssl" not in sys.modules, "ssl imported"
assert "_hashlib" not in sys.modules, "hashlib/OpenSSL imported"
from elsa.core.jobid import host_id
import hashlib, tempfile
seed = "0123456789abcdef"
with tempfile.NamedTemporaryFile("w") as fh:
    fh.write(seed)
    fh.flush()
    want = (int.from_bytes(hashlib.sha256(seed.encode()).digest()[:4], "big") & 0x7FFFFFFF) or 1
    assert host_id(fh.name) == want  # the same host id (job ids) as with hashlib
"""

USE = r"""
import elsa.logsetup, structlog, io
buf = io.StringIO()
elsa.logsetup.configure("info", stream=buf, json=True)
import asyncio.subprocess  # a first import of a submodule: must not run it twice
import asyncio
assert asyncio.subprocess is sys.modules["asyncio.subprocess"]
async def main():
    await structlog.get_logger().ainfo("async hello")  # structlog's deferred asyncio
asyncio.run(main())
assert "async hello" in buf.getvalue(), buf.getvalue()
"""


def test_elsa_imports_leave_asyncio_ssl_and_openssl_out():
    python_out("import sys\n" + CHECK)


def test_asyncio_still_works_for_whoever_uses_it():
    python_out("import sys\n" + USE)
