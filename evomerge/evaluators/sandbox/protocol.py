"""The plain-data protocol between the harness and the worker (how the verdict is protected: only data
crosses).

:data:`PROTOCOL_SOURCE` is program text, not code of this process: it is part of the harness program
(:mod:`evomerge.evaluators.sandbox.harness`), which runs inside the sandbox with ``python -I -S -c`` and
has ``sys`` imported. It defines the length-prefixed JSON messages on the harness/worker socket
(``_send``, ``_recv``), the codec of values that may cross (``_encode``, and ``_decode``, the strict
decoder the harness relies on), the protocol's exceptions (``_WorkerGone``, ``_Protocol``,
``ProgramError``) and small helpers shared by both processes (``_read_fd``, ``_text``, ``_flush``,
``_exit_status``).
"""

PROTOCOL_SOURCE = r'''
_MAX_MESSAGE = 16 * 1024 * 1024
_MAX_DEPTH = 200


class _WorkerGone(BaseException):
    """The worker closed the socket (it exited, crashed or was killed)."""


class _Protocol(BaseException):
    """The worker sent something that is not a well-formed message."""


class ProgramError(Exception):
    """An exception raised by the program's function whose type is not a builtin (or is one of _SILENT)."""


_SILENT = (StopIteration, StopAsyncIteration)


# --- plain-data codec (the supervisor decodes strictly; the worker's encoding is only a convenience) ---

def _encode(value, depth=0):
    if depth > _MAX_DEPTH:
        raise ValueError("the value is nested too deeply to pass across the sandbox")
    if value is None or type(value) is bool or type(value) is str:
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return ["i", format(int.__index__(value), "x")]
    if isinstance(value, float):
        return ["f", float.hex(value)]
    if isinstance(value, complex):
        return ["c", [float.hex(value.real), float.hex(value.imag)]]
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bytes):
        return ["b", bytes(value).hex()]
    if isinstance(value, bytearray):
        return ["ba", bytes(value).hex()]
    for kind, tag in ((list, "l"), (tuple, "t"), (set, "s"), (frozenset, "fs")):
        if isinstance(value, kind):
            return [tag, [_encode(item, depth + 1) for item in value]]
    if isinstance(value, dict):
        return ["d", [[_encode(k, depth + 1), _encode(v, depth + 1)] for k, v in value.items()]]
    raise TypeError(f"a {type(value).__name__} cannot be passed across the sandbox (only plain data)")


def _decode(data, depth=0):
    if depth > _MAX_DEPTH:
        raise _Protocol("value nested too deeply")
    kind = type(data)
    if data is None or kind is bool or kind is str:
        return data
    if kind is list and len(data) == 2 and type(data[0]) is str:
        tag, payload = data
        try:
            if tag == "i" and type(payload) is str:
                return int(payload, 16)
            if tag == "f" and type(payload) is str:
                return float.fromhex(payload)
            if tag == "c" and type(payload) is list and len(payload) == 2:
                if type(payload[0]) is str and type(payload[1]) is str:
                    return complex(float.fromhex(payload[0]), float.fromhex(payload[1]))
            if tag in ("b", "ba") and type(payload) is str:
                raw = bytes.fromhex(payload)
                return raw if tag == "b" else bytearray(raw)
            if type(payload) is list:
                if tag == "l":
                    return [_decode(item, depth + 1) for item in payload]
                if tag == "t":
                    return tuple(_decode(item, depth + 1) for item in payload)
                if tag == "s":
                    return {_decode(item, depth + 1) for item in payload}
                if tag == "fs":
                    return frozenset(_decode(item, depth + 1) for item in payload)
                if tag == "d":
                    result = {}
                    for pair in payload:
                        if type(pair) is not list or len(pair) != 2:
                            raise _Protocol("malformed dict item")
                        result[_decode(pair[0], depth + 1)] = _decode(pair[1], depth + 1)
                    return result
        except (ValueError, TypeError, OverflowError) as exc:
            raise _Protocol(f"malformed value: {exc}") from None
    raise _Protocol("malformed value")


def _send(sock, message):
    data = __import__("json").dumps(message, separators=(",", ":")).encode("ascii")
    if len(data) > _MAX_MESSAGE:
        raise ValueError("the value is too large to pass across the sandbox")
    sock.sendall(len(data).to_bytes(4, "big") + data)


def _recv_exact(sock, size):
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _recv(sock):
    header = _recv_exact(sock, 4)
    if header is None:
        return None
    size = int.from_bytes(header, "big")
    if size > _MAX_MESSAGE:
        raise _Protocol("message too large")
    body = _recv_exact(sock, size)
    if body is None:
        return None
    try:
        message = __import__("json").loads(body)
    except (ValueError, RecursionError):
        raise _Protocol("malformed message") from None
    if type(message) is not list or not message or type(message[0]) is not str:
        raise _Protocol("malformed message")
    return message


def _read_fd(fd):
    import os

    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _text(exc):
    try:
        return str(exc)[:2000]
    except Exception:
        return ""


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _exit_status(code):
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:
        pass
    return 1
'''
