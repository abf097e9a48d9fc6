"""Every shipped model has a card that describes that very file, and the card's reproduce commands
are still valid command lines of today's CLI; the README names every command and only options that exist."""

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


def _subparsers(parser) -> dict:
    import argparse

    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def _doc_command_options(doc: str = "README.md") -> list[tuple[str, list[str], str]]:
    """``(span, command words, --options)`` of every inline ``covidct ...`` code span of ``doc``."""
    text = (Path(__file__).parents[1] / doc).read_text()
    found = []
    for span in re.findall(r"`(covidct [^`]+)`", text):
        words = span.split()[1:]
        found.append((span, words, re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", span)))
    return found


def test_readme_names_every_command_and_only_options_that_exist():
    """The README's (and RESULTS') commands and their options are what the CLI takes (a renamed option fails here)."""
    top = _subparsers(build_parser())
    spans = _doc_command_options()
    assert len(spans) > 30
    named = {tuple(words[:2]) if _subparsers(top.get(words[0])) else (words[0],) for _, words, _ in spans if words
             and words[0] in top}
    for name, sub in top.items():
        commands = [(name, s) for s in _subparsers(sub)] or [(name,)]
        missing = [" ".join(c) for c in commands if c not in named]
        assert not missing, f"commands the README never names: {missing}"
    # the commands written beside the measurements take only options that exist, too
    for span, words, options in spans + _doc_command_options("benchmarks/RESULTS.md"):
        if not words or words[0] not in top:
            continue
        parser = top[words[0]]
        if _subparsers(parser):
            parser = _subparsers(parser).get(words[1]) if len(words) > 1 else None
            if parser is None:
                continue
        known = {s for a in parser._actions for s in a.option_strings}
        unknown = [o for o in options if o not in known]
        assert not unknown, f"README `{span}`: no such option {unknown}"


def test_models_name_shipped_starts():
    """A checkpoint's ``starts`` name a shipped start file the way ``--model`` takes it (a fold member by its path
    below the weights folder), which resolves back to that very file on any machine, with its checksum."""
    from covidct.models.registry import model_references, resolve_model

    for spec in ("seg-effl0-unet", "cv5-ucsd/cls-effl0-ucsd-f0"):
        path = resolve_model(spec, task="seg")
        assert model_references(init=path, encoder_init=None) == {"init": {"name": spec, "sha256": file_sha256(path)}}
        assert resolve_model(spec, task="seg").resolve() == path.resolve()
