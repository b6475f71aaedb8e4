"""CurveZMQ key files for the publish and control sockets (``armscope keys``):
ZPL certificates, the format ``zmq.auth`` reads, so its tools and ours share
files. Apart from ``armscope.core.protocol`` (which re-exports these names) because
keys are about who may connect, not what the messages say."""
from __future__ import annotations

import re
from pathlib import Path

from armscope.core.errors import ArmscopeError

KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a plain file name: no path, no leading dot


def _zmq():
    import zmq

    return zmq



def _read_z85(path: Path, field: str) -> bytes | None:
    """Read ``public-key``/``secret-key`` from a ZPL certificate (the format
    ``zmq.auth`` uses, so its tools read our files and vice versa)."""
    if not path.is_file():
        raise ArmscopeError(f"{path}: no such CurveZMQ key file")
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith(field):
            _, _, value = line.partition("=")
            value = value.strip().strip('"')
            if len(value) != 40:
                raise ArmscopeError(f"{path}: {field} is not a 40-character Z85 key")
            return value.encode()
    return None


def load_keypair(path: str | Path) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from ``NAME.key`` or ``NAME.key_secret``."""
    path = Path(path)
    public = _read_z85(path, "public-key")
    if public is None:
        raise ArmscopeError(f"{path}: no public-key line (expected a ZPL certificate written by 'armscope keys')")
    return public, _read_z85(path, "secret-key")


def apply_curve_client(socket, server_public: str | Path, client_secret: str | Path) -> None:
    """Configure a client socket (SUB, REQ) for CurveZMQ: the server's public
    key file and this client's secret key file."""
    server_key, _ = load_keypair(server_public)
    public, secret = load_keypair(client_secret)
    if secret is None:
        raise ArmscopeError(f"{client_secret}: has no secret-key (pass the .key_secret file)")
    socket.curve_serverkey = server_key
    socket.curve_publickey = public
    socket.curve_secretkey = secret


def write_keypair(directory: str | Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Make a CurveZMQ keypair with ``zmq.curve_keypair`` and write
    ``NAME.key`` (public, give it to peers) and ``NAME.key_secret`` (mode 0600)."""
    zmq = _zmq()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public_path, secret_path):
        if path.exists() and not force:
            raise ArmscopeError(f"{path}: already exists (use --force to replace it)")
    public, secret = zmq.curve_keypair()
    banner = "#   ZeroMQ CURVE certificate written by 'armscope keys'\n"
    public_text = f"{banner}metadata\ncurve\n    public-key = \"{public.decode()}\"\n"
    secret_text = public_text + f"    secret-key = \"{secret.decode()}\"\n"
    public_path.write_text(public_text)
    secret_path.touch(mode=0o600)
    secret_path.chmod(0o600)
    secret_path.write_text(secret_text)
    return public_path, secret_path


def write_keypairs(directory: str | Path, names: list[str], force: bool = False) -> list[tuple[Path, Path]]:
    """One keypair per name (``write_keypair``), every name and file checked before any is
    written, so a bad second name leaves no half-made set behind."""
    directory = Path(directory)
    for name in names:
        if not KEY_NAME.fullmatch(name) or names.count(name) > 1:
            raise ArmscopeError(f"--names {name!r}: expected distinct plain names (letters, digits, _ . -), "
                                "each written as NAME.key and NAME.key_secret inside --out")
        for path in (directory / f"{name}.key", directory / f"{name}.key_secret"):
            if path.exists() and not force:
                raise ArmscopeError(f"{path}: already exists (use --force to replace it)")
    return [write_keypair(directory, name, force=force) for name in names]
