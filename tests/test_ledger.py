"""The ledger's journal of written files: what a killed chunk wrote is known by its bytes."""

from __future__ import annotations

import hashlib
import json

import pytest

from synthmed.ledger import ForeignFileError, Ledger

A, B = "images/train/case-0000001.png", "images/train/case-0000002.png"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def ledger(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    ledger = Ledger(root, root / ".synthmed")
    ledger.claim("chunk-000000", [A, B])
    return ledger


def write(ledger: Ledger, rel: str, data: bytes) -> None:
    path = ledger.root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    ledger.note_written("chunk-000000", rel, sha(data))


def test_a_noted_file_is_known_by_its_bytes_before_the_claim_records_it(ledger):
    write(ledger, A, b"ours")
    assert ledger.read("chunk-000000")["files"] == {A: sha(b"ours"), B: None}
    assert ledger.known_digests()[A] == {sha(b"ours")}
    (ledger.root / A).write_bytes(b"the user's edit")  # after a kill: theirs now
    with pytest.raises(ForeignFileError, match="changed since synthmed wrote it"):
        ledger.claim("chunk-000000", [A])
    assert (ledger.root / A).read_bytes() == b"the user's edit"
    assert ledger.remove_owned().changed == [A] and (ledger.root / A).exists()


def test_the_last_line_of_a_file_written_twice_wins(ledger):
    write(ledger, A, b"first")
    write(ledger, A, b"second")
    assert ledger.read("chunk-000000")["files"][A] == sha(b"second")
    ledger.claim("chunk-000000", [B])  # an unchanged file is not refused
    assert ledger.read("chunk-000000")["files"][A] == sha(b"second")  # merged into the claim, journal gone
    assert not (ledger.dir / "chunk-000000.written").exists()


def test_lines_naming_other_files_or_cut_short_are_ignored(ledger):
    write(ledger, A, b"ours")
    journal = ledger.dir / "chunk-000000.written"
    with open(journal, "ab") as fh:
        fh.write((json.dumps(["manifest.csv", sha(b"x")]) + "\n").encode())  # not in this claim
        fh.write(b'["images/train/case-0000002.png", "ab')  # a kill mid-line
    assert ledger.read("chunk-000000")["files"] == {A: sha(b"ours"), B: None}


def test_a_second_kill_before_a_file_is_rewritten_still_knows_it(ledger):
    """Re-trial: a resume re-claims the chunk and is killed before it rewrites a file the first run wrote; the
    file kept its 'maybe written' null, so a user's edit after that was overwritten. An unchanged file of ours keeps
    its sha256 through the re-claim; a file not there, or rewritten with other bytes, takes the new note."""
    write(ledger, A, b"ours")
    ledger.claim("chunk-000000", [A, B], keep_recorded=True)  # the resume's claim: A is not rewritten yet (killed)
    assert ledger.read("chunk-000000")["files"] == {A: sha(b"ours"), B: None}
    (ledger.root / A).write_bytes(b"the user's edit")
    with pytest.raises(ForeignFileError, match="changed since synthmed wrote it"):
        ledger.claim("chunk-000000", [A, B], keep_recorded=True)
    (ledger.root / A).write_bytes(b"ours")
    ledger.claim("chunk-000000", [A, B], keep_recorded=True)
    write(ledger, A, b"other bytes")  # rewritten: the journal is newer than the claim
    assert ledger.read("chunk-000000")["files"][A] == sha(b"other bytes")


def test_other_writers_mark_a_reclaimed_file_maybe_written(ledger):
    """A writer that does not note each file (qc's report, a run's manifest) may rewrite it with other bytes; killed
    before recording them, that file must not read as a user's edit: its claim says "maybe written"."""
    write(ledger, A, b"ours")
    ledger.claim("chunk-000000", [A])
    assert ledger.read("chunk-000000")["files"][A] is None


def test_the_journal_is_no_claim_and_goes_with_its_claim(ledger):
    write(ledger, A, b"ours")
    assert ledger.keys() == ["chunk-000000"] and ledger.other_kind("dataset") is None
    ledger.forget("chunk-000000")
    assert list(ledger.dir.iterdir()) == []


def test_a_link_at_the_journal_name_is_not_written_through(ledger, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep", encoding="utf-8")
    (ledger.dir / "chunk-000000.written").symlink_to(victim)
    with pytest.raises(OSError) as info:
        ledger.note_written("chunk-000000", A, sha(b"ours"))
    assert info.value.filename.endswith("chunk-000000.written")
    assert victim.read_text(encoding="utf-8") == "keep"
    assert ledger.read("chunk-000000")["files"][A] is None  # nor read through
