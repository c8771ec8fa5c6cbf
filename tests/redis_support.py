"""Real redis-server processes for the store's tests: a TCP proxy that can hold back replies.

Every server and proxy listens on loopback only, on a free port, and is stopped by the test
that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from tests.service_support import free_port, wait_until


class ReplyGate:
    """A loopback TCP proxy in front of a redis-server that forwards commands at once and, while
    closed, holds back the server's replies: a test can then act between Redis running a command
    and the client hearing of it (the window in which a request can be cancelled)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> ReplyGate:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def close_gate(self) -> None:
        self._open.clear()

    def open_gate(self) -> None:
        self._open.set()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        pumps = [
            asyncio.create_task(self._pump(client_r, server_w, gated=False)),
            asyncio.create_task(self._pump(server_r, client_w, gated=True)),
        ]
        self._pumps.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
            self._pumps.discard(pump)
        for writer in (client_w, server_w):
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gated: bool) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if gated:
                    await self._open.wait()
                writer.write(data)
                await writer.drain()

    async def stop(self) -> None:
        for pump in list(self._pumps):
            pump.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class RedisServer:
    """A redis-server process of the test's own, on a free loopback port, that can be SIGKILLed
    and restarted (with the same append-only file when persistent)."""

    def __init__(
        self,
        workdir: Path,
        persistent: bool = False,
        extra_args: Sequence[str] = (),
        password: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.port = free_port()
        self.dir = workdir
        self.persistent = persistent
        self.extra_args = list(extra_args)
        self.password = password  # of the default user (an admin's, for the test's own client)
        self.tls = tls  # TLS only: no plain port at all
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"{'rediss' if tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        listen = tls_server_args(self.tls, self.port) if self.tls else ["--port", str(self.port)]
        args = ["redis-server", *listen, "--bind", "127.0.0.1", "--dir", str(self.dir)]
        if self.password:
            args += ["--requirepass", self.password]
        args += ["--save", "", "--daemonize", "no", "--protected-mode", "no"]
        if self.persistent:  # every write fsynced before it is acknowledged: a SIGKILL loses nothing
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.proc = subprocess.Popen([*args, *self.extra_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: ready_redis(self.client().ping), timeout=20, what="redis-server", interval=0.05)
        return self

    def client(self) -> redis.Redis:
        tls: dict[str, Any] = {}
        if self.tls:
            tls = dict(ssl=True, ssl_ca_certs=str(self.tls.ca))
            tls.update(ssl_certfile=str(self.tls.client_cert), ssl_keyfile=str(self.tls.client_key))
        return redis.Redis(port=self.port, password=self.password, socket_timeout=2, socket_connect_timeout=2, **tls)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.kill()


def ready_redis(predicate: Any) -> Any:
    try:
        return predicate()
    except redis.RedisError:
        return False


class CommandLog:
    """Every command clients sent to a redis-server, in order: its slow log with a threshold of 0
    records every command; those a script ran inside it carry the address "?:0" and are left
    out (INFO commandstats would count them as calls too)."""

    IGNORED = (b"SLOWLOG", b"CONFIG", b"CLIENT", b"INFO", b"PING")  # the log's own and connection set-up

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        r.config_set("slowlog-log-slower-than", 0)
        r.config_set("slowlog-max-len", 10_000)

    def reset(self) -> None:
        self.r.slowlog_reset()

    def commands(self) -> list[str]:
        """Command names, oldest first."""
        entries = self.r.execute_command("SLOWLOG", "GET", -1)
        names = [entry[3][0].upper() for entry in reversed(entries) if entry[4] != b"?:0"]
        return [name.decode() for name in names if name not in self.IGNORED]


# The least a chargen replica needs, as an ACL rule (docs/scaling.md): its scripts and their
# commands on its own keys, the sweep's read, and what a cluster client asks at connect time.
CHARGEN_ACL = (
    "on ~chargen:* resetchannels -@all +evalsha +eval +exists +zrangebyscore +ping +hello +command "
    "+cluster|slots +cluster|shards +hset +hget +hmget +expire +pexpire +ttl +pttl +zadd +zrem +set +get +del"
)


class LocalCluster:
    """A Redis Cluster of our own on loopback: ``primaries`` primaries with a replica each, from
    `redis-server --cluster-enabled yes` and `redis-cli --cluster create`.

    With ``password``, every node requires it of the default user (replicas use it too), and the
    user ``chargen`` has it with only CHARGEN_ACL's rights. ``cluster-require-full-coverage no``:
    while one shard fails over, the others keep serving (what docs/scaling.md asks of a cluster).
    """

    def __init__(
        self, workdir: Path, primaries: int = 3, node_timeout_ms: int = 1000, password: str | None = None
    ) -> None:
        self.dir = workdir
        self.primaries = primaries
        self.node_timeout_ms = node_timeout_ms
        self.password = password
        self.ports = [free_port() for _ in range(2 * primaries)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        auth = f"chargen:{self.password}@" if self.password else ""
        return "redis+cluster://" + auth + ",".join(f"127.0.0.1:{port}" for port in self.ports[:2]) + "/"

    def _config(self, port: int) -> Path:
        node_dir = self.dir / f"node-{port}"
        node_dir.mkdir(exist_ok=True)
        lines = [
            f"port {port}",
            f"cluster-port {free_port()}",
            "bind 127.0.0.1",
            "protected-mode no",
            f"dir {node_dir}",
            "save ''",
            "appendonly no",
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            f"cluster-node-timeout {self.node_timeout_ms}",
            "cluster-require-full-coverage no",
            "repl-diskless-sync-delay 0",  # a replica syncs at once (the default waits 5 s for others)
            "repl-ping-replica-period 1",  # and shows in CLUSTER SLOTS within a second, not 10
        ]
        if self.password:
            lines += [f"requirepass {self.password}", f"masterauth {self.password}"]
            lines += [f"user chargen {CHARGEN_ACL} >{self.password}"]
        path = node_dir / "redis.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.password, socket_timeout=2, socket_connect_timeout=2)

    def start(self) -> LocalCluster:
        try:
            for port in self.ports:
                self.procs[port] = subprocess.Popen(
                    ["redis-server", str(self._config(port))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            for port in self.ports:
                wait_until(lambda port=port: ready_redis(self.client(port).ping), timeout=20, what="redis-server")
            auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
            nodes = [f"127.0.0.1:{p}" for p in self.ports]
            subprocess.run(
                ["redis-cli", *auth, "--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            wait_until(self.healthy, timeout=60, interval=0.1, what="the cluster to be healthy")
        except BaseException:
            self.stop()
            raise
        return self

    def healthy(self) -> bool:
        """Every live node says the cluster is ok, and every replica's link to its primary is up."""
        for port in self.procs:
            r = self.client(port)
            info = ready_redis(lambda r=r: r.cluster("info"))
            if not info or info.get("cluster_state") != "ok":
                return False
            role = ready_redis(lambda r=r: r.info("replication"))
            if not role or (role["role"] == "slave" and role.get("master_link_status") != "up"):
                return False
        shards = self.shards()
        return len(shards) == self.primaries and all(replica is not None for *_, replica in shards)

    def shards(self) -> list[tuple[int, int, int, int | None]]:
        """(first slot, last slot, primary port, replica port) per slot range, as a live node sees it."""
        port = next(iter(self.procs))
        ranges = self.client(port).execute_command("CLUSTER", "SLOTS")
        shards = []
        for first, last, primary, *replicas in ranges:
            shards.append((int(first), int(last), int(primary[1]), int(replicas[0][1]) if replicas else None))
        return sorted(shards)

    def primary_of_slot(self, slot: int) -> int:
        return next(primary for first, last, primary, _ in self.shards() if first <= slot <= last)

    def replica_caught_up(self, primary: int) -> bool:
        """The primary's replica has applied every write the primary has acknowledged."""
        replica = next(rep for _, _, p, rep in self.shards() if p == primary)
        assert replica is not None
        offset = self.client(primary).info("replication")["master_repl_offset"]
        return int(self.client(replica).info("replication")["slave_repl_offset"]) >= int(offset)

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the test's own certificate authority
    server_cert: Path  # for 127.0.0.1 and localhost, signed by ca
    server_key: Path
    client_cert: Path  # a client certificate signed by ca (the server asks for one)
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: trusting only it must fail


def make_tls_files(directory: Path) -> TlsFiles:
    """A CA, a server and a client certificate, made here (nothing from outside the test)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        pkcs8 = serialization.PrivateFormat.PKCS8
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()))
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def authority(common: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(name(common))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(*[False] * 5, True, True, False, False), critical=True)  # cert + CRL sign
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cert, key

    def leaf(common: str, usage: x509.ObjectIdentifier, ca: x509.Certificate, ca_key: Any) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    ca, ca_key = authority("chargen test CA")
    other_ca, _ = authority("some other CA")
    server, server_key = leaf("redis", ExtendedKeyUsageOID.SERVER_AUTH, ca, ca_key)
    client, client_key = leaf("chargen", ExtendedKeyUsageOID.CLIENT_AUTH, ca, ca_key)
    return TlsFiles(
        ca=write_cert(ca, directory / "ca.crt"),
        server_cert=write_cert(server, directory / "redis.crt"),
        server_key=write_key(server_key, directory / "redis.key"),
        client_cert=write_cert(client, directory / "client.crt"),
        client_key=write_key(client_key, directory / "client.key"),
        other_ca=write_cert(other_ca, directory / "other-ca.crt"),
    )


def tls_server_args(tls: TlsFiles, port: int) -> list[str]:
    """redis-server on TLS only (its plain port off), asking clients for a certificate."""
    return [
        "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", str(tls.server_cert), "--tls-key-file", str(tls.server_key),
        "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "yes",
    ]  # fmt: skip
