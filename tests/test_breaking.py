"""The breaking gate: `buf breaking` against the published contract (protos/baseline.binpb) catches a removed and a
renumbered field, lets an additive change through, and `make breaking` fails a multi-commit submission whose break
is in any of its commits, or that re-publishes the baseline to hide one."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / "node_modules" / ".bin" / "buf"
PROTO = Path("protos/tokenwire/v1/generation.proto")
BASELINE = ROOT / "protos" / "baseline.binpb"

pytestmark = pytest.mark.timeout(120)


def contract_copy(tmp_path: Path) -> Path:
    """buf.yaml and protos/ in a directory of their own, to mutate."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos" / "tokenwire", tmp_path / "protos" / "tokenwire")
    return tmp_path


def mutate(root: Path, old: str, new: str) -> None:
    path = root / PROTO
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def breaking(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BUF, "breaking", "--against", BASELINE], cwd=root, capture_output=True, text=True, timeout=60, check=False
    )


REMOVE_SEED = ("  optional int64 seed = 7;\n", "")
RENUMBER_REQUEST_ID = ("  string request_id = 11;", "  string request_id = 21;")
# A field numbered far from any in use, so the test holds however the request grows.
ADD_FIELD = (
    "message GenerateRequest {\n",
    "message GenerateRequest {\n  // Optional. A new field.\n  string note_for_the_gate_test = 9999;\n\n",
)


def test_the_contract_as_committed_passes(tmp_path: Path) -> None:
    out = breaking(contract_copy(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_removed_field_fails(tmp_path: Path) -> None:
    root = contract_copy(tmp_path)
    mutate(root, *REMOVE_SEED)
    out = breaking(root)
    assert out.returncode != 0
    assert 'Previously present field "7" with name "seed" on message "GenerateRequest" was deleted' in out.stdout


def test_a_renumbered_field_fails(tmp_path: Path) -> None:
    root = contract_copy(tmp_path)
    mutate(root, *RENUMBER_REQUEST_ID)
    out = breaking(root)
    assert out.returncode != 0
    assert 'Previously present field "11" with name "request_id" on message "GenerateRequest"' in out.stdout


def test_an_added_field_passes(tmp_path: Path) -> None:
    root = contract_copy(tmp_path)
    mutate(root, *ADD_FIELD)
    out = breaking(root)
    assert out.returncode == 0, out.stdout


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout


def commit(repo: Path, message: str) -> str:
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qam", message)
    return git(repo, "rev-parse", "HEAD").strip()


def make_breaking(repo: Path) -> subprocess.CompletedProcess[str]:
    # The clone has no node_modules: the project's buf, and its npm stamp taken as made.
    return subprocess.run(
        ["make", "--no-print-directory", "-o", "node_modules/.installed", "breaking", f"BUF={BUF}"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A clone of this repository's history with the working tree's contract, Makefile and baseline committed."""
    repo = tmp_path / "repo"
    git(tmp_path, "clone", "--quiet", "--no-checkout", str(ROOT), str(repo))
    git(repo, "checkout", "--quiet", "HEAD")
    for path in ("Makefile", "buf.yaml", "protos/baseline.binpb", str(PROTO)):
        shutil.copy(ROOT / path, repo / path)
    git(repo, "add", "-A")
    if git(repo, "status", "--porcelain").strip():
        commit(repo, "the working tree's gate and contract")
    assert make_breaking(repo).returncode == 0
    return repo


def test_a_break_in_the_first_commit_of_two_fails(repo: Path) -> None:
    mutate(repo, *REMOVE_SEED)
    mutate(repo, "  // Optional. A seed for providers", "  reserved 7;\n  // Optional. A seed for providers")
    commit(repo, "remove seed (reserved)")
    mutate(repo, "// GenerationService streams", "// GenerationService (reworded) streams")
    commit(repo, "an innocent comment")
    # The old gate, HEAD~1 only, saw a comment change; this one compares the tip with what was published.
    out = make_breaking(repo)
    assert out.returncode != 0
    assert 'field "7" with name "seed" on message "GenerateRequest" was deleted' in out.stdout, out.stdout


def test_a_break_undone_later_still_fails_at_its_commit(repo: Path) -> None:
    mutate(repo, *RENUMBER_REQUEST_ID)
    first = commit(repo, "renumber request_id")
    mutate(repo, RENUMBER_REQUEST_ID[1], RENUMBER_REQUEST_ID[0])
    commit(repo, "put it back")
    out = make_breaking(repo)
    assert out.returncode != 0 and f"commit {first} breaks the published contract" in out.stdout, out.stdout


def test_re_publishing_the_baseline_to_hide_a_break_fails(repo: Path) -> None:
    mutate(repo, *REMOVE_SEED)
    commit(repo, "remove seed")
    subprocess.run(
        [BUF, "build", "--exclude-source-info", "-o", "protos/baseline.binpb"], cwd=repo, check=True, timeout=60
    )
    commit(repo, "publish it")
    out = make_breaking(repo)
    assert out.returncode != 0
    assert re.search(r"baseline.binpb breaks the one published before it", out.stdout), out.stdout
