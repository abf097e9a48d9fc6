"""Every shipped model has a card that describes that very file, and the card's reproduce commands
are still valid command lines of today's CLI."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from covidct.cli import build_parser
from covidct.models.checkpoint import file_sha256
from covidct.models.registry import shipped_files

SHIPPED = shipped_files()

# the card's bash blocks run with every program but bash's own words replaced: `covidct` prints its
# arguments (NUL-separated, one record per call) and everything else does nothing
_STUBS = """
covidct() { printf '%s\\0' "$@"; printf '\\n\\0'; }
python() { :; }
git() { :; }
"""


def _bash_blocks(card: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", card, flags=re.S | re.M)


def _covidct_calls(block: str, workdir: Path) -> list[list[str]]:
    """The argument lists of the ``covidct`` calls of one bash block, variables and loops expanded."""
    out = subprocess.run(["bash", "-c", _STUBS + block], cwd=workdir, capture_output=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "COVIDCT_DATA": "/data"}).stdout.decode()
    calls, current = [], []
    for word in out.split("\0")[:-1]:
        if word == "\n":
            calls.append(current)
            current = []
        else:
            current.append(word)
    return calls


def test_every_shipped_model_is_listed_with_a_card():
    assert SHIPPED, "no shipped models found"
    missing = [p.name for p in SHIPPED if not p.with_suffix(".md").exists()]
    assert not missing, f"shipped models without a model card: {missing}"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_model_card_names_the_shipped_file_by_checksum(path: Path):
    card = path.with_suffix(".md").read_text()
    assert card.startswith(f"# {path.stem}\n")
    assert "not for diagnosis" in card
    assert f"sha256 `{file_sha256(path)}`" in card, \
        f"{path.with_suffix('.md').name} describes another file: regenerate it with scripts/model_card.py"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_model_card_commands_parse_with_the_current_cli(path: Path, tmp_path: Path):
    blocks = _bash_blocks(path.with_suffix(".md").read_text())
    assert blocks, "the card has no reproduce command"
    calls = [c for b in blocks for c in _covidct_calls(b, tmp_path)]
    assert any(c[:1] in (["train"], ["ensemble"], ["attach"]) for c in calls), calls
    parser = build_parser()
    for argv in calls:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{path.with_suffix('.md').name}: not a valid command today: covidct {' '.join(argv)}")


def test_card_command_extraction_expands_variables_and_loops(tmp_path: Path):
    block = ('D=$COVIDCT_DATA/x; E="--labels masks4 --epochs 2"\n'
             "for k in 0 1; do\n  covidct train seg --data $D $E --fold $k -o f$k.pt   # a comment\ndone\n"
             "python benchmarks/x.py \\\n    --data $D\n")
    assert _covidct_calls(block, tmp_path) == [
        ["train", "seg", "--data", "/data/x", "--labels", "masks4", "--epochs", "2", "--fold", str(k), "-o", f"f{k}.pt"]
        for k in (0, 1)]
