"""Free disk space: the decision to defer mail, the cached reading, and intake's 452 over real SMTP."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import structlog
from conftest import converse, write_config

from guardrail.cli import main
from guardrail.committer import WAL_SIZE_LIMIT, Committer
from guardrail.storage import READ_EVERY, FreeSpace, storage_problem
from guardrail.store import Store
from guardrail.store_batch import StoreSettings

MIB = 1024**2
EHLO = b"EHLO client.test.example\r\n"


@pytest.mark.parametrize(
    ("free", "min_free", "declared", "problem"),
    [
        (100 * MIB, 64 * MIB, 0, None),
        (64 * MIB, 64 * MIB, 0, None),
        (63 * MIB, 64 * MIB, 0, "63.0 MiB free on the database's file system, less than 64.0 MiB (database.min_free_space)"),
        # The message is counted three times: WAL, database file, maildir file.
        (94 * MIB, 64 * MIB, 10 * MIB, None),
        (
            93 * MIB, 64 * MIB, 10 * MIB,
            "93.0 MiB free on the database's file system, less than 64.0 MiB (database.min_free_space)"
            " plus 3 times the declared size of 10.0 MiB",
        ),
        (0, 1, 0, "0.0 MiB free on the database's file system, less than 0.0 MiB (database.min_free_space)"),
    ],
)
def test_storage_problem(free: int, min_free: int, declared: int, problem: str | None) -> None:
    assert storage_problem(free, min_free, declared) == problem


def test_free_space_reading_is_cached() -> None:
    now = [0.0]
    readings = iter([5, 7])
    calls: list[Path] = []

    def read(folder: Path) -> int:
        calls.append(folder)
        return next(readings)

    space = FreeSpace(Path("/data"), read=read, monotonic=lambda: now[0])

    first = space.bytes()
    now[0] = READ_EVERY / 2
    cached = space.bytes()
    now[0] = READ_EVERY
    fresh = space.bytes()

    assert (first, cached, fresh) == (5, 5, 7)
    assert calls == [Path("/data"), Path("/data")]


def test_free_space_of_missing_folder_is_none(tmp_path: Path) -> None:
    assert FreeSpace(tmp_path / "missing").bytes() is None
    assert (FreeSpace(tmp_path).bytes() or 0) > 0


async def test_mail_gets_452_while_disk_is_low(tmp_path: Path, start_daemon) -> None:
    # More free space than any file system has: the disk counts as full.
    daemon = await start_daemon(write_config(tmp_path, sections={"database": {"min_free_space": "100000000GiB"}}))

    with structlog.testing.capture_logs() as logs:
        first = await converse(daemon.port, EHLO + b"MAIL FROM:<alice@example.com>\r\nQUIT\r\n")
        second = await converse(daemon.port, EHLO + b"MAIL FROM:<bob@example.com>\r\nQUIT\r\n")

    assert first[-2] == "452 4.3.1 Insufficient system storage, try again later"
    assert second[-2] == "452 4.3.1 Insufficient system storage, try again later"
    # One error line when the disk runs low, not one per client.
    assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == ["storage_low"]


async def test_declared_size_must_fit_on_disk(tmp_path: Path, start_daemon) -> None:
    free = shutil.disk_usage(tmp_path).free
    if free < 400 * MIB:
        pytest.fail(f"the test needs 400 MiB free in {tmp_path}; {free // MIB} MiB are")
    # 200 MiB of room above the minimum, with a margin for other writers on the disk:
    # 100 MiB announced needs 300 MiB, 10 MiB needs 30 MiB.
    minimum = (free - 200 * MIB) // MIB
    config = write_config(
        tmp_path, smtp={"max_message_size": "200MiB"}, sections={"database": {"min_free_space": f"{minimum}MiB"}}
    )
    daemon = await start_daemon(config)

    large = await converse(daemon.port, EHLO + f"MAIL FROM:<alice@example.com> SIZE={100 * MIB}\r\nQUIT\r\n".encode())
    small = await converse(daemon.port, EHLO + f"MAIL FROM:<alice@example.com> SIZE={10 * MIB}\r\nQUIT\r\n".encode())

    assert large[-2] == "452 4.3.1 Insufficient system storage, try again later"
    assert small[-2].startswith("250 ")


def test_failed_reading_is_cached() -> None:
    now = [0.0]
    calls: list[Path] = []

    def read(folder: Path) -> int:
        calls.append(folder)
        raise OSError("no such file system")

    space = FreeSpace(Path("/gone"), read=read, monotonic=lambda: now[0])

    first = space.bytes()
    second = space.bytes()
    now[0] = READ_EVERY
    third = space.bytes()

    assert (first, second, third) == (None, None, None)
    assert len(calls) == 2


async def test_wal_shrinks_after_large_transaction(tmp_path: Path) -> None:
    # The daemon's writer connection carries journal_size_limit, so one large
    # message does not leave its size in the WAL file for good.
    store = await Store.open(tmp_path / "guardrail.db", StoreSettings())
    await store.close()
    committer = Committer(tmp_path / "guardrail.db", StoreSettings())
    wal = tmp_path / "guardrail.db-wal"
    try:
        committer.db.execute("CREATE TABLE blobs (data BLOB)")
        committer.db.execute("INSERT INTO blobs VALUES (zeroblob(?))", (WAL_SIZE_LIMIT * 2,))
        assert wal.stat().st_size > WAL_SIZE_LIMIT * 2
        committer.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        # The next write starts the WAL again from its beginning and cuts the file back.
        committer.db.execute("INSERT INTO blobs VALUES (1)")
        assert wal.stat().st_size <= WAL_SIZE_LIMIT
    finally:
        committer.close()


def test_check_warns_of_small_free_space(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, smtp={"max_message_size": "50MiB"}, sections={"database": {"min_free_space": "100MiB"}})
    main(["check", "--config", str(config)])
    output = capsys.readouterr().err
    assert (
        "database.min_free_space: 100 MiB is less than three times smtp.max_message_size (50 MiB),"
        ' so a message sent without SIZE can fill the disk; set it to at least "150MiB"'
    ) in output


def test_check_accepts_default_free_space(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["check", "--config", str(write_config(tmp_path))])
    assert "min_free_space" not in capsys.readouterr().err


def test_check_warns_low_free_space(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The daemon starts on such a disk and replies 452 to every MAIL, so check must warn.
    database = tmp_path / "not yet" / "made" / "guardrail.db"
    config = write_config(tmp_path, sections={"database": {"path": str(database), "min_free_space": "100000000GiB"}})
    main(["check", "--config", str(config)])
    lines = capsys.readouterr().err.splitlines()
    warnings = [line for line in lines if "so the daemon would answer 452 4.3.1 to every MAIL" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"warning: {config}: database.min_free_space: ")
    assert "MiB free on the database's file system, less than 102400000000.0 MiB (database.min_free_space)" in warnings[0]
    assert not database.parent.exists()
