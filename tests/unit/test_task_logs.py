"""Task logs without services: the attempt log writer, log grants, and the events' new fields."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import msgspec
import pytest

from rexec.schemas import loggrant, messages
from rexec.schemas.signing import Signer, Verifier, generate_private_key
from rexec.worker.logstore import TAIL_BYTES, TAIL_LINES, AttemptLog, DirLogStore


class _Kept(io.BytesIO):
    def close(self) -> None:  # keep the bytes readable after the log closes its file
        pass


def make_log(max_bytes: int = 1 << 20, mask: object = None) -> tuple[AttemptLog, _Kept]:
    buffer = _Kept()
    return AttemptLog(
        lambda: buffer, "dir:p/t/1.log", max_bytes=max_bytes, mask=mask, clock=lambda: 0.5
    ), buffer  # type: ignore[arg-type]


def test_lines_are_prefixed_with_time_and_stream_and_partial_lines_wait() -> None:
    log, buffer = make_log()
    log.write("stdout", "one\ntw")
    log.write("stderr", "err\n")
    log.write("stdout", "o\nthree")
    log.close()
    assert buffer.getvalue().decode().splitlines() == [
        "1970-01-01T00:00:00.500Z stdout one",
        "1970-01-01T00:00:00.500Z stderr err",
        "1970-01-01T00:00:00.500Z stdout two",
        "1970-01-01T00:00:00.500Z stdout three",
    ]


def test_the_mask_applies_to_every_line_before_it_is_written_and_to_the_tail() -> None:
    log, buffer = make_log(mask=lambda line: line.replace("s3cret", "****"))
    log.write("stdout", "token=s3cret\n")
    log.note("failed: s3cret rejected")
    tail = log.close()
    assert b"s3cret" not in buffer.getvalue() and "s3cret" not in tail
    assert "token=****" in tail and "failed: **** rejected" in tail


def test_the_tail_is_the_last_lines_within_two_kib() -> None:
    log, _ = make_log()
    for i in range(100):
        log.write("stdout", f"line {i}\n")
    tail = log.close()
    assert tail.splitlines()[-1].endswith("line 99") and len(tail.splitlines()) == TAIL_LINES
    log, _ = make_log()
    log.write("stdout", ("x" * 500 + "\n") * 30)
    tail = log.close()
    assert len(tail.encode()) <= TAIL_BYTES and len(tail.splitlines()) == 3


def test_past_the_cap_lines_are_dropped_and_counted() -> None:
    log, buffer = make_log(max_bytes=200)
    for i in range(50):
        log.write("stdout", f"line {i}\n")
    tail = log.close()
    text = buffer.getvalue().decode()
    assert "line 0" in text and "line 49" not in text
    assert "log reached its limit of 200 bytes (REXEC_LOG_MAX_BYTES)" in text
    assert re.search(r"dropped \d+ lines \(\d+ bytes\) past the limit\n$", text)
    assert "line 49" in tail


def test_the_directory_store_refuses_paths_that_are_not_task_ids(tmp_path: object) -> None:
    from pathlib import Path

    store = DirLogStore(Path(str(tmp_path)), 1000, 60)
    with pytest.raises(ValueError):
        store.open("pool", "../../etc", 1, None)
    assert store.read("pool", "abc", 1, 0) is None
    log = store.open("pool", "abc", 2, None)
    assert store.is_open("pool", "abc", 2)
    log.write("stdout", "hi\n")
    log.close()
    assert not store.is_open("pool", "abc", 2)
    assert store.read("pool", "abc", 2, 0) == (Path(str(tmp_path)) / "pool/abc/2.log").read_bytes()
    assert store.prune(now=10**12) == 1 and store.read("pool", "abc", 2, 0) is None


def test_the_sweep_leaves_a_log_being_written_however_old(tmp_path: Path) -> None:
    """An attempt that runs longer than the retention still has its whole log."""
    store = DirLogStore(tmp_path, 1000, 60)
    log = store.open("pool", "long", 1, None)
    log.write("stdout", "started a week ago\n")
    os.utime(tmp_path / "pool/long/1.log", (0, 0))
    assert store.prune(now=10**12) == 0
    log.close()
    os.utime(tmp_path / "pool/long/1.log", (0, 0))
    assert store.prune(now=10**12) == 1


def test_a_grant_is_checked_for_signature_expiry_and_exactly_the_attempt() -> None:
    key = generate_private_key()
    verifier = Verifier([Signer(key).public_key])
    claims = loggrant.LogGrantClaims(task_id="t1", attempt=2, agent_id="a", expires_at=100.0)
    grant = loggrant.issue(Signer(key), claims)
    ok = {"task_id": "t1", "attempt": 2, "agent_id": "a"}
    assert loggrant.verify(verifier, grant, **ok, now=99.0) == claims  # type: ignore[arg-type]
    with pytest.raises(loggrant.GrantError, match="expired"):
        loggrant.verify(verifier, grant, **ok, now=100.0)  # type: ignore[arg-type]
    with pytest.raises(loggrant.GrantError, match="not task t1 attempt 1"):
        loggrant.verify(verifier, grant, task_id="t1", attempt=1, agent_id="a", now=0)
    with pytest.raises(loggrant.GrantError, match=r"on agent a, not .* on agent b"):
        loggrant.verify(verifier, grant, task_id="t1", attempt=2, agent_id="b", now=0)
    forged = loggrant.issue(Signer(generate_private_key()), claims)
    with pytest.raises(loggrant.GrantError, match="bad signature"):
        loggrant.verify(verifier, forged, **ok, now=0)  # type: ignore[arg-type]
    with pytest.raises(loggrant.GrantError, match="malformed"):
        loggrant.verify(verifier, "nonsense", **ok, now=0)  # type: ignore[arg-type]
    # A signature of the bare claims (what signing a message body would give) is not a grant.
    payload = grant.split(".")[0]
    raw = msgspec.json.encode(claims)
    with pytest.raises(loggrant.GrantError, match="bad signature"):
        loggrant.verify(verifier, f"{payload}.{Signer(key).sign(raw)}", **ok, now=0)  # type: ignore[arg-type]


def test_terminal_events_omit_empty_log_fields_and_old_events_still_decode() -> None:
    ids = {"task_id": "t", "attempt": 1, "agent_id": "a", "at": 1.0}
    plain = messages.encode(messages.EventBatch(events=[messages.Succeeded(**ids, result=3)]))
    assert b"log_tail" not in plain and b"log_ref" not in plain
    old = b'{"v":1,"events":[{"type":"failed","task_id":"t","attempt":1,"agent_id":"a","at":1.0,"error_type":"E","message":"m"}]}'
    [event] = messages.decode_events(old).events
    assert isinstance(event, messages.Failed) and (event.log_tail, event.log_ref) == ("", "")
    logged = messages.TimedOut(**ids, timeout=1.0, log_tail="x\n", log_ref="dir:p/t/1.log")
    [back] = messages.decode_events(messages.encode(messages.EventBatch(events=[logged]))).events
    assert back == logged


def test_object_storage_is_configured_clearly() -> None:
    from rexec.worker.logstore import LogStoreError, S3LogStore

    with pytest.raises(LogStoreError, match="s3://bucket/prefix"):
        S3LogStore("bucket-without-scheme", 1000)
    try:
        import boto3  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        with pytest.raises(LogStoreError, match=r"pip install 'rexec\[s3\]'"):
            S3LogStore("s3://logs/rexec", 1000)
    else:  # pragma: no cover - only where the extra is installed
        store = S3LogStore("s3://logs/rexec", 1000)
        assert store.ref("p", "t1", 2) == "s3://logs/rexec/p/t1/2.log"


def test_an_unwritable_default_log_dir_falls_back_to_the_temporary_directory(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pathlib import Path

    from rexec.schemas.settings import load_settings
    from rexec.worker.logstore import LogStoreError, open_store

    readonly = Path(str(tmp_path)) / "ro"
    readonly.mkdir()
    (readonly / "rexec-logs").write_text("a file where the directory would go")
    monkeypatch.chdir(readonly)
    monkeypatch.setattr("tempfile.tempdir", str(Path(str(tmp_path)) / "tmp"))
    store = open_store(load_settings({}))
    assert isinstance(store, DirLogStore)
    assert store.root == Path(str(tmp_path)) / "tmp" / "rexec-logs"
    with pytest.raises(LogStoreError, match="set REXEC_LOG_DIR to a writable directory"):
        open_store(load_settings({}, log_dir=str(readonly / "rexec-logs" / "x")))
