"""Config: defaults, validation messages, and elsad refusing bad files before starting."""

import os
import subprocess
import sys

import pytest

from elsa import config
from elsa.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "elsa.toml"
    p.write_text(text)
    return str(p)


def test_defaults_without_file():
    cfg = config.load(None)
    assert cfg.backend == "auto"
    assert cfg.socket == "/run/elsa/elsad.sock"
    assert cfg.state_dir == "/var/lib/elsa"
    assert cfg.limits["max_request_bytes"] == 65536
    assert cfg.path == "<defaults>"


def test_valid_file(tmp_path):
    cfg = config.load(write(tmp_path, 'backend = "cgroup2"\nlog_level = "debug"\n'
                            '[sources.taskstats]\n[sources.bsdacct]\nenabled = false\n'
                            '[limits]\nidle_timeout = 5\n'
                            '[backends.cgroup2]\nbase = "/x"\n'))
    assert cfg.backend == "cgroup2" and cfg.log_level == "debug"
    assert cfg.sources == ("taskstats",)  # bsdacct's table says enabled = false
    assert cfg.source_table("bsdacct") == {}
    assert cfg.limits["idle_timeout"] == 5.0  # ints are accepted for floats
    assert cfg.backend_table("cgroup2") == {"base": "/x"}


@pytest.mark.parametrize("text, expected", [
    ('bogus = 1\n', "unknown key 'bogus'"),
    ('backend = 3\n', "key 'backend' must be a string, got integer 3"),
    ('log_level = "loud"\n', "key 'log_level' must be one of"),
    ('socket = "relative.sock"\n', "key 'socket' must be an absolute path"),
    # AF_UNIX's sun_path holds 108 bytes with the NUL (unix(7)); bind() said "None"
    (f'socket = "/run/{"x" * 103}"\n', "key 'socket' must be at most 107 bytes long"),
    ('netlink_rcvbuf = 0\n', "key 'netlink_rcvbuf' must be greater than 0"),
    ('netlink_rcvbuf = true\n', "key 'netlink_rcvbuf' must be an integer, got boolean"),
    # setsockopt's C int, which the kernel doubles
    ('netlink_rcvbuf = 2147483648\n', "key 'netlink_rcvbuf' must be at most 1073741824"),
    ('disabled_plugins = ["a", 2]\n', "key 'disabled_plugins[1]' must be a string, got integer 2"),
    ('[sources.x]\nenabled = "yes"\n', "key 'sources.x.enabled' must be a boolean"),
    ('[limits]\nmax_connections = "many"\n', "key 'limits.max_connections' must be an integer"),
    ('[limits]\nnope = 1\n', "unknown key 'limits.nope'"),
    ('backends = 3\n', "key 'backends' must be a table of tables"),
    ('[backends]\ncnproc = 1\n', "key 'backends.cnproc' must be a table"),
    ('backend = "cnproc\n', "not valid TOML"),
])
def test_bad_values_name_file_key_and_type(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    assert path in exc.value.message
    assert expected in exc.value.message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(str(tmp_path / "nope.toml"))


def test_resolve_order(tmp_path):
    assert config.resolve_path("/a", {"ELSA_CONFIG": "/b"}) == "/a"
    assert config.resolve_path(None, {"ELSA_CONFIG": "/b"}) == "/b"


def test_example_config_parses_back():
    text = config.render_example()
    # Uncomment every key: the example must be valid TOML with valid defaults.
    lines = [ln[1:] if ln.startswith("#") and " = " in ln else ln for ln in text.splitlines()]
    data = config.tomllib.loads("\n".join(lines))
    cfg = config.parse(data, "<example>")
    assert cfg.backend == "auto"


@pytest.mark.parametrize("text, expected", [
    ('backend = "nosuch"\n', "no backend named 'nosuch'; available: "),
    ('[sources.nosuch]\n', "source 'nosuch' is not installed"),
    ('[backends.cnproc]\nfoo = 1\n', "unknown key 'backends.cnproc.foo'"),
    ('[sources.taskstats]\nrcvbuf = 2147483648\n',
     "key 'sources.taskstats.rcvbuf' must be at most 1073741824"),
    ('log_level = 5\n', "key 'log_level' must be a string"),
])
def test_elsad_refuses_bad_config_and_starts_nothing(tmp_path, text, expected):
    sock = tmp_path / "s.sock"
    path = write(tmp_path, f'socket = "{sock}"\nstate_dir = "{tmp_path / "st"}"\n' + text)
    res = subprocess.run([sys.executable, "-m", "elsa.elsad", "--config", path],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert expected in res.stderr
    assert path in res.stderr
    assert not sock.exists() and not (tmp_path / "st").exists()


def test_check_config_ok(tmp_path):
    path = write(tmp_path, 'backend = "cnproc"\n')
    res = subprocess.run([sys.executable, "-m", "elsa.elsad", "--check-config", "--config", path],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "configuration is valid" in res.stdout


def test_env_var_is_used(tmp_path):
    path = write(tmp_path, "bogus = 1\n")
    env = dict(os.environ, ELSA_CONFIG=path)
    res = subprocess.run([sys.executable, "-m", "elsa.elsad", "--check-config"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown key 'bogus'" in res.stderr


# -- feature sections ([billing], [export.prometheus], ...) -------------------------------------

FAKE_OPTIONS = {
    "listen": config.Option(str, "", "Address to listen on."),
    "rate": config.Option(float, 1.0, "A rate.", check=config.non_negative),
}


@pytest.fixture
def fake_sections(monkeypatch):
    monkeypatch.setattr(config, "SECTIONS", {"feat": f"{__name__}:FAKE_OPTIONS",
                                             "exp.prom": f"{__name__}:FAKE_OPTIONS"})


def test_section_defaults_when_absent(fake_sections):
    cfg = config.parse({}, "x.toml")
    assert cfg.section("feat") == {"listen": "", "rate": 1.0}


def test_section_validated(fake_sections):
    cfg = config.parse({"feat": {"rate": 2}, "exp": {"prom": {"listen": "127.0.0.1:1"}}},
                       "x.toml")
    assert cfg.section("feat")["rate"] == 2.0
    assert cfg.section("exp.prom")["listen"] == "127.0.0.1:1"
    with pytest.raises(ConfigError, match=r"x.toml: unknown key 'feat.nope'"):
        config.parse({"feat": {"nope": 1}}, "x.toml")
    with pytest.raises(ConfigError, match=r"'feat.rate' must be 0 or more"):
        config.parse({"feat": {"rate": -1}}, "x.toml")
    with pytest.raises(ConfigError, match=r"unknown table 'exp.other'"):
        config.parse({"exp": {"other": {}}}, "x.toml")


def test_section_in_example(fake_sections):
    text = config.render_example()
    assert "[feat]" in text and "[exp.prom]" in text


def test_elsad_checks_the_central_url_and_password_file(tmp_path):
    """[central]: what can be checked without the server fails --check-config and the
    start, naming the file and the key, instead of showing later as FAILING in status."""
    pytest.importorskip("psycopg")
    pw = tmp_path / "node.pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o644)
    head = f'backend = "cnproc"\nsocket = "{tmp_path / "s.sock"}"\n' \
           f'state_dir = "{tmp_path / "st"}"\n[central]\n'
    cases = [
        ('url = "mysql://x@y/z"\n', "key 'central.url' 'mysql://x@y/z' is neither"),
        ('url = "host=db prot=5432"\n', 'invalid connection option "prot"'),
        ('url = "postgresql://n:hunter2@db/elsa?sslmod=require"\n',
         "invalid URI query parameter: \"sslmod\""),
        (f'url = "service=elsa"\npassword_file = "{tmp_path / "nope"}"\n',
         f"key 'central.password_file': {tmp_path / 'nope'}: No such file"),
        (f'url = "postgresql://n@db/elsa"\npassword_file = "{pw}"\n',
         "is readable by group or others (mode 644)"),
    ]
    for text, expected in cases:
        path = write(tmp_path, head + text)
        for argv in (["--check-config"], []):
            res = subprocess.run([sys.executable, "-m", "elsa.elsad", *argv, "--config", path],
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 2 and expected in res.stderr, (text, res.stderr)
            assert path in res.stderr and "hunter2" not in res.stderr
            assert not (tmp_path / "st").exists()
    pw.chmod(0o600)
    for url in ("postgresql://n@db/elsa?sslmode=verify-full", "host=db port=5432 dbname=elsa"):
        path = write(tmp_path, head + f'url = "{url}"\npassword_file = "{pw}"\n')
        res = subprocess.run([sys.executable, "-m", "elsa.elsad", "--check-config", "--config",
                              path], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
