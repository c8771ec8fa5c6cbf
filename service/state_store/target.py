"""Which store a CHARGEN_STATE_URL names, and its credentials, kept out of anything printed.

    memory://                                        this process (the default)
    redis://[user[:password]@]host:port/db           one redis-server (rediss://: over TLS)
    unix:///path/to/redis.sock?db=0                  one redis-server on a Unix socket
    redis+cluster://[user[:password]@]host:port[,host:port...]/
                                                     a Redis Cluster, found from these nodes
                                                     (rediss+cluster://: over TLS)

User names and passwords in a URL are percent-encoded (``p%40ss`` for ``p@ss``). A password may
come from a file instead (CHARGEN_STATE_PASSWORD_FILE, for container secrets), not from both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

SCHEMES = ("memory", "redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
SCHEME_LIST = "memory://, redis://, rediss://, unix://, redis+cluster:// or rediss+cluster://"


@dataclass(frozen=True)
class StoreTarget:
    scheme: str
    username: str | None = field(default=None, repr=False)  # repr=False: never in a log line
    password: str | None = field(default=None, repr=False)
    nodes: tuple[tuple[str, int], ...] = ()  # cluster: the nodes to discover it from

    @property
    def cluster(self) -> bool:
        return self.scheme.endswith("+cluster")

    @property
    def tls(self) -> bool:
        return self.scheme.startswith("rediss")


def parse_target(url: str) -> StoreTarget:
    """Raises ValueError with a message that never repeats the URL (it may hold a password)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"must start with {SCHEME_LIST}")
    if scheme == "memory":
        return StoreTarget(scheme)
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        userinfo, hosts = "", netloc
    username, colon, password = userinfo.partition(":")
    username = unquote(username) or None
    password = unquote(password) if colon else None
    if not scheme.endswith("+cluster"):
        return StoreTarget(scheme, username, password)
    if path not in ("", "0") or "?" in rest:
        raise ValueError("a Redis Cluster URL has no database number or options: redis+cluster://host:port,.../")
    nodes = []
    for node in hosts.split(","):
        host, colon, port = node.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("a Redis Cluster URL lists its nodes as host:port, separated by commas")
        nodes.append((host.strip("[]"), int(port)))
    return StoreTarget(scheme, username, password, tuple(nodes))


def redacted(url: str) -> str:
    """The URL without user name or password (for logs and /readyz)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "(invalid URL)"
    netloc, slash, path = rest.partition("/")
    return f"{scheme}://{netloc.rpartition('@')[2]}{slash}{path.split('?')[0]}"


def read_password_file(path: Path) -> str:
    """The file's contents without the trailing newline that editors and `echo` add."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read the password file {path} ({type(err).__name__})") from None
    password = text.rstrip("\r\n")
    if not password:
        raise ValueError(f"the password file {path} is empty")
    return password


def check_url(url: str, password_file: Path | None = None) -> StoreTarget:
    target = parse_target(url)
    if password_file is not None and target.password is not None:
        raise ValueError("give the Redis password in the URL or in CHARGEN_STATE_PASSWORD_FILE, not both")
    if target.scheme == "memory" and password_file is not None:
        raise ValueError("CHARGEN_STATE_PASSWORD_FILE is set but the state URL is memory://")
    return target
