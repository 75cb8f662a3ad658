"""The peer watchdog: dead, stopped and stalled processes end the whole job in seconds (system
code; started by `jcdm.runtime.distributed.initialize`).

Every process holds one plain TCP connection to process 0 (process 0 listens on an ephemeral port
published in the coordination service's key-value store). Newline-terminated messages:

- `<index>`: a connecting process introduces itself.
- `beat <index> <step>`: every `StallConfig.heartbeat_s`, from each process to process 0 and from
  process 0 to each process, sent by this module's thread, so it keeps beating while the main
  thread waits on a device or hangs in Python.
- `dead <index>`: process 0 tells the others which peer's connection closed.
- `stalled <index> <why>`: a process that found itself stalled (`jcdm.runtime.stall`), or process
  0 about a peer that fell silent; process 0 relays what it receives to everyone else.

What ends the job, with a message naming the process at fault, and exit 1 (FAILURE, retried):
- Death (crash, SIGKILL, OOM kill): the OS closes the dead process's sockets at once and the other
  end reads EOF within milliseconds, whatever the process was doing.
- Silence (SIGSTOP, a frozen VM, a cut network): no message for `StallConfig.peer_silence_s`.
  The survivors write their own stacks (where they wait) to their logs. A watcher that itself
  woke late (an overloaded host) restarts its clocks instead of blaming its peers.
- A stall reported by the process itself (`jcdm.runtime.stall`).
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time

from jcdm.runtime import stall

log = logging.getLogger(__name__)

WATCHDOG_KEY = "jcdm/peer_watchdog_port"


class PeerWatchdog:
    def __init__(self, me: int, grace: float, cfg: stall.StallConfig):
        self.me, self.grace, self.cfg = me, grace, cfg
        self.stopping = threading.Event()  # set by a normal end: closed connections are fine
        self.sockets: list[socket.socket] = []  # kept open until the process exits
        self._sel = selectors.DefaultSelector()
        self._peers: dict[socket.socket, int] = {}  # introduced connections -> peer index
        self._pending: dict[socket.socket, bytes] = {}  # process 0: not yet introduced
        self._buffers: dict[socket.socket, bytes] = {}
        self._heard: dict[int, float] = {}  # peer -> last time anything arrived from it
        self._send_lock = threading.Lock()
        self.max_gap_s = 0.0  # the longest silence seen from any peer (reported at the end)

    # --- connecting ------------------------------------------------------------------------

    def connect(self, client, coordinator_host: str, timeout_s: int) -> bool:
        """Listen (process 0) or connect to process 0; False if the watchdog cannot run."""
        if self.me == 0:
            port = 0  # published as 0 when there is no watchdog, so the others do not wait
            try:
                if socket.has_dualstack_ipv6():
                    server = socket.create_server(
                        ("", 0), family=socket.AF_INET6, dualstack_ipv6=True
                    )
                else:
                    server = socket.create_server(("", 0))
                port = server.getsockname()[1]
                self.sockets.append(server)
                self._sel.register(server, selectors.EVENT_READ, "accept")
            except OSError as e:
                log.warning("peer watchdog: cannot listen (%s); relying on JAX's heartbeat", e)
            client.key_value_set(WATCHDOG_KEY, str(port))
            return bool(port)
        port = int(client.blocking_key_value_get(WATCHDOG_KEY, timeout_s * 1000))
        if not port:
            return False
        try:
            # Process 0 listens before it publishes the port: a healthy network connects in
            # milliseconds, and a firewall that drops packets should not hold up the start.
            conn = socket.create_connection((coordinator_host, port), timeout=10)
        except OSError as e:
            log.warning(
                "peer watchdog: cannot reach process 0 at %s:%d (%s); a dead peer will only be "
                "noticed after JAX's heartbeat timeout",
                coordinator_host,
                port,
                e,
            )
            return False
        conn.settimeout(10)  # a send never blocks the watchdog for long
        conn.sendall(f"{self.me}\n".encode())
        self.sockets.append(conn)
        self._peers[conn] = 0
        self._heard[0] = time.monotonic()
        self._sel.register(conn, selectors.EVENT_READ, "peer")
        return True

    def start(self) -> None:
        threading.Thread(target=self._run, name="jcdm-peer-watchdog", daemon=True).start()

    # --- sending ---------------------------------------------------------------------------

    def _send(self, line: str, exclude: int | None = None) -> None:
        data = (line.replace("\n", " ") + "\n").encode()
        with self._send_lock:
            for sock, peer in list(self._peers.items()):
                if peer == exclude:
                    continue
                try:
                    sock.sendall(data)
                except OSError:
                    pass  # its EOF (or silence) is reported by the watch loop

    def announce_stall(self, why: str) -> None:
        """Tell the peers that this process is stalled (process 0 forwards it to the others)."""
        self._send(f"stalled {self.me} {why}")

    # --- watching --------------------------------------------------------------------------

    def _run(self) -> None:
        beat_every = self.cfg.heartbeat_s if self.cfg.enabled else None
        next_beat = time.monotonic()
        last_loop = time.monotonic()
        while True:
            timeout = None if beat_every is None else max(0.0, next_beat - time.monotonic())
            for key, _ in self._sel.select(timeout):
                if key.data == "accept":
                    conn, _addr = key.fileobj.accept()
                    conn.settimeout(10)
                    self.sockets.append(conn)
                    self._pending[conn] = b""
                    self._sel.register(conn, selectors.EVENT_READ, "hello")
                else:
                    self._read(key.fileobj, key.data)
            now = time.monotonic()
            if beat_every is None:
                continue
            if now - last_loop > self.cfg.peer_silence_s / 2:  # we were starved, not the peers
                self._heard = dict.fromkeys(self._heard, now)
            last_loop = now
            if now >= next_beat:
                self._send(f"beat {self.me} {stall.progress.step}")
                next_beat = now + beat_every
            for peer, heard in list(self._heard.items()):
                self.max_gap_s = max(self.max_gap_s, now - heard)
                if now - heard > self.cfg.peer_silence_s:
                    return self._on_silent(peer, now - heard)

    def _read(self, sock: socket.socket, kind: str) -> None:
        try:
            data = sock.recv(4096)
        except OSError:
            data = b""
        if kind == "hello":
            if not data:
                self._sel.unregister(sock)
                self._pending.pop(sock, None)
                return
            self._pending[sock] += data
            if b"\n" not in self._pending[sock]:
                return
            hello, rest = self._pending.pop(sock).split(b"\n", 1)
            if not hello.isdigit():  # not one of ours (a port scan): ignore it
                self._sel.unregister(sock)
                return
            peer = int(hello)
            with self._send_lock:
                self._peers[sock] = peer
            self._heard[peer] = time.monotonic()
            self._sel.modify(sock, selectors.EVENT_READ, "peer")
            data = rest
            if not data:
                return
        peer = self._peers.get(sock)
        if peer is None:
            return
        if not data:  # EOF: the process at the other end is gone
            self._sel.unregister(sock)
            with self._send_lock:
                self._peers.pop(sock, None)
            self._heard.pop(peer, None)
            return self._on_lost(peer)
        self._heard[peer] = time.monotonic()
        buf = self._buffers.get(sock, b"") + data
        *lines, self._buffers[sock] = buf.split(b"\n")
        for line in lines:
            self._on_message(peer, line.decode(errors="replace"))

    def _on_message(self, sender: int, line: str) -> None:
        words = line.split(" ", 2)
        if words[0] == "dead" and self.me != 0:
            self._on_lost(int(words[1]))
        elif words[0] == "stalled":
            about, why = int(words[1]), words[2] if len(words) > 2 else ""
            if self.me == 0:
                self._send(line, exclude=sender)
            self._finish(f"process {about} stalled ({why})", about)

    # --- ending the job --------------------------------------------------------------------

    def _on_lost(self, peer: int) -> None:
        if self.me == 0:  # tell the others who died, so their message names the right process
            self._send(f"dead {peer}")
        self._finish(f"process {peer} exited or was killed", peer)

    def _on_silent(self, peer: int, silent_s: float) -> None:
        what = (
            f"process {peer} stopped responding: no heartbeat for {silent_s:.1f}s "
            f"(limit {self.cfg.peer_silence_s:g}s; the process is stopped, frozen or cut off)"
        )
        if self.me == 0:
            self._send(f"stalled {peer} no heartbeat for {silent_s:.1f}s (stopped or frozen)")
        if not self.stopping.is_set():
            stall.dump_stacks(f"waiting for process {peer}, which stopped responding")
        self._finish(what, peer)

    def _finish(self, what: str, peer: int) -> None:
        if self.stopping.is_set():
            return
        # Said at once: the main thread may die first of the same cause (gloo reports a closed
        # connection as an error in the running collective) and its traceback alone is vague.
        log.error("process %d: %s; this job cannot continue", self.me, what)
        time.sleep(self.grace)  # a process already exiting with its own code keeps that code
        if not self.stopping.is_set():
            stall.die(f"process {self.me}: {what}")


_active: PeerWatchdog | None = None


def active() -> PeerWatchdog | None:
    return _active


def start(client, coordinator_host: str, *, grace: float, timeout_s: int, me: int) -> None:
    """Connect and start watching; a process that cannot connect runs on without a watchdog."""
    global _active
    watchdog = PeerWatchdog(me, grace, stall.StallConfig())
    if watchdog.connect(client, coordinator_host, timeout_s):
        watchdog.start()
        _active = watchdog


def announce_stall(why: str) -> None:
    if _active is not None:
        _active.announce_stall(why)


def stopping() -> None:
    """A normal end has begun: closed connections and silence are no longer failures."""
    if _active is not None:
        _active.stopping.set()
