"""Sign-in for the technician's screen: a password hash on the device, sessions, and a rate limit.

The password is stored as a salted scrypt hash (Python's ``hashlib.scrypt``: no extra package) in
the configuration folder, readable by its owner only, never in the repository or a log. A signed-in
browser holds a random session token in an HttpOnly, SameSite=Strict cookie; every state change
also carries a per-session CSRF token. Failed sign-ins are limited per client address.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
import time
from pathlib import Path

from bmc.errors import BmcError

PASSWORD_FILE = "ui_password"
# scrypt parameters: ~50 ms and 16 MB on a Raspberry Pi 4 class CPU; stored with the hash
N, R, P = 2**14, 8, 1
MIN_LENGTH = 10


class AuthError(BmcError, ValueError):
    pass


def hash_password(password: str) -> str:
    if len(password) < MIN_LENGTH:
        raise AuthError(f"the password must have at least {MIN_LENGTH} characters")
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=32)
    return "scrypt${}${}${}${}${}".format(N, R, P, base64.b64encode(salt).decode(), base64.b64encode(digest).decode())


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.strip().split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(base64.b64decode(digest)),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def set_password(config_dir: str | Path, password: str) -> Path:
    """Write the hash to ``config_dir/ui_password`` (mode 0600, replaced atomically)."""
    config_dir = Path(config_dir)
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / PASSWORD_FILE
    hashed = hash_password(password)  # a refused password leaves nothing behind
    tmp = config_dir / f".{PASSWORD_FILE}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(hashed + "\n")
    os.replace(tmp, path)
    return path


def stored_hash(config_dir: str | Path) -> str | None:
    path = Path(config_dir) / PASSWORD_FILE
    return path.read_text().strip() if path.is_file() else None


class Sessions:
    """Signed-in browsers: token → (user, CSRF token, expiry). In memory: a restart signs everyone out."""

    def __init__(self, lifetime_s: float = 12 * 3600, most: int = 1000):
        self.lifetime, self.most = lifetime_s, most
        self._lock = threading.Lock()
        self._by_token: dict[str, tuple[str, str, float]] = {}

    def create(self, user: str) -> str:
        """A new session; the expired ones go, and past ``most`` live ones the oldest do (a client
        that never sends its cookie back makes one per request)."""
        token = secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            for t in [t for t, item in self._by_token.items() if item[2] < now]:
                del self._by_token[t]
            while len(self._by_token) >= self.most:
                # the least recently used first (get() moves a session to the end): a client that never
                # sends its cookie back does not sign out the technician at work
                del self._by_token[next(iter(self._by_token))]
            self._by_token[token] = (user, secrets.token_urlsafe(32), now + self.lifetime)
        return token

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_token)

    def get(self, token: str | None) -> tuple[str, str] | None:
        """(user, csrf token) of a live session."""
        if not token:
            return None
        with self._lock:
            item = self._by_token.get(token)
            if item is None:
                return None
            if item[2] < time.time():
                del self._by_token[token]
                return None
            self._by_token[token] = self._by_token.pop(token)  # now the most recently used
            return item[0], item[1]

    def end(self, token: str | None) -> None:
        with self._lock:
            self._by_token.pop(token or "", None)


class RateLimit:
    """At most ``attempts`` failed sign-ins per client address in ``window_s``."""

    def __init__(self, attempts: int = 5, window_s: float = 300):
        self.attempts, self.window = attempts, window_s
        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}

    def attempt(self, client: str) -> float | None:
        """An attempt reserved (counted as failed until :meth:`succeeded` says otherwise), or None
        where the client has failed ``attempts`` times in the window: checked and counted in one
        step, so that many sign-ins at once are not all let through to the password check."""
        now = time.time()
        with self._lock:
            recent = [t for t in self._failures.get(client, []) if now - t < self.window]
            if len(recent) >= self.attempts:
                self._failures[client] = recent
                return None
            self._failures[client] = [*recent, now]
            return now

    def succeeded(self, client: str, attempt: float) -> None:
        with self._lock:
            mine = self._failures.get(client, [])
            if attempt in mine:
                mine.remove(attempt)
