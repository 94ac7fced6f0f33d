"""How a plan's processes find and trust each other: the rendezvous, the shared secret, the groups.

* **Rendezvous.** The driver hosts a ``torch.distributed.TCPStore`` on a socket it binds itself to the
  address given (``127.0.0.1`` by default), so the store listens there and nowhere else. Every gloo
  group's sockets are bound to one address too: the driver's is the rendezvous address, a worker's the
  address it reaches the driver from (or ``--bind``).
* **Secret.** Driver and workers share a secret: generated per launch for the workers the driver
  starts (passed in the ``HETSERVE_CLUSTER_SECRET`` environment variable, never on a command line),
  given by the user for ``hetserve worker`` on other machines. The driver publishes a random session
  id with an HMAC of it; a worker checks it before it trusts the driver and answers with an HMAC of
  its own rank, which the driver checks before it forms a group with it. Commands are signed with a
  key derived from the secret and the session (``channel.CommandCodec``).
* **Groups.** Gloo groups are made directly (not ``init_process_group``): a world group of every rank
  per *generation*, and one group per tensor-parallel server made by its ranks only. When a worker
  dies and comes back, everyone forms the next generation's groups; the layers and KV caches of the
  others stay loaded.

Every wait is bounded: joining (``JOIN_TIMEOUT``), each send or receive (``OP_TIMEOUT``; the driver
pings idle workers every ``PING_INTERVAL`` so a worker that hears nothing that long knows the driver is
gone).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from ...errors import HetserveError

SECRET_ENV = "HETSERVE_CLUSTER_SECRET"
MIN_SECRET_CHARS = 16
JOIN_TIMEOUT = datetime.timedelta(seconds=600)
OP_TIMEOUT = datetime.timedelta(seconds=300)
FORM_TIMEOUT = datetime.timedelta(seconds=120)
PING_INTERVAL = 10.0


# ---- the secret ------------------------------------------------------------------------------------
def new_secret() -> str:
    return secrets.token_hex(32)


def read_secret(secret_file: str | None = None) -> str:
    """The cluster secret from ``secret_file`` or the ``HETSERVE_CLUSTER_SECRET`` environment variable."""
    if secret_file:
        path = Path(secret_file)
        if not path.is_file():
            raise HetserveError(f"--secret-file {secret_file}: not a regular file")
        if path.stat().st_size > 4096:
            raise HetserveError(f"--secret-file {secret_file}: more than 4096 bytes; a secret is one line")
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise HetserveError(f"--secret-file {secret_file}: {exc}") from None
        where = f"--secret-file {secret_file}"
    else:
        secret = os.environ.get(SECRET_ENV, "").strip()
        where = SECRET_ENV
        if not secret:
            raise HetserveError(
                f"workers on several machines share a secret: set {SECRET_ENV} (the same on every "
                "machine, e.g. the output of: python -c 'import secrets; print(secrets.token_hex(32))') "
                "or pass --secret-file"
            )
    if len(secret) < MIN_SECRET_CHARS:
        raise HetserveError(
            f"{where}: the secret has {len(secret)} characters; use at least {MIN_SECRET_CHARS}"
        )
    return secret


def _hmac(secret: str, *parts: object) -> str:
    msg = "|".join(str(p) for p in parts).encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


# ---- addresses -------------------------------------------------------------------------------------
def parse_address(address: str, what: str = "--rendezvous") -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise HetserveError(f"{what} {address!r}: expected HOST:PORT")
    if host in ("0.0.0.0", "::", "*"):
        raise HetserveError(
            f"{what} {address!r}: give the address the workers reach this machine at, not a wildcard "
            "(the rendezvous listens on that address only)"
        )
    return host, int(port)


def _ipv4(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError) as exc:
        raise HetserveError(f"cannot resolve {host!r}: {exc}") from None


def local_address_towards(host: str) -> str:
    """This machine's address on the route to ``host`` (loopback for a loopback host)."""
    ip = _ipv4(host)
    if ipaddress.ip_address(ip).is_loopback:
        return ip
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((ip, 9))  # no packet is sent: the kernel only picks the route
        return s.getsockname()[0]


# ---- the rendezvous --------------------------------------------------------------------------------
class Rendezvous:
    """The store (hosted by the driver), the session, and this process's proofs."""

    def __init__(self, store, session: str, secret: str, rank: int, bind: str):
        self.store, self.session, self.rank, self.bind = store, session, rank, bind
        self.address = ""  # HOST:PORT of the store, on the driver
        self._secret = secret
        self.command_key = hmac.new(secret.encode(), f"commands|{session}".encode(), hashlib.sha256).digest()

    def key(self, *parts: object) -> str:
        return "/".join(["hetserve", self.session, *map(str, parts)])

    @classmethod
    def host(cls, address: str, secret: str) -> Rendezvous:
        """The driver: bind ``address`` (port 0: any free port), host the store on it, publish a session."""
        host, port = parse_address(address)
        ip = _ipv4(host)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((ip, port))
        except OSError as exc:
            listener.close()
            raise HetserveError(f"the rendezvous cannot listen on {ip}:{port}: {exc.strerror}") from None
        listener.listen(128)
        port = listener.getsockname()[1]
        store = dist.TCPStore(
            ip, port, None, True, FORM_TIMEOUT, wait_for_workers=False, master_listen_fd=listener.fileno()
        )
        listener.detach()  # the store owns the listening socket now (and closes it)
        session = secrets.token_hex(16)
        store.set(
            "hetserve/hello", json.dumps({"session": session, "proof": _hmac(secret, "driver", session)})
        )
        rv = cls(store, session, secret, 0, ip)
        rv.address = f"{ip}:{port}"
        return rv

    @classmethod
    def join(cls, address: str, secret: str, rank: int, bind: str | None = None) -> Rendezvous:
        """A worker: reach the driver's store, check the driver holds the secret."""
        host, port = parse_address(address)
        bind = bind or local_address_towards(host)
        try:
            store = dist.TCPStore(_ipv4(host), port, None, False, JOIN_TIMEOUT)
            store.wait(["hetserve/hello"], JOIN_TIMEOUT)
            hello = json.loads(store.get("hetserve/hello"))
            store.set_timeout(FORM_TIMEOUT)  # gets while groups form
        except (RuntimeError, ValueError) as exc:
            raise HetserveError(f"no hetserve driver answered at {address}: {exc}") from None
        session = str(hello.get("session", ""))
        if not hmac.compare_digest(str(hello.get("proof", "")), _hmac(secret, "driver", session)):
            raise HetserveError(
                f"the driver at {address} does not hold this secret ({SECRET_ENV} or --secret-file "
                "must be the same on every machine)"
            )
        return cls(store, session, secret, rank, bind)

    # ---- workers announce themselves --------------------------------------------------------------
    def announce(self, stage: str, nonce: str = "") -> None:
        """``stage``: 'join' (first start: its layers are loaded) or 'rejoin' (a restarted worker)."""
        proof = _hmac(self._secret, stage, self.session, self.rank, nonce)
        self.store.set(self.key(stage, self.rank), json.dumps({"nonce": nonce, "proof": proof}))

    def has_announced(self, stage: str, rank: int) -> bool:
        return self.store.check([self.key(stage, rank)])

    def wait_announced(self, stage: str, rank: int, timeout: datetime.timedelta = JOIN_TIMEOUT) -> str:
        """Wait for ``rank``'s announcement and check it; its nonce."""
        key = self.key(stage, rank)
        self.store.wait([key], timeout)
        doc = json.loads(self.store.get(key))
        self.store.delete_key(key)
        nonce = str(doc.get("nonce", ""))
        if not hmac.compare_digest(
            str(doc.get("proof", "")), _hmac(self._secret, stage, self.session, rank, nonce)
        ):
            raise HetserveError(
                f"worker rank {rank} does not hold this server's secret ({SECRET_ENV} or --secret-file "
                "must be the same on every machine)"
            )
        return nonce

    def admit(self, rank: int, nonce: str, generation: int) -> None:
        """Tell a restarted worker which generation to form."""
        self.store.set(self.key("generation", rank, nonce), str(generation))

    def wait_admitted(self, nonce: str) -> int:
        key = self.key("generation", self.rank, nonce)
        self.store.wait([key], JOIN_TIMEOUT)
        return int(self.store.get(key))

    def close(self) -> None:
        self.store = None  # the driver's store stops listening when it is freed


# ---- groups ----------------------------------------------------------------------------------------
class Mesh:
    """This process's gloo groups of the current generation: the world and its tensor-parallel group."""

    def __init__(self, rendezvous: Rendezvous, world_size: int):
        self.rv, self.rank, self.world_size = rendezvous, rendezvous.rank, world_size
        self.generation = -1
        self.world = None
        self.tp = None
        self._device = dist.ProcessGroupGloo.create_device(hostname=rendezvous.bind)

    def _group(self, name: str, rank: int, size: int):
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = OP_TIMEOUT
        opts._devices = [self._device]
        store = dist.PrefixStore(self.rv.key("g", self.generation, name) + "/", self.rv.store)
        return dist.ProcessGroupGloo(store, rank, size, opts)

    def form(self, generation: int, tp_ranks: tuple[int, ...] = ()) -> None:
        """Form ``generation``'s world group (every rank must) and this rank's TP group (its ranks must)."""
        self.generation = generation
        self.world = self.tp = None
        self.world = self._group("world", self.rank, self.world_size)
        if len(tp_ranks) > 1:
            self.tp = self._group(f"tp-{min(tp_ranks)}", tp_ranks.index(self.rank), len(tp_ranks))
        barrier = torch.zeros(1)
        self.world.allreduce([barrier]).wait()  # every rank has its groups: none waits on a half-formed one

    def _live(self):
        world = self.world
        if world is None:
            raise RuntimeError(f"rank {self.rank} has no worker group (generation {self.generation})")
        return world

    def send(self, tensor: torch.Tensor, dst: int, tag: int):
        return self._live().send([tensor], dst, tag)

    def recv(self, tensor: torch.Tensor, src: int, tag: int):
        return self._live().recv([tensor], src, tag)

    def close(self) -> None:
        self.world = self.tp = None
